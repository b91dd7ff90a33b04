"""Stage ``preprocess``: docs/METHOD.md step 1, streamed over row blocks of ``work/input``.

The published scGNN's preprocessing, formula by formula:

1. Genes kept: non-zero in at least ``min_cell_fraction * n_cells`` cells.
2. Cells kept: non-zero in at least ``min_gene_fraction * n_kept_genes`` of the kept genes.
3. Of the kept genes, the ``n_top_genes`` with the largest variance (``ddof=1``) across the kept cells;
   ties go to the gene that comes first in the input. The ranked values are the raw counts
   (``variance_on='raw'``, the published code) or the output values before the log is undone
   (``'log'``: ``log1p`` of the possibly normalised counts). Fewer surviving genes than
   ``n_top_genes``: all are kept. Genes keep their input order in ``X``.
4. Optional library-size normalisation (``normalize_total > 0``): each kept cell is scaled to that
   total, its library size being its sum over the genes kept in step 1 (as scanpy's ``normalize_total``
   after ``filter_genes``). Off by default, as in the paper.
5. ``X = log1p(values)`` (natural log), float32, kept cells x top genes.

For raw integer counts the variance ranking is exact: the per-gene sums of x and x^2 are exact in
float64 (integers below 2^53) and genes are ranked by the integer ``m * sum(x^2) - sum(x)^2`` in Python
integers, so ties are real ties and are broken by gene order whatever the block layout.

Passes, each a Dask graph over row blocks of ``store.chunk_rows`` cells (memory: one block per thread
plus O(n_cells + n_genes) vectors):

- A: per-gene non-zero counts (tree-summed);
- B: per block, the cell filter, library sizes and per-gene sum, sum of squares and non-zero count over
  the kept cells (cell decisions only need the gene mask of A, so B and the statistics share one pass);
- C: ``X``, one task per row chunk of the output, each writing whole ``(chunk_rows, chunk_genes)`` chunks;
  with ``keep_counts``, in the same graph, ``raw``: one task per chunk of its CSR ``data``/``indices``
  (the output ``indptr`` is known from the input's, so each task copies its own entry range and no two
  tasks write into one chunk). Its cost is a decompression and recompression of the kept entries: on a
  simulated 100k x 2000 atlas (53M non-zeros, every cell kept, 2 cores) the stage took 14.3-15.4 s
  instead of 11.6-12.1 s, and ``raw`` 91 MB on disk.

Scheduler choice: the threaded scheduler (``dask.delayed`` graphs run with ``scheduler="threads"``),
because the tasks spend their time in zarr/blosc decompression and numpy, which release the GIL, and
return a few vectors; an embedded LocalCluster would cost seconds of start-up and a process per core
for no gain on one machine. With ``--scheduler`` the same graphs run on that cluster (``ctx.client()``):
tasks take store paths, not arrays, so workers that see the run directory read it themselves.

Writes ``X``, ``obs`` (kept cells with the carried columns), ``var`` (kept genes; ``variance`` and
``mean`` of the ranked values and ``n_cells_nonzero``, all over the kept cells), ``work/preprocess/cells``
and ``work/preprocess/genes`` (int64 indices into the input), and with ``keep_counts`` (default) ``raw``:
the input counts of every input gene for the kept cells, a CSR group ``raw/X`` (float32 data, int32
indices, int64 indptr) with ``raw/var`` (the input's genes) and an empty ``raw/varm``, so that
``anndata.read_zarr`` gives ``.raw`` back; without it an earlier ``raw`` is removed on commit.
"""

from __future__ import annotations

import numpy as np

from ..csr_tasks import compute_tasks, iter_selected_rows, per_cell_scale, read_rows, tree_sum
from ..errors import InputError
from ..keys import KEYS
from ..readers import source_name
from ..store import CSR_CHUNK
from ..store import compressors as store_compressors

# ---------------------------------------------------------------------------------------------------
# tasks (module level, taking paths: they run in threads or on Dask workers)


def _gene_nonzero_counts(input_path: str, start: int, stop: int, n_genes: int) -> np.ndarray:
    _, indices, data = read_rows(input_path, start, stop)
    return np.bincount(indices[data != 0], minlength=n_genes).astype(np.int64)


def _filter_and_stats(input_path: str, start: int, stop: int, gene_pos: np.ndarray, n_kept_genes: int,
                      min_genes: float, normalize_total: float, variance_on: str):
    """Cell filter of one block, library sizes, and gene statistics over its kept cells.

    Returns ``(kept_genes_per_cell, library_size, (sum, sum_sq, n_nonzero))``; a cell is kept when its
    count reaches ``min_genes``; the statistics cover the kept cells and the kept genes (positions from
    ``gene_pos``, -1 for dropped genes).
    """
    indptr, indices, data = read_rows(input_path, start, stop)
    n_rows = stop - start
    row = np.repeat(np.arange(n_rows), np.diff(indptr))
    pos = gene_pos[indices]
    on_kept = (pos >= 0) & (data != 0)
    row, pos, values = row[on_kept], pos[on_kept], data[on_kept].astype(np.float64)
    per_cell = np.bincount(row, minlength=n_rows)
    cell_keep = per_cell >= min_genes
    library = np.bincount(row, weights=values, minlength=n_rows).astype(np.float64)
    in_kept_cell = cell_keep[row]
    row, pos, values = row[in_kept_cell], pos[in_kept_cell], values[in_kept_cell]
    if variance_on == "log":
        values = np.log1p(values * per_cell_scale(library, normalize_total)[row]) if normalize_total else np.log1p(values)
    # astype: bincount of nothing is int64 even with weights (a block whose cells were all dropped)
    stats = (np.bincount(pos, weights=values, minlength=n_kept_genes).astype(np.float64),
             np.bincount(pos, weights=values * values, minlength=n_kept_genes).astype(np.float64),
             np.bincount(pos, minlength=n_kept_genes).astype(np.int64))
    return per_cell.astype(np.int32), library, stats


def _write_chunk(input_path: str, x_path: str, out_start: int, rows: np.ndarray, col_map: np.ndarray,
                 n_out_genes: int, scale: np.ndarray | None) -> int:
    """Rows ``rows`` of the input (sorted) -> ``X[out_start:out_start + len(rows)]``, whole chunks."""
    import zarr

    out = np.zeros((len(rows), n_out_genes), dtype=np.float32)
    for i, j, counts, indices, data in iter_selected_rows(input_path, rows):
        out_row = np.repeat(np.arange(i, j), counts)
        cols = col_map[indices]
        keep = cols >= 0
        values = data[keep].astype(np.float64)
        out_row, cols = out_row[keep], cols[keep]
        if scale is not None:
            values = values * scale[out_row]
        out[out_row, cols] = np.log1p(values)
    zarr.open_array(x_path, mode="r+")[out_start:out_start + len(rows)] = out
    return len(rows)


def _write_raw_entries(input_path: str, raw_x_path: str, lo: int, hi: int, rows: np.ndarray, offset: int) -> int:
    """Entries ``lo:hi`` of the raw CSR's ``data`` and ``indices``, copied from input rows ``rows``
    (sorted), whose entries start at position ``offset`` of the raw CSR.

    ``lo`` is a chunk boundary and ``hi`` one or the end, so no two tasks write into one chunk.
    """
    import zarr

    parts = [(indices, data) for _, _, _, indices, data in iter_selected_rows(input_path, rows)]
    indices = np.concatenate([p[0] for p in parts])[lo - offset:hi - offset]
    data = np.concatenate([p[1] for p in parts])[lo - offset:hi - offset]
    zarr.open_array(f"{raw_x_path}/indices", mode="r+")[lo:hi] = indices
    zarr.open_array(f"{raw_x_path}/data", mode="r+")[lo:hi] = data
    return hi - lo


def _raw_indptr(input_path: str, cells: np.ndarray) -> np.ndarray:
    """The raw CSR's ``indptr``: the kept cells' entry counts in the input, cumulated (O(n_cells))."""
    import zarr

    counts = np.diff(np.asarray(zarr.open_array(f"{input_path}/indptr", mode="r")[:], dtype=np.int64))
    return np.concatenate([[0], np.cumsum(counts[cells])]).astype(np.int64)


def _create_raw(st, indptr: np.ndarray, input_var, compression_level: int) -> str:
    """Stage ``raw`` in AnnData's layout (X a CSR group, the input's var, empty varm), with ``X/indptr``
    written and ``X/data``, ``X/indices`` allocated; returns the path of ``raw/X`` for the copy tasks."""
    from anndata.io import write_elem

    compressors = store_compressors(compression_level)
    nnz = int(indptr[-1])
    raw = st.create_group(KEYS.raw)
    raw.attrs.update({"encoding-type": "raw", "encoding-version": "0.1.0"})
    x = raw.create_group("X")
    x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                    "shape": [len(indptr) - 1, len(input_var)]})
    for name, dtype, size in (("data", np.float32, nnz), ("indices", np.int32, nnz),
                              ("indptr", np.int64, len(indptr))):
        x.create_array(name, shape=(size,), dtype=dtype, chunks=(CSR_CHUNK,), compressors=compressors,
                       fill_value=0)
    x["indptr"][:] = indptr
    write_elem(raw, "var", input_var)
    write_elem(raw, "varm", {})
    return st.path_of("raw/X")


def _raw_tasks(input_path: str, raw_x_path: str, cells: np.ndarray, indptr: np.ndarray) -> list:
    """Delayed copies of the kept cells' input entries into ``raw/X``, one per chunk of its arrays."""
    import dask

    nnz = int(indptr[-1])
    tasks = []
    for lo in range(0, nnz, CSR_CHUNK):
        hi = min(lo + CSR_CHUNK, nnz)
        first = int(np.searchsorted(indptr, lo, side="right")) - 1  # the kept cell holding entry lo
        stop = int(np.searchsorted(indptr, hi, side="left"))  # past the kept cell holding entry hi - 1
        tasks.append(dask.delayed(_write_raw_entries)(input_path, raw_x_path, lo, hi, cells[first:stop],
                                                      int(indptr[first])))
    return tasks


# ---------------------------------------------------------------------------------------------------
# the formulas on the reduced statistics


def rank_genes_by_variance(sums: np.ndarray, sums_sq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample variances (``ddof=1``) and the gene order by decreasing variance, ties by gene index.

    Parameters
    ----------
    sums, sums_sq
        Per-gene sum of values and of squared values over ``n`` cells (float64).
    n
        Number of cells (at least 2).

    Returns
    -------
    variance, order
        ``order[0]`` is the most variable gene. When every sum is an integer below 2^53 (raw counts)
        the ranking is exact (integer arithmetic); otherwise it is the float64 formula.
    """
    exact = bool(np.all(sums == np.round(sums)) and np.all(sums_sq == np.round(sums_sq))
                 and (len(sums_sq) == 0 or sums_sq.max() < 2.0**53))
    if exact:
        numerators = [n * int(s2) - int(s1) * int(s1) for s1, s2 in zip(sums, sums_sq, strict=True)]
        variance = np.array([num / (n * (n - 1)) for num in numerators], dtype=np.float64)
        order = np.array(sorted(range(len(numerators)), key=lambda j: (-numerators[j], j)), dtype=np.int64)
        return variance, order
    variance = np.maximum((sums_sq - sums * sums / n) / (n - 1), 0.0)
    order = np.lexsort((np.arange(len(variance)), -variance)).astype(np.int64)
    return variance, order


def _check_config(cfg) -> None:
    for option in ("min_cell_fraction", "min_gene_fraction"):
        value = getattr(cfg, option)
        if not 0.0 <= value <= 1.0:
            raise InputError(f"config option preprocess.{option}: {value} is not a fraction between 0 and 1")
    if cfg.n_top_genes < 1:
        raise InputError(f"config option preprocess.n_top_genes: {cfg.n_top_genes} must be at least 1")
    if cfg.normalize_total < 0:
        raise InputError(f"config option preprocess.normalize_total: {cfg.normalize_total} must be >= 0")


# ---------------------------------------------------------------------------------------------------
# the stage


def run(ctx) -> dict:
    """Filter, select the most variable genes and log-transform ``work/input`` into ``X`` (module docstring)."""
    import dask
    from anndata.io import write_elem

    cfg = ctx.config.preprocess
    _check_config(cfg)
    name = source_name(ctx.input) if ctx.input is not None else str(ctx.store.root)
    group = ctx.store.open_group(KEYS.input)
    n_cells, n_genes = (int(s) for s in group.attrs["shape"])
    input_path = ctx.store.path_of(KEYS.input)
    block = ctx.config.store.chunk_rows
    ranges = [(a, min(a + block, n_cells)) for a in range(0, n_cells, block)]

    # pass A: gene filter
    parts = [dask.delayed(_gene_nonzero_counts)(input_path, a, b, n_genes) for a, b in ranges]
    (gene_nnz,) = compute_tasks(ctx, "gene counts", tree_sum(parts))
    expressed = np.flatnonzero(gene_nnz >= cfg.min_cell_fraction * n_cells)
    if len(expressed) == 0:
        raise InputError(f"{name}: nothing left after filtering: no gene is non-zero in at least "
                         f"{cfg.min_cell_fraction:g} of the {n_cells} cells "
                         f"(preprocess.min_cell_fraction; the best gene is non-zero in {int(gene_nnz.max())})")

    # pass B: cell filter, library sizes, gene statistics over the kept cells
    gene_pos = np.full(n_genes, -1, dtype=np.int64)
    gene_pos[expressed] = np.arange(len(expressed))
    gene_pos_d = dask.delayed(gene_pos)
    min_genes = cfg.min_gene_fraction * len(expressed)
    outs = [dask.delayed(_filter_and_stats, nout=3)(input_path, a, b, gene_pos_d, len(expressed), min_genes,
                                                     cfg.normalize_total, cfg.variance_on) for a, b in ranges]
    count_parts, library_parts, stats = compute_tasks(ctx, "filters and variances", [o[0] for o in outs],
                                                      [o[1] for o in outs], tree_sum([o[2] for o in outs]))
    genes_per_cell = np.concatenate(count_parts)
    cell_keep = genes_per_cell >= min_genes  # the same test the tasks applied
    library = np.concatenate(library_parts)
    cells = np.flatnonzero(cell_keep).astype(np.int64)
    if len(cells) == 0:
        raise InputError(f"{name}: nothing left after filtering: no cell is non-zero in at least "
                         f"{cfg.min_gene_fraction:g} of the {len(expressed)} kept genes "
                         f"(preprocess.min_gene_fraction; the best cell has {int(genes_per_cell.max())})")
    if len(cells) < 2:
        raise InputError(f"{name}: only 1 cell left after filtering; at least 2 are needed")
    sums, sums_sq, nonzero = stats
    m = len(cells)
    variance, order = rank_genes_by_variance(sums, sums_sq, m)
    top = np.sort(order[: cfg.n_top_genes])
    genes = expressed[top]
    n_out = len(genes)

    # pass C: X, one task per output row chunk (and raw, one task per chunk of its entries)
    col_map = np.full(n_genes, -1, dtype=np.int64)
    col_map[genes] = np.arange(n_out)
    col_map_d = dask.delayed(col_map)
    scale = per_cell_scale(library[cells], cfg.normalize_total) if cfg.normalize_total else None
    input_var = ctx.store.read_elem(KEYS.input_var)
    raw_nnz = None
    with ctx.store.staging(ctx.stage) as st:
        X = st.create_matrix(KEYS.x, (m, n_out), np.float32)
        x_path = st.path_of(KEYS.x)
        step = X.chunks[0]
        tasks = [dask.delayed(_write_chunk)(input_path, x_path, a, cells[a:a + step], col_map_d, n_out,
                                            None if scale is None else scale[a:a + step])
                 for a in range(0, m, step)]
        if cfg.keep_counts:
            # the raw copy shares pass C's graph, so its reads run beside the X tasks
            raw_indptr = _raw_indptr(input_path, cells)
            raw_nnz = int(raw_indptr[-1])
            raw_x_path = _create_raw(st, raw_indptr, input_var, ctx.config.store.compression_level)
            tasks += _raw_tasks(input_path, raw_x_path, cells, raw_indptr)
        else:
            st.drop(KEYS.raw)  # a raw left by an earlier run with keep_counts would no longer match
        compute_tasks(ctx, "writing X" + (" and raw counts" if cfg.keep_counts else ""), tasks)

        obs = ctx.store.read_elem(KEYS.input_obs).iloc[cells]
        var = input_var.iloc[genes].copy()
        var["variance"] = variance[top]
        var["mean"] = sums[top] / m
        var["n_cells_nonzero"] = nonzero[top]
        st.write_elem(KEYS.obs, obs)
        st.write_elem(KEYS.var, var)
        work = st.create_group(KEYS.preprocess)
        write_elem(work, "cells", cells)
        write_elem(work, "genes", genes.astype(np.int64))
    ctx.log.info("preprocess: %d of %d cells, %d of %d expressed genes (of %d)", m, n_cells, n_out,
                 len(expressed), n_genes)
    return {"n_cells_input": n_cells, "n_genes_input": n_genes, "n_genes_expressed": int(len(expressed)),
            "n_cells": int(m), "n_genes": int(n_out), "variance_on": cfg.variance_on,
            "normalize_total": cfg.normalize_total, "raw_nnz": raw_nnz}
