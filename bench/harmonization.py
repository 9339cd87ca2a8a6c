"""Scanner effects and ComBat (issue 15): how many radiomics features depend on the site,
and what harmonization does to the radiomics model's leave-one-site-out and external AUC.

Per seed, one simulated cohort (`simulation.cohort`: every site its own scanner profile —
spacing, intensity scale and offset, noise, bias field — drawn from disjoint strata, so
the scanner effects are strong), three training sites and one external site, images and
two readers' masks; the study `radiomics,validation` with `validation=loso` in the
Simulation Engine, once with `harmonize=none` and once with `harmonize=combat` (the
features are extracted once per site and cached, so both runs see the same features).
Figures per seed and as the mean over seeds: features that differ by site (one-way ANOVA
of site, p < 0.05) before and after ComBat, the radiomics model's external AUC and its
mean leave-one-site-out AUC with and without. These are measurements, not targets.

    .venv/bin/python bench/harmonization.py [--seeds 3] [--patients 30] [--image-size 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.figures import Figures, machine
from simulation import launcher
from simulation.cohort import simulate_cohort

ARMS = ("none", "combat")


def study(sites: Path, out: Path, harmonize: str) -> dict:
    rc = launcher.run_simulation(sites, out, {
        "stages": "radiomics,validation", "validation": "loso", "harmonize": harmonize,
        "cv-folds": "5", "seed": "1"}, echo=False)
    if rc != 0:
        raise SystemExit(f"the study with harmonize={harmonize} failed (rc {rc}); see {out}")
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def measures(results: dict) -> dict[str, float | None]:
    radiomics = results["radiomics"]
    loso = results["validation"].get("loso", {}).get("sites", {})
    aucs = [row["radiomics"]["auc"] for row in loso.values()
            if row.get("radiomics", {}).get("auc") is not None]
    out: dict[str, float | None] = {
        "external_auc": radiomics["auc"].get("external", {}).get("auc"),
        "loso_auc": statistics.mean(aucs) if aucs else None,
    }
    effect = radiomics.get("harmonization", {}).get("site_effect", {})
    for when in ("before", "after"):
        out[f"site_dependent_{when}"] = effect.get(when, {}).get("n_site_dependent")
    out["features"] = radiomics.get("harmonization", {}).get("features")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=30, help="patients per site (about)")
    parser.add_argument("--image-size", type=int, default=40)
    parser.add_argument("--effect-size", type=float, default=1.5)
    parser.add_argument("--quick", action="store_true", help="1 seed, smaller sites")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.patients, args.image_size = 1, 24, 32
    root = args.out or Path(tempfile.mkdtemp(prefix="feddlr-bench-combat-"))
    figures = Figures()
    print(f"harmonization: {args.seeds} seeds, 3 training + 1 external site of about "
          f"{args.patients} patients, images {args.image_size} voxels, effect size "
          f"{args.effect_size}", flush=True)
    rows: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):
        sites = root / f"sites-{seed}"
        simulate_cohort(sites, n_sites=4, n_patients=args.patients, seed=100 + seed,
                        effect_size=args.effect_size, image_size=args.image_size,
                        external_sites=1)
        for arm in ARMS:
            row = measures(study(sites, root / f"out-{seed}-{arm}", arm))
            rows[arm].append(row)
            for key in ("external_auc", "loso_auc"):
                figures.add(f"seed{seed}_{arm}_{key}", row[key],
                            f"radiomics {key.replace('_', ' ')}, harmonize={arm}")
        combat = rows["combat"][-1]
        figures.add(f"seed{seed}_site_dependent_features",
                    f"{combat['site_dependent_before']} → {combat['site_dependent_after']}",
                    f"of {combat['features']} features differing by site at p < 0.05, "
                    "before → after ComBat")
    for arm in ARMS:
        for key in ("external_auc", "loso_auc"):
            values = [r[key] for r in rows[arm] if r[key] is not None]
            figures.add(f"mean_{arm}_{key}", statistics.mean(values) if values else None,
                        f"mean over seeds, harmonize={arm}")
    for when in ("before", "after"):
        values = [r[f"site_dependent_{when}"] for r in rows["combat"]]
        figures.add(f"mean_site_dependent_{when}",
                    statistics.mean(v for v in values if v is not None),
                    f"features differing by site (p < 0.05) {when} ComBat, mean over seeds")
    figures.dump(args.json, machine=machine())
    print(f"written under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
