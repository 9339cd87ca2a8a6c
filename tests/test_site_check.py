"""Site folder loading and `feddlr check-site`, on real (small) files broken in real ways."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from client.site.check import main
from client.site.folder import (
    Problem,
    SiteError,
    check_site,
    inspect_site,
    load_site,
    read_site_config,
)
from shared.policy import PrivacyPolicy

REPO = Path(__file__).resolve().parents[1]
SHAPE = (8, 16, 16)  # numpy order z, y, x -> SimpleITK size (16, 16, 8)
ALL_NEEDS = ("clinical", "label", "survival", "mri", "mri_r2", "us")

# patient -> (her2_ihc, her2_ish, dfs_time, dfs_event)
PATIENTS = {
    "p01": ("0", "", "120", "0"),
    "p02": ("1+", "", "300.5", "1"),
    "p03": ("2", "positive", "45", "1"),
    "p04": ("2", "negative", "800", "0"),
    "p05": ("3", "", "0", "1"),
    "p06": ("1", "negative", "365", "0"),
}


# --------------------------------------------------------------------------- builders


def write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-10.0, 5.0, 0.0)[: image.GetDimension()])
    sitk.WriteImage(image, str(path))


def tumour_mask(shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(s // 4, s // 2) for s in shape)] = 1
    return mask


def write_clinical(root: Path, rows: list[dict[str, str]]) -> None:
    pd.DataFrame(rows).to_csv(root / "clinical.csv", index=False)


def clinical_rows() -> list[dict[str, str]]:
    return [
        {"patient_id": p, "her2_ihc": ihc, "her2_ish": ish, "dfs_time": t, "dfs_event": e,
         "age": str(40 + i)}
        for i, (p, (ihc, ish, t, e)) in enumerate(PATIENTS.items())
    ]


def write_yaml(root: Path, **overrides: object) -> None:
    config: dict[str, object] = {
        "site_id": "site-a",
        "roles": ["train", "survival"],
        "time_unit": "days",
        "scanner": "1.5T GE",
        "privacy": {"min_patients": 2, "min_cell_count": 1, "time_bin": 30},
    }
    config.update(overrides)
    (root / "site.yaml").write_text(yaml.safe_dump(config))


def write_images(root: Path, patient: str, seed: int) -> None:
    folder = root / "images" / patient
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    write_volume(folder / "mri.nii.gz", rng.normal(100, 20, SHAPE).astype(np.float32))
    write_volume(folder / "mri_mask.nii.gz", tumour_mask())
    write_volume(folder / "mri_mask_r2.nii.gz", tumour_mask())
    us = sitk.GetImageFromArray(rng.integers(0, 255, (24, 32), dtype=np.uint8))
    sitk.WriteImage(us, str(folder / "us.png"))
    us_mask = sitk.GetImageFromArray(tumour_mask((24, 32)) * 255)
    sitk.WriteImage(us_mask, str(folder / "us_mask.png"))


def make_site(root: Path) -> Path:
    """A good site: 6 patients with clinical + survival, MRI, two readers, ultrasound."""
    root.mkdir(parents=True, exist_ok=True)
    write_yaml(root)
    write_clinical(root, clinical_rows())
    for seed, patient in enumerate(PATIENTS):
        write_images(root, patient, seed)
    return root


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return make_site(tmp_path / "site-a")


def lines_of(problems: list[Problem]) -> list[str]:
    return [str(p) for p in problems]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --------------------------------------------------------------------------- breakages


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncated_image(root: Path) -> None:
    truncate(root / "images/p01/mri.nii.gz")


def mask_other_size(root: Path) -> None:
    write_volume(root / "images/p02/mri_mask.nii.gz", tumour_mask((10, 16, 16)))


def mask_other_spacing(root: Path) -> None:
    write_volume(root / "images/p02/mri_mask.nii.gz", tumour_mask(), spacing=(1.0, 1.0, 3.0))


def missing_mask(root: Path) -> None:
    (root / "images/p03/mri_mask.nii.gz").unlink()


def empty_mask(root: Path) -> None:
    write_volume(root / "images/p04/mri_mask.nii.gz", np.zeros(SHAPE, np.uint8))


def empty_reader2_mask(root: Path) -> None:
    write_volume(root / "images/p04/mri_mask_r2.nii.gz", np.zeros(SHAPE, np.uint8))


def corrupt_us(root: Path) -> None:
    truncate(root / "images/p05/us.png")


def missing_image_folder(root: Path) -> None:
    for path in (root / "images/p06").iterdir():
        path.unlink()
    (root / "images/p06").rmdir()


def edit_clinical(patient: str, column: str, value: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        table = pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)
        table.loc[table.patient_id == patient, column] = value
        table.to_csv(root / "clinical.csv", index=False)

    return edit


def duplicate_patient(root: Path) -> None:
    rows = clinical_rows()
    write_clinical(root, [*rows, {**rows[2], "age": "99"}])


BREAKAGES = {
    "truncated image": (
        truncated_image,
        "site-a: images/p01/mri.nii.gz: patient p01: cannot read image: file is truncated",
    ),
    "mask of another size": (
        mask_other_size,
        "site-a: images/p02/mri_mask.nii.gz: patient p02: reader-1 mask is not on mri.nii.gz's "
        "region: its grid's centre is offset by (+0.0, +0.0, +2.0) mm (LPS; 2.0 mm) and its "
        "extent differs by (+0.0, +0.0, +4.0) mm",
    ),
    "mask of another spacing": (
        mask_other_spacing,
        "site-a: images/p02/mri_mask.nii.gz: patient p02: reader-1 mask is not on mri.nii.gz's "
        "region: its grid's centre is offset by (+0.0, +0.0, +3.5) mm (LPS; 3.5 mm) and its "
        "extent differs by (+0.0, +0.0, +8.0) mm",
    ),
    "missing mask": (
        missing_mask,
        "site-a: images/p03/mri_mask.nii.gz: patient p03: missing reader-1 mask",
    ),
    "empty mask": (
        empty_mask,
        "site-a: images/p04/mri_mask.nii.gz: patient p04: reader-1 mask is empty "
        "(no non-zero voxel)",
    ),
    "empty reader-2 mask": (
        empty_reader2_mask,
        "site-a: images/p04/mri_mask_r2.nii.gz: patient p04: reader-2 mask is empty",
    ),
    "corrupt ultrasound": (
        corrupt_us, "site-a: images/p05/us.png: patient p05: cannot read image: "
    ),
    "no image folder": (
        missing_image_folder, "site-a: images/p06/: patient p06: no image folder",
    ),
    "IHC 7": (
        edit_clinical("p04", "her2_ihc", "7"),
        "site-a: clinical.csv: patient p04: her2_ihc 7 is not one of 0, 1, 2, 3",
    ),
    "bad ISH": (
        edit_clinical("p03", "her2_ish", "maybe"),
        "site-a: clinical.csv: patient p03: her2_ish maybe is not positive, negative or empty",
    ),
    "negative follow-up time": (
        edit_clinical("p05", "dfs_time", "-3"),
        "site-a: clinical.csv: patient p05: dfs_time -3 is negative",
    ),
    "follow-up time not a number": (
        edit_clinical("p05", "dfs_time", "soon"),
        "site-a: clinical.csv: patient p05: dfs_time soon is not a number",
    ),
    "event not 0/1": (
        edit_clinical("p01", "dfs_event", "2"),
        "site-a: clinical.csv: patient p01: dfs_event 2 is not 0 or 1",
    ),
    "duplicate patient id": (
        duplicate_patient,
        "site-a: clinical.csv: patient p03: duplicate patient_id on 2 rows (lines 4, 8); "
        "all are excluded",
    ),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_each_breakage_is_named_with_site_file_and_patient(
    name: str, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    breakage, expected = BREAKAGES[name]
    breakage(site)

    problems = check_site(site)
    assert any(line.startswith(expected) for line in lines_of(problems)), lines_of(problems)
    assert all(p.site == "site-a" and p.file and p.patient for p in problems)

    code, output = run_cli(capsys, str(site))
    assert code == 1
    assert expected in output
    assert "Traceback" not in output
    assert "site-a: 1 problem in 1 patient; 1 patient excluded, 5 usable" in output


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_load_site_excludes_the_broken_patient_with_its_reason(name: str, site: Path) -> None:
    breakage, expected = BREAKAGES[name]
    breakage(site)
    patient = expected.split("patient ")[1].split(":")[0]

    loaded = load_site(site, needs=ALL_NEEDS, full_read=True)

    assert patient in loaded.excluded
    assert patient not in loaded.clinical.index
    assert expected.split(f"patient {patient}: ")[1] in loaded.excluded[patient]
    assert loaded.n_patients + loaded.n_excluded == len(PATIENTS)  # nobody silently dropped


def test_good_site_is_ok(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_site(site) == []
    code, output = run_cli(capsys, str(site))
    assert code == 0
    assert output.strip() == "site-a: OK (6 patients)"


ALL_AT_ONCE = (
    "duplicate patient id", "truncated image", "mask of another size", "missing mask",
    "empty mask", "corrupt ultrasound", "IHC 7", "negative follow-up time", "event not 0/1",
)


def test_every_problem_reported_at_once(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ALL_AT_ONCE:
        BREAKAGES[name][0](site)
    write_yaml(site, site_id="Site_A", privacy={"min_patients": 2, "max_patients": 5})

    code, output = run_cli(capsys, str(site))

    assert code == 1
    # site.yaml is invalid, so the problems are named after the folder
    assert "site-a: site.yaml: site_id 'Site_A' must match ^[a-z0-9-]+$" in output
    assert "site-a: site.yaml: privacy: unknown privacy key(s) ['max_patients']" in output
    for name in ALL_AT_ONCE:
        assert BREAKAGES[name][1] in output, name
    assert "Traceback" not in output
    assert output.strip().endswith("site-a: 11 problems in 5 patients (2 site-level); "
                                   "5 patients excluded, 1 usable")


def test_cli_subprocess_prints_no_traceback(site: Path) -> None:
    truncated_image(site)
    empty_mask(site)
    edit_clinical("p02", "her2_ihc", "abc")(site)
    write_yaml(site, site_id="BAD ID")
    command = f"from client.site.check import main; raise SystemExit(main([{str(site)!r}]))"

    result = subprocess.run(
        [sys.executable, "-c", command], cwd=REPO, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "images/p01/mri.nii.gz: patient p01: cannot read image" in result.stdout
    assert "clinical.csv: patient p02: her2_ihc abc is not one of 0, 1, 2, 3" in result.stdout


def test_cli_missing_directory_returns_2(tmp_path: Path, capsys) -> None:
    code, output = run_cli(capsys, str(tmp_path / "nowhere"))
    assert code == 2
    assert "no such directory" in output


def test_cli_checks_a_folder_of_sites(tmp_path: Path, capsys) -> None:
    make_site(tmp_path / "a")
    broken = make_site(tmp_path / "b")
    write_yaml(broken, site_id="site-b")
    missing_mask(broken)
    code, output = run_cli(capsys, str(tmp_path))
    assert code == 1
    assert "site-a: OK (6 patients)" in output
    assert "site-b: images/p03/mri_mask.nii.gz: patient p03: missing reader-1 mask" in output


def test_cli_task_counts_patients_outside_the_task(site: Path, capsys) -> None:
    edit_clinical("p04", "her2_ish", "")(site)  # IHC2+ without ISH
    code, output = run_cli(capsys, str(site), "--task", "her2-low")
    assert code == 0  # not a data problem
    assert "site-a: OK (3 patients for task her2-low; 3 not in the task (" in output
    assert "HER2-positive: not in the her2-low task: 2" in output
    assert "IHC2+ without ISH: excluded from HER2 tasks: 1" in output


# --------------------------------------------------------------------------- site.yaml


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"site_id": "Hospital_A"}, "site_id 'Hospital_A' must match ^[a-z0-9-]+$"),
        ({"site_id": None}, "site_id is missing"),
        ({"roles": []}, "roles must be a non-empty list"),
        ({"roles": ["train", "external"]}, "roles cannot hold both train and external"),
        ({"roles": ["training"]}, "unknown role(s) ['training']"),
        ({"time_unit": "weeks"}, "time_unit 'weeks' is not allowed; one of: days, months, years"),
        ({"privacy": {"min_patient": 5}}, "privacy: unknown privacy key(s) ['min_patient']"),
        ({"privacy": {"min_patients": 0}}, "privacy: min_patients must be an integer >= 1"),
        ({"owner": "x"}, "unknown key 'owner'"),
    ],
)
def test_bad_site_yaml(site: Path, overrides: dict, message: str) -> None:
    write_yaml(site, **overrides)
    with pytest.raises(SiteError) as caught:
        read_site_config(site)
    assert any(str(p).startswith(f"site-a: site.yaml: {message}") for p in caught.value.problems)
    with pytest.raises(SiteError):
        load_site(site)
    assert f"site-a: site.yaml: {message}" in "\n".join(lines_of(check_site(site)))


def test_site_yaml_unparseable_or_missing(site: Path) -> None:
    (site / "site.yaml").write_text("site_id: [unclosed\n")
    assert "cannot parse YAML" in "\n".join(lines_of(check_site(site)))
    (site / "site.yaml").unlink()
    with pytest.raises(SiteError, match=r"site-a: site\.yaml: missing"):
        load_site(site)


def test_site_config_values(site: Path) -> None:
    config = read_site_config(site)
    assert config.site_id == "site-a"
    assert config.roles == ("train", "survival")
    assert config.time_unit == "days"
    assert config.privacy == PrivacyPolicy(min_patients=2, min_cell_count=1, time_bin=30)


# --------------------------------------------------------------------------- load_site


def test_load_site_types_and_index(site: Path) -> None:
    loaded = load_site(site, task="her2-positive")
    clinical = loaded.clinical
    assert list(clinical.index) == list(PATIENTS)
    assert clinical.index.name == "patient_id"
    assert list(clinical["her2_ihc"]) == [0, 1, 2, 2, 3, 1]
    assert list(clinical["her2_ish"]) == [None, None, "positive", "negative", None, "negative"]
    assert list(clinical["target"]) == [0, 0, 1, 0, 1, 0]
    assert clinical["dfs_time"].dtype == float and clinical["age"].dtype.kind in "if"
    assert loaded.excluded == {} and loaded.problems == []


def test_task_exclusions_have_reasons_and_no_problem(site: Path) -> None:
    edit_clinical("p04", "her2_ish", "")(site)
    loaded = load_site(site, task="her2-low")
    assert loaded.excluded == {
        "p03": "HER2-positive: not in the her2-low task",
        "p04": "IHC2+ without ISH: excluded from HER2 tasks",
        "p05": "HER2-positive: not in the her2-low task",
    }
    assert dict(loaded.clinical["target"]) == {"p01": 0, "p02": 1, "p06": 1}
    assert loaded.problems == []


def test_needs_control_required_values(site: Path) -> None:
    edit_clinical("p05", "dfs_time", "")(site)
    assert load_site(site, needs=("clinical",)).excluded == {}
    loaded = load_site(site, needs=("clinical", "survival"))
    assert loaded.excluded == {"p05": "clinical.csv: dfs_time is missing"}
    assert len(loaded.problems) == 1 and loaded.problems[0].patient == "p05"


def test_missing_required_column_is_a_site_error_naming_it(site: Path) -> None:
    rows = [{k: v for k, v in row.items() if k != "dfs_time"} for row in clinical_rows()]
    write_clinical(site, rows)
    assert load_site(site, needs=("clinical",)).n_patients == 6
    with pytest.raises(SiteError) as caught:
        load_site(site, needs=("clinical", "survival"))
    assert lines_of(caught.value.problems) == [
        "site-a: clinical.csv: missing column 'dfs_time' (needed for survival)"
    ]


def test_label_task_uses_label_column(site: Path) -> None:
    rows = [{"patient_id": p, "label": str(i % 2)} for i, p in enumerate(PATIENTS)]
    rows[1]["label"] = "2"
    write_clinical(site, rows)
    loaded = load_site(site, task="label")
    assert dict(loaded.clinical["target"]) == {"p01": 0, "p03": 0, "p04": 1, "p05": 0, "p06": 1}
    assert loaded.excluded == {"p02": "clinical.csv: label 2 is not 0 or 1"}
    with pytest.raises(SiteError, match="missing column 'her2_ihc'"):
        load_site(site, task="her2-positive")


def test_image_needs_only_checked_when_needed(site: Path) -> None:
    missing_mask(site)
    empty_reader2_mask(site)
    assert load_site(site, needs=("clinical",)).excluded == {}
    assert set(load_site(site, needs=("mri",)).excluded) == {"p03"}
    assert set(load_site(site, needs=("mri_r2",)).excluded) == {"p03", "p04"}
    assert load_site(site, needs=("us",)).excluded == {}


def test_header_only_read_still_catches_truncated_nifti(site: Path) -> None:
    truncated_image(site)
    loaded = load_site(site, needs=("mri",))
    assert loaded.excluded["p01"].startswith("images/p01/mri.nii.gz: cannot read image: ")


def test_image_paths(site: Path) -> None:
    loaded = load_site(site, needs=("mri", "us"))
    paths = loaded.image_paths("p01")
    assert set(paths) == {"mri", "mri_mask", "mri_mask_r2", "us", "us_mask"}
    assert paths["mri"] == site / "images/p01/mri.nii.gz"
    with pytest.raises(KeyError):
        loaded.image_paths("nobody")


def test_dicom_series_is_read(site: Path) -> None:
    folder = site / "images/p01"
    volume = sitk.ReadImage(str(folder / "mri.nii.gz"), sitk.sitkInt16)
    (folder / "mri.nii.gz").unlink()
    write_dicom_series(volume, folder / "mri")
    assert check_site(site) == []
    assert load_site(site, needs=("mri",)).image_paths("p01")["mri"] == folder / "mri"
    (folder / "mri" / "slice003.dcm").unlink()  # a missing slice: 7 slices, not 8
    assert lines_of(check_site(site))[0] == (
        "site-a: images/p01/mri: patient p01: cannot use the DICOM series: non-uniform slice "
        "spacing: the gap between slices 3 and 4 (of 7, by position) is 4 mm, the others 2 mm "
        "(1 uneven gap; a missing slice?)"
    )
    for path in (folder / "mri").iterdir():
        path.write_bytes(b"not dicom")
    assert lines_of(check_site(site))[0] == (
        "site-a: images/p01/mri: patient p01: cannot read image: no DICOM series found in the "
        "folder"
    )


def write_dicom_series(volume: sitk.Image, folder: Path) -> None:
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.1"
    for z in range(volume.GetDepth()):
        piece = volume[:, :, z]
        origin = volume.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {
            "0008|0060": "MR", "0020|000e": series, "0020|000d": series + ".0",
            "0020|0013": str(z + 1), "0020|0032": "\\".join(map(str, origin)),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "1\\1", "0018|0050": "2",
            "0008|0018": f"{series}.{z + 1}",
        }
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(piece)


def test_features_and_predictions(site: Path) -> None:
    features = pd.DataFrame({
        "patient_id": [*PATIENTS, "stranger"],
        "original_firstorder_Mean": ["1.5", "2", "abc", "4", "5", "6", "7"],
        "original_shape_Volume": ["10", "20", "30", "40", "50", "60", "70"],
    })
    features.iloc[:-2].to_csv(site / "features.csv", index=False)  # p06 has no row
    features.iloc[[0, 1, 2, 3, 4, 6]].to_csv(site / "features.csv", index=False)
    pd.DataFrame({
        "patient_id": list(PATIENTS) * 2,
        "model": ["outside"] * 6 + ["other"] * 6,
        "score": ["0.1", "0.9", "0.5", "1.2", "0.3", "0.4"] * 2,
    }).iloc[:-1].to_csv(site / "predictions.csv", index=False)  # p06 lacks 'other'

    loaded = load_site(site, needs=("clinical", "features", "predictions"))

    assert set(loaded.excluded) == {"p03", "p04", "p06"}
    assert "original_firstorder_Mean='abc'" in loaded.excluded["p03"]
    assert "score 1.2 for model 'outside' is not in [0, 1]" in loaded.excluded["p04"]
    assert "features.csv: no row for this patient" in loaded.excluded["p06"]
    assert "no score for model 'other'" in loaded.excluded["p06"]
    assert list(loaded.features.index) == ["p01", "p02", "p05"]
    assert loaded.features.loc["p02", "original_firstorder_Mean"] == 2.0
    assert len(loaded.predictions) == 6
    stranger = [p for p in loaded.problems if p.patient == "stranger"]
    assert lines_of(stranger) == ["site-a: features.csv: patient stranger: patient not in "
                                  "clinical.csv"]


def test_unknown_need_and_task_are_programming_errors(site: Path) -> None:
    with pytest.raises(ValueError, match="unknown need"):
        load_site(site, needs=("ct",))
    with pytest.raises(ValueError, match="unknown task"):
        load_site(site, task="her3")


def test_clinical_missing_or_unreadable(site: Path) -> None:
    (site / "clinical.csv").write_bytes(b"patient_id,her2_ihc\n\xff\xfe,3\n")
    assert "site-a: clinical.csv: cannot read CSV" in "\n".join(lines_of(check_site(site)))
    (site / "clinical.csv").unlink()
    with pytest.raises(SiteError, match=r"site-a: clinical\.csv: missing"):
        load_site(site)


def test_image_folder_of_unknown_patient_is_reported(site: Path) -> None:
    (site / "images/p01").rename(site / "images/p1")
    report = inspect_site(site)
    assert "site-a: images/p1/: patient p1: image folder of a patient not in clinical.csv" in (
        lines_of(report.problems)
    )
    assert "p01" in report.excluded and "p1" not in report.excluded


def test_empty_patient_id_is_counted(site: Path) -> None:
    rows = clinical_rows()
    write_clinical(site, [*rows, {**rows[0], "patient_id": ""}])
    loaded = load_site(site)
    assert lines_of(loaded.problems) == [
        "site-a: clinical.csv: line 8: patient_id is empty; the row is excluded"
    ]
    assert loaded.n_patients == 6 and loaded.n_excluded == 1


def test_site_without_patients_is_not_a_crash(site: Path, capsys) -> None:
    (site / "clinical.csv").write_text("patient_id,her2_ihc,her2_ish\n")
    assert load_site(site).n_patients == 0
    code, output = run_cli(capsys, str(site))
    assert "below privacy.min_patients (2)" in output
    assert code == 1  # six image folders of patients not in clinical.csv
    (site / "clinical.csv").write_text("")
    assert "clinical.csv: cannot read CSV" in "\n".join(lines_of(check_site(site)))


def test_stages_check_only_what_those_stages_need(site: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    truncated_image(site)  # p01's MRI is broken
    code, output = run_cli(capsys, str(site), "--stages", "cohort,survival")
    assert code == 0 and output.strip() == "site-a: OK (6 patients)"
    code, output = run_cli(capsys, str(site), "--stages", "dsfr")
    assert code == 1 and "images/p01/mri.nii.gz: patient p01: cannot read image" in output
    rows = [{k: v for k, v in row.items() if k not in ("her2_ihc", "her2_ish")}
            for row in clinical_rows()]
    write_clinical(site, rows)
    code, output = run_cli(capsys, str(site), "--stages", "survival")
    assert code == 0, output  # a survival study needs no HER2 columns
    code, output = run_cli(capsys, str(site), "--stages", "cohort")
    assert code == 1 and "missing column 'her2_ihc' (needed for labels)" in output
    code, output = run_cli(capsys, str(site), "--stages", "survival", "--task", "her2-positive")
    assert code == 1 and "missing column 'her2_ihc' (needed for task her2-positive)" in output
    assert run_cli(capsys, str(site), "--stages", "surv")[0] == 2
