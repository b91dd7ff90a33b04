"""The pruned, symmetric k-nearest-neighbour cell graph (docs/METHOD.md step 4).

From an N x d embedding (the feature embedding, and beside it the principal components of the normalised
counts when ``pca.n_comps`` > 0, each part unit-scaled: :func:`searched_embedding`; loaded whole, except
by the 'blocks' backend, which streams it): each cell's
k nearest neighbours (Euclidean, self excluded) with the backend of ``graph.method``, the edges the
pruning rule rejects dropped, symmetrised by union: a scipy CSR matrix, float32 weights of 1.0, int64
``indptr`` and ``indices``, no self loops. The graph stage and each iteration build it with
:func:`build_graph`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from . import knn, knn_blocks
from .config import GraphConfig
from .errors import InputError
from .keys import KEYS

# rows per block while the side-by-side embedding's scale is measured and its rows are written
SCALE_BLOCK_ROWS = 65536


def choose_method(cfg: GraphConfig, n_cells: int, cuda: bool, *, embedding_bytes: int = 0) -> str:
    """'auto': 'blocks' when the embedding is larger than ``memory_budget_mb``, else exact up to
    ``exact_max_cells``, then torch brute force on a GPU, else pynndescent."""
    if cfg.method != "auto":
        return cfg.method
    if embedding_bytes > cfg.memory_budget_mb * 2**20:
        return "blocks"
    if n_cells <= cfg.exact_max_cells:
        return "exact"
    return "torch" if cuda else "pynndescent"


def knn_graph(x, cfg: GraphConfig, *, device, seed: int = 0, progress=None, method: str | None = None,
              prune: str | None = None, scratch_dir: str | Path | None = None) -> tuple[sp.csr_matrix, dict]:
    """The pruned, symmetrised KNN graph of the rows of ``x`` (no store involved).

    Parameters
    ----------
    x
        ``(N, d)`` embedding: numpy, or a zarr array that the 'blocks' backend reads in row blocks (the
        others read it whole).
    cfg
        Graph options (k, backend and its parameters, pruning rule).
    seed
        Seed of pynndescent and of the Isolation-Forest rule.
    device
        The run's torch device: 'auto' searches with torch on it when it is CUDA, and the 'torch'
        backend runs on it.
    progress
        Optional tqdm-like bar over cells (exact, torch and blocks backends).
    method, prune
        Override ``cfg.method`` / ``cfg.prune``.
    scratch_dir
        Where the 'blocks' backend spills its parts (a temporary directory inside; None: the system's).

    Returns
    -------
    graph, info
        CSR ``N x N`` (float32 ones, int64 index arrays, symmetric) and a JSON-able summary.
    """
    import torch

    device = torch.device(device)
    n, d = x.shape
    method = method or choose_method(cfg, n, device.type == "cuda", embedding_bytes=4 * n * d)
    if method != "blocks":
        x = np.ascontiguousarray(x, dtype=np.float32)
    prune = prune or cfg.prune
    k = cfg.k
    t0 = time.perf_counter()
    partition: dict = {}
    if method == "exact":
        idx, dist = knn.knn_exact(x, k, progress=progress)
    elif method == "pynndescent":
        idx, dist = knn.knn_pynndescent(x, k, n_neighbors=cfg.nnd_neighbors, n_trees=cfg.nnd_trees or None,
                                        n_iters=cfg.nnd_iters or None, n_jobs=cfg.n_jobs, low_memory=True,
                                        seed=seed)
    elif method == "torch":
        idx, dist = knn.knn_torch(x, k, device=device, query_block=cfg.torch_query_block, progress=progress)
    elif method == "blocks":
        idx, dist, partition = knn_blocks.knn_blocks(x, k, cfg, seed=seed, scratch_dir=scratch_dir, progress=progress)
    else:
        raise InputError(f"graph.method {method!r}: not one of auto, exact, pynndescent, torch, blocks")
    t_search = time.perf_counter() - t0
    info: dict = {"method": method, "k": k, "n_cells": n, "search_seconds": round(t_search, 3), **partition}
    if method in ("pynndescent", "blocks") and cfg.recall_sample > 0:
        t1 = time.perf_counter()
        recall_of = knn.knn_recall if method == "pynndescent" else knn.knn_recall_streamed
        info["recall"] = round(recall_of(x, idx, sample=cfg.recall_sample, seed=seed), 4)
        info["recall_sample"] = min(cfg.recall_sample, n)
        info["recall_seconds"] = round(time.perf_counter() - t1, 3)
    elif method in ("exact", "torch"):
        info["recall"] = 1.0

    t2 = time.perf_counter()
    if prune == "std":
        keep = knn.prune_std(dist)
    elif prune == "isolation_forest":
        keep = knn.prune_isolation_forest(dist, seed=seed)
    elif prune == "none":
        keep = np.ones_like(dist, dtype=bool)
    else:
        raise InputError(f"graph.prune {prune!r}: not one of std, isolation_forest, none")
    del dist  # 4 k bytes a cell fewer while the symmetric graph is built
    info["prune"] = prune
    info["prune_seconds"] = round(time.perf_counter() - t2, 3)
    info["kept_fraction"] = round(float(keep.mean()), 4)

    graph = symmetric_graph(idx, keep, n)
    degree = np.diff(graph.indptr)
    info.update({"n_edges": int(graph.nnz // 2), "mean_degree": round(float(degree.mean()), 3),
                 "min_degree": int(degree.min()), "max_degree": int(degree.max())})
    return graph, info


SYMMETRIC_BLOCK_ROWS = 1 << 18  # rows per block while the union is built (a block's edges are its memory)


def symmetric_graph(indices: np.ndarray, keep: np.ndarray, n: int, *,
                    block_rows: int = SYMMETRIC_BLOCK_ROWS) -> sp.csr_matrix:
    """Union-symmetrised CSR of the kept directed edges ``i -> indices[i, j]``; weights 1.0, int64 indices.

    Built in row blocks: each block's row is the sorted union of its kept out-edges and the kept edges
    that point into it (:func:`incoming_edges`), self loops dropped; a first pass counts, a second fills.
    Besides the output, memory is the reverse index (4 bytes a kept edge below 2**31 cells) and one
    block's edges; scipy's ``maximum(directed.T)`` made several N-sized copies.
    """
    sources_ptr, sources = incoming_edges(indices, keep, n, block_rows)
    indptr = np.zeros(n + 1, np.int64)
    for a, b in knn.row_blocks(n, block_rows):
        rows, _ = _union_rows(indices, keep, sources_ptr, sources, a, b, n)
        indptr[a + 1:b + 1] = np.bincount(rows, minlength=b - a)
    np.cumsum(indptr, out=indptr)
    columns = np.empty(int(indptr[-1]), np.int64)
    for a, b in knn.row_blocks(n, block_rows):
        _, columns[indptr[a]:indptr[b]] = _union_rows(indices, keep, sources_ptr, sources, a, b, n)
    graph = sp.csr_matrix((n, n), dtype=np.float32)  # arrays set as they are (the constructor may narrow to int32)
    graph.data, graph.indices, graph.indptr = np.ones(columns.size, np.float32), columns, indptr
    graph.has_sorted_indices = True
    return graph


def incoming_edges(indices: np.ndarray, keep: np.ndarray, n: int, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Reverse index of the kept edges, CSR-like: ``sources[ptr[j]:ptr[j + 1]]`` are the cells that keep ``j``."""
    counts = np.zeros(n, np.int64)
    for a, b in knn.row_blocks(n, block_rows):
        counts += np.bincount(indices[a:b][keep[a:b]], minlength=n)
    ptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    sources = np.empty(int(ptr[-1]), np.int32 if n < 2**31 else np.int64)
    next_slot = ptr[:-1].copy()
    for a, b in knn.row_blocks(n, block_rows):
        targets = indices[a:b][keep[a:b]]
        origins = np.repeat(np.arange(a, b), keep[a:b].sum(axis=1))
        order = np.argsort(targets, kind="stable")
        targets, origins = targets[order], origins[order]
        rank = np.arange(targets.size) - np.searchsorted(targets, targets, side="left")  # within equal targets
        sources[next_slot[targets] + rank] = origins
        last_of_target = np.r_[targets[1:] != targets[:-1], True]
        next_slot[targets[last_of_target]] += rank[last_of_target] + 1
    return ptr, sources


def _union_rows(indices, keep, sources_ptr, sources, a: int, b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``a:b`` of the symmetric graph as (row - a, column) pairs, sorted, unique, without self loops."""
    out_rows = np.repeat(np.arange(b - a, dtype=np.int64), keep[a:b].sum(axis=1))
    out_cols = indices[a:b][keep[a:b]].astype(np.int64)
    in_rows = np.repeat(np.arange(b - a, dtype=np.int64), np.diff(sources_ptr[a:b + 1]))
    in_cols = sources[sources_ptr[a]:sources_ptr[b]].astype(np.int64)
    pairs = np.concatenate([out_rows * n + out_cols, in_rows * n + in_cols])
    pairs.sort()  # np.unique's hashing took 10x longer on these
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]]
    rows, cols = np.divmod(pairs, n)
    not_self = cols != rows + a
    return rows[not_self], cols[not_self]


def unit_scale(array) -> tuple[np.ndarray, float]:
    """``(mean, factor)`` with ``(x - mean) * factor`` of mean squared row norm 1 (factor 1 for a constant
    embedding), for an ``(N, d)`` numpy or zarr array read in row blocks."""
    from .graph_autoencoder import column_moments

    mean, sd = column_moments(array, SCALE_BLOCK_ROWS, constant_sd=0.0)
    spread = float(np.sum(sd * sd))  # the mean squared norm of a centred row
    return mean, (1.0 / np.sqrt(spread) if spread > 0 else 1.0)


@contextmanager
def searched_embedding(parts: list, *, streamed: bool, scratch_dir: Path | None = None):
    """The embedding the cell graph is searched in: the one stored array of ``parts`` as it is, or several
    side by side, each centred and scaled to a mean squared row norm of 1 (both weigh the same in a
    distance). In memory (float32), or with ``streamed`` a zarr array written in row blocks to a temporary
    directory under ``scratch_dir`` (for the 'blocks' search, which reads it in row blocks)."""
    import tempfile

    import zarr

    if len(parts) == 1:
        yield parts[0] if streamed else np.asarray(parts[0][:], dtype=np.float32)
        return
    scales = [unit_scale(p) for p in parts]
    n, d = parts[0].shape[0], sum(p.shape[1] for p in parts)

    def rows(a: int, b: int) -> np.ndarray:
        return np.hstack([((np.asarray(p[a:b], dtype=np.float64) - mean) * factor).astype(np.float32)
                          for p, (mean, factor) in zip(parts, scales, strict=True)])

    if not streamed:
        whole = np.empty((n, d), np.float32)
        for a, b in knn.row_blocks(n, SCALE_BLOCK_ROWS):
            whole[a:b] = rows(a, b)
        yield whole
        return
    with tempfile.TemporaryDirectory(prefix="side-by-side-", dir=scratch_dir) as tmp:
        out = zarr.create_array(store=str(Path(tmp) / "x.zarr"), shape=(n, d), dtype=np.float32,
                                chunks=(min(SCALE_BLOCK_ROWS, n), d))
        for a, b in knn.row_blocks(n, SCALE_BLOCK_ROWS):
            out[a:b] = rows(a, b)
        yield out


def build_graph(ctx, staging, *, embedding_key: str, graph_key: str) -> dict:
    """Build the pruned KNN graph of ``embedding_key`` and stage it at ``graph_key``.

    Parameters
    ----------
    ctx
        Stage context (config ``graph``, ``runtime.seed``, torch device).
    staging
        Where the graph is written (committed by the caller's ``with`` block).
    embedding_key
        Store key of the ``N x d`` embedding (read from ``staging`` when staged there, else the store).
    graph_key
        Store key of the output CSR graph.

    Returns
    -------
    dict
        n_edges, mean_degree, method, recall (exact: 1.0; pynndescent, blocks: measured on a sample), timings.
    """
    parts = [staging.open_array(embedding_key)]
    if ctx.config.pca.n_comps > 0:
        if not ctx.store.has(KEYS.pca):
            raise InputError(f"{ctx.store.root}: {KEYS.pca} is missing (pca.n_comps {ctx.config.pca.n_comps}); "
                             "run the pca stage first")
        parts.append(ctx.store.open_array(KEYS.pca))
    cfg = ctx.config.graph
    n = parts[0].shape[0]
    d = sum(p.shape[1] for p in parts)
    if n <= cfg.k:
        raise InputError(f"{embedding_key}: {n} cells are too few for graph.k = {cfg.k} neighbours")
    method = choose_method(cfg, n, ctx.runtime.cuda, embedding_bytes=4 * n * d)
    scratch_dir = staging.root if isinstance(staging.root, Path) else None  # beside the staged outputs
    with searched_embedding(parts, streamed=method == "blocks", scratch_dir=scratch_dir) as x:
        with ctx.progress(n, f"{method} {cfg.k}-NN") as bar:
            graph, info = knn_graph(x, cfg, device=ctx.runtime.device, seed=ctx.config.runtime.seed, progress=bar,
                                    method=method, scratch_dir=scratch_dir)
    info["embedding_columns"] = int(d)
    staging.write_elem(graph_key, graph)
    ctx.log.info("graph: %d cells, %d edges, mean degree %.2f (%s, recall %s)", n, info["n_edges"],
                 info["mean_degree"], method, info.get("recall"))
    return info
