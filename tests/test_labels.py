"""HER2 label rules (ASCO/CAP 2018): every IHC x ISH combination, every task, bad values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from client.stages.handshake import n_excluded
from shared.labels import (
    IHC2_WITHOUT_ISH,
    POSITIVE_NOT_IN_LOW,
    TASKS,
    LabelError,
    her2_low_status,
    her2_status,
    is_missing,
    parse_binary_label,
    parse_ihc,
    parse_ish,
    task_label,
)

EXCLUDED = "excluded"
# (ihc, ish) -> (her2_status, her2_low_status, her2-positive label, her2-low label)
# ISH only decides IHC2+; "excluded" marks a patient outside the task (LabelError).
TRUTH: dict[tuple[int, str | None], tuple[str, str, object, object]] = {
    (0, "positive"): ("negative", "zero", 0, 0),
    (0, "negative"): ("negative", "zero", 0, 0),
    (0, None): ("negative", "zero", 0, 0),
    (1, "positive"): ("negative", "low", 0, 1),
    (1, "negative"): ("negative", "low", 0, 1),
    (1, None): ("negative", "low", 0, 1),
    (2, "positive"): ("positive", "positive", 1, EXCLUDED),
    (2, "negative"): ("negative", "low", 0, 1),
    (2, None): (EXCLUDED, EXCLUDED, EXCLUDED, EXCLUDED),
    (3, "positive"): ("positive", "positive", 1, EXCLUDED),
    (3, "negative"): ("positive", "positive", 1, EXCLUDED),
    (3, None): ("positive", "positive", 1, EXCLUDED),
}
COMBINATIONS = sorted(TRUTH, key=lambda k: (k[0], str(k[1])))


def test_truth_table_covers_every_combination() -> None:
    assert set(TRUTH) == {(i, s) for i in range(4) for s in ("positive", "negative", None)}
    assert TASKS == ("her2-positive", "her2-low", "label")


@pytest.mark.parametrize(("ihc", "ish"), COMBINATIONS)
def test_her2_status(ihc: int, ish: str | None) -> None:
    expected = TRUTH[(ihc, ish)][0]
    if expected == EXCLUDED:
        with pytest.raises(LabelError, match="IHC2\\+ without ISH"):
            her2_status(ihc, ish)
    else:
        assert her2_status(ihc, ish) == expected


@pytest.mark.parametrize(("ihc", "ish"), COMBINATIONS)
def test_her2_low_status(ihc: int, ish: str | None) -> None:
    expected = TRUTH[(ihc, ish)][1]
    if expected == EXCLUDED:
        with pytest.raises(LabelError, match="IHC2\\+ without ISH"):
            her2_low_status(ihc, ish)
    else:
        assert her2_low_status(ihc, ish) == expected


@pytest.mark.parametrize(("ihc", "ish"), COMBINATIONS)
def test_task_her2_positive(ihc: int, ish: str | None) -> None:
    expected = TRUTH[(ihc, ish)][2]
    if expected == EXCLUDED:
        with pytest.raises(LabelError) as caught:
            task_label("her2-positive", ihc, ish)
        assert str(caught.value) == IHC2_WITHOUT_ISH
    else:
        assert task_label("her2-positive", ihc, ish) == expected


@pytest.mark.parametrize(("ihc", "ish"), COMBINATIONS)
def test_task_her2_low(ihc: int, ish: str | None) -> None:
    expected = TRUTH[(ihc, ish)][3]
    if expected != EXCLUDED:
        assert task_label("her2-low", ihc, ish) == expected
        return
    with pytest.raises(LabelError) as caught:
        task_label("her2-low", ihc, ish)
    reason = IHC2_WITHOUT_ISH if ish is None and ihc == 2 else POSITIVE_NOT_IN_LOW
    assert str(caught.value) == reason


def test_patients_outside_the_her2_low_population_are_not_counted_as_excluded() -> None:
    """The handshake's `n_excluded` tells the two her2-low reasons apart by their text: an
    IHC2+ patient without ISH (equivocal) is excluded, a HER2-positive one is simply outside
    the task's population. Every combination of the truth table, counted from the table."""
    excluded = {}
    for i, (ihc, ish) in enumerate(COMBINATIONS):
        try:
            task_label("her2-low", ihc, ish)
        except LabelError as err:
            excluded[f"p{i}"] = str(err)
    session = SimpleNamespace(site=SimpleNamespace(excluded=excluded))
    outside = [k for k, v in TRUTH.items() if v[3] == EXCLUDED]
    equivocal = [k for k in outside if TRUTH[k][0] == EXCLUDED]
    assert len(excluded) == len(outside) == 5 and len(equivocal) == 1
    assert n_excluded(session) == len(equivocal)


@pytest.mark.parametrize(("ihc", "ish"), COMBINATIONS)
@pytest.mark.parametrize("label", [0, 1])
def test_task_label_ignores_ihc_and_ish(ihc: int, ish: str | None, label: int) -> None:
    assert task_label("label", ihc, ish, label) == label


def test_task_label_needs_a_valid_label() -> None:
    with pytest.raises(LabelError, match="label is missing"):
        task_label("label", 3, "positive", None)
    with pytest.raises(LabelError, match="label 2 is not 0 or 1"):
        task_label("label", 3, "positive", 2)
    with pytest.raises(LabelError, match="label yes is not 0 or 1"):
        task_label("label", 3, "positive", "yes")


@pytest.mark.parametrize("value", ["0", "1", "0.0", "1.0", 0, 1, 1.0, True, " 1 "])
def test_binary_label_accepts(value: object) -> None:
    assert parse_binary_label(value) in (0, 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (3, 3), (2.0, 2), ("0", 0), ("1", 1), ("2", 2), ("3", 3), ("1+", 1), ("2+", 2),
     ("3+", 3), (" 3+ ", 3), ("2.0", 2)],
)
def test_ihc_accepted_spellings(value: object, expected: int) -> None:
    assert parse_ihc(value) == expected


@pytest.mark.parametrize(
    ("value", "shown"),
    [(7, "7"), (-1, "-1"), (2.5, "2.5"), ("abc", "abc"), ("4+", "4+"), ("0+", "0+"),
     ("7", "7"), (math.inf, "inf"), (True, "True"), ("two plus", "'two plus'")],
)
def test_ihc_invalid_values_are_named(value: object, shown: str) -> None:
    with pytest.raises(LabelError) as caught:
        parse_ihc(value)
    assert str(caught.value) == f"her2_ihc {shown} is not one of 0, 1, 2, 3"
    with pytest.raises(LabelError, match="is not one of 0, 1, 2, 3"):
        task_label("her2-positive", value, "positive")


@pytest.mark.parametrize("value", [None, "", "  ", math.nan, "NA", "nan"])
def test_ihc_missing(value: object) -> None:
    with pytest.raises(LabelError, match="her2_ihc is missing"):
        parse_ihc(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("positive", "positive"), ("Positive", "positive"), ("POS", "positive"), ("+", "positive"),
     ("negative", "negative"), (" Negative ", "negative"), ("neg", "negative"), ("-", "negative"),
     (None, None), ("", None), (math.nan, None), ("N/A", None)],
)
def test_ish_accepted_spellings(value: object, expected: str | None) -> None:
    assert parse_ish(value) == expected


@pytest.mark.parametrize(("value", "shown"), [("maybe", "maybe"), ("amplified", "amplified"),
                                              (1, "1"), ("equivocal", "equivocal")])
def test_ish_invalid_values_are_named(value: object, shown: str) -> None:
    with pytest.raises(LabelError) as caught:
        parse_ish(value)
    assert str(caught.value) == f"her2_ish {shown} is not positive, negative or empty"
    # an invalid ISH value is an error even where IHC alone decides
    with pytest.raises(LabelError):
        her2_status(3, value)


def test_unknown_task_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="unknown task 'her2'") as caught:
        task_label("her2", 3, "positive")
    assert not isinstance(caught.value, LabelError)


def test_is_missing() -> None:
    assert is_missing(None) and is_missing(math.nan) and is_missing(" ") and is_missing("null")
    assert not is_missing(0) and not is_missing("0") and not is_missing("negative")
