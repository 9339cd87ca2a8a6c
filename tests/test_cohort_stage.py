"""The cohort stage through the in-process transport on site folders made from real data
(lifelines' GBSG2, task `label`), plus the handshake's refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from server.workflow import StudyError, run_study
from shared.config import StudyConfig
from simulation.cohort import simulate_cohort
from simulation.in_process import InProcessTransport
from tests.splits import gbsg2, non_iid_split


def write_site(root: Path, site_id: str, rows: pd.DataFrame, **privacy: object) -> Path:
    folder = root / site_id
    folder.mkdir(parents=True)
    policy = {"min_patients": 10, "min_cell_count": 3, **privacy}
    (folder / "site.yaml").write_text(yaml.safe_dump(
        {"site_id": site_id, "roles": ["train"], "time_unit": "days", "privacy": policy}))
    rows.to_csv(folder / "clinical.csv", index=False)
    return folder


@pytest.fixture
def gbsg2_sites(tmp_path: Path) -> tuple[list[Path], pd.DataFrame]:
    frame = gbsg2()
    frame["label"] = frame.pop("cens")
    frame.insert(0, "patient_id", [f"g{i:04d}" for i in range(len(frame))])
    parts = non_iid_split(frame, by="age", n_sites=3, seed=5)
    return [write_site(tmp_path, f"site-{i + 1}", p) for i, p in enumerate(parts)], frame


def test_cohort_stage_equals_scipy_on_pooled_gbsg2(gbsg2_sites, tmp_path: Path) -> None:
    folders, frame = gbsg2_sites
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="label",
                         cohort_covariates=("age", "tsize", "pnodes", "horTh", "tgrade"))
    results = run_study(InProcessTransport(folders), config)
    cohort = results["cohort"]
    assert cohort["n"]["pooled"] == frame.label.value_counts().sort_index().tolist()
    for name in ("age", "tsize", "pnodes"):
        entry = cohort["covariates"][name]
        assert entry["sites_missing"] == []
        ref = stats.ttest_ind(frame.loc[frame.label == 0, name], frame.loc[frame.label == 1, name])
        assert entry["t_test"]["statistic"] == pytest.approx(ref.statistic, rel=1e-9)
        assert entry["t_test"]["p_value"] == pytest.approx(ref.pvalue, rel=1e-7)
    parts = {f.name: pd.read_csv(f / "clinical.csv") for f in folders}
    for name in ("horTh", "tgrade"):
        entry = cohort["covariates"][name]
        small = {s for s, p in parts.items()
                 if pd.crosstab(p[name], p.label).isin([1, 2]).any().any()}
        assert set(entry["sites_missing"]) == small  # a table with a cell of 1 or 2 is refused
        released = pd.concat([p for s, p in parts.items() if s not in small])
        table = pd.crosstab(released[name], released.label)
        assert entry["levels"] == [str(v).lower() for v in table.index]  # levels lower-cased
        assert entry["chi2"]["p_value"] == pytest.approx(
            stats.chi2_contingency(table.to_numpy()).pvalue, rel=1e-7)
    assert (tmp_path / "out" / "results.json").is_file()
    assert (tmp_path / "out" / "report.html").is_file()


def test_site_on_another_schema_major_is_refused(gbsg2_sites, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folders, _ = gbsg2_sites
    import client.stages.handshake

    monkeypatch.setattr(client.stages.handshake, "SCHEMA_VERSION", "2.0")
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="label")
    with pytest.raises(StudyError, match="only 0 usable site"):
        run_study(InProcessTransport(folders), config)
    import json

    sites = json.loads((tmp_path / "out" / "results.json").read_text())["run"]["sites"]
    assert {s["status"] for s in sites} == {"refused"}
    assert all("schema 2.0 is incompatible" in s["reason"] for s in sites)


def test_fewer_usable_sites_than_min_sites_stops_with_a_clear_error(gbsg2_sites,
                                                                    tmp_path: Path) -> None:
    folders, _ = gbsg2_sites
    (folders[0] / "clinical.csv").unlink()
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="label", min_sites=3)
    with pytest.raises(StudyError, match=r"only 2 usable site\(s\), min-sites is 3: "
                                         r"site-1: site folder site-1 cannot serve"):
        run_study(InProcessTransport(folders), config)


def test_her2_low_task_does_not_count_positives_as_excluded(tmp_path: Path) -> None:
    simulate_cohort(tmp_path / "sites", n_sites=2, n_patients=40, seed=3, images=False)
    folders = sorted(p for p in (tmp_path / "sites").iterdir() if p.is_dir())
    config = StudyConfig(out_dir=str(tmp_path / "out"), task="her2-low")
    results = run_study(InProcessTransport(folders), config)
    for row, folder in zip(results["run"]["sites"], folders, strict=True):
        raw = pd.read_csv(folder / "clinical.csv", dtype={"her2_ish": str})
        equivocal = int(((raw.her2_ihc == 2) & raw.her2_ish.isna()).sum())
        negative = (raw.her2_ihc <= 1) | ((raw.her2_ihc == 2) & (raw.her2_ish == "negative"))
        assert row["n_excluded"] == (equivocal if equivocal >= 3 or equivocal == 0 else None)
        assert row["n_patients"] == int(negative.sum())
        assert np.sum(row["label_counts"]) == int(negative.sum())
