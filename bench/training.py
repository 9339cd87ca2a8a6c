"""CNN learning quality federated vs pooled (over seeds), and the weights' bytes on the wire.

1. `learning` (issue 12): for each seed (the cohort's and the training's), a synthetic
   cohort of 3 training sites (`simulate_cohort`: effect size 1.0, scanner shift and
   HER2 prevalence differ by site) and one study in Flower's Simulation Engine
   (`simulation.launcher.run_simulation`, stages `radiomics,dsfr,deep,fusion`,
   `mode=both`, `recipe=scratch`, every other key the pyproject/recipe default): each CNN
   (DSFR U-Net, DL-MRI ResNet18-3D, DL-US ConvNeXt V2) is trained federated (FedAvg, sites
   as Simulation Engine actors) and pooled (the training sites' data in the ServerApp
   process, the centralized reference). Then, from the sites' own prediction files
   (`<site>/predictions/<model>-<run>.csv`, training sites' out-of-fold rows, labels from
   clinical.csv), scikit-learn's `roc_auc_score` per model, federated and pooled:
   radiomics (exact federated = pooled: one file serves both), DSFR, DL-MRI, DL-US, DLR
   (mean of the radiomics and DSFR probabilities; pooled: with `dsfr_pooled`) and the
   MRI&US late fusion (`LogisticRegression(C=1.0)` on the DL-MRI and DL-US probabilities,
   out-of-fold by a stratified 4-fold CV in this script on both sides; the run's own
   `fusion` file, fitted in-sample on the out-of-fold inputs, is reported beside it).
   Also: the simulator's ceiling (truth.json, population and sample), pooled ÷ sample
   ceiling, time-to-AUC (seconds of federated training until the per-round pooled
   validation AUC first reaches 0.95 × the pooled model's out-of-fold AUC; DSFR: Dice per
   round instead), federated − pooled with its spread over the seeds, the targets as
   pass/fail, and the federated ÷ pooled wall-time ratios and peak RSS of the same runs.
2. `wire`: for each wire dtype (float32, float16, bfloat16), one federated round per model
   in process (the same site and server code as a Flower run) and the bytes of weights
   sent per site and round (down: global weights of every fold; up: the update), measured
   on the messages, with the ratio to the float32 parameter bytes; and the parameter bytes
   of the papers' full-size models (computed, not trained: too big for this CPU).

    .venv/bin/python bench/training.py                     # 3 seeds × 3 sites × ~40, 96 px
    .venv/bin/python bench/training.py --skip-wire         # the learning part alone
    .venv/bin/python bench/training.py --quick             # 1 seed, 24 per site, 48 px

Prints `name: value  (what it means)` lines and writes OUT/bench.json (and `--json FILE`,
the figures for `bench/run.py`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import Figures, PeakMemory, machine
from bench.training_wire import paper_sizes, wire, wire_config, wire_figures
from client.site.folder import read_site_config
from shared.labels import LabelError, task_label
from simulation.cohort import DEFAULT_IMAGE_SIZE, simulate_cohort
from simulation.launcher import run_simulation

TASK = "her2-positive"
CNNS = ("dsfr", "dl_mri", "dl_us")  # trained federated and pooled
DEEP = ("dl_mri", "dl_us")
REPORTED = ("radiomics", "dsfr", "dl_mri", "dl_us", "dlr", "fusion")
NAMES = {"radiomics": "radiomics", "dsfr": "DSFR", "dl_mri": "DL-MRI", "dl_us": "DL-US",
         "dlr": "DLR", "fusion": "MRI&US fusion"}
STAGES = "radiomics,dsfr,deep,fusion"
FUSION_FOLDS, FUSION_C = 4, 1.0
TARGET_DELTA = -0.02      # federated − pooled ≥ this, per CNN
TARGET_CEILING = 0.9      # pooled DL-MRI, DL-US ≥ this × the sample ceiling
TIME_FRACTION = 0.95      # time-to-AUC: until 0.95 × the pooled model's out-of-fold AUC


def learning_config(seed: int) -> dict[str, str]:
    """The run-config keys this bench sets (all documented in pyproject.toml); every
    other key keeps its default, i.e. the scratch recipe's values per model."""
    return {"stages": STAGES, "mode": "both", "recipe": "scratch", "seed": str(seed),
            "gradcam-patients": "0"}


# --------------------------------------------------------------------------- learning


def learning(args: argparse.Namespace, root: Path) -> dict:
    started = time.perf_counter()
    seeds = {}
    for seed in args.seeds:
        seeds[seed] = one_seed(args, root / f"seed-{seed}", seed)
    return {"seeds": seeds, "total_seconds": time.perf_counter() - started,
            "config": {k: v for k, v in learning_config(0).items() if k != "seed"}}


def one_seed(args: argparse.Namespace, root: Path, seed: int) -> dict:
    t0 = time.perf_counter()
    sites = root / "sites"
    truth = simulate_cohort(sites, n_sites=args.sites, n_patients=args.patients, seed=seed,
                            effect_size=args.effect_size, image_size=args.image_size)
    simulated = time.perf_counter() - t0
    out = root / "run"
    t1 = time.perf_counter()
    # Simulation Engine workers (Ray actors running the ClientApp: the sites) and the
    # simulation process (it runs the ServerApp, which also trains the pooled reference)
    with PeakMemory({"site_actor": "ClientAppActor", "serverapp": "flwr-serverapp",
                     "simulation": "flwr-simulation"}) as mem:
        rc = run_simulation(sites, out, learning_config(seed), num_cpus_per_site=1,
                            echo=False)
    run_seconds = time.perf_counter() - t1
    results = json.loads((out / "results.json").read_text())
    failed = {s: v for s, v in results["run"]["stages"].items() if v.get("status") != "ok"}
    if rc != 0 or failed:
        raise SystemExit(f"seed {seed}: run exit {rc}, stages not ok: {failed}; "
                         f"see {out / 'run.log'}")
    row = score_seed(sites, results, truth, seed)
    row.update(seconds={"simulate": simulated, "run": run_seconds,
                        "learning": time.perf_counter() - t0},
               memory={"peak_mib": mem.max_by_label(),
                       "processes": list(mem.peaks.values())},
               plans={name: _plan_summary(result)
                      for name, result in training_results(results).items()},
               n_patients={s["site_id"]: s["n_patients"] for s in results["run"]["sites"]})
    auc = row["auc"]
    print(f"seed {seed}: {run_seconds:.0f} s run; AUC fed/pooled " + ", ".join(
        f"{m} {auc[m]['federated']:.3f}/{auc[m]['pooled']:.3f}" for m in REPORTED)
        + f"; sample ceiling {row['ceiling']['sample']:.3f}", flush=True)
    return row


def training_results(results: dict) -> dict[str, dict]:
    """Each training's result block: dsfr, dsfr_pooled, dl_mri, dl_mri_pooled, …"""
    out = {}
    dsfr = results.get("dsfr", {})
    if "training" in dsfr:
        out["dsfr"] = dsfr["training"]
        if "pooled" in dsfr:
            out["dsfr_pooled"] = dsfr["pooled"]["training"]
    out.update(results.get("deep", {}).get("models", {}))
    return out


def _plan_summary(result: dict) -> dict:
    plan = result["plan"]
    keys = ("recipe", "rounds", "local_epochs", "local_steps", "lr", "batch_size", "optimizer",
            "weight_decay", "width", "strategy", "cv_folds", "spacing", "margin_mm",
            "reference", "schedule", "augment")
    return {k: plan.get(k) for k in keys} | {"size": {"dsfr": plan.get("dsfr_size"),
                                                       "dl_mri": plan.get("mri_size"),
                                                       "dl_us": plan.get("us_size")}[
        result["model"]], "parameters": result["network"]["parameters"]}


def score_seed(sites_dir: Path, results: dict, truth: dict, seed: int) -> dict:
    """Out-of-fold AUCs (sklearn) from the training sites' prediction files, the ceiling,
    time-to-AUC and the run's federated-vs-pooled comparison blocks."""
    from sklearn.metrics import roc_auc_score

    run = _run_label(results["run"].get("run_id", ""))
    folders = training_sites(sites_dir)
    labels = pd.concat([site_labels(folder, site) for site, folder in folders.items()])

    def scores(name: str, kinds: tuple[str, ...] = ("out-of-fold",)) -> pd.Series:
        return prediction_scores(folders, name, run, kinds)

    def auc(score: pd.Series) -> dict:
        y = labels.reindex(score.index)
        keep = y.notna()
        y, s = y[keep].astype(int), score[keep]
        return {"auc": float(roc_auc_score(y, s)), "n": len(y), "positives": int(y.sum())}

    files = {name: scores(name) for name in ("radiomics", "dsfr", "dsfr_pooled", "dl_mri",
                                              "dl_mri_pooled", "dl_us", "dl_us_pooled", "dlr")}
    files["fusion_site"] = scores("fusion", ("fitted",))
    block: dict[str, dict] = {}
    radiomics = auc(files["radiomics"])
    block["radiomics"] = {"federated": radiomics["auc"], "pooled": radiomics["auc"],
                          "n": radiomics["n"], "positives": radiomics["positives"],
                          "note": "exact federated = pooled: one file"}
    for model in CNNS:
        fed, pooled = auc(files[model]), auc(files[f"{model}_pooled"])
        block[model] = {"federated": fed["auc"], "pooled": pooled["auc"], "n": fed["n"],
                        "n_pooled": pooled["n"], "positives": fed["positives"]}
    # DLR: the run's own file (federated); pooled = mean of radiomics and dsfr_pooled
    mine = _joined(files["radiomics"], files["dsfr"]).mean(axis=1)
    dlr_pooled = _joined(files["radiomics"], files["dsfr_pooled"]).mean(axis=1)
    dlr = auc(files["dlr"])
    block["dlr"] = {"federated": dlr["auc"], "pooled": auc(dlr_pooled)["auc"], "n": dlr["n"],
                    "positives": dlr["positives"],
                    "check_max_abs_diff_vs_site_file": float(
                        (mine - files["dlr"].reindex(mine.index)).abs().max())}
    # late fusion: the same 4-fold LR on both sides, the run's fitted file beside it
    fed_fused = fused(_joined(files["dl_mri"], files["dl_us"]), labels, seed)
    pooled_fused = fused(_joined(files["dl_mri_pooled"], files["dl_us_pooled"]), labels, seed)
    block["fusion"] = {"federated": auc(fed_fused)["auc"], "pooled": auc(pooled_fused)["auc"],
                       "n": auc(fed_fused)["n"], "positives": auc(fed_fused)["positives"],
                       "federated_site_file": auc(files["fusion_site"])["auc"],
                       "note": f"LogisticRegression(C={FUSION_C}) out-of-fold, stratified "
                               f"{FUSION_FOLDS}-fold (shuffled, random_state={seed}); "
                               "federated_site_file: the run's federated fit, in-sample"}
    for row in block.values():
        row["delta"] = row["federated"] - row["pooled"]
    ceiling = truth["ceiling"][TASK]
    for row in block.values():
        row["pooled_vs_ceiling"] = row["pooled"] / ceiling["sample"]
    trainings = training_results(results)
    timing = {m: time_to_auc(trainings[m], trainings[f"{m}_pooled"],
                             TIME_FRACTION * block[m]["pooled"]) for m in DEEP}
    dice = {name: _per_round(trainings[name], "dice") for name in ("dsfr", "dsfr_pooled")}
    comparison = dict(results["deep"].get("comparison", {}))
    if "comparison" in results.get("dsfr", {}):
        comparison["dsfr"] = results["dsfr"]["comparison"]
    return {"auc": block, "ceiling": {"population": ceiling["population"],
                                      "sample": ceiling["sample"], "sites": ceiling["sites"]},
            "time_to_auc": timing, "dsfr_dice": dice, "comparison": comparison,
            "prediction_run": run}


def training_sites(sites_dir: Path) -> dict[str, Path]:
    out = {}
    for folder in sorted(p for p in sites_dir.iterdir() if (p / "site.yaml").is_file()):
        config = read_site_config(folder)
        if "train" in config.roles:
            out[config.site_id] = folder
    return out


def site_labels(folder: Path, site: str) -> pd.Series:
    """The task label per patient from clinical.csv (IHC2+ without ISH: left out)."""
    clinical = pd.read_csv(folder / "clinical.csv", dtype={"patient_id": str})
    values = {}
    for row in clinical.itertuples(index=False):
        try:
            values[(site, row.patient_id)] = task_label(TASK, row.her2_ihc, row.her2_ish, None)
        except LabelError:
            continue
    return pd.Series(values, dtype=float)


def _run_label(run_id: object) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(run_id or "local"))[:64]


def prediction_scores(folders: dict[str, Path], name: str, run: str,
                      kinds: tuple[str, ...]) -> pd.Series:
    """One model's scores at the training sites, rows of `kinds`, indexed (site, patient)."""
    parts = []
    for site, folder in folders.items():
        path = folder / "predictions" / f"{name}-{run}.csv"
        if not path.is_file():
            found = sorted((folder / "predictions").glob(f"{name}-*.csv"))
            if len(found) != 1:
                raise SystemExit(f"{site}: no single prediction file of {name} "
                                 f"(run {run}): {[p.name for p in found]}")
            path = found[0]
        frame = pd.read_csv(path, dtype={"patient_id": str})
        frame = frame[frame["kind"].isin(kinds)]
        parts.append(pd.Series(frame["score"].to_numpy(float),
                               index=pd.MultiIndex.from_arrays(
                                   [[site] * len(frame), frame["patient_id"]])))
    if not parts or not sum(len(p) for p in parts):
        raise SystemExit(f"no {'/'.join(kinds)} rows of {name} at the training sites")
    return pd.concat(parts).sort_index()


def _joined(*scores: pd.Series) -> pd.DataFrame:
    return pd.concat(scores, axis=1, join="inner").sort_index()


def fused(x: pd.DataFrame, labels: pd.Series, seed: int) -> pd.Series:
    """Out-of-fold late fusion: LogisticRegression(C=1.0) on the models' probabilities,
    stratified 4-fold CV over the training sites' patients pooled."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    y = labels.reindex(x.index)
    x = x[y.notna()]
    y = y[y.notna()].astype(int).to_numpy()
    out = np.empty(len(x))
    folds = StratifiedKFold(FUSION_FOLDS, shuffle=True, random_state=seed)
    for train, test in folds.split(x, y):
        model = LogisticRegression(C=FUSION_C).fit(x.iloc[train], y[train])
        out[test] = model.predict_proba(x.iloc[test])[:, 1]
    return pd.Series(out, index=x.index)


def _per_round(result: dict, metric: str) -> list[dict]:
    """(round, cumulative training seconds, metric) after each round, round 0 = initial
    weights; the weights after round r exist at the end of round r's message."""
    elapsed, at = 0.0, {0: 0.0}
    for entry in result["rounds"]:
        elapsed += entry["seconds"]
        at[int(entry["round"])] = elapsed
    rows = []
    for key in sorted(result["validation"], key=int):
        pooled = result["validation"][key]["pooled"]
        rows.append({"round": int(key), "seconds": at.get(int(key)),
                     metric: pooled.get(metric),
                     "sites_missing": pooled.get("auc_sites_missing", [])})
    return rows


def time_to_auc(federated: dict, pooled: dict, threshold: float) -> dict:
    """Seconds of federated training until its per-round pooled validation AUC first
    reaches `threshold` (None if never); the pooled reference's own time beside it."""
    def first(rows: list[dict]) -> dict | None:
        return next(({"round": r["round"], "seconds": r["seconds"], "auc": r["auc"]}
                     for r in rows if r["auc"] is not None and r["auc"] >= threshold), None)

    fed_rows, pooled_rows = _per_round(federated, "auc"), _per_round(pooled, "auc")
    return {"threshold": threshold, "federated": first(fed_rows), "pooled": first(pooled_rows),
            "federated_rounds": fed_rows, "pooled_rounds": pooled_rows,
            "federated_training_seconds": federated["seconds"],
            "pooled_training_seconds": pooled["seconds"]}


def spread(values: list) -> dict:
    """Mean, SD (n − 1), min and max of the non-missing values, and the values."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0, "values": values}
    return {"mean": float(np.mean(kept)),
            "sd": float(np.std(kept, ddof=1)) if len(kept) > 1 else None,
            "min": min(kept), "max": max(kept), "n": len(kept), "values": values}


def summarize(measured: dict) -> dict:
    """Per model, over the seeds: federated, pooled, delta, pooled ÷ ceiling."""
    rows = list(measured["seeds"].values())
    out: dict = {"models": {}, "ceiling": {
        k: spread([r["ceiling"][k] for r in rows]) for k in ("population", "sample")}}
    for model in REPORTED:
        out["models"][model] = {k: spread([r["auc"][model][k] for r in rows])
                                for k in ("federated", "pooled", "delta", "pooled_vs_ceiling")}
    out["models"]["fusion"]["federated_site_file"] = spread(
        [r["auc"]["fusion"]["federated_site_file"] for r in rows])
    out["time_to_auc"] = {m: {side: spread([(r["time_to_auc"][m][side] or {}).get("seconds")
                                            for r in rows]) for side in ("federated", "pooled")}
                          for m in DEEP}
    out["auc_per_round"] = {m: {side: [spread(list(v)) for v in zip(
        *[[d["auc"] for d in r["time_to_auc"][m][f"{side}_rounds"]] for r in rows],
        strict=True)] for side in ("federated", "pooled")} for m in DEEP}
    out["validation_sites_missing"] = {m: sorted({s for r in rows for d in r["time_to_auc"][m][
        "federated_rounds"] for s in d["sites_missing"]}) for m in DEEP}
    out["dsfr_dice"] = {name: [spread(list(v)) for v in zip(
        *[[d["dice"] for d in r["dsfr_dice"][name]] for r in rows], strict=True)]
        for name in ("dsfr", "dsfr_pooled")}
    return out


def _range(s: dict, digits: int = 3) -> str:
    if s["mean"] is None:
        return "n/a"
    sd = "" if s["sd"] is None else f", SD {s['sd']:.{digits}f}"
    return (f"mean of {s['n']} seeds; min {s['min']:.{digits}f}, max {s['max']:.{digits}f}"
            f"{sd}")


def _values(s: dict, digits: int = 3) -> str:
    return " / ".join("n/a" if v is None else f"{v:.{digits}f}" for v in s["values"])


def learning_figures(figures: Figures, measured: dict, seeds: list[int]) -> dict:
    summary = summarize(measured)
    per = f"seeds {'/'.join(map(str, seeds))}"
    ceiling = summary["ceiling"]
    figures.add("ceiling.population", ceiling["population"]["mean"],
                f"simulator's her2-positive population ceiling (truth.json); {per}: "
                f"{_values(ceiling['population'], 4)}")
    figures.add("ceiling.sample", ceiling["sample"]["mean"],
                f"ceiling on the drawn patients (truth.json 'sample'), {_range(ceiling['sample'])}"
                f"; {per}: {_values(ceiling['sample'])}")
    for model in REPORTED:
        row = summary["models"][model]
        name = NAMES[model]
        if model == "radiomics":
            figures.add("quality.radiomics.auc", row["pooled"]["mean"],
                        f"radiomics out-of-fold AUC (sklearn, sites' files; exact federated = "
                        f"pooled), {_range(row['pooled'])}; {per}: {_values(row['pooled'])}")
        else:
            how = {"dlr": "mean of radiomics and DSFR probabilities",
                   "fusion": f"LR(C=1) on DL-MRI, DL-US, bench {FUSION_FOLDS}-fold OOF"}.get(
                model, "out-of-fold")
            figures.add(f"quality.{model}.auc_federated", row["federated"]["mean"],
                        f"{name} federated AUC ({how}; sklearn on the sites' prediction "
                        f"files), {_range(row['federated'])}; {per}: {_values(row['federated'])}")
            figures.add(f"quality.{model}.auc_pooled", row["pooled"]["mean"],
                        f"{name} pooled reference, {_range(row['pooled'])}; "
                        f"{per}: {_values(row['pooled'])}")
            figures.add(f"quality.{model}.delta_auc", row["delta"]["mean"],
                        f"{name} federated - pooled, {_range(row['delta'])}; "
                        f"{per}: {_values(row['delta'])}")
        figures.add(f"quality.{model}.pooled_vs_ceiling", row["pooled_vs_ceiling"]["mean"],
                    f"{name} pooled AUC / sample ceiling, {_range(row['pooled_vs_ceiling'])}")
    fusion = summary["models"]["fusion"]["federated_site_file"]
    figures.add("quality.fusion.auc_federated_site_file", fusion["mean"],
                f"the run's own federated fusion file (LR fitted on all training rows: "
                f"in-sample for the LR); {per}: {_values(fusion)}")
    targets = [(m, "delta", "delta_auc", TARGET_DELTA, f"{NAMES[m]} federated - pooled")
               for m in CNNS] + [
        (m, "pooled_vs_ceiling", "pooled_vs_ceiling", TARGET_CEILING,
         f"pooled {NAMES[m]} / sample ceiling") for m in DEEP]
    for model, block, key, target, what in targets:
        values = summary["models"][model][block]
        seeds_met = sum(v >= target for v in values["values"])
        figures.add(f"target.{model}.{key}", "pass" if values["mean"] >= target else "fail",
                    f"{what} >= {target}: mean {values['mean']:+.3f}; {seeds_met} of "
                    f"{values['n']} seeds meet it")
    for model in DEEP:
        timing = summary["time_to_auc"][model]
        rows = [r["time_to_auc"][model] for r in measured["seeds"].values()]
        shown = "; ".join(
            f"seed {s}: " + ("never" if r["federated"] is None else
                             f"{r['federated']['seconds']:.1f} s (round "
                             f"{r['federated']['round']})")
            + f" to {r['threshold']:.3f}" for s, r in zip(seeds, rows, strict=True))
        figures.add(f"time_to_auc.{model}.federated_seconds", timing["federated"]["mean"],
                    f"{NAMES[model]}: seconds of federated training until its per-round "
                    f"pooled validation AUC >= {TIME_FRACTION} x pooled OOF AUC, mean over the "
                    f"{timing['federated']['n']} of {len(rows)} seeds that reach it; {shown}")
        pooled = timing["pooled"]
        figures.add(f"time_to_auc.{model}.pooled_seconds", pooled["mean"],
                    f"the pooled reference's own time to the same AUC, mean of {pooled['n']} "
                    f"seeds that reach it; {per}: {_values(pooled, 1)}")
    for model in DEEP:
        missing = summary["validation_sites_missing"][model]
        for side in ("federated", "pooled"):
            curve = summary["auc_per_round"][model][side]
            note = (f"; sites whose validation histograms were refused in some round: "
                    f"{', '.join(missing)}" if side == "federated" and missing else "")
            figures.add(f"quality.{model}.val_auc_per_round_{side}",
                        [None if c["mean"] is None else round(c["mean"], 3) for c in curve],
                        f"{NAMES[model]} {side} per-round pooled validation AUC (histograms) "
                        f"after rounds 0..{len(curve) - 1}, mean over seeds{note}")
    for name, label in (("dsfr", "federated"), ("dsfr_pooled", "pooled")):
        curve = summary["dsfr_dice"][name]
        figures.add(f"quality.dsfr.dice_per_round_{label}",
                    [round(s["mean"], 3) if s["mean"] is not None else None for s in curve],
                    f"DSFR U-Net {label} validation Dice after rounds 0..{len(curve) - 1} "
                    f"(its per-round metric; no time-to-AUC), mean over seeds")
    overhead_figures(figures, measured)
    total = measured["total_seconds"]
    figures.add("learning.total_seconds", total,
                f"the whole learning part: {len(seeds)} cohorts simulated + {len(seeds)} "
                f"Simulation Engine runs + scoring; target <= 900 s on 2 cores")
    return summary


def overhead_figures(figures: Figures, measured: dict) -> None:
    rows = list(measured["seeds"].values())
    total_f = total_p = 0.0
    for model in CNNS:
        blocks = [r["comparison"][model] for r in rows if model in r["comparison"]]
        if not blocks:
            continue
        fs = sum(b["seconds_federated"] for b in blocks)
        ps = sum(b["seconds_pooled"] for b in blocks)
        total_f, total_p = total_f + fs, total_p + ps
        ratios = spread([b["wall_time_ratio"] for b in blocks])
        figures.add(f"overhead.{model}.wall_time_ratio", fs / max(ps, 1e-9),
                    f"federated / pooled training seconds, summed over seeds: {fs:.1f} / "
                    f"{ps:.1f}; per seed {_values(ratios, 2)}; target <= 1.15")
        steady = spread([b["round_time_ratio"] for b in blocks])
        figures.add(f"overhead.{model}.round_time_ratio", steady["mean"],
                    f"median round after the first, federated / pooled, mean over seeds; per "
                    f"seed {_values(steady, 2)}")
    if total_p:
        figures.add("overhead.all_models.wall_time_ratio", total_f / total_p,
                    f"federated / pooled training seconds, all CNNs, all seeds: {total_f:.1f} "
                    f"/ {total_p:.1f}; target <= 1.15")
    runs = spread([r["seconds"]["run"] for r in rows])
    figures.add("overhead.run_seconds", runs["mean"],
                f"one Simulation Engine run (4 stages, both modes), mean over seeds; per seed "
                f"{_values(runs, 1)}")
    peaks = [r["memory"] for r in rows]
    actor = [p["peak_mib"]["site_actor"] for p in peaks if "site_actor" in p["peak_mib"]]
    if actor:
        n = max(sum(q["label"] == "site_actor" for q in p["processes"]) for p in peaks)
        figures.add("memory.site_process_peak_rss_mib", round(max(actor), 1),
                    f"peak RSS (VmHWM) of a Simulation Engine worker (the sites' ClientApp), "
                    f"max over {n} workers and the seeds")
    for label, meaning in (("serverapp", "the ServerApp process"),
                           ("simulation", "the flwr-simulation process (runs the ServerApp, "
                                          "which trains the pooled reference)")):
        values = [p["peak_mib"][label] for p in peaks if label in p["peak_mib"]]
        if values:
            figures.add(f"memory.{label}_peak_rss_mib", round(max(values), 1),
                        f"peak RSS of {meaning}, max over seeds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3, help="training sites per cohort")
    parser.add_argument("--patients", type=int, default=40,
                        help="patients per site (the simulator varies it by +-25 %%)")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                        help="phantom size in pixels (the simulator's default)")
    parser.add_argument("--effect-size", type=float, default=1.0,
                        help="the simulator's default: her2-positive ceiling about 0.90")
    parser.add_argument("--seeds", default="1,2,3",
                        help="comma-separated; each is the cohort's and the training's seed")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-wire", action="store_true")
    parser.add_argument("--skip-learning", "--skip-fed", dest="skip_learning",
                        action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 seed, 24 patients per site, 48-px phantoms")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.patients, args.image_size = "1", 24, 48
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    root = args.out or Path(tempfile.mkdtemp(prefix="feddlr-bench-training-"))
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine()}
    figures = Figures()
    if not args.skip_learning:
        keys = " ".join(f"{k}={v}" for k, v in learning_config(0).items() if k != "seed")
        print(f"learning: seeds {args.seeds}, {args.sites} training sites x ~{args.patients} "
              f"patients, {args.image_size}-px phantoms, effect size {args.effect_size}; "
              f"run config set: {keys} seed=<seed>; every other key its pyproject default "
              f"(the recipe's values)", flush=True)
        measured = learning(args, root)
        report["learning"] = measured
        report["learning_summary"] = learning_figures(figures, measured, args.seeds)
        first = next(iter(measured["seeds"].values()))
        for name, plan in first["plans"].items():
            print(f"plan {name}: " + ", ".join(f"{k} {v}" for k, v in plan.items()))
    if not args.skip_wire:
        print("wire: run config set: " + " ".join(
            f"{k}={v}" for k, v in wire_config(args.seeds[0], "<dtype>").items()), flush=True)
        measured = wire(args, root)
        report["wire"] = measured
        wire_figures(figures, measured)
        report["paper_sizes"] = paper_sizes()
        for model, sizes in report["paper_sizes"].items():
            figures.add(f"wire.{model}.full_size_mib", round(sizes["float32"] / 2**20, 1),
                        "one full-size (width 1) model in float32, computed; "
                        + ", ".join(f"{d} {b / 2**20:.1f} MiB" for d, b in sizes.items()))
    (root / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    figures.dump(args.json, details=report)
    print(f"written: {root / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
