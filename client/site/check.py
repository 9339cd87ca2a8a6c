"""`feddlr check-site DIR [DIR ...] [--task TASK] [--stages S,…]`: every problem of a site
folder at once — of everything it holds, or (`--stages`) of just what those stages need.

Prints one line per problem (`site: file: patient ID: message`) and a summary per site;
returns 0 when no problem is found, 1 when any is, 2 when a DIR does not exist. A DIR that
holds no site.yaml but has site folders inside (e.g. the output of `feddlr simulate`) is
checked folder by folder. Never prints a traceback for bad data.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from client.site.folder import FEATURES_CSV, SITE_YAML, SiteCheck, inspect_site, present_needs
from shared.config import STAGE_NEEDS, STAGES
from shared.labels import TASKS

EXIT_OK, EXIT_PROBLEMS, EXIT_NO_DIR = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error: argparse has printed why
        return int(exit_.code or 0)
    code = EXIT_OK
    for directory in args.dirs:
        if not directory.is_dir():
            print(f"feddlr check-site: {directory}: no such directory", file=sys.stderr)
            code = EXIT_NO_DIR
            continue
        for root in _site_folders(directory):
            if not check_one(root, task=args.task, stages=args.stages) and code == EXIT_OK:
                code = EXIT_PROBLEMS
    return code


def check_one(root: Path, *, task: str | None = None, stages: tuple[str, ...] | None = None,
              out: TextIO | None = None) -> bool:
    """Check one site folder and print its report; True when it has no problem."""
    out = out or sys.stdout
    try:
        needs = None if stages is None else stage_needs(root, stages, task)
        report = inspect_site(root, task=task, needs=needs)
    except Exception as error:  # a bug or an unforeseen input: report it, no traceback
        print(f"{root.name}: .: check failed: {type(error).__name__}: {error}", file=out)
        return False
    for problem in report.problems:
        print(problem, file=out)
    for line in _notes(report):
        print(line, file=out)
    print(_summary(report, task), file=out)
    return report.ok


def stage_needs(root: Path, stages: tuple[str, ...], task: str | None) -> tuple[str, ...]:
    """The inputs `stages` need of this folder (shared.config.STAGE_NEEDS): an optional one
    where the site has it, radiomics' features.csv where present (else the MRI). Survival's
    label is checked only with --task (it needs one only to group by `label`)."""
    asked: list[str] = []
    for stage in stages:
        for need in STAGE_NEEDS[stage]:
            if need == "mri|features":
                need = "features" if (root / FEATURES_CSV).is_file() else "mri"
            if not (need == "label" and stage == "survival" and task is None):
                asked.append(need)
    return present_needs(root, asked)


def _stages(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="feddlr check-site",
        description="Report every problem in hospital site folder(s) at once.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="site folder(s)")
    parser.add_argument(
        "--task", choices=TASKS, default=None,
        help="also count the patients of this task (e.g. IHC2+ without ISH are outside "
        "HER2 tasks)",
    )
    parser.add_argument(
        "--stages", type=_stages, default=None, metavar="S,…",
        help="check only what these stages need (e.g. survival: clinical.csv with DFS, "
        "no HER2 columns or images); default: everything the folder holds",
    )
    return parser


def _site_folders(directory: Path) -> list[Path]:
    """The folder itself, or the site folders inside a folder of sites."""
    if (directory / SITE_YAML).exists():
        return [directory]
    inside = sorted(p for p in directory.iterdir() if (p / SITE_YAML).is_file())
    return inside or [directory]


def _summary(report: SiteCheck, task: str | None) -> str:
    """`site-a: OK (40 patients)` or `site-a: 3 problems in 2 patients; ...`."""
    for_task = f" for task {task}" if task else ""
    outside = _outside_task(report, task)
    if report.ok:
        return f"{report.site}: OK ({_plural(report.n_patients, 'patient')}{for_task}{outside})"
    n_problems = len(report.problems)
    n_patients = len(report.problem_patients)
    site_level = sum(problem.patient is None for problem in report.problems)
    text = f"{report.site}: {_plural(n_problems, 'problem')} in {_plural(n_patients, 'patient')}"
    if site_level:
        text += f" ({site_level} site-level)"
    excluded = len(report.excluded) - len(report.not_in_task)
    return (
        f"{text}; {_plural(excluded, 'patient')} excluded, "
        f"{report.n_patients} usable{for_task}{outside}"
    )


def _outside_task(report: SiteCheck, task: str | None) -> str:
    if not task or not report.not_in_task:
        return ""
    reasons = Counter(report.not_in_task.values())
    detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items()))
    return f"; {len(report.not_in_task)} not in the task ({detail})"


def _notes(report: SiteCheck) -> list[str]:
    """Things worth knowing that are not problems with the data: how masks on another grid
    are put on their image's (client/site/image_pair.py), and a site too small to answer."""
    notes = [note.as_note() for note in report.notes]
    if report.config is None:
        return notes
    minimum = report.config.privacy.min_patients
    if report.n_patients < minimum:
        notes.append(
            f"{report.site}: note: {report.n_patients} usable patients is below "
            f"privacy.min_patients ({minimum}); the site would refuse every statistic"
        )
    return notes


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


if __name__ == "__main__":
    raise SystemExit(main())
