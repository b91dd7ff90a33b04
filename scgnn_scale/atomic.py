"""One way to write a file so that a reader (or a resumed run) sees the old or the new content, never half."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .paths import ObjectPath, atomic_path

__all__ = ["atomic_path", "write_json", "as_stored"]


def _json_default(obj: Any):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def _dumps(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=True, default=_json_default)


def write_json(path: str | Path | ObjectPath, data: Any) -> None:
    """``data`` as indented JSON (numpy scalars and arrays as numbers and lists), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(_dumps(data))


def as_stored(data: Any) -> Any:
    """``data`` as :func:`write_json` stores it and ``json.loads`` reads it back: mapping keys sorted, numpy
    scalars and arrays as Python numbers and lists, tuples as lists."""
    return json.loads(_dumps(data))
