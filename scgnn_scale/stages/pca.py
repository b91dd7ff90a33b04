"""Stage ``pca``: principal components of the library-normalised counts, searched beside the feature embedding.

A departure from the paper (``pca.n_comps`` 0 restores it): the cell graph (stage ``graph`` and each
iteration) is searched in the feature autoencoder's embedding and these components side by side
(:func:`scgnn_scale.cell_graph.searched_embedding`). The components are scanpy's default embedding,
computed out of core from the counts of every input gene of the kept cells (``raw``, or ``work/input``
when ``preprocess.keep_counts`` is off):

- pass 1 (every cell): library sizes and, per gene, the sums of ``x / library`` and its square and the
  non-zero count; normalised counts are ``target_sum * x / library`` (target: the median library size
  unless ``pca.target_sum`` is set), so these give each gene's mean and variance after normalising, and
  the ``pca.n_top_genes`` genes of largest normalised dispersion are chosen
  (:func:`scgnn_scale.normalised_pca.dispersion_genes`);
- pass 2 (at most ``pca.max_cells`` cells, sampled with the run's seed): the Gram matrix and column sums of
  ``log1p`` of their normalised counts on those genes, whose covariance's leading eigenvectors are the axes
  (:func:`scgnn_scale.normalised_pca.components_from_gram`);
- pass 3 (every cell): the scores ``(y - mean) @ axes``, written to ``obsm/X_pca``, one task per row chunk.

Memory: one block of rows per thread, a genes x genes Gram matrix per pass-2 task (32 MB at 2,000 genes),
and O(n_cells) library sizes. Tasks take store paths (as preprocess's), so they run in threads or on the
Dask cluster of ``--scheduler`` (:mod:`scgnn_scale.csr_tasks`, shared with preprocess). Writes
``obsm/X_pca`` (float32, cells x n_comps) and ``work/pca/genes`` (the chosen genes, int64 indices into the
input's genes); with ``n_comps`` 0 removes both.
"""

from __future__ import annotations

import numpy as np

from ..csr_tasks import compute_tasks, iter_selected_rows, per_cell_scale, tree_sum
from ..errors import InputError
from ..keys import KEYS
from ..normalised_pca import components_from_gram, dispersion_genes

# sampled rows of one pass-2 task, in chunks of the store's chunk rows (fewer genes x genes partial sums)
_TASK_BLOCKS = 16
PCA_GENES = "work/pca/genes"


def _rows_csr(path: str, rows: np.ndarray, n_genes: int):
    """The CSR matrix of the sorted rows ``rows`` of the CSR group at ``path``."""
    import scipy.sparse as sp

    pieces = list(iter_selected_rows(path, rows))  # rows is never empty
    indptr = np.concatenate([[0], np.cumsum(np.concatenate([p[2] for p in pieces]))]).astype(np.int64)
    return sp.csr_matrix((np.concatenate([p[4] for p in pieces]).astype(np.float64),
                          np.concatenate([p[3] for p in pieces]), indptr), shape=(len(rows), n_genes))


def _library_and_gene_sums(path: str, rows: np.ndarray, n_genes: int):
    """Library sizes of ``rows`` and per gene the sums of ``x / library``, of its square, and non-zeros."""
    x = _rows_csr(path, rows, n_genes)
    library = np.asarray(x.sum(axis=1)).ravel()
    share = x.data * np.repeat(per_cell_scale(library, 1.0), np.diff(x.indptr))
    return library, (np.bincount(x.indices, weights=share, minlength=n_genes),
                     np.bincount(x.indices, weights=share * share, minlength=n_genes),
                     np.bincount(x.indices[x.data != 0], minlength=n_genes).astype(np.int64))


def _log_normalised(path: str, rows: np.ndarray, scale: np.ndarray, n_genes: int, col_map: np.ndarray, n_cols: int):
    """``log1p(scale * x)`` of ``rows`` on the chosen genes (``col_map``: gene -> column or -1), CSR."""
    import scipy.sparse as sp

    x = _rows_csr(path, rows, n_genes)
    row = np.repeat(np.arange(len(rows)), np.diff(x.indptr))
    cols = col_map[x.indices]
    keep = cols >= 0
    values = np.log1p(x.data[keep] * scale[row[keep]])
    return sp.csr_matrix((values, (row[keep], cols[keep])), shape=(len(rows), n_cols))


def _gram(path: str, rows: np.ndarray, scale: np.ndarray, n_genes: int, col_map: np.ndarray, n_cols: int,
          sub_rows: int):
    """Gram matrix (float64) and column sums of the log-normalised rows, in dense float32 sub-blocks."""
    gram = np.zeros((n_cols, n_cols), np.float64)
    sums = np.zeros(n_cols, np.float64)
    for a in range(0, len(rows), sub_rows):
        y = _log_normalised(path, rows[a:a + sub_rows], scale[a:a + sub_rows], n_genes, col_map, n_cols)
        dense = y.toarray().astype(np.float32)
        gram += dense.T @ dense
        sums += dense.sum(axis=0, dtype=np.float64)
    return gram, sums


def _project(path: str, rows: np.ndarray, scale: np.ndarray, n_genes: int, col_map: np.ndarray, n_cols: int,
             axes: np.ndarray, offset: np.ndarray, out_path: str, out_start: int) -> int:
    """Scores of ``rows`` written to ``out[out_start:out_start + len(rows)]`` (whole chunks)."""
    import zarr

    y = _log_normalised(path, rows, scale, n_genes, col_map, n_cols)
    scores = (y @ axes - offset).astype(np.float32)
    zarr.open_array(out_path, mode="r+")[out_start:out_start + len(rows)] = scores
    return len(rows)


def counts_source(ctx) -> tuple[str, np.ndarray, int]:
    """Where the kept cells' counts of every input gene are: ``(CSR group path, sorted rows, n_genes)``."""
    if ctx.store.has(KEYS.raw):
        shape = ctx.store.open_group(f"{KEYS.raw}/X").attrs["shape"]
        return ctx.store.path_of(f"{KEYS.raw}/X"), np.arange(int(shape[0]), dtype=np.int64), int(shape[1])
    if ctx.store.has(KEYS.input):
        shape = ctx.store.open_group(KEYS.input).attrs["shape"]
        return ctx.store.path_of(KEYS.input), np.asarray(ctx.store.read_elem(KEYS.kept_cells)), int(shape[1])
    raise InputError(f"{ctx.store.root}: pca.n_comps {ctx.config.pca.n_comps} needs the counts of every gene, and "
                     "neither raw (preprocess.keep_counts) nor work/input is in the run; run again with "
                     "--preprocess-keep-counts true or --pca-n-comps 0")


def _check_config(cfg) -> None:
    for option, least in (("n_comps", 0), ("n_top_genes", 2), ("max_cells", 2)):
        if getattr(cfg, option) < least:
            raise InputError(f"config option pca.{option}: {getattr(cfg, option)} must be at least {least}")
    if cfg.target_sum < 0:
        raise InputError(f"config option pca.target_sum: {cfg.target_sum} must be >= 0 (0: the median library size)")


def run(ctx) -> dict:
    """Stage entry point: the kept cells' counts -> ``obsm/X_pca`` (module docstring)."""
    import dask

    cfg = ctx.config.pca
    _check_config(cfg)
    if cfg.n_comps == 0:
        with ctx.store.staging(ctx.stage) as st:
            st.drop(KEYS.pca)
            st.drop(PCA_GENES)
        return {"n_comps": 0}
    path, rows, n_genes = counts_source(ctx)
    m = len(rows)
    chunk = ctx.config.store.chunk_rows
    ranges = [(a, min(a + chunk, m)) for a in range(0, m, chunk)]

    # pass 1: library sizes and the genes' statistics after normalising
    outs = [dask.delayed(_library_and_gene_sums, nout=2)(path, rows[a:b], n_genes) for a, b in ranges]
    library_parts, (share_sums, share_sq, nonzero) = compute_tasks(ctx, "pca: library sizes and gene dispersions",
                                                                   [o[0] for o in outs], tree_sum([o[1] for o in outs]))
    library = np.concatenate(library_parts)
    target = cfg.target_sum or (float(np.median(library[library > 0])) if (library > 0).any() else 1.0)
    scale = per_cell_scale(library, target)
    mean = target * share_sums / m
    var = np.maximum(target * target * (share_sq - share_sums * share_sums / m) / max(m - 1, 1), 0.0)
    genes = dispersion_genes(mean, var, nonzero > 0, cfg.n_top_genes)
    if len(genes) < 2:
        raise InputError(f"{ctx.store.root}: pca: {len(genes)} gene(s) vary across the cells after normalising; "
                         "at least 2 are needed (or --pca-n-comps 0)")
    col_map = np.full(n_genes, -1, dtype=np.int64)
    col_map[genes] = np.arange(len(genes))

    # pass 2: the axes, from a sample of cells
    if m > cfg.max_cells:
        sample = np.sort(np.random.default_rng(ctx.config.runtime.seed).choice(m, cfg.max_cells, replace=False))
    else:
        sample = np.arange(m)
    step = chunk * _TASK_BLOCKS
    col_map_d = dask.delayed(col_map)
    parts = [dask.delayed(_gram, nout=2)(path, rows[sample[a:a + step]], scale[sample[a:a + step]], n_genes,
                                         col_map_d, len(genes), chunk) for a in range(0, len(sample), step)]
    ((gram, sums),) = compute_tasks(ctx, "pca: gene covariance", tree_sum(parts))
    n_comps = min(cfg.n_comps, len(genes), len(sample) - 1)
    centre, axes, variance = components_from_gram(gram, sums, len(sample), n_comps)
    total = float(np.trace(gram) / len(sample) - centre @ centre) * len(sample) / max(len(sample) - 1, 1)

    # pass 3: every cell's scores, one row chunk of obsm/X_pca per task
    with ctx.store.staging(ctx.stage) as st:
        st.create_matrix(KEYS.pca, (m, n_comps), np.float32, chunks=(min(chunk, m), n_comps))
        out_path = st.path_of(KEYS.pca)
        axes_d, offset_d = dask.delayed(axes), dask.delayed(centre @ axes)
        tasks = [dask.delayed(_project)(path, rows[a:b], scale[a:b], n_genes, col_map_d, len(genes), axes_d,
                                        offset_d, out_path, a) for a, b in ranges]
        compute_tasks(ctx, "pca: scores", tasks)
        st.write_elem(PCA_GENES, genes)
    ratio = variance / total if total > 0 else np.zeros_like(variance)
    ctx.log.info("pca: %d components of %d genes (of %d) from %d cells, %.1f%% of their variance, target sum %.4g",
                 n_comps, len(genes), n_genes, len(sample), 100 * float(ratio.sum()), target)
    return {"n_comps": int(n_comps), "n_genes": int(len(genes)), "n_fit_cells": int(len(sample)),
            "target_sum": float(target), "variance_ratio": [round(float(r), 5) for r in ratio]}
