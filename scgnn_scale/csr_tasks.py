"""Streamed passes over a CSR group of the store (``work/input``, ``raw/X``) as Dask tasks.

The preprocess and pca stages read rows of a CSR group in tasks that take store paths (so they run in
threads or on the Dask workers of ``--scheduler``), sum their partial results in a tree and compute the
graph with a progress bar (threads by default: the tasks spend their time in zarr/blosc decompression and
numpy, which release the GIL; docs in :mod:`scgnn_scale.stages.preprocess`).
"""

from __future__ import annotations

import os

import numpy as np

# input rows read at once by a task that selects rows (bounds memory when the selected rows are sparse)
SUB_ROWS = 8192
TREE_FAN_IN = 8


def read_rows(input_path: str, start: int, stop: int):
    """CSR pieces (indptr from 0, indices, data) of input rows ``start:stop``."""
    import zarr

    indptr = np.asarray(zarr.open_array(f"{input_path}/indptr", mode="r")[start:stop + 1], dtype=np.int64)
    lo, hi = int(indptr[0]), int(indptr[-1])
    indices = np.asarray(zarr.open_array(f"{input_path}/indices", mode="r")[lo:hi])
    data = np.asarray(zarr.open_array(f"{input_path}/data", mode="r")[lo:hi])
    return indptr - lo, indices, data


def per_cell_scale(library: np.ndarray, target: float) -> np.ndarray:
    """Per-cell factor ``target / library`` (0 for an empty cell, which stays all-zero)."""
    out = np.zeros_like(library, dtype=np.float64)
    np.divide(target, library, out=out, where=library > 0)
    return out


def iter_selected_rows(input_path: str, rows: np.ndarray):
    """Yield ``(i, j, counts, indices, data)``: the entries of input rows ``rows[i:j]`` in row order and
    their per-row counts, reading at most ``SUB_ROWS`` input rows at once (``rows`` sorted)."""
    i = 0
    while i < len(rows):
        j = int(np.searchsorted(rows, rows[i] + SUB_ROWS, side="left"))
        first, last = int(rows[i]), int(rows[j - 1])
        indptr, indices, data = read_rows(input_path, first, last + 1)
        local = rows[i:j] - first
        counts = indptr[local + 1] - indptr[local]
        # positions of the selected rows' entries, in row order
        take = np.repeat(indptr[local] - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
        yield i, j, counts, indices[take], data[take]
        i = j


def _sum_parts(*parts):
    if isinstance(parts[0], tuple):
        return tuple(_sum_parts(*items) for items in zip(*parts, strict=True))
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    return total


def tree_sum(parts: list):
    """Sum delayed results pairwise in a tree (fan-in 8), so few partial sums are alive at once."""
    import dask

    while len(parts) > 1:
        parts = [dask.delayed(_sum_parts)(*parts[i:i + TREE_FAN_IN]) for i in range(0, len(parts), TREE_FAN_IN)]
    return parts[0]


def compute_tasks(ctx, desc: str, *objs):
    """Compute delayed objects: threads by default, the Dask cluster when ``--scheduler`` is given or
    the embedded cluster's workers are processes (``runtime.worker_processes``: on many cores the
    scipy parts of these tasks hold the GIL)."""
    import dask

    if ctx.config.runtime.scheduler or ctx.config.runtime.worker_processes:
        return dask.compute(*objs, scheduler=ctx.client())
    from dask.callbacks import Callback

    bar = ctx.progress(None, desc, "tasks")

    class _Progress(Callback):
        def _start_state(self, dsk, state):
            bar.total = len(dsk)
            bar.refresh()

        def _posttask(self, key, result, dsk, state, worker_id):
            bar.update(1)

    with bar, _Progress():
        return dask.compute(*objs, scheduler="threads", num_workers=ctx.config.runtime.n_workers or os.cpu_count())
