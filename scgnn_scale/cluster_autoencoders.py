"""Cluster autoencoders (docs/METHOD.md step 7): one autoencoder per cluster, trained on its cells only.

The rows the cluster AEs learn are the previous feature AE's reconstruction, ``decoder(embedding)``
(:mod:`scgnn_scale.reconstruction`): a streamed pass lays the rows of the *embedding* of each
cluster out in their own scratch array (cell order kept; latent floats a cell, not one per gene);
each cluster is one job that decodes its rows, trains, and saves its model, so nothing cells x genes
is written and nothing passes through the scheduler (jobs get paths and return a few numbers). The
outputs in cell order (``X_t``, the iteration's feature AE input) are computed again from the saved
models whenever they are read. Jobs run where a :class:`JobExecutor` puts them: Dask tasks, or one
after another here on a GPU.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from .keys import KEYS
from .loader import BackgroundWriter, iter_row_blocks
from .memory import release_freed_memory
from .paths import remove_tree
from .reconstruction import ClusterOutputs, DecodedRows
from .store import Staging

#: never committed: the clusters' rows of the embedding, removed once the cluster AEs are trained
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


def cluster_seed(seed: int, iteration: int, cluster: int) -> int:
    """The seed of one cluster AE: depends only on the run seed, the iteration and the cluster."""
    return int(np.random.SeedSequence([int(seed), int(iteration), int(cluster)]).generate_state(1)[0] % 2**31)


def cluster_model(iteration: int, cluster: int) -> str:
    """The saved model name of one cluster AE (``RunStore.model_path``), removed once its iteration commits."""
    return f"{CLUSTER_MODELS.replace('*', str(iteration), 1).replace('*', str(cluster))}"


#: glob of the cluster AEs' saved models (iteration, cluster)
CLUSTER_MODELS = "iterate_cluster_*_*"


def run_cluster_autoencoders(ctx, *, source: DecodedRows, labels: np.ndarray, model_in, iteration: int,
                             executor: JobExecutor | None = None) -> dict:
    """Train one AE per cluster on its rows of ``source``; their outputs in cell order as ``outputs``.

    Parameters
    ----------
    ctx
        Stage context (``config.iterate``, ``config.feature``, Dask client, device).
    source
        N x G reconstruction the cluster AEs learn, computed from a saved model and its embedding.
    labels
        ``(N,)`` cluster of each cell.
    model_in
        Saved feature AE to start every cluster AE from, or None for fresh networks.
    iteration
        Iteration number (seeds, model names).
    executor
        Where the cluster AEs train (:func:`choose_executor`'s choice when None).

    Returns
    -------
    dict
        Per-cluster results (cells, steps, losses, seconds), ``loss_mean``, ``executor``, ``seconds``
        (of the layout of the embedding by cluster and of the training), ``outputs`` (a
        :class:`~scgnn_scale.reconstruction.ClusterOutputs`: each cell's row through its cluster's
        AE, computed as it is read) and ``models`` (the saved cluster AEs' names).
    """
    cfg, fcfg = ctx.config.iterate, ctx.config.feature
    n, g = source.shape
    labels = dense_labels(labels)
    if labels.shape != (n,):
        raise ValueError(f"{len(labels)} labels for {n} cells")
    sizes = np.bincount(labels)
    n_clusters = len(sizes)
    memory = ctx.runtime.memory
    latent = int(source.embedding.shape[1])
    chunk_c = cluster_chunk_rows(n_clusters, latent, buffer_mb=memory.scatter_mb(cfg.scatter_buffer_mb),
                                 chunk_rows=ctx.store.store_config.chunk_rows)
    executor = executor or choose_executor(ctx)
    # loaders running at once: one per Dask worker (the --memory-limit share is divided among them)
    loaders = 1 if executor.name == "local" else (ctx.config.runtime.n_workers or os.cpu_count() or 1)
    loader_mb = memory.loader_mb(cfg.cluster_memory_budget_mb, parts=loaders)
    block_rows = ctx.store.store_config.chunk_rows
    models = [cluster_model(iteration, c) for c in range(n_clusters)]

    # the clusters' rows of the embedding (latent floats a cell, not genes): each job decodes its own
    scratch = Staging(ctx.store, _SCRATCH)  # never committed: removed once the cluster AEs are trained
    phases, t0 = {}, time.perf_counter()
    try:
        inputs = []
        for c in range(n_clusters):
            shape, chunks = (int(sizes[c]), latent), (int(min(chunk_c, max(1, sizes[c]))), latent)
            inputs.append(scratch.create_matrix(_cluster_key(c, "embedding"), shape, np.float32, chunks=chunks))
        scatter_rows(source.embedding, labels, inputs, block_rows=block_rows)
        phases["layout"], t0 = round(time.perf_counter() - t0, 3), time.perf_counter()

        jobs = []
        for c in range(n_clusters):
            jobs.append({
                "cluster": c, "config": ctx.config,
                "input": scratch.path_of(_cluster_key(c, "embedding")),
                "decoder": source.model_path,
                "output": str(ctx.store.model_path(models[c])),
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
        phases["train_and_write"] = round(time.perf_counter() - t0, 3)
        release_freed_memory()  # the cluster AEs' buffers, before the feature AE allocates its own
    finally:
        remove_tree(scratch.root)
    outputs = ClusterOutputs(source, labels, [ctx.store.model_path(m) for m in models], source.device)
    ctx.log.info("iterate: %d cluster autoencoders: embedding laid out by cluster in %.1f s, trained in %.1f s "
                 "(%s)", n_clusters, phases["layout"], phases["train_and_write"], executor.name)
    losses = [r["loss_last"] for r in results if r.get("loss_last") is not None]
    weights = [r["n_cells"] for r in results if r.get("loss_last") is not None]
    return {"clusters": results, "executor": executor.name, "seconds": phases, "outputs": outputs, "models": models,
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
    """One cluster AE (a Dask task): decode the cluster's rows, train, save the model.

    ``job`` holds paths and small values only (a task builds what it needs, the device included):
    ``cluster``, ``config``, ``input`` (zarr path of the cluster's rows of the embedding), ``decoder``
    (the feature AE that decodes them into the rows to learn), ``output`` (where the model is saved),
    ``model_in`` (feature AE to start from, or None), ``seed``, ``steps``, ``memory_budget_mb`` (its
    loader's, after ``--memory-limit``).
    """
    import torch

    from .devices import resolve_device, training_precision
    from .nn.autoencoder import DenseAutoencoder
    from .nn.optim import adam
    from .train import TrainPlan, fit_autoencoder, load_model, save_model, write_outputs

    config = job["config"]
    cfg, fcfg = config.iterate, config.feature
    threads = _worker_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    device = resolve_device(config.runtime.device)
    x = DecodedRows(job["decoder"], job["input"], device)
    torch.manual_seed(job["seed"])
    if job["model_in"]:
        model, _ = load_model(job["model_in"], device)
    else:
        model = DenseAutoencoder(int(x.shape[1]), fcfg.hidden, fcfg.latent).to(device)
    optimizer = adam(model.parameters(), lr=fcfg.lr)
    plan = TrainPlan(steps=job["steps"], batch_size=fcfg.batch_size, gamma=cfg.cluster_gamma, alpha=0.0,
                     l1=fcfg.l1, seed=job["seed"], memory_budget_mb=job["memory_budget_mb"],
                     buffer_blocks=fcfg.buffer_blocks, prefetch_blocks=fcfg.prefetch_blocks,
                     plateau_tol=cfg.cluster_plateau_tol,
                     precision=training_precision(fcfg.precision, device))
    info = fit_autoencoder(model, optimizer, [x], plan, name=f"cluster {job['cluster']} AE")
    save_model(job["output"], model)
    written = write_outputs(model, x)  # the error over the cluster's rows; the outputs are computed when read
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
