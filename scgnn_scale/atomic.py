"""One way to write a file so that a reader (or a resumed run) sees the old or the new content, never half."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success its content is flushed to disk and renamed over
    ``path``. On an error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON (numpy scalars and arrays as numbers and lists), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(_dumps(data))


def as_stored(data: Any) -> Any:
    """``data`` as :func:`write_json` stores it and ``json.loads`` reads it back: mapping keys sorted, numpy
    scalars and arrays as Python numbers and lists, tuples as lists."""
    return json.loads(_dumps(data))
