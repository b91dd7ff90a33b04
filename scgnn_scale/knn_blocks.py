"""k nearest neighbours of an embedding too large to hold: the 'blocks' backend (docs/METHOD.md step 4).

At 10 million cells the 128-d embedding alone is 5.1 GB and one NN-descent graph of all cells another
~2.4 GB. This backend holds a bounded number of embedding rows at any time:

1. k-means with ``P = ceil(N / graph.block_cells)`` centroids is fitted on a sample of at most
   ``graph.partition_sample`` rows; parts estimated above ``2 x block_cells`` cells are split;
2. one streamed pass over the embedding sends every cell to the part of its nearest centroid, and the
   cells nearest the boundary with their second-nearest centroid's part to that part too (at most about
   ``block_cells`` guests a part), spilling each part's rows to a scratch file (``4 d + 8`` bytes a
   row on disk, removed at the end);
3. each part, read back alone (about ``2 x block_cells`` rows, at most about 3 x), is searched like a
   whole embedding (pynndescent, or exact search for parts up to ``graph.exact_max_cells``), and each
   cell keeps the ``k`` nearest, by exact distance, of the candidates its parts found.

Below 3 parts there is one part of all cells. Neighbours outside a cell's parts are missed: recall is
measured on a sample, as for pynndescent. In memory: the ``(N, k)`` result (12 k bytes a cell), one
part and its search, the k-means sample.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import knn
from .config import GraphConfig
from .errors import InputError

REFINE_ROWS = 4096  # rows per exact re-ranking call (float64 differences: rows x k x d x 8 bytes)


@dataclass(frozen=True)
class Partition:
    """Centroids of the parts and, per part, the margin below which a cell whose second-nearest centroid
    it is joins it as a guest."""

    centroids: np.ndarray  # (P, d) float32
    guest_margin: np.ndarray  # (P,) float64


def knn_blocks(x, k: int, cfg: GraphConfig, *, seed: int = 0, scratch_dir: str | Path | None = None,
               progress=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Approximate k nearest neighbours of the rows of ``x`` (zarr or numpy, ``(N, d)``), part by part.

    Returns ``(indices, distances, info)``: ``(N, k)`` int64 and float32, each row sorted by distance
    then index, self excluded, as the other backends (which order float32 ties by their float64
    distances: the same neighbours and the same graph); ``info`` describes the partition. Scratch files go
    to a temporary directory under ``scratch_dir`` (the system's when None). ``progress`` counts cells
    whose parts are all searched.
    """
    n, d = x.shape
    if n <= k:
        raise InputError(f"embedding: {n} cells are too few for k = {k} neighbours (need more than k)")
    n_parts = math.ceil(n / cfg.block_cells)
    t0 = time.perf_counter()
    partition = fit_partition(x, n_parts if n_parts >= 3 else 1, block_cells=cfg.block_cells,
                              sample=cfg.partition_sample, seed=seed)
    info = {"n_parts": len(partition.centroids), "partition_seconds": round(time.perf_counter() - t0, 3)}
    best_idx = np.full((n, k), -1, np.int64)
    best_dist = np.full((n, k), np.inf, np.float32)
    parts_left = np.empty(n, np.int8)
    with tempfile.TemporaryDirectory(prefix="knn-blocks-", dir=scratch_dir) as tmp:
        scratch = Path(tmp)
        t1 = time.perf_counter()
        counts = spill_parts(x, partition, scratch, parts_left)
        info.update({"part_cells_max": int(counts.max()), "guest_fraction": round(int(counts.sum()) / n - 1, 4),
                     "scratch_mb": round(int(counts.sum()) * (4 * d + 8) / 2**20, 1),
                     "spill_seconds": round(time.perf_counter() - t1, 3)})
        for part in np.flatnonzero(counts):
            rows, cells = load_part(scratch, part, d)
            idx, dist = part_neighbours(rows, k, cfg, seed=seed)
            del rows
            merge_nearest(best_idx, best_dist, cells, cells[idx], dist)
            parts_left[cells] -= 1
            if progress is not None:
                progress.update(int((parts_left[cells] == 0).sum()))
    short = int((best_idx < 0).any(axis=1).sum())
    if short:
        raise InputError(f"graph.block_cells {cfg.block_cells}: {short} cells have fewer than k = {k} neighbours "
                         "in their parts; raise graph.block_cells")
    return best_idx, best_dist, info


def fit_partition(x, n_parts: int, *, block_cells: int, sample: int, seed: int) -> Partition:
    """The parts, fitted on a random sample of at most ``sample`` rows of ``x``.

    k-means with ``n_parts`` centroids; a part whose cells (estimated on the sample) exceed
    ``2 x block_cells`` is split (:func:`split_large_parts`); each part takes as guests at most about
    ``block_cells`` cells whose second-nearest centroid it is, those nearest the boundary between
    their two parts (:func:`guest_margins`).
    """
    n, d = x.shape
    if n_parts == 1:
        return Partition(np.zeros((1, d), np.float32), np.full(1, -np.inf))
    if min(sample, n) < n_parts:
        raise InputError(f"graph.partition_sample {sample}: fewer sampled cells than the {n_parts} parts to fit; "
                         "raise it or graph.block_cells")
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    fit_rows = _finite(knn.read_rows(x, rows))
    cells_per_row = n / len(rows)
    centroids = split_large_parts(fit_rows, kmeans(fit_rows, n_parts, seed), 2 * block_cells / cells_per_row, seed)
    _, second, margin = two_nearest(fit_rows, centroids)
    return Partition(centroids, guest_margins(second, margin, len(centroids), block_cells / cells_per_row))


def kmeans(rows: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """``(n_clusters, d)`` float32 centroids of MiniBatchKMeans on ``rows``."""
    from sklearn.cluster import MiniBatchKMeans

    fitted = MiniBatchKMeans(n_clusters=n_clusters, batch_size=4096, n_init=3, random_state=seed).fit(rows)
    return fitted.cluster_centers_.astype(np.float32)


def split_large_parts(rows: np.ndarray, centroids: np.ndarray, limit: float, seed: int,
                      rounds: int = 8) -> np.ndarray:
    """Replace each centroid holding more than ``limit`` of ``rows`` by 2-means of its rows, for a few rounds.

    k-means leaves dense clusters whole (on 50 blobs in 4 parts, one part held 8 times the cells of
    another); ``rounds`` bounds the work where a part cannot be split (identical rows).
    """
    for _ in range(rounds):
        home = nearest_centroid(rows, centroids)
        large = np.flatnonzero(np.bincount(home, minlength=len(centroids)) > max(limit, 1))
        if not len(large):
            break
        halves = [kmeans(rows[home == part], 2, seed) for part in large]
        centroids = np.concatenate([np.delete(centroids, large, axis=0), *halves])
    return centroids


def _centroid_d2(block: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared distances to the centroids less each row's own ``|row|^2`` (the same for all centroids)."""
    d2 = block @ centroids.T
    d2 *= -2.0
    d2 += np.einsum("ij,ij->i", centroids, centroids)[None, :]
    return d2


def nearest_centroid(block: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmin(_centroid_d2(block, centroids), axis=1)


def two_nearest(block: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's nearest and second-nearest centroid and its margin: its distance to their bisecting plane.

    Every point on the second centroid's side of that plane is at least the margin away from the row, so
    the rows with a small margin are those whose neighbours may lie in the second part.
    """
    if len(centroids) == 1:
        zeros = np.zeros(len(block), np.int64)
        return zeros, zeros, np.full(len(block), np.inf)
    d2 = _centroid_d2(block, centroids)
    near = np.argpartition(d2, 1, axis=1)[:, :2]
    near_d2 = np.take_along_axis(d2, near, 1)
    near = np.where((near_d2[:, :1] > near_d2[:, 1:]), near[:, ::-1], near)
    first, second = near[:, 0], near[:, 1]
    gap = np.linalg.norm((centroids[first] - centroids[second]).astype(np.float64), axis=1)
    excess = np.abs(near_d2[:, 1] - near_d2[:, 0]).astype(np.float64)
    return first, second, excess / np.maximum(2 * gap, np.finfo(np.float64).tiny)


def guest_margins(second: np.ndarray, margin: np.ndarray, n_parts: int, cap: float) -> np.ndarray:
    """Per part, the margin below which the sampled cells whose second-nearest centroid it is number at most
    ``cap``: a part of a hub centroid (second-nearest to most cells in high dimension) stays bounded."""
    limits = np.full(n_parts, np.inf)
    for part in range(n_parts):
        margins = np.sort(margin[second == part])
        if len(margins) > cap:
            limits[part] = margins[int(cap)]
    return limits


def _finite(block: np.ndarray) -> np.ndarray:
    if not np.isfinite(block).all():
        raise InputError("embedding: contains NaN or infinite values")
    return block


def _part_files(scratch: Path, part: int) -> tuple[Path, Path]:
    return scratch / f"part{part}.f32", scratch / f"part{part}.ids"


def spill_parts(x, partition: Partition, scratch: Path, memberships: np.ndarray) -> np.ndarray:
    """One pass over ``x``'s row blocks: append each cell's row and id to the files of its parts.

    Every cell goes to its nearest centroid's part, and to its second-nearest's as a guest when its
    margin is below that part's limit; ``memberships`` (N,) receives each cell's number of parts.
    Returns the cells of each part. A part's ids come out ascending, so local order is global order.
    """
    n, _ = x.shape
    n_parts = len(partition.centroids)
    counts = np.zeros(n_parts, np.int64)
    for a, b in knn.row_blocks(n, knn.READ_ROWS):
        block = _finite(np.ascontiguousarray(x[a:b], dtype=np.float32))
        first, second, margin = two_nearest(block, partition.centroids)
        guest = margin < partition.guest_margin[second]
        memberships[a:b] = 1 + guest
        cells = np.concatenate([np.arange(a, b), np.flatnonzero(guest) + a])
        parts = np.concatenate([first, second[guest]])
        order = np.lexsort((cells, parts))
        parts, cells = parts[order], cells[order]
        starts = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1]])
        for lo, hi in zip(starts, np.r_[starts[1:], len(parts)], strict=True):
            rows_file, ids_file = _part_files(scratch, int(parts[lo]))
            with open(rows_file, "ab") as fh:
                block[cells[lo:hi] - a].tofile(fh)
            with open(ids_file, "ab") as fh:
                cells[lo:hi].astype(np.int64).tofile(fh)
        counts += np.bincount(parts, minlength=n_parts)
    return counts


def load_part(scratch: Path, part: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """A part's rows ``(m, d)`` and global cell ids ``(m,)``; its files are removed (disk freed early)."""
    rows_file, ids_file = _part_files(scratch, part)
    rows = np.fromfile(rows_file, dtype=np.float32).reshape(-1, d)
    cells = np.fromfile(ids_file, dtype=np.int64)
    rows_file.unlink()
    ids_file.unlink()
    return rows, cells


def part_neighbours(rows: np.ndarray, k: int, cfg: GraphConfig, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest neighbours within its part (local ids; ``min(k, m - 1)`` of them), exact distances.

    Parts up to ``cfg.exact_max_cells`` rows (or of ``k`` rows or fewer) are searched exactly, larger
    ones with pynndescent under the graph options, whose candidates are then re-ranked by exact distance
    so that a pair found in both of a cell's parts has the same distance twice.
    """
    m = rows.shape[0]
    width = min(k, m - 1)
    if width == 0:
        return np.empty((m, 0), np.int64), np.empty((m, 0), np.float32)
    if m <= cfg.exact_max_cells or width < k:
        return knn.knn_exact(rows, width)
    cand, _ = knn.knn_pynndescent(rows, k, n_neighbors=cfg.nnd_neighbors, n_trees=cfg.nnd_trees or None,
                                  n_iters=cfg.nnd_iters or None, n_jobs=cfg.n_jobs, low_memory=True, seed=seed)
    return exact_order(rows, cand)


def exact_order(x: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ``cand`` of every row of ``x`` with exact distances, sorted by distance then index."""
    idx = np.empty_like(cand)
    dist = np.empty(cand.shape, np.float32)
    for a, b in knn.row_blocks(x.shape[0], REFINE_ROWS):
        idx[a:b], dist[a:b] = knn._refine_numpy(x, np.arange(a, b), cand[a:b], cand.shape[1])
    return idx, dist


def merge_nearest(best_idx: np.ndarray, best_dist: np.ndarray, cells: np.ndarray, idx: np.ndarray,
                  dist: np.ndarray) -> None:
    """Merge candidates (global ids) of ``cells`` into their running k nearest, in place.

    A neighbour found in both of a cell's parts is counted once; rows stay sorted by distance then
    index; unfilled slots hold id -1 at distance inf.
    """
    k = best_idx.shape[1]
    all_i = np.concatenate([best_idx[cells], idx], axis=1)
    all_d = np.concatenate([best_dist[cells], dist], axis=1)
    by_id = np.lexsort((all_d, all_i), axis=1)
    all_i, all_d = np.take_along_axis(all_i, by_id, 1), np.take_along_axis(all_d, by_id, 1)
    repeat = np.zeros(all_i.shape, bool)
    repeat[:, 1:] = (all_i[:, 1:] == all_i[:, :-1]) & (all_i[:, 1:] >= 0)
    all_i[repeat], all_d[repeat] = -1, np.inf
    nearest = np.lexsort((all_i, all_d), axis=1)[:, :k]
    best_idx[cells] = np.take_along_axis(all_i, nearest, 1)
    best_dist[cells] = np.take_along_axis(all_d, nearest, 1)
