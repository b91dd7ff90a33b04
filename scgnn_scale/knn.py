"""k-nearest-neighbour search and edge pruning for the cell graph (docs/METHOD.md step 4).

Three search backends, all returning ``(indices, distances)`` of shape ``(N, k)`` (int64, float32),
each row sorted by increasing Euclidean distance and never containing the row's own cell:

- :func:`knn_exact`: blocked brute force in numpy (candidates re-ranked by :func:`_refine`, shared with
  :func:`knn_torch`); memory ``O(block * N)``. For small N (and as the
  reference of the others).
- :func:`knn_pynndescent`: approximate NN-descent, ``O(N log N)``, bounded memory (``low_memory``,
  a fixed number of threads). Its recall is set by ``n_neighbors`` of the NN-descent graph, which
  is built with more neighbours than the ``k`` returned (see :func:`knn_pynndescent`).
- :func:`knn_torch`: blocked brute force in torch on the GPU when present (also runs on the CPU);
  memory ``O(query_block * ref_block)`` on the device plus the reference set.

Pruning (:func:`prune_std`, :func:`prune_isolation_forest`) works on the ``(N, k)`` distance
matrix and is fully vectorised. :func:`knn_recall` measures an approximate search against exact
neighbours of a sample of cells (:func:`knn_recall_streamed` without holding the embedding; the
'blocks' backend, which never holds it either, is :mod:`scgnn_scale.knn_blocks`).
"""

from __future__ import annotations

import math
import os

import numpy as np

from .errors import InputError, MissingDependencyError

READ_ROWS = 65536  # embedding rows per read when an embedding is streamed (32 MiB at 128-d)


def _check_input(x: np.ndarray, k: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"embedding: expected a 2-d array, got shape {x.shape}")
    if x.shape[0] <= k:
        raise InputError(f"embedding: {x.shape[0]} cells are too few for k = {k} neighbours (need more than k)")
    if not np.isfinite(x).all():
        raise InputError("embedding: contains NaN or infinite values")
    return x


def _refine(x, rows, cand, k: int):
    """Exact float64 distances of candidate neighbours, sorted by distance then index; the ``k`` nearest.

    Torch tensors on any device (numpy callers wrap theirs; :func:`knn_torch` runs it on the GPU, where
    the numpy version took 19 of the 38 s of a 1M-cell search). Candidates come from float32
    ``|a|^2 - 2ab + |b|^2`` expansions whose rounding can swap near ties; recomputing ``|a - b|`` on the
    few candidates makes the order exact.
    """
    import torch

    diff = x[cand].double() - x[rows][:, None, :].double()
    dist = torch.sqrt((diff * diff).sum(-1))
    by_index = torch.argsort(cand, dim=1, stable=True)
    cand, dist = torch.gather(cand, 1, by_index), torch.gather(dist, 1, by_index)
    by_distance = torch.argsort(dist, dim=1, stable=True)[:, :k]  # stable: ties stay in index order
    return torch.gather(cand, 1, by_distance), torch.gather(dist, 1, by_distance).float()


def _refine_numpy(x: np.ndarray, rows: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_refine` for numpy arrays (CPU tensors share their memory)."""
    import torch

    idx, dist = _refine(torch.from_numpy(x), torch.from_numpy(rows), torch.from_numpy(cand), k)
    return idx.numpy(), dist.numpy()


def knn_exact(x: np.ndarray, k: int = 10, *, block_bytes: int = 256 << 20, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours (Euclidean, self excluded) by blocked brute force.

    Parameters
    ----------
    x
        ``(N, d)`` embedding.
    k
        Neighbours per cell.
    block_bytes
        Memory of one block of the ``block x N`` distance matrix.
    progress
        Optional tqdm-like bar, updated with the number of rows done.

    Returns
    -------
    indices, distances
        ``(N, k)`` int64 and float32, rows sorted by distance.
    """
    x = _check_input(x, k)
    return exact_neighbours_of(x, np.arange(x.shape[0]), k, block_bytes=block_bytes, progress=progress)


def exact_neighbours_of(x: np.ndarray, rows: np.ndarray, k: int, *, block_bytes: int = 256 << 20,
                        progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours (self excluded) of the cells ``rows`` among all N, in bounded memory.

    Query rows go in blocks sized so that one ``block x N`` distance block (float32, plus the int64
    argpartition output) takes ``block_bytes``; temporaries are updated in place.
    """
    n = x.shape[0]
    rows = np.asarray(rows, dtype=np.int64)
    extra = min(k + 8, n - 1)  # a few spare candidates for the exact re-ranking
    sq = np.einsum("ij,ij->i", x, x)
    block = max(1, min(max(len(rows), 1), block_bytes // (12 * n)))  # float32 distances + int64 argpartition
    out_idx = np.empty((len(rows), k), np.int64)
    out_dist = np.empty((len(rows), k), np.float32)
    for a in range(0, len(rows), block):
        r = rows[a:a + block]
        d2 = x[r] @ x.T  # in place from here: one block-sized temporary
        d2 *= -2.0
        d2 += sq[None, :]
        d2 += sq[r, None]
        d2[np.arange(len(r)), r] = np.inf  # self
        cand = np.argpartition(d2, extra - 1, axis=1)[:, :extra]
        del d2
        out_idx[a:a + len(r)], out_dist[a:a + len(r)] = _refine_numpy(x, r, np.ascontiguousarray(cand), k)
        if progress is not None:
            progress.update(len(r))
    return out_idx, out_dist


def _strip_self(ind: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's own index (wherever it sits, or the last column if absent) and keep ``k``."""
    n, m = ind.shape
    is_self = ind == np.arange(n)[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, m - 1] = True  # self not found: drop the farthest instead
    drop_first = np.cumsum(is_self, axis=1) == 1
    keep = ~(is_self & drop_first)
    ind = ind[keep].reshape(n, m - 1)[:, :k]
    dist = dist[keep].reshape(n, m - 1)[:, :k]
    return ind.astype(np.int64), dist.astype(np.float32)


def knn_pynndescent(x: np.ndarray, k: int = 10, *, n_neighbors: int = 30, n_trees: int | None = None,
                    n_iters: int | None = None, max_candidates: int | None = None, n_jobs: int = 0,
                    low_memory: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest neighbours with pynndescent's NN-descent graph.

    The NN-descent graph is built with ``n_neighbors`` (> ``k``) neighbours per cell and its ``k``
    nearest non-self entries are returned. A wider graph is what buys recall: on 128-d Gaussian
    blobs (50 centres), recall@10 was 0.69 with ``n_neighbors = 11`` and 0.98 with 30 at 100k cells
    (bench/bench_knn.py). The search index (``prepare``/``query``, where ``diversify_prob`` and
    ``pruning_degree_multiplier`` act) is never built: the all-pairs graph is the result.

    Parameters
    ----------
    x, k
        Embedding ``(N, d)`` and neighbours per cell.
    n_neighbors
        Degree of the NN-descent graph (at least ``k + 1``).
    n_trees, n_iters, max_candidates
        pynndescent's options (None: its defaults).
    n_jobs
        Threads of numba (0: ``min(8, cores)``; fixed so memory and timing do not depend on the host).
    low_memory
        pynndescent's low-memory mode.
    seed
        Random state; the same seed and ``n_jobs`` give the same graph on one machine.
    """
    x = _check_input(x, k)
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "scgnn_scale_numba"))
    try:
        import numba
        from pynndescent import NNDescent
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise MissingDependencyError("graph.method 'pynndescent' needs the pynndescent package") from exc
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba's OpenMP pool keeps torch's OpenMP from running afterwards in the same process (torch
        # ops measured 55x slower after one pynndescent call); its own 'workqueue' pool does not.
        # Effective only before numba's first parallel launch in the process.
        numba.config.THREADING_LAYER = "workqueue"
    n_jobs = n_jobs or min(8, os.cpu_count() or 1)
    n_neighbors = max(int(n_neighbors), k + 1)
    index = NNDescent(x, metric="euclidean", n_neighbors=min(n_neighbors, x.shape[0]), n_trees=n_trees,
                      n_iters=n_iters, max_candidates=max_candidates, random_state=seed, n_jobs=n_jobs,
                      low_memory=low_memory, compressed=True)
    ind, dist = index.neighbor_graph
    del index
    return _strip_self(ind, dist, k)


def smallest_k(d, k: int, group: int = 32):
    """The ``k`` smallest entries of each row of a 2-d torch tensor (values, column indices), exactly.

    ``torch.topk`` over very wide rows is slow on a GPU (it took about 47 s of a 1M-cell search on an
    H100). Instead each row is cut into groups of ``group`` columns: the union of the ``k`` groups with
    the smallest minima holds the row's ``k`` smallest entries (a group left out has ``k`` groups below
    its minimum, each with an entry smaller than any of its own), so one pass for the group minima
    and two small ``topk`` calls over ``w / group`` minima and ``k * group`` candidates replace it.
    """
    import torch
    import torch.nn.functional as F

    rows, width = d.shape
    k = min(k, width)
    if group <= 1 or width <= 4 * group * k:
        return torch.topk(d, k, dim=1, largest=False)
    pad = (-width) % group
    if pad:  # +inf columns are never chosen while a row has k finite entries (width >= k)
        d = F.pad(d, (0, pad), value=math.inf)
    groups = d.view(rows, -1, group)
    _, first = torch.topk(groups.amin(dim=2), k, dim=1, largest=False)
    cand = torch.gather(groups, 1, first[:, :, None].expand(-1, -1, group)).reshape(rows, -1)
    values, pos = torch.topk(cand, k, dim=1, largest=False)
    return values, first.gather(1, pos // group) * group + pos % group


def knn_torch(x: np.ndarray, k: int = 10, *, device, query_block: int = 4096, block_bytes: int | None = None,
              progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by blocked brute force in torch (GPU when ``device`` is CUDA).

    Queries go in blocks of ``query_block`` rows against reference blocks sized so that one
    ``query x reference`` distance block takes ``block_bytes`` (default 256 MiB on the CPU, 2 GiB on
    a GPU); a running top-k (:func:`smallest_k`) merges the reference blocks, so memory is bounded by
    the block plus the embedding itself. Candidates are re-ranked with exact distances as in
    :func:`knn_exact`.
    """
    import torch

    x = _check_input(x, k)
    device = torch.device(device)
    n = x.shape[0]
    extra = min(k + 8, n - 1)
    if block_bytes is None:
        block_bytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    query_block = max(1, min(query_block, n))
    ref_block = max(extra, min(n, block_bytes // (4 * query_block)))
    xt = torch.from_numpy(x).to(device)
    sq = (xt * xt).sum(1)
    out_idx = np.empty((n, k), np.int64)
    out_dist = np.empty((n, k), np.float32)
    with torch.no_grad():
        for a in range(0, n, query_block):
            b = min(n, a + query_block)
            q = xt[a:b]
            best_d = torch.full((b - a, extra), math.inf, device=device)
            best_i = torch.zeros((b - a, extra), dtype=torch.long, device=device)
            for r0 in range(0, n, ref_block):
                r1 = min(n, r0 + ref_block)
                # |r|^2 - 2 q.r orders a query's references as |q - r|^2 does (|q|^2 is the same for the row)
                d2 = torch.addmm(sq[None, r0:r1], q, xt[r0:r1].T, alpha=-2.0)
                lo, hi = max(a, r0), min(b, r1)
                if lo < hi:  # this reference block holds some of the queries themselves
                    rows = torch.arange(lo, hi, device=device)
                    d2[rows - a, rows - r0] = math.inf
                dd, ii = smallest_k(d2, min(extra, r1 - r0))
                cat_d = torch.cat([best_d, dd], 1)
                cat_i = torch.cat([best_i, ii + r0], 1)
                sel = torch.topk(cat_d, extra, dim=1, largest=False).indices
                best_d = torch.gather(cat_d, 1, sel)
                best_i = torch.gather(cat_i, 1, sel)
            idx_t, dist_t = _refine(xt, torch.arange(a, b, device=device), best_i, k)
            out_idx[a:b], out_dist[a:b] = idx_t.cpu().numpy(), dist_t.cpu().numpy()
            if progress is not None:
                progress.update(b - a)
    return out_idx, out_dist


def knn_recall(x: np.ndarray, indices: np.ndarray, *, sample: int = 1000, seed: int = 0,
               block_bytes: int = 256 << 20) -> float:
    """Recall@k of ``indices`` against exact neighbours of a random sample of cells.

    Exact neighbours of the sampled cells are found by brute force against all N cells
    (``O(sample * N * d)``), in blocks of ``block_bytes`` (at 1M cells, 256 sampled rows in one
    block took about 4 GB: the distances and argpartition's int64 output, both sample x N).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = _recall_rows(indices.shape[0], sample, seed)
    truth, _ = exact_neighbours_of(x, rows, indices.shape[1], block_bytes=block_bytes)
    return _recall(truth, indices[rows])


def knn_recall_streamed(x, indices: np.ndarray, *, sample: int = 1000, seed: int = 0,
                        block_rows: int = READ_ROWS) -> float:
    """:func:`knn_recall` of an embedding read in row blocks (a zarr array or numpy), never held whole.

    The same sampled cells as :func:`knn_recall` (same ``sample`` and ``seed``); their exact neighbours
    come from :func:`streamed_neighbours_of`.
    """
    rows = _recall_rows(indices.shape[0], sample, seed)
    truth = streamed_neighbours_of(x, rows, indices.shape[1], block_rows=block_rows)
    return _recall(truth, indices[rows])


def _recall_rows(n: int, sample: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))


def _recall(truth: np.ndarray, found: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(t, g)) for t, g in zip(truth, found, strict=True))
    return hits / truth.size


def read_rows(x, rows: np.ndarray) -> np.ndarray:
    """The rows ``rows`` of an ``(N, d)`` numpy or zarr array, as contiguous float32."""
    picked = x[rows] if isinstance(x, np.ndarray) else x.oindex[rows]
    return np.ascontiguousarray(picked, dtype=np.float32)


def row_blocks(n: int, size: int):
    """``(start, stop)`` of consecutive blocks of ``size`` rows covering ``range(n)``."""
    for a in range(0, n, size):
        yield a, min(n, a + size)


def streamed_neighbours_of(x, rows: np.ndarray, k: int, *, block_rows: int = READ_ROWS) -> np.ndarray:
    """Exact k nearest neighbours (self excluded) of the cells ``rows`` in one pass over ``x``'s row blocks.

    Memory is the sampled rows plus one ``len(rows) x block_rows`` distance block: a running set of
    ``k + 8`` float32 candidates per sampled cell is kept over the blocks, then re-ranked with exact
    distances (:func:`_refine`) on the candidates' rows alone, as :func:`exact_neighbours_of` does.
    """
    n = x.shape[0]
    rows = np.asarray(rows, dtype=np.int64)
    extra = min(k + 8, n - 1)
    queries = read_rows(x, rows)
    query_sq = np.einsum("ij,ij->i", queries, queries)
    best_d = np.full((len(rows), extra), np.inf, np.float32)
    best_i = np.zeros((len(rows), extra), np.int64)
    for a, b in row_blocks(n, block_rows):
        block = np.ascontiguousarray(x[a:b], dtype=np.float32)
        d2 = queries @ block.T
        d2 *= -2.0
        d2 += np.einsum("ij,ij->i", block, block)[None, :]
        d2 += query_sq[:, None]
        inside = np.flatnonzero((rows >= a) & (rows < b))
        d2[inside, rows[inside] - a] = np.inf  # self
        take = min(extra, b - a)
        cand = np.argpartition(d2, take - 1, axis=1)[:, :take]
        all_d = np.concatenate([best_d, np.take_along_axis(d2, cand, 1)], 1)
        all_i = np.concatenate([best_i, cand + a], 1)
        keep = np.argpartition(all_d, extra - 1, axis=1)[:, :extra]
        best_d, best_i = np.take_along_axis(all_d, keep, 1), np.take_along_axis(all_i, keep, 1)
    ids = np.unique(best_i)  # the candidates' rows, read once for the exact re-ranking
    local = np.concatenate([queries, read_rows(x, ids)])
    idx, _ = _refine_numpy(local, np.arange(len(rows)), len(rows) + np.searchsorted(ids, best_i), k)
    return ids[idx - len(rows)]


def prune_std(distances: np.ndarray) -> np.ndarray:
    """The published pruning rule: keep a neighbour when its distance is at most mean + 1 std.

    Mean and (population, ddof=0) standard deviation are over each cell's own k distances, as in
    scGNN's ``calculateKNNgraphDistanceMatrixStats``. The nearest neighbour is always kept (it is
    never above the mean).

    Returns
    -------
    keep
        Boolean ``(N, k)`` mask of the edges that stay.
    """
    d = distances.astype(np.float64)
    bound = d.mean(axis=1, keepdims=True) + d.std(axis=1, keepdims=True)
    return d <= bound


def prune_isolation_forest(distances: np.ndarray, *, seed: int = 0, n_estimators: int = 100,
                           max_samples: int = 256, fit_sample: int = 200_000) -> np.ndarray:
    """Isolation-Forest pruning, vectorised: one forest for all cells, evaluated by table lookup.

    The paper's alternative rule flags outlying neighbours with an Isolation Forest per cell, which
    costs ~0.2 s per cell (60 h at 1M cells). Here each cell's k distances are standardised
    (``z = (d - mean) / std`` of that cell), which puts every cell on one scale, and **one**
    ``IsolationForest`` (contamination 'auto') is fitted on a random sample of at most
    ``fit_sample`` pooled z values. Because the input is one-dimensional, the forest's score is a
    step function of z that changes only at the trees' split thresholds: it is evaluated once per
    interval between consecutive thresholds (a few thousand points) and looked up with
    ``searchsorted`` for all ``N * k`` values, which gives exactly ``forest.predict(z)`` at
    ``O(N k log T)`` cost. An edge is dropped when the forest calls it an outlier **and** it is
    farther than the cell's mean (unusually close neighbours are good neighbours); the nearest
    neighbour is always kept.

    Returns
    -------
    keep
        Boolean ``(N, k)`` mask of the edges that stay.
    """
    forest, z = _pooled_forest(distances, seed=seed, n_estimators=n_estimators, max_samples=max_samples,
                               fit_sample=fit_sample)
    thresholds, interval_outlier = _forest_lookup_table(forest)
    outlier = interval_outlier[np.searchsorted(thresholds, z.astype(np.float64).ravel(), side="left")]
    keep = ~(outlier.reshape(z.shape) & (z > 0))
    keep[:, 0] = True
    return keep


def _standardise_rows(distances: np.ndarray) -> np.ndarray:
    d = distances.astype(np.float64)
    sd = d.std(axis=1, keepdims=True)
    z = (d - d.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)
    return z.astype(np.float32)  # the forest compares float32 features, as scikit-learn does


def _pooled_forest(distances: np.ndarray, *, seed: int, n_estimators: int, max_samples: int, fit_sample: int):
    """One IsolationForest on a sample of the pooled per-cell-standardised distances; returns (forest, z)."""
    from sklearn.ensemble import IsolationForest

    z = _standardise_rows(distances)
    flat = z.ravel()
    rng = np.random.default_rng(seed)
    fit = flat if flat.size <= fit_sample else flat[rng.choice(flat.size, fit_sample, replace=False)]
    forest = IsolationForest(n_estimators=n_estimators, max_samples=min(max_samples, fit.size),
                             contamination="auto", random_state=seed).fit(fit[:, None])
    return forest, z


def _forest_lookup_table(forest) -> tuple[np.ndarray, np.ndarray]:
    """The split thresholds ``t`` of a 1-d forest and the outlier flag of each interval between them.

    Interval ``q`` holds the z with ``t[q-1] < z <= t[q]`` (scikit-learn sends ``z <= t`` left), so
    ``searchsorted(t, z, side='left')`` is the interval of z; the last one is ``z > t[-1]``. Each
    interval is evaluated at a float32 point inside it (z is float32 in the forest too); an interval
    that holds no float32 value gets an arbitrary flag that no z can ever look up.
    """
    thresholds = np.unique(np.concatenate(
        [est.tree_.threshold[est.tree_.feature >= 0] for est in forest.estimators_] + [np.empty(0)]))
    if thresholds.size == 0:  # every value equal: no split, one interval
        return thresholds, forest.predict(np.zeros((1, 1), np.float32)) == -1
    reps = thresholds.astype(np.float32)
    above = reps.astype(np.float64) > thresholds
    reps[above] = np.nextafter(reps[above], np.float32(-np.inf))
    last = np.nextafter(np.float32(thresholds[-1]), np.float32(np.inf))
    reps = np.append(reps, last)
    return thresholds, forest.predict(reps[:, None]) == -1
