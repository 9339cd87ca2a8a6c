"""results.json as written: strict JSON, numpy values as plain ones, NaN and infinities as
null (`plain`). The workflow, the checkpoint and the training record write through it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_results(results: dict[str, Any], path: Path) -> None:
    """Strict JSON: numpy values become plain ones, NaN and infinities become null."""
    path.write_text(json.dumps(plain(results), indent=2, allow_nan=False) + "\n",
                    encoding="utf-8")


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
