"""The graph autoencoder's 16-d cell embedding (docs/METHOD.md step 5): its training loop and inference.

Input: a 128-d embedding (node features E) and the cell graph. Output: float32 N x 16,
``Z = act(A~ ReLU(A~ E W1) W2)``. The gae stage and each iteration call :func:`train_gae`.

**Training modes** (``gae.mode``, 'auto' picks by ``gae.full_graph_max_nodes``):

- *full graph*: each epoch is one Adam step on the whole graph; the loss takes every edge once as a
  positive and ``neg_ratio x |E|`` uniformly drawn non-edges (redrawn every epoch). 200 epochs =
  200 steps, as the published code.
- *minibatch* (neighbour sampling): an epoch visits ``min(N, gae.epoch_cells)`` target cells in
  minibatches of ``gae.batch_size`` (a rolling random permutation, so successive epochs cover all
  cells). For each target one uniformly sampled neighbour forms a positive pair, weighted by the
  target's degree so that the positive term estimates the mean over all edges; ``neg_ratio`` non-
  edges per target form the negative pairs. The seeds (targets, their positive partners and the
  negatives' partners) get their embedding from a sampled neighbourhood
  (:func:`scgnn_scale.nn.sampling.sample_blocks`, full-degree normalisation). ``epoch_cells`` bounds
  the work: with the defaults an epoch is 4 steps of 4096 targets whatever N is, 800 steps in all
  (~0.25 s each on one CPU thread at 200k cells). Measured on three gold sets (PCA-50 input,
  1.5k-4k cells, batch 256): 200 minibatch steps clustered as well as 200 full-graph epochs, and
  4x more steps did not help, so the step count need not grow with N.

**First-layer precomputation.** ``A~ E`` does not depend on the weights, so it is computed once
(one sparse product over the whole graph, ``O(N k d)``) and the first layer becomes
``ReLU((A~E) W1)``. Full-graph training and inference use it (the same numbers as propagating every
step); in minibatch mode the first layer is therefore exact and only hop 1 is sampled, unless
``gae.sample_first_layer`` asks for classic 2-hop sampling on E.

**Input scaling.** With ``gae.standardize`` (default) each feature column is z-scored first: the
feature AE's embedding has scales of 10-100, which at lr 0.01 left most first-layer ReLUs dead and
collapsed the embedding on small sets (goolam, pollen, baron: KMeans found fewer distinct points
than clusters). The published code fed a binarised 0/1 embedding instead.

**Data-parallel** (``--gpus N``): every rank holds the graph and ``A~ E`` and trains the same model
wrapped in DistributedDataParallel; in minibatch mode a rank draws its targets from its own share of
the cells (``gae.batch_size / N`` a step), in full mode it takes every N-th positive edge and its share
of the negatives; DDP averages the gradients. Rank 0 infers the embedding.

**Inference** runs on the whole graph with no sampling: two sparse products over N cells.
On the CPU the result is deterministic for a seed (numpy and torch generators seeded from
``runtime.seed``).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time

import numpy as np
import torch

from .config import GAEConfig, parse_fanouts
from .convergence import LossPlateau
from .errors import InputError
from .nn.gcn import GCNEncoder, edge_bce_loss, normalized_adjacency, pair_logits, propagate, sparse_csr
from .nn.optim import adam
from .nn.sampling import CSRGraph, sample_blocks, sample_neighbors, sorted_unique

#: rows per block of the streamed passes (standardising, propagating, inference)
BLOCK_ROWS = 65536


def _row_blocks(n: int, block_rows: int | None = None) -> list[tuple[int, int]]:
    block_rows = block_rows or BLOCK_ROWS
    return [(a, min(n, a + block_rows)) for a in range(0, n, block_rows)]


def column_moments(x, block_rows: int | None = None, *, constant_sd: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation of each column, in float64, in row blocks; a constant
    column reports ``constant_sd`` (1: dividing by it leaves the column at 0 once centred).

    ``x`` is anything sliced by rows (a numpy or zarr array); two passes, so the only memory is a block.
    """
    n, d = x.shape
    mean = np.zeros(d)
    for a, b in _row_blocks(n, block_rows):
        mean += np.asarray(x[a:b]).sum(axis=0, dtype=np.float64)
    mean /= max(n, 1)
    squares = np.zeros(d)
    for a, b in _row_blocks(n, block_rows):
        diff = np.asarray(x[a:b]) - mean
        squares += np.einsum("ij,ij->j", diff, diff)
    sd = np.sqrt(squares / max(n, 1))
    sd[sd <= 0] = constant_sd
    return mean, sd


def standardize_columns(x: np.ndarray, block_rows: int | None = None) -> np.ndarray:
    """Each column to mean 0 and standard deviation 1 (constant columns to 0), in float32.

    Row block by row block, with float64 sums: the only N-sized allocation is the float32 result
    (numpy's ``std`` and the float64 broadcast held three N x d float64 copies: 3 GB at 1M x 128).
    """
    n, d = x.shape
    mean, sd = column_moments(x, block_rows)
    out = np.empty((n, d), np.float32)
    for a, b in _row_blocks(n, block_rows):
        out[a:b] = (x[a:b] - mean) / sd
    return out


#: bytes of a scratch file mapped at once. A read fault maps the file's cached pages around the faulting
#: one too (the kernel's fault-around), so one gather of 130k random rows through a map of a whole 5 GB
#: file (10M cells x 128) counted 4.9 GB of it as resident; a window bounds that to its size.
MAP_WINDOW_BYTES = 64 << 20


class DiskRows:
    """An ``N x d`` float32 table in a raw scratch file, written and gathered by rows.

    Each access maps the part of the file it needs, at most :data:`MAP_WINDOW_BYTES` at once, and
    unmaps it again, so only that part counts towards the process's resident memory, however large the
    table.
    """

    def __init__(self, path, shape: tuple[int, int], *, create: bool = True):
        """A new zero-filled table at ``path``; ``create=False`` attaches to an existing file of this shape."""
        self.path, self.shape = str(path), (int(shape[0]), int(shape[1]))
        if create:
            np.memmap(self.path, dtype=np.float32, mode="w+", shape=self.shape).flush()
        elif os.path.getsize(self.path) != 4 * self.shape[0] * self.shape[1]:
            raise ValueError(f"{self.path}: not a float32 table of shape {self.shape}")

    def _map(self, start: int, stop: int, mode: str = "r") -> np.memmap:
        row_bytes = 4 * self.shape[1]
        return np.memmap(self.path, dtype=np.float32, mode=mode, offset=start * row_bytes,
                         shape=(stop - start, self.shape[1]))

    def _window_rows(self) -> int:
        return max(1, MAP_WINDOW_BYTES // (4 * self.shape[1]))

    def write(self, start: int, rows: np.ndarray) -> None:
        table = self._map(start, start + len(rows), "r+")
        table[:] = rows
        table.flush()
        del table

    def take(self, ids: np.ndarray) -> np.ndarray:
        """``table[ids]`` (any order, repeats allowed), gathered window by window into one output array
        (a second one only for unsorted ``ids``, which the callers' sorted ids never are)."""
        ids = np.asarray(ids, dtype=np.int64)
        in_order = bool(np.all(ids[1:] >= ids[:-1]))
        order = None if in_order else np.argsort(ids, kind="stable")
        ordered = ids if in_order else ids[order]
        gathered = np.empty((ids.size, self.shape[1]), np.float32)
        if ids.size == 0:
            return gathered
        if ordered[0] < 0 or ordered[-1] >= self.shape[0]:
            raise IndexError(f"{self.path}: row ids outside 0..{self.shape[0] - 1}")
        window = self._window_rows()
        starts = np.arange(int(ordered[0]) // window * window, int(ordered[-1]) + 1, window)
        cuts = np.searchsorted(ordered, np.r_[starts, starts[-1] + window])
        for start, lo, hi in zip(starts.tolist(), cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
            if lo == hi:
                continue
            table = self._map(start, min(self.shape[0], start + window))
            # mode 'clip' writes straight into the output ('raise' buffers a copy); the ids are checked above
            np.take(table, ordered[lo:hi] - start, axis=0, out=gathered[lo:hi], mode="clip")
            del table
        if in_order:
            return gathered
        out = np.empty_like(gathered)
        out[order] = gathered
        return out

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("DiskRows: only contiguous row slices")
        table = self._map(start, stop)
        out = np.array(table)
        del table
        return out


def adjacency_rows(graph: CSRGraph, a: int, b: int, dinv: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Rows ``a:b`` of ``A~ = D^-1/2 (A + I) D^-1/2`` over the columns they touch.

    Returns the sparse CSR block (``b - a`` x ``len(cols)``, columns local) and ``cols``, the sorted
    global ids of those columns. Entries and their order are those of the same rows of
    :func:`~scgnn_scale.nn.gcn.normalized_adjacency` (``dinv``: ``(deg + 1)^-1/2`` as torch computes it).
    """
    lo, hi = int(graph.indptr[a]), int(graph.indptr[b])
    crow = torch.from_numpy(graph.indptr[a:b + 1] - lo)
    col = torch.from_numpy(graph.indices[lo:hi].astype(np.int64))
    rows_n = b - a
    row_local = torch.repeat_interleave(torch.arange(rows_n), crow[1:] - crow[:-1])
    row = row_local + a
    loop_at = crow[:-1] + torch.arange(rows_n) + torch.bincount(row_local[col < row], minlength=rows_n)
    is_edge = torch.ones(col.numel() + rows_n, dtype=torch.bool)
    is_edge[loop_at] = False
    cols = torch.empty(col.numel() + rows_n, dtype=torch.int64)
    cols[loop_at] = torch.arange(a, b)
    cols[is_edge] = col
    vals = torch.empty(col.numel() + rows_n, dtype=torch.float32)
    block_dinv = dinv[a:b]
    vals[loop_at] = block_dinv * block_dinv
    vals[is_edge] = torch.ones(col.numel()) * dinv[row] * dinv[col]
    global_cols = cols.numpy()
    unique = sorted_unique(global_cols)
    local = torch.from_numpy(np.searchsorted(unique, global_cols))
    return sparse_csr(crow + torch.arange(rows_n + 1), local, vals, (rows_n, unique.size)), unique


def read_graph(location: str) -> CSRGraph:
    """The CSR graph stored (AnnData encoding) at ``location``, its indices read chunk by chunk into
    :class:`CSRGraph`'s index type, without the int64 copy and the weights a whole read holds."""
    import zarr

    from .nn.sampling import index_dtype

    group = zarr.open_group(location, mode="r", zarr_format=3)
    indptr = np.asarray(group["indptr"][:], dtype=np.int64)
    n = int(group.attrs["shape"][0])
    stored = group["indices"]
    indices = np.empty(stored.shape[0], dtype=index_dtype(n))
    step = max(int(stored.chunks[0]), 1 << 22)
    for a in range(0, stored.shape[0], step):
        indices[a:a + step] = stored[a:a + step]
    return CSRGraph(indptr, indices, n)


def _sparse_adjacency(graph: CSRGraph, device) -> torch.Tensor:
    return normalized_adjacency(torch.from_numpy(graph.indptr), torch.from_numpy(graph.indices), graph.n).to(device)


def fit_gae(x, graph: CSRGraph, cfg: GAEConfig, *, device, seed: int = 0,
            progress=None, rank: int = 0, world: int = 1, out=None) -> tuple[np.ndarray | None, dict]:
    """Train the graph autoencoder on features ``x`` and ``graph``; return the embedding of all cells.

    Parameters
    ----------
    x
        ``(N, d)`` node features (the feature autoencoder's embedding).
    graph
        The symmetric cell graph.
    cfg
        GAE options (sizes, lr, epochs, mode, sampling).
    seed
        Seed of the weights' initialisation and of every sample.
    device
        Torch device to train and infer on.
    progress
        Optional callable ``(total, desc, unit) -> tqdm-like`` bar factory.
    rank, world
        This process's rank among ``world`` data-parallel ranks (the process group is initialised).
    out
        Where to write the embedding, block by block (an ``N x latent`` zarr or numpy array); None:
        a new numpy array.

    ``x`` may be any array sliced by rows (numpy, zarr). In minibatch mode on one rank, when the
    features take more than ``gae.memory_budget_mb`` (N x d x 4 bytes), neither ``x`` nor ``A~ E``
    is held: they are computed block by block into scratch files in the temporary directory
    (``TMPDIR``), each minibatch gathers its rows from there, and inference writes ``out`` block by
    block. The numbers are those of the in-memory path.

    Returns
    -------
    z, info
        ``(N, latent)`` float32 embedding (``out`` when given; None on ranks other than 0) and a
        JSON-able summary (mode, steps, losses, seconds).
    """
    device = torch.device(device)
    n, d = x.shape
    if graph.n != n:
        raise InputError(f"graph has {graph.n} nodes but the embedding has {n} rows")
    if graph.n_directed_edges == 0:
        raise InputError("graph: has no edges; the graph autoencoder needs some")
    mode = cfg.mode if cfg.mode != "auto" else ("full" if n <= cfg.full_graph_max_nodes else "minibatch")
    fanouts = parse_fanouts(cfg.fanouts)
    rng = np.random.default_rng(seed if world == 1 else [seed, rank])  # each rank its own samples
    gen = torch.Generator().manual_seed(seed)
    encoder = GCNEncoder(d, cfg.hidden, cfg.latent, final_relu=cfg.final_relu, generator=gen).to(device)
    optimizer = adam(encoder.parameters(), lr=cfg.lr)
    model = encoder
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None)

    t0 = time.perf_counter()
    scratch = contextlib.ExitStack()
    on_disk = mode == "minibatch" and world == 1 and n * d * 4 > cfg.memory_budget_mb * 2**20
    if on_disk:
        adj = None
        propagated, raw = _propagate_on_disk(x, graph, cfg, scratch.enter_context(
            tempfile.TemporaryDirectory(prefix="scgnn-gae-")))
    else:
        adj = _sparse_adjacency(graph, device)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if cfg.standardize:
            x = standardize_columns(x)
        features = torch.from_numpy(x).to(device)
        with torch.no_grad():
            propagated = propagate(adj, features)  # A~ E, exact, once
        raw = features if (mode == "minibatch" and cfg.sample_first_layer) else None
        del features, x  # only A~ E is needed from here (at 1M x 128 each copy is 512 MB)

    losses: list[float] = []
    bar = progress(cfg.epochs, f"GAE ({mode})", "epochs") if progress else None
    steps = 0
    # ranks see different losses: a plateau stop on one rank would leave the others waiting on it
    plateau = LossPlateau(cfg.plateau_tol if world == 1 else 0.0)

    def flat() -> bool:
        """After an epoch: whether the mean loss of the last window of epochs stopped falling."""
        window = max(1, cfg.plateau_window)
        return len(losses) % window == 0 and plateau.update(len(losses), float(np.mean(losses[-window:])))

    if mode == "full":
        ps, pd_ = graph.upper_edges()
        ps, pd_ = ps[rank::world], pd_[rank::world]  # this rank's share of the edges
        pos_src, pos_dst = torch.from_numpy(ps).to(device), torch.from_numpy(pd_).to(device)
        n_neg = max(1, int(round(cfg.neg_ratio * ps.size)))
        for _ in range(cfg.epochs):
            ns, nd = graph.sample_non_edges(n_neg, rng)
            z = model(propagated, adj, precomputed=True)
            loss = edge_bce_loss(pair_logits(z[pos_src], z[pos_dst]),
                                 pair_logits(z[torch.from_numpy(ns).to(device)], z[torch.from_numpy(nd).to(device)]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            steps += 1
            if bar is not None:
                bar.update(1)
            if flat():
                break
    else:
        epoch_cells = min(n, cfg.epoch_cells)
        steps_per_epoch = max(1, math.ceil(epoch_cells / cfg.batch_size))
        cells = np.arange(n)[rank::world]  # the targets this rank draws from
        batch = max(1, min(math.ceil(cfg.batch_size / world), math.ceil(epoch_cells / world), cells.size))
        order, cursor = rng.permutation(cells), 0
        for _ in range(cfg.epochs):
            epoch_loss = 0.0
            for _ in range(steps_per_epoch):
                if cursor + batch > cells.size:
                    order, cursor = rng.permutation(cells), 0
                targets = order[cursor:cursor + batch]
                cursor += batch
                loss = _minibatch_loss(model, graph, targets, fanouts, cfg, rng, propagated, raw, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                epoch_loss += float(loss.detach())
                steps += 1
            losses.append(epoch_loss / steps_per_epoch)
            if bar is not None:
                bar.update(1)
            if flat():
                break
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t0

    encoder.eval()
    z = None
    with scratch:
        if rank == 0 and on_disk:
            z = _infer_on_disk(encoder, propagated, graph, scratch.enter_context(
                tempfile.TemporaryDirectory(prefix="scgnn-gae-")), out)
        elif rank == 0:
            with torch.no_grad():
                z = encoder(propagated, adj, precomputed=True).cpu().numpy().astype(np.float32)
            if out is not None:
                for a, b in _row_blocks(n):
                    out[a:b] = z[a:b]
                z = out
    info = {"mode": mode, "features_on_disk": on_disk, "epochs": cfg.epochs, "epochs_run": len(losses), "stopped_on_plateau": plateau.stopped_at is not None,
            "steps": steps, "loss_first": round(losses[0], 5),
            "loss_last": round(losses[-1], 5), "train_seconds": round(train_seconds, 3),
            "n_edges": graph.n_directed_edges // 2, "final_relu": cfg.final_relu, "ranks": world,
            "loss_history": loss_history(losses)}
    if mode == "minibatch":
        info.update({"batch_size": cfg.batch_size, "epoch_cells": min(n, cfg.epoch_cells),
                     "fanouts": fanouts if cfg.sample_first_layer else fanouts[:1],
                     "sample_first_layer": cfg.sample_first_layer})
    return z, info


def _propagate_on_disk(x, graph: CSRGraph, cfg: GAEConfig, scratch: str) -> tuple[DiskRows, DiskRows | None]:
    """``A~ E`` (E standardised when ``gae.standardize``) into a scratch file, row block by row block.

    E is first streamed from ``x`` into its own scratch file, from which each block of ``A~`` gathers
    the rows its columns name. Returns ``A~ E`` and, for ``gae.sample_first_layer``, E.
    """
    n, d = x.shape
    mean, sd = column_moments(x) if cfg.standardize else (None, None)
    features = DiskRows(os.path.join(scratch, "features.f32"), (n, d))
    for a, b in _row_blocks(n):
        block = np.asarray(x[a:b], dtype=np.float32)
        features.write(a, ((block - mean) / sd).astype(np.float32) if cfg.standardize else block)
    dinv = _torch_dinv(graph)
    propagated = DiskRows(os.path.join(scratch, "propagated.f32"), (n, d))
    with torch.no_grad():
        for a, b in _row_blocks(n):
            rows = np.empty((b - a, d), np.float32)
            for c, e in _gathering_blocks(graph, a, b):
                block, cols = adjacency_rows(graph, c, e, dinv)
                rows[c - a:e - a] = torch.sparse.mm(block, torch.from_numpy(features.take(cols))).numpy()
            propagated.write(a, rows)
    if not cfg.sample_first_layer:
        os.unlink(features.path)
        features = None
    return propagated, features


def _infer_on_disk(encoder: GCNEncoder, propagated: DiskRows, graph: CSRGraph, scratch: str, out) -> np.ndarray:
    """The encoder's output on the whole graph (as ``encoder(A~E, A~, precomputed=True)``), block by block:
    ``H = ReLU((A~E) W1)`` into a scratch file, then each block of ``A~ (H W2)`` into ``out``."""
    n = graph.n
    if out is None:
        out = np.empty((n, encoder.w2.shape[1]), np.float32)
    dinv = _torch_dinv(graph)
    hidden = DiskRows(os.path.join(scratch, "hidden.f32"), (n, encoder.w1.shape[1]))
    device = encoder.w1.device
    with torch.no_grad():
        for a, b in _row_blocks(n):
            hidden.write(a, torch.relu(torch.from_numpy(propagated[a:b]).to(device) @ encoder.w1).cpu().numpy())
        for a, b in _row_blocks(n):
            rows = np.empty((b - a, encoder.w2.shape[1]), np.float32)
            for c, e in _gathering_blocks(graph, a, b):
                block, cols = adjacency_rows(graph, c, e, dinv)
                z = torch.sparse.mm(block.to(device), torch.from_numpy(hidden.take(cols)).to(device) @ encoder.w2)
                rows[c - a:e - a] = (torch.relu(z) if encoder.final_relu else z).cpu().numpy()
            out[a:b] = rows
    return out


#: rows gathered from a scratch file at once by a block of A~: each maps one page (4 KB) of the file,
#: counted in the process's resident memory until the block is done
GATHER_ROWS = 32768


def _gathering_blocks(graph: CSRGraph, a: int, b: int) -> list[tuple[int, int]]:
    """Rows ``a:b`` in sub-blocks whose neighbours (and themselves) number about :data:`GATHER_ROWS`."""
    mean_degree = graph.n_directed_edges / max(graph.n, 1)
    step = max(64, int(GATHER_ROWS / (mean_degree + 1)))
    return [(c, min(b, c + step)) for c in range(a, b, step)]


def _torch_dinv(graph: CSRGraph) -> torch.Tensor:
    """``(deg + 1)^-1/2`` as :func:`~scgnn_scale.nn.gcn.normalized_adjacency` computes it (float32 rsqrt)."""
    return torch.from_numpy((graph.degree + 1).astype(np.float32)).rsqrt()


#: at most this many points of a loss curve are kept in the stage's info (manifest.json, uns): a few KB
LOSS_HISTORY_POINTS = 200


def loss_history(losses: list[float]) -> list[dict]:
    """Per-epoch losses as ``{"epoch", "loss"}`` records for the run report, thinned to
    :data:`LOSS_HISTORY_POINTS` (every n-th epoch, the last always kept)."""
    every = max(1, math.ceil(len(losses) / LOSS_HISTORY_POINTS))
    keep = sorted(set(range(every - 1, len(losses), every)) | {len(losses) - 1}) if losses else []
    return [{"epoch": i + 1, "loss": round(losses[i], 5)} for i in keep]


def _gather_rows(table, ids: np.ndarray, device=None) -> torch.Tensor:
    """``table[ids]``; on the CPU through numpy's ``take``, 3-4x faster than torch indexing there.
    A :class:`DiskRows` table is read and its rows moved to ``device``."""
    if isinstance(table, DiskRows):
        return torch.from_numpy(table.take(ids)).to(device)
    if table.device.type == "cpu":
        return torch.from_numpy(table.numpy().take(ids, axis=0))
    return table.index_select(0, torch.from_numpy(ids).to(table.device))


def _minibatch_loss(model, graph: CSRGraph, targets: np.ndarray, fanouts: list[int], cfg: GAEConfig,
                    rng: np.random.Generator, propagated: torch.Tensor, raw: torch.Tensor | None, device):
    """Negative-sampled BCE of one minibatch of target cells (see the module docstring)."""
    targets = np.sort(targets)
    owner, partner, _ = sample_neighbors(graph, targets, 1, rng)
    pos_a = targets[owner]
    pos_weight = graph.degree[pos_a].astype(np.float32)
    n_neg = max(1, int(round(cfg.neg_ratio * pos_a.size)))
    neg_a, neg_b = graph.sample_non_edges(n_neg, rng, sources=targets)
    seeds = sorted_unique(np.concatenate([targets, partner, neg_b]))
    if raw is not None:
        batch = sample_blocks(graph, seeds, fanouts, rng)
        z = model(_gather_rows(raw, batch.input_nodes, device), batch.to_torch(device))
    else:
        batch = sample_blocks(graph, seeds, fanouts[:1], rng)
        z = model(_gather_rows(propagated, batch.input_nodes, device), batch.to_torch(device), precomputed=True)

    def rows(ids):  # z's rows follow the sorted seeds
        return torch.from_numpy(np.searchsorted(seeds, ids)).to(device)

    return edge_bce_loss(pair_logits(z[rows(pos_a)], z[rows(partner)]),
                         pair_logits(z[rows(neg_a)], z[rows(neg_b)]),
                         pos_weight=torch.from_numpy(pos_weight).to(device))


def train_gae(ctx, staging, *, embedding_key: str, graph_key: str, out_key: str) -> dict:
    """Train the GAE on ``embedding_key`` and ``graph_key``; stage the embedding at ``out_key``.

    Parameters
    ----------
    ctx
        Stage context (config ``gae``, ``runtime.seed``, torch device, progress bars).
    staging
        Where the embedding is written; inputs staged there by the caller are read from it.
    embedding_key, graph_key, out_key
        Store keys of the node features, the graph and the output embedding.

    Returns
    -------
    dict
        mode, steps, first/last loss, per-epoch loss history (thinned), seconds.
    """
    if ctx.runtime.data_parallel:
        z, info = ctx.runtime.ranks().fit_gae(staging.location_of(embedding_key), staging.location_of(graph_key),
                                              ctx.config.gae, seed=ctx.config.runtime.seed, progress=ctx.progress)
        staging.write_elem(out_key, z)
    else:
        from .train import cpu_threads

        graph = read_graph(staging.location_of(graph_key))
        features = staging.open_array(embedding_key)
        out = staging.create_matrix(out_key, (int(features.shape[0]), ctx.config.gae.latent), np.float32,
                                    chunks=(min(BLOCK_ROWS, max(int(features.shape[0]), 1)), ctx.config.gae.latent))
        # one thread fewer than the cores, as the autoencoders: at 8,000 cells on the 2-core VM, busy with other
        # work, 200 epochs took 64.5 CPU-s with two threads, whose OpenMP waits spin, and 6-7 with one
        with cpu_threads(ctx.runtime.device, ctx.config.gae.torch_threads):
            _, info = fit_gae(features, graph, ctx.config.gae, device=ctx.runtime.device,
                              seed=ctx.config.runtime.seed, progress=ctx.progress, out=out)
    ctx.log.info("gae: %s mode, %d of %d epochs (%d steps), loss %.4f -> %.4f", info["mode"], info["epochs_run"],
                 info["epochs"], info["steps"], info["loss_first"], info["loss_last"])
    return info
