"""Cluster autoencoders (docs/METHOD.md step 7): one autoencoder per cluster, trained on its cells only.

A streamed pass lays the rows of each cluster out in their own scratch array (cell order kept);
each cluster is one job that reads its array from the store and writes its reconstruction to its
own output array, so no two jobs ever write the same chunk and nothing cells x genes passes through
the scheduler (jobs get paths and return a few numbers). A second streamed pass puts the outputs
back in cell order. Jobs run where a :class:`JobExecutor` puts them: Dask tasks, or one after another
here on a GPU.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from .keys import KEYS
from .loader import BackgroundWriter, in_background, iter_row_blocks
from .memory import release_freed_memory
from .store import Staging

#: never committed: the clusters' rows and outputs, removed once the outputs are back in cell order
_SCRATCH = "iterate_scratch"


def _cluster_key(c: int, name: str) -> str:
    return f"{KEYS.iterate_work}/clusters/{c}/{name}"


def dense_labels(labels) -> np.ndarray:
    """Cluster ids as 0..k-1 (int32), in order of first sorted id."""
    labels = np.asarray(labels)
    _, dense = np.unique(labels, return_inverse=True)
    return dense.astype(np.int32).reshape(-1)


def cluster_chunk_rows(n_clusters: int, n_genes: int, *, buffer_mb: float, chunk_rows: int) -> int:
    """Rows per chunk of the per-cluster arrays: all clusters' buffers together fit ``buffer_mb``.

    The scatter and gather passes hold about one chunk per cluster; chunks are full rows (all genes)
    so a cluster AE task reads whole chunks.
    """
    per_row = max(1, n_clusters) * max(1, n_genes) * 4
    return int(max(16, min(chunk_rows, int(buffer_mb * 2**20) // per_row)))


def scatter_rows(source, labels: np.ndarray, targets: list, *, block_rows: int) -> None:
    """Copy the rows of ``source`` of cluster ``c`` into ``targets[c]``, in cell order, streamed.

    Rows are buffered per cluster and written in whole chunks of the target, so every chunk is
    written once; reads run ahead on one thread and writes behind on another.
    """
    n_clusters = len(targets)
    buffers: list[list[np.ndarray]] = [[] for _ in range(n_clusters)]
    buffered = np.zeros(n_clusters, dtype=np.int64)
    written = np.zeros(n_clusters, dtype=np.int64)

    def flush(c: int, final: bool) -> None:
        rows = np.concatenate(buffers[c]) if len(buffers[c]) > 1 else buffers[c][0]
        chunk = int(targets[c].chunks[0])
        take = len(rows) if final else len(rows) // chunk * chunk
        if take:
            writer.submit(targets[c].__setitem__, slice(int(written[c]), int(written[c] + take)), rows[:take])
            written[c] += take
        buffers[c] = [rows[take:]]
        buffered[c] = len(rows) - take

    with BackgroundWriter(depth=2) as writer:
        for a, b, block in iter_row_blocks(source, block_rows):
            block_labels = labels[a:b]
            for c in np.unique(block_labels):
                buffers[c].append(block[block_labels == c])
                buffered[c] += int(np.count_nonzero(block_labels == c))
                if buffered[c] >= targets[c].chunks[0]:
                    flush(int(c), final=False)
        for c in range(n_clusters):
            if buffered[c]:
                flush(c, final=True)
    for c in range(n_clusters):
        if written[c] != targets[c].shape[0]:
            raise AssertionError(f"cluster {c}: {written[c]} rows laid out, expected {targets[c].shape[0]}")


class _SequentialReader:
    """Hands out consecutive rows of an array, reading whole chunks once."""

    def __init__(self, array):
        self.array = array
        self.chunk = int(array.chunks[0])
        self.next_row = 0
        self.buffer = np.empty((0,) + tuple(array.shape[1:]), dtype=array.dtype)

    def take(self, k: int) -> np.ndarray:
        if len(self.buffer) < k:
            need = k - len(self.buffer)
            stop = min(self.array.shape[0], self.next_row + math.ceil(need / self.chunk) * self.chunk)
            fresh = np.asarray(self.array[self.next_row:stop])
            self.next_row = stop
            self.buffer = np.concatenate([self.buffer, fresh]) if len(self.buffer) else fresh
        rows, self.buffer = self.buffer[:k], self.buffer[k:]
        return rows


def gather_rows(sources: list, labels: np.ndarray, target, *, block_rows: int) -> None:
    """Inverse of :func:`scatter_rows`: put the clusters' rows back in cell order into ``target``."""
    readers = [_SequentialReader(s) for s in sources]
    n = target.shape[0]

    def assemble(stopped):
        for a in range(0, n, block_rows):
            if stopped():
                return
            b = min(n, a + block_rows)
            block_labels = labels[a:b]
            block = np.empty((b - a,) + tuple(target.shape[1:]), dtype=target.dtype)
            for c in np.unique(block_labels):
                mask = block_labels == c
                block[mask] = readers[c].take(int(np.count_nonzero(mask)))
            yield a, b, block

    # reading and assembling run one block ahead on one thread, compressing one behind on another
    with BackgroundWriter(depth=2) as writer:
        for a, b, block in in_background(assemble, 1):
            writer.submit(target.__setitem__, slice(a, b), block)


def cluster_seed(seed: int, iteration: int, cluster: int) -> int:
    """The seed of one cluster AE: depends only on the run seed, the iteration and the cluster."""
    return int(np.random.SeedSequence([int(seed), int(iteration), int(cluster)]).generate_state(1)[0] % 2**31)


def run_cluster_autoencoders(ctx, staging, *, source_key: str, labels: np.ndarray, out_key: str, model_in,
                             iteration: int, executor: JobExecutor | None = None) -> dict:
    """Train one AE per cluster on its rows of ``source_key``; write the reassembled output to ``out_key``.

    Parameters
    ----------
    ctx
        Stage context (``config.iterate``, ``config.feature``, Dask client, device).
    staging
        Where ``out_key`` is written.
    source_key
        N x G reconstruction the cluster AEs learn (committed).
    labels
        ``(N,)`` cluster of each cell.
    out_key
        N x G output key: each cell's row from its cluster's AE, in cell order.
    model_in
        Saved feature AE to start every cluster AE from, or None for fresh networks.
    iteration
        Iteration number (seeds).
    executor
        Where the cluster AEs train (:func:`choose_executor`'s choice when None).

    Returns
    -------
    dict
        Per-cluster results (cells, steps, losses, seconds), ``loss_mean``, ``executor``, ``seconds``
        (of the layout by cluster, the training and writing, and the gather back to cell order).
    """
    cfg, fcfg = ctx.config.iterate, ctx.config.feature
    source = ctx.store.open_array(source_key)
    n, g = int(source.shape[0]), int(source.shape[1])
    labels = dense_labels(labels)
    if labels.shape != (n,):
        raise ValueError(f"{len(labels)} labels for {n} cells")
    sizes = np.bincount(labels)
    n_clusters = len(sizes)
    memory = ctx.runtime.memory
    chunk_c = cluster_chunk_rows(n_clusters, g, buffer_mb=memory.scatter_mb(cfg.scatter_buffer_mb),
                                 chunk_rows=ctx.store.store_config.chunk_rows)
    executor = executor or choose_executor(ctx)
    # loaders running at once: one per Dask worker (the --memory-limit share is divided among them)
    loaders = 1 if executor.name == "local" else (ctx.config.runtime.n_workers or os.cpu_count() or 1)
    loader_mb = memory.loader_mb(cfg.cluster_memory_budget_mb, parts=loaders)
    block_rows = ctx.store.store_config.chunk_rows

    scratch = Staging(ctx.store, _SCRATCH)  # never committed: removed once the outputs are back in cell order
    phases, t0 = {}, time.perf_counter()
    try:
        inputs, outputs = [], []
        for c in range(n_clusters):
            shape, chunks = (int(sizes[c]), g), (int(min(chunk_c, max(1, sizes[c]))), g)
            inputs.append(scratch.create_matrix(_cluster_key(c, "input"), shape, np.float32, chunks=chunks))
            outputs.append(scratch.create_matrix(_cluster_key(c, "output"), shape, np.float32, chunks=chunks))
        scatter_rows(source, labels, inputs, block_rows=block_rows)
        phases["layout"], t0 = round(time.perf_counter() - t0, 3), time.perf_counter()

        jobs = []
        for c in range(n_clusters):
            jobs.append({
                "cluster": c, "config": ctx.config,
                "input": scratch.path_of(_cluster_key(c, "input")),
                "output": scratch.path_of(_cluster_key(c, "output")),
                "model_in": str(model_in) if model_in is not None else None,
                "seed": cluster_seed(ctx.config.runtime.seed, iteration, c),
                "steps": cluster_steps(int(sizes[c]), fcfg.batch_size, cfg.cluster_steps, cfg.cluster_max_epochs),
                "memory_budget_mb": loader_mb,
            })
        bar = ctx.progress(len(jobs), "cluster autoencoders", unit="clusters")
        try:
            results = sorted(executor.run(train_cluster_autoencoder, jobs, bar.update), key=lambda r: r["cluster"])
        finally:
            bar.close()
        phases["train_and_write"], t0 = round(time.perf_counter() - t0, 3), time.perf_counter()
        release_freed_memory()  # the cluster AEs' buffers, before the feature AE allocates its own
        for c in range(n_clusters):  # inputs are no longer needed: free the disk before the gather
            shutil.rmtree(scratch.path_of(_cluster_key(c, "input")), ignore_errors=True)

        out = staging.create_matrix(out_key, (n, g), np.float32)
        gather_rows(outputs, labels, out, block_rows=block_rows)
    finally:
        shutil.rmtree(scratch.root, ignore_errors=True)
    phases["gather"] = round(time.perf_counter() - t0, 3)
    ctx.log.info("iterate: %d cluster autoencoders: cells laid out by cluster in %.1f s, trained and written "
                 "in %.1f s (%s), put back in cell order in %.1f s", n_clusters, phases["layout"],
                 phases["train_and_write"], executor.name, phases["gather"])
    losses = [r["loss_last"] for r in results if r.get("loss_last") is not None]
    weights = [r["n_cells"] for r in results if r.get("loss_last") is not None]
    return {"clusters": results, "executor": executor.name, "seconds": phases,
            "loss_mean": float(np.average(losses, weights=weights)) if losses else float("nan")}


def cluster_steps(n_cells: int, batch_size: int, min_steps: int, max_epochs: int) -> int:
    """Steps of one cluster AE: ``max(min_steps, max_epochs * ceil(n_cells / batch))``.

    A cluster of up to ``batch_size`` cells trains full-batch, as the original (200 full-batch
    epochs = 200 steps); a large cluster gets at least ``max_epochs`` passes over its cells.
    """
    per_epoch = math.ceil(n_cells / max(1, min(batch_size, max(1, n_cells))))
    return int(max(min_steps, max_epochs * per_epoch))


class JobExecutor:
    """Runs the cluster AE jobs: ``run(fn, jobs, done)`` returns ``fn(job)`` for every job (any order) and
    calls ``done(1)`` as each finishes. The seam where tests observe or replace where jobs run."""

    name = "abstract"

    def run(self, fn: Callable[[dict], dict], jobs: list[dict], done: Callable[[int], Any]) -> list[dict]:
        raise NotImplementedError


class LocalExecutor(JobExecutor):
    """One job after another in this process (a GPU trains them faster than tasks would share it)."""

    name = "local"

    def run(self, fn, jobs, done):
        results = []
        for job in jobs:
            results.append(fn(job))
            done(1)
        return results


class DaskExecutor(JobExecutor):
    """One Dask task per job, largest clusters first so that the last tasks to start are short ones."""

    name = "dask"

    def __init__(self, client):
        self.client = client

    def run(self, fn, jobs, done):
        from distributed import as_completed

        order = sorted(jobs, key=lambda j: -zarr.open_array(j["input"], mode="r").shape[0])
        futures = [self.client.submit(fn, job, pure=False) for job in order]
        results = []
        for future in as_completed(futures):
            results.append(future.result())
            done(1)
        return results


class RankExecutor(JobExecutor):
    """The jobs dealt out to the data-parallel ranks (one GPU each), largest clusters first."""

    name = "ranks"

    def __init__(self, group):
        self.group = group

    def run(self, fn, jobs, done):
        return self.group.map_jobs(fn, jobs, done, size=lambda j: zarr.open_array(j["input"], mode="r").shape[0])


def choose_executor(ctx) -> JobExecutor:
    """``iterate.cluster_executor``: 'local', 'dask', or 'auto' (the data-parallel ranks when training is
    data-parallel, else local on a GPU and Dask otherwise)."""
    choice = ctx.config.iterate.cluster_executor
    if choice == "auto" and ctx.runtime.data_parallel:
        return RankExecutor(ctx.runtime.ranks())
    if choice == "auto":
        choice = "local" if ctx.runtime.cuda else "dask"
    return LocalExecutor() if choice == "local" else DaskExecutor(ctx.client())


def train_cluster_autoencoder(job: dict[str, Any]) -> dict:
    """One cluster AE (a Dask task): read the cluster's rows, train, write its reconstruction.

    ``job`` holds paths and small values only (a task builds what it needs, the device included):
    ``cluster``, ``config``, ``input`` and ``output``
    (zarr array paths: the cluster's rows and where its reconstruction goes), ``model_in`` (feature
    AE to start from, or None), ``seed``, ``steps``, ``memory_budget_mb`` (its loader's, after
    ``--memory-limit``).
    """
    import torch

    from .devices import resolve_device
    from .nn.autoencoder import DenseAutoencoder
    from .nn.optim import adam
    from .train import TrainPlan, fit_autoencoder, load_model, write_outputs

    config = job["config"]
    cfg, fcfg = config.iterate, config.feature
    threads = _worker_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    x = zarr.open_array(job["input"], mode="r", zarr_format=3)
    out = zarr.open_array(job["output"], mode="r+", zarr_format=3)
    device = resolve_device(config.runtime.device)
    torch.manual_seed(job["seed"])
    if job["model_in"]:
        model, _ = load_model(job["model_in"], device)
    else:
        model = DenseAutoencoder(int(x.shape[1]), fcfg.hidden, fcfg.latent).to(device)
    optimizer = adam(model.parameters(), lr=fcfg.lr)
    plan = TrainPlan(steps=job["steps"], batch_size=fcfg.batch_size, gamma=cfg.cluster_gamma, alpha=0.0,
                     l1=fcfg.l1, seed=job["seed"], memory_budget_mb=job["memory_budget_mb"],
                     buffer_blocks=fcfg.buffer_blocks, prefetch_blocks=fcfg.prefetch_blocks,
                     plateau_tol=cfg.cluster_plateau_tol)
    info = fit_autoencoder(model, optimizer, [x], plan, name=f"cluster {job['cluster']} AE")
    written = write_outputs(model, x, recon=out)
    return {"cluster": job["cluster"], "n_cells": int(x.shape[0]), "steps": info["steps"],
            "steps_run": info["steps_run"],
            "loss_first": info["loss_first"], "loss_last": info["loss_last"], "recon_mse": written["recon_mse"],
            "seconds": round(time.perf_counter() - t0, 3)}


def _worker_threads() -> int | None:
    """Torch threads in a Dask worker: the worker's thread count (no oversubscription); None outside Dask."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    state = getattr(worker, "state", None)
    return int(getattr(state, "nthreads", None) or getattr(worker, "nthreads", 1) or 1)
