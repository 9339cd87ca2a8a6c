"""Report section of the CNN stages (`dsfr`, `deep`): per model the training plan, the
federated validation per round (pooled and per site, with a figure), the chosen round, the
out-of-fold AUC, bytes on the wire and time; the federated-vs-pooled comparison; under
`dp=…` the mode, C, σ and ε per site and overall."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from server.report.auc import agreed, notes_paragraph
from server.report.html import escape as _e
from server.report.html import table as _table


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


def training_sections(results: dict[str, Any], out: Path) -> str:
    models: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    dsfr = results.get("dsfr") or {}
    if "training" in dsfr:
        models["dsfr"] = (dsfr["training"], dsfr.get("auc", {}))
        if "pooled" in dsfr:
            models["dsfr_pooled"] = (dsfr["pooled"]["training"], dsfr["pooled"].get("auc", {}))
    for name, model in (results.get("deep") or {}).get("models", {}).items():
        models[name] = (model, model.get("auc", {}))
    if not models:
        return ""
    parts = ["<h2>CNN training (DSFR U-Net, DL-MRI ResNet18-3D, DL-US ConvNeXt V2)</h2>"]
    rows, notes = [], []
    for name, (model, auc) in models.items():
        plan = model["plan"]
        shown, note = agreed(results, name, "train_oof", auc.get("train_oof") or {},
                             f"{name}, training sites out-of-fold")
        notes.append(note)
        wire = model.get("wire", {})
        rows.append([
            _e(name), _e(model["mode"]),
            _e(plan["strategy"] + (" + FedBN" if plan["fedbn"] else "")),
            _e(_local_work(plan)), _e(plan["width"]),
            _e(f"{model['network']['parameters']:,}"), _e(model["chosen_round"]),
            _f(shown.get("auc")),
            _e(f"{wire['mean_up'] / 2**20:.2f} MiB {wire['dtype']}") if wire.get("mean_up")
            else "—", _f(model["seconds"], 1)])
    parts.append(_table(["model", "mode", "strategy", "rounds × local work", "width",
                         "parameters",
                         "chosen round", "AUC (out-of-fold)", "update per site·round",
                         "seconds"], rows))
    parts.append(notes_paragraph(notes))
    failed = [[_e(name), _e(site), _e(why)] for name, (model, _) in models.items()
              for site, why in (model.get("failed_sites") or {}).items()]
    if failed:  # the model was trained without them: say so beside it
        parts.append("<p class='bad'>Sites that fell out of training (the model was "
                     "trained without them from then on; the stage is <b>partial</b>):</p>"
                     + _table(["model", "site", "when and why"], failed))
    comparisons = dict((results.get("deep") or {}).get("comparison", {}))
    if "comparison" in dsfr:
        comparisons["dsfr"] = dsfr["comparison"]
    if comparisons:
        parts.append(_table(["model", "AUC federated", "AUC pooled", "federated − pooled",
                             "wall time federated ÷ pooled"],
                            [[_e(m), _f(c["auc_federated"]), _f(c["auc_pooled"]),
                              _f(c["delta_auc"]), _f(c["wall_time_ratio"], 2)]
                             for m, c in comparisons.items()]))
    dp_rows = [_dp_row(name, model["dp"]) for name, (model, _) in models.items()
               if model.get("dp")]
    if dp_rows:
        parts.append(_table(["model", "DP", "clipping norm C", "noise multiplier σ",
                             "steps (rounds × units)", "ε overall (δ = 1/Σn)",
                             "ε per site (δ = 1/n)"], dp_rows))
    if "training" in dsfr:
        parts.append(_dsfr_table(dsfr, results))
    parts.append(f"<img src='{_curves(models, out)}' alt='validation per round'>")
    parts.append("<p class='muted'>Validation of the global weights of each round on the "
                 "sites' held-out rows (deep models: BCE loss; DSFR: Dice), pooled over sites "
                 "(thick) and per site. Probabilities and Grad-CAM maps stay at the sites.</p>")
    return "\n".join(parts)


def _dp_row(name: str, dp: dict[str, Any]) -> list[str]:
    """One model's differential privacy: mode, C, σ, steps and ε (Opacus' RDP accountant)."""
    eps = dp.get("epsilon", {})
    sites = ", ".join(f"{s} {_f(e, 2)}" for s, e in eps.items() if s != "overall")
    clip = _f(dp["clipping_norm"], 4) + (" (initial, adaptive)"
                                         if dp["mode"] == "client-adaptive" else "")
    return [_e(name), _e(dp["mode"]), _e(clip), _f(dp["noise_multiplier"], 3),
            _e(dp.get("steps", {}).get("overall", "—")), _f(eps.get("overall"), 2),
            _e(sites or "—")]


def _local_work(plan: dict[str, Any]) -> str:
    steps = plan.get("local_steps") or 0
    return (f"{plan['rounds']} × {steps} steps" if steps
            else f"{plan['rounds']} × {plan['local_epochs']} epochs")


def _dsfr_table(dsfr: dict[str, Any], results: dict[str, Any]) -> str:
    """DSFR: the segmentation's Dice per round and the AUC of the features' LR head."""
    validation = dsfr["training"].get("validation", {})
    dice = ", ".join(f"{r}: {_f(validation[r]['pooled'].get('dice'), 2)}"
                     for r in sorted(validation, key=int))
    auc, _ = agreed(results, "dsfr", "train_oof",
                    (dsfr.get("auc") or {}).get("train_oof") or {}, "dsfr")
    features = dsfr.get("features") or {}
    return _table(["DSFR", "value"], [
        ["feature layer", _e(features.get("layer", "—"))],
        ["Dice per round (pooled validation, weights after round r)", _e(dice or "—")],
        ["features selected", _e(len(dsfr.get("selected") or []))],
        ["AUC of the DSFR features (LR head, out-of-fold)", _f(auc.get("auc"))]])


def _curves(models: dict[str, tuple[dict[str, Any], dict[str, Any]]], out: Path) -> str:
    name = "training_validation.png"
    fig, axes = plt.subplots(1, len(models), figsize=(3.4 * len(models), 3), squeeze=False)
    for ax, (label, (model, _)) in zip(axes[0], models.items(), strict=True):
        validation = model.get("validation", {})
        rounds = sorted(int(r) for r in validation)
        metric = validation[str(rounds[0])]["metric"] if rounds else "loss"
        pooled = [validation[str(r)]["pooled"].get(metric) for r in rounds]
        ax.plot(rounds, [float("nan") if v is None else v for v in pooled], lw=2.5,
                color="#222", label="pooled")
        sites = sorted({s for r in rounds for s in validation[str(r)]["sites"]})
        for site in sites:
            values = [validation[str(r)]["sites"].get(site, {}).get(metric) for r in rounds]
            ax.plot(rounds, [float("nan") if v is None else v for v in values], lw=1,
                    alpha=0.8, label=site)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("weights after round")
        ax.set_ylabel(metric)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name
