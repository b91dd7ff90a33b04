"""Stage ``iterate``: cluster autoencoders and the scGNN iteration to convergence (docs/METHOD.md steps 7-8).

Iteration ``t = 1, 2, ...`` starts from the previous feature-autoencoder reconstruction ``R_(t-1)``
(the feature stage's ``work/recon`` for t = 1) and the previous clusters ``c_(t-1)`` (the cluster
stage's ``obs/scgnn_cluster`` for t = 1):

1. **Cluster autoencoders.** One :class:`~scgnn_scale.nn.autoencoder.DenseAutoencoder` per cluster,
   trained only on that cluster's rows of ``R_(t-1)`` (the paper; the published code at HEAD trains
   them on all cells because a fix was reverted), loss ``cluster_gamma * SE + l1 * sum|w|`` (no LTMG
   term), started from the current feature AE's weights as the published code does
   (``model.load_state_dict(ptstatus)``; ``iterate.cluster_init``). A streamed pass lays the rows of
   each cluster out in their own scratch array (cell order kept); each cluster is one Dask task that
   reads its array from the store and writes its reconstruction to its own output array, so no two
   tasks ever write the same chunk and nothing cells x genes passes through the scheduler (tasks
   get paths and return a few numbers). A second streamed pass puts the outputs back in cell order:
   ``X_t``, the next input.
2. **Feature AE, continued** from the previous iteration's saved model and optimiser
   (``feature.iter_steps`` steps, LTMG term per ``iterate.feature_ltmg``), then the cell graph,
   the graph autoencoder and the clusters ``c_t``, with the functions of those stages.
3. **Convergence** (:mod:`scgnn_scale.convergence`): stop when ``ARI(c_t, c_(t-1)) > ari_stop``,
   or when the smoothed graph stops moving (``mean|A'_t - A'_(t-1)| < graph_tol * mean|L0|``,
   sparse), or after ``max_iterations``.

**Number of clusters in the iterations** (``iterate.cluster_count``, issue 5). Default ``'first'``:
iteration ``t`` makes as many clusters as the first pass found, with the same rule (Leiden /
Louvain at the resolution that gives that count, searched from ``cluster.resolution``; LouvainK's
KMeans with that k). ``'free'``: the rule chooses its count again each iteration, as the published
code does (it reruns Louvain on every iteration's graph). Why, measured: every iteration
autoencodes the previous reconstruction again (cluster AEs, then the feature AE), which thins each
cluster to a nearly one-dimensional set (mean within-cluster participation-ratio dimension of the
128-d embedding 4.4 -> 1.2 on a 3,000 x 2,000 six-type simulation, 3.1 -> 2.2 -> 1.8 on
klein_subset), and a KNN graph of such a set is a chain that modularity cuts at a fixed resolution.
The graph itself does not get worse (share of edges inside a planted type 1.000 -> 1.000 on the
simulation, inside a gold class 0.968 -> 0.958 on klein_subset), but the resolution that still
gives the first pass's count falls (klein_subset 0.3 -> 0.18 -> 0.075 -> 0.029), so resolution 0.3
over-splits: 6 -> 11 -> 17 -> 23 clusters on the simulation (ARI to the planted types 1.0 -> 0.74
-> 0.53 -> 0.43), 6 -> 7 -> 8 on klein_subset (ARI 0.662 -> 0.569 -> 0.546). The cluster AEs are
not the cause on their own: with zero cluster-AE steps klein_subset still goes to 8 and 7 clusters
(ARI 0.47-0.52), so regularising them less does not help. KMeans with the first count on the 16-d
embedding (the paper's KMeans step) scores lower than the count-matched Leiden on the same graphs
(klein_subset 0.51-0.59 vs 0.70-0.80; simulation 0.72 vs 1.0). With ``'first'``: the simulation
stops after one iteration at 6 clusters, ARI 1.0; klein_subset after two, 6 clusters, ARI 0.707
(one pass 0.662; with seed 1: one pass 5 clusters, ARI 0.890, kept through the iterations,
against 7 -> 8 -> 8 clusters and ARI 0.668 -> 0.591 -> 0.592 with ``'free'``). The paper takes the number of clusters from Louvain and then clusters the graph
embedding with it; keeping the first count is that rule with the count taken once, on the graph
that the iterations have not yet thinned.

Store layout while running (all under ``work.zarr``)::

    work/first_pass/{X_scgnn_feature, X_scgnn, graph, cluster, labels}
                                                     the first pass's results, which iterate replaces
                                                     (L0 and c_0 come from here; kept after the stage)
    work/iterate/<t>/x                               X_t, removed once iteration t has committed
    work/iterate/<t>/recon, feature, graph, gae, cluster, labels
    models/iterate_feature_<t>.pt                    the feature AE (and optimiser) after iteration t
    work/recon_final                                 after the stage: R_T, the last iteration's
                                                     feature-AE reconstruction (FINAL_RECON)

Each iteration is one staged commit (its steps read what the earlier steps staged), and the
stage checkpoints (``ctx.save_checkpoint``) after every finished iteration: a killed run resumes
at the last finished iteration, from the same stored reconstruction, clusters and model file,
with seeds that depend only on (seed, iteration, cluster), so it ends with the same result as an
uninterrupted run. Iteration ``t - 1``'s arrays and model are removed once iteration ``t`` has
committed. Disk: at most about three cells x genes arrays at a time (``R_(t-1)``, the cluster
outputs or ``R_t``, and ``X_t``), and one (``work/recon_final``) once the stage has ended.

Outputs: the last iteration's embedding, graph, graph embedding and clusters replace
``obsm/X_scgnn_feature``, ``obsp/scgnn_graph``, ``obsm/X_scgnn``, ``obs/scgnn_cluster``; the info
dict carries the per-iteration ``history`` (stored by the pipeline in ``uns/scgnn/history``). The
last iteration's feature-AE reconstruction ``R_T`` is kept at ``work/recon_final``
(:data:`FINAL_RECON`, moved there once the stage's checkpoint says finished) for the impute stage's
``impute.input = "final"``; the default imputation input is the first pass's ``work/recon`` (the
published ``reconOri``, see :mod:`scgnn_scale.stages.impute`), which the feature stage wrote and
iterate only reads. A run with no iteration (``max_iterations = 0``) or a rerun from scratch
removes a ``work/recon_final`` left by an earlier config. ``work/iterate`` is removed when the
stage ends. The last feature model stays in ``models/`` (its path is in the info dict), and so
does ``work/first_pass`` (O(N (k + d)), see :func:`restore_first_pass`) until a rerun redoes the
feature stage or an earlier one, which removes it (:func:`forget_first_pass`).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .. import convergence as cv
from ..errors import InputError
from ..loader import BackgroundWriter, in_background, iter_row_blocks
from ..memory import MemoryPlan, peak_rss_mb, release_freed_memory

WORK = "work/iterate"
#: the first pass's results (feature, graph, gae, cluster stages), kept because iterate replaces them
FIRST_PASS = "work/first_pass"
_FIRST_PASS_KEYS = {"obsm/X_scgnn_feature": "X_scgnn_feature", "obsm/X_scgnn": "X_scgnn",
                    "obsp/scgnn_graph": "graph", "obs/scgnn_cluster": "cluster"}
_SCRATCH = "iterate_scratch"
#: the last iteration's feature-AE reconstruction, kept for the impute stage (``impute.input = "final"``)
FINAL_RECON = "work/recon_final"


# -- keys and files ------------------------------------------------------------------------------
def _key(t: int, name: str) -> str:
    return f"{WORK}/{t}/{name}"


def _model_path(ctx, t: int) -> Path:
    if t == 0:
        from .feature import MODEL_NAME

        return ctx.store.root / "models" / f"{MODEL_NAME}.pt"
    return ctx.store.root / "models" / f"iterate_feature_{t}.pt"


def _recon_key(t: int) -> str:
    return "work/recon" if t == 0 else _key(t, "recon")


# -- the stage -----------------------------------------------------------------------------------
def run(ctx) -> dict:
    """Stage ``iterate``: iterate cluster AEs, feature AE, graph, graph AE and clusters to convergence.

    Returns
    -------
    dict
        ``iterations``, ``stopped`` (``"clusters"``, ``"graph"`` or ``"max_iterations"``),
        ``history`` (one dict per iteration: ``iteration``, ``ari_to_previous``, ``graph_change``,
        ``graph_threshold``, ``feature_loss``, ``feature_recon_mse``, ``cluster_ae_loss``,
        ``n_clusters``, ``seconds``, ``peak_rss_mb_after_<step>`` (the process's peak so far after the
        cluster AEs, feature AE, graph, GAE and clustering), ``seconds_<step>`` (each step's time),
        ``seconds_cluster_ae_<phase>`` (the cluster AEs' layout, train_and_write and gather),
        ``resolution`` and ``resolution_steps`` (Leiden/Louvain with a fixed count); ``ari_to_label`` /
        ``nmi_to_label`` with a label column), ``model`` and ``metrics``.
    """
    cfg = ctx.config.iterate
    if cfg.max_iterations <= 0:
        ctx.log.info("iterate: max_iterations is 0; the first pass's results stay")
        ctx.store.delete(FINAL_RECON)  # an earlier config's; the last reconstruction is now work/recon
        return {"iterations": 0, "stopped": "max_iterations", "history": []}
    for key in ("work/recon", "obsp/scgnn_graph", "obs/scgnn_cluster"):
        if not ctx.store.has(key):
            raise InputError(f"{ctx.store.root}: the run has no '{key}' yet; run the stages before iterate")

    state = ctx.load_checkpoint()
    if state and state.get("finished"):
        _keep_final_recon(ctx, state["info"]["iterations"])  # killed between the checkpoint and the move
        _cleanup_all(ctx, keep_model=state["info"]["iterations"])
        return state["info"]
    if not state:
        ctx.store.delete(FINAL_RECON)  # an earlier config's: never read next to this run's results
        _snapshot_first_pass(ctx)
        state = {"done": 0, "history": [], "stopped": None}
        ctx.save_checkpoint(state)
    else:
        ctx.log.info("iterate: resuming after iteration %d", state["done"])

    threshold = cv.graph_threshold(_reference_graph(ctx), cfg.graph_tol)
    truth = _label_column(ctx)
    done, history, stopped = int(state["done"]), list(state["history"]), state.get("stopped")
    labels_prev = _read_labels(ctx, done) if done else _dense_labels(_read(ctx.store, f"{FIRST_PASS}/labels"))

    bar = ctx.progress(cfg.max_iterations, "iterations", unit="it", initial=done)
    try:
        t = done
        while stopped is None and t < cfg.max_iterations:
            t += 1
            t0 = time.perf_counter()
            step = _run_iteration(ctx, t, labels_prev)
            labels = step["labels"]
            change = _graph_change(ctx, t)
            ari = cv.clustering_ari(labels_prev, labels)
            stopped = cv.should_stop(ari=ari, change=change, threshold=threshold, ari_stop=cfg.ari_stop)
            if stopped is None and t >= cfg.max_iterations:
                stopped = "max_iterations"
            record = {
                "iteration": t, "ari_to_previous": ari, "graph_change": change, "graph_threshold": threshold,
                "feature_loss": _num(step["feature"].get("loss_last")),
                "feature_recon_mse": _num(step["feature"].get("recon_mse")),
                "cluster_ae_loss": _num(step["cluster_ae_loss"]),
                "n_clusters": int(len(np.unique(labels))), "seconds": round(time.perf_counter() - t0, 3),
            }
            record.update({f"peak_rss_mb_after_{k}": v for k, v in step["peak_rss_mb_after"].items()})
            record.update({f"seconds_{k}": v for k, v in step["seconds"].items()})
            record.update({f"seconds_cluster_ae_{k}": v for k, v in step["cluster_ae_seconds"].items()})
            if "resolution" in step["cluster"]:
                record["resolution"] = step["cluster"]["resolution"]
            if "resolution_steps" in step["cluster"]:
                record["resolution_steps"] = step["cluster"]["resolution_steps"]
            if truth is not None:
                record.update(_label_scores(truth, labels))
            history.append(record)
            ctx.save_checkpoint({"done": t, "history": history, "stopped": stopped})
            _cleanup_iteration(ctx, t - 1)
            ctx.log.info("iterate: iteration %d: ARI to previous %.4f, graph change %.3g (threshold %.3g), "
                         "%d clusters, %.1f s (%s)%s", t, ari, change, threshold, record["n_clusters"],
                         record["seconds"], ", ".join(f"{k} {v:.1f} s" for k, v in step["seconds"].items()),
                         f"; stop ({stopped})" if stopped else "")
            bar.update(1)
            labels_prev = labels
        final = t
    finally:
        bar.close()

    info = _commit_final(ctx, final, history, stopped, truth)
    ctx.save_checkpoint({"finished": True, "info": info})
    _keep_final_recon(ctx, final)
    _cleanup_all(ctx, keep_model=final)
    return info


def _reference_graph(ctx):
    """``L0`` of the first pass's graph, read again whenever needed: held through an iteration it took
    about 175 MB at 1M cells (and the previous smoothed graph, from iteration 2 on, 175-350 MB more)."""
    return cv.reference_graph(_read(ctx.store, f"{FIRST_PASS}/graph"), ctx.config.iterate.graph_reference)


def _graph_change(ctx, t: int) -> float:
    """The change of the smoothed graph from iteration ``t - 1`` (the first pass's: ``L0`` itself) to ``t``."""
    lam = ctx.config.iterate.graph_lambda
    reference = _reference_graph(ctx)
    previous = reference if t == 1 else cv.smoothed_graph(_read_graph(ctx, t - 1), reference, lam)
    return cv.graph_change(cv.smoothed_graph(_read_graph(ctx, t), reference, lam), previous)


def _run_iteration(ctx, t: int, labels_prev: np.ndarray) -> dict:
    """One iteration; its outputs are committed together under ``work/iterate/<t>/``."""
    import torch

    from .cluster import cluster_cells
    from .feature import ltmg_key, train_feature
    from .gae import train_gae
    from .graph import build_graph

    cfg, seed = ctx.config.iterate, ctx.config.runtime.seed
    # global RNGs reset per iteration: a resumed run draws what an uninterrupted one draws
    torch.manual_seed(seed + 7919 * t)
    np.random.seed((seed + 7919 * t) % 2**32)

    peaks = {}  # the process's peak RSS so far after each step: where it jumps, that step set it
    seconds, t_step = {}, time.perf_counter()

    def done(name: str) -> None:
        nonlocal t_step
        peaks[name] = peak_rss_mb()
        seconds[name] = round(time.perf_counter() - t_step, 3)
        ctx.log.info("iterate: iteration %d: %s done in %.1f s", t, name.replace("_", " "), seconds[name])
        t_step = time.perf_counter()

    # one commit per iteration: the steps read what the previous ones staged
    with ctx.store.staging(f"iterate_{t}") as st:
        cluster_info = run_cluster_autoencoders(
            ctx, st, source_key=_recon_key(t - 1), labels=labels_prev, out_key=_key(t, "x"),
            model_in=_model_path(ctx, t - 1) if cfg.cluster_init == "feature" else None, iteration=t)
        done("cluster_autoencoders")
        feature_info = train_feature(
            ctx, st, x_key=_key(t, "x"), trs_key=ltmg_key(ctx) if cfg.feature_ltmg else None,
            steps=ctx.config.feature.iter_steps, model_in=_model_path(ctx, t - 1), model_out=_model_path(ctx, t),
            embedding_key=_key(t, "feature"), recon_key=_key(t, "recon"), seed=seed + t)
        done("feature")
        build_graph(ctx, st, embedding_key=_key(t, "feature"), graph_key=_key(t, "graph"))
        done("graph")
        train_gae(ctx, st, embedding_key=_key(t, "feature"), graph_key=_key(t, "graph"), out_key=_key(t, "gae"))
        done("gae")
        n_clusters = _first_pass_count(ctx) if cfg.cluster_count == "first" else None
        labels, cinfo = cluster_cells(ctx, st, embedding_key=_key(t, "gae"), graph_key=_key(t, "graph"),
                                      out_key=_key(t, "cluster"), n_clusters=n_clusters)
        done("cluster")
        labels = _dense_labels(labels)
        st.write_elem(_key(t, "labels"), labels)
    ctx.store.delete(_key(t, "x"))  # only this iteration's feature AE reads it
    return {"labels": labels, "feature": feature_info, "cluster_ae_loss": cluster_info["loss_mean"],
            "cluster_ae_seconds": cluster_info["seconds"], "cluster": cinfo, "peak_rss_mb_after": peaks,
            "seconds": seconds}


def _first_pass_count(ctx) -> int:
    """The number of clusters of the first pass (``work/first_pass/labels``)."""
    return int(_dense_labels(np.asarray(_read(ctx.store, f"{FIRST_PASS}/labels"))).max()) + 1


# -- cluster autoencoders ------------------------------------------------------------------------
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
                             iteration: int) -> dict:
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

    Returns
    -------
    dict
        Per-cluster results (cells, steps, losses, seconds), ``loss_mean``, ``executor``, ``seconds``
        (of the layout by cluster, the training and writing, and the gather back to cell order).
    """
    cfg, fcfg = ctx.config.iterate, ctx.config.feature
    source = ctx.store.open_array(source_key)
    n, g = int(source.shape[0]), int(source.shape[1])
    labels = _dense_labels(labels)
    if labels.shape != (n,):
        raise ValueError(f"{len(labels)} labels for {n} cells")
    sizes = np.bincount(labels)
    n_clusters = len(sizes)
    plan = MemoryPlan.from_config(ctx.config.runtime)
    chunk_c = cluster_chunk_rows(n_clusters, g, buffer_mb=plan.scatter_mb(cfg.scatter_buffer_mb),
                                 chunk_rows=ctx.store.store_config.chunk_rows)
    executor = _executor(ctx)
    # loaders running at once: one per Dask worker (the --memory-limit share is divided among them)
    loaders = 1 if executor == "local" else (ctx.config.runtime.n_workers or os.cpu_count() or 1)
    loader_mb = plan.loader_mb(cfg.cluster_memory_budget_mb, parts=loaders)
    block_rows = ctx.store.store_config.chunk_rows

    from ..store import Staging

    scratch = Staging(ctx.store, _SCRATCH)  # never committed: removed once the outputs are back in cell order
    phases, t0 = {}, time.perf_counter()
    try:
        inputs, outputs = [], []
        for c in range(n_clusters):
            shape, chunks = (int(sizes[c]), g), (int(min(chunk_c, max(1, sizes[c]))), g)
            inputs.append(scratch.create_matrix(f"{WORK}/clusters/{c}/input", shape, np.float32, chunks=chunks))
            outputs.append(scratch.create_matrix(f"{WORK}/clusters/{c}/output", shape, np.float32, chunks=chunks))
        scatter_rows(source, labels, inputs, block_rows=block_rows)
        phases["layout"], t0 = round(time.perf_counter() - t0, 3), time.perf_counter()

        jobs = []
        for c in range(n_clusters):
            jobs.append({
                "cluster": c, "config": ctx.config, "quiet": True,
                "input": scratch.path_of(f"{WORK}/clusters/{c}/input"),
                "output": scratch.path_of(f"{WORK}/clusters/{c}/output"),
                "model_in": str(model_in) if model_in is not None else None,
                "seed": cluster_seed(ctx.config.runtime.seed, iteration, c),
                "steps": cluster_steps(int(sizes[c]), fcfg.batch_size, cfg.cluster_steps, cfg.cluster_max_epochs),
                "memory_budget_mb": loader_mb,
            })
        results = _run_jobs(ctx, jobs, executor)
        phases["train_and_write"], t0 = round(time.perf_counter() - t0, 3), time.perf_counter()
        release_freed_memory()  # the cluster AEs' buffers, before the feature AE allocates its own
        for c in range(n_clusters):  # inputs are no longer needed: free the disk before the gather
            shutil.rmtree(scratch.path_of(f"{WORK}/clusters/{c}/input"), ignore_errors=True)

        out = staging.create_matrix(out_key, (n, g), np.float32)
        gather_rows(outputs, labels, out, block_rows=block_rows)
    finally:
        shutil.rmtree(scratch.root, ignore_errors=True)
    phases["gather"] = round(time.perf_counter() - t0, 3)
    ctx.log.info("iterate: %d cluster autoencoders: cells laid out by cluster in %.1f s, trained and written "
                 "in %.1f s (%s), put back in cell order in %.1f s", n_clusters, phases["layout"],
                 phases["train_and_write"], executor, phases["gather"])
    losses = [r["loss_last"] for r in results if r.get("loss_last") is not None]
    weights = [r["n_cells"] for r in results if r.get("loss_last") is not None]
    return {"clusters": results, "executor": executor, "seconds": phases,
            "loss_mean": float(np.average(losses, weights=weights)) if losses else float("nan")}


def cluster_steps(n_cells: int, batch_size: int, min_steps: int, max_epochs: int) -> int:
    """Steps of one cluster AE: ``max(min_steps, max_epochs * ceil(n_cells / batch))``.

    A cluster of up to ``batch_size`` cells trains full-batch, as the original (200 full-batch
    epochs = 200 steps); a large cluster gets at least ``max_epochs`` passes over its cells.
    """
    per_epoch = math.ceil(n_cells / max(1, min(batch_size, max(1, n_cells))))
    return int(max(min_steps, max_epochs * per_epoch))


def _executor(ctx) -> str:
    choice = ctx.config.iterate.cluster_executor
    if choice != "auto":
        return choice
    return "local" if ctx.torch_device().type == "cuda" else "dask"


def _run_jobs(ctx, jobs: list[dict], executor: str) -> list[dict]:
    bar = ctx.progress(len(jobs), "cluster autoencoders", unit="clusters")
    results: list[dict] = []
    try:
        if executor == "local":
            for job in jobs:
                results.append(train_cluster_autoencoder(job))
                bar.update(1)
        else:
            from distributed import as_completed

            client = ctx.client()
            # largest clusters first, so the last tasks to start are short ones
            order = sorted(jobs, key=lambda j: -zarr.open_array(j["input"], mode="r").shape[0])
            futures = [client.submit(train_cluster_autoencoder, job, pure=False) for job in order]
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(1)
    finally:
        bar.close()
    return sorted(results, key=lambda r: r["cluster"])


def train_cluster_autoencoder(job: dict[str, Any]) -> dict:
    """One cluster AE (a Dask task): read the cluster's rows, train, write its reconstruction.

    ``job`` holds paths and small values only: ``cluster``, ``config``, ``input`` and ``output``
    (zarr array paths: the cluster's rows and where its reconstruction goes), ``model_in`` (feature
    AE to start from, or None), ``seed``, ``steps``, ``memory_budget_mb`` (its loader's, after
    ``--memory-limit``).
    """
    import torch

    from ..context import StageContext
    from ..nn.autoencoder import DenseAutoencoder
    from ..nn.optim import adam
    from .feature import fit_autoencoder, load_model, write_outputs

    config = job["config"]
    cfg, fcfg = config.iterate, config.feature
    threads = _worker_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    x = zarr.open_array(job["input"], mode="r", zarr_format=3)
    out = zarr.open_array(job["output"], mode="r+", zarr_format=3)
    ctx = StageContext(store=None, config=config, stage="iterate", chain_hash="", quiet=job.get("quiet", True))
    device = ctx.torch_device()
    torch.manual_seed(job["seed"])
    if job["model_in"]:
        model, _ = load_model(job["model_in"], device)
    else:
        model = DenseAutoencoder(int(x.shape[1]), fcfg.hidden, fcfg.latent).to(device)
    optimizer = adam(model.parameters(), lr=fcfg.lr)
    info = fit_autoencoder(ctx, model, optimizer, [x], steps=job["steps"], batch_size=fcfg.batch_size,
                           gamma=cfg.cluster_gamma, alpha=0.0, l1=fcfg.l1, seed=job["seed"],
                           memory_budget_mb=job["memory_budget_mb"], buffer_blocks=fcfg.buffer_blocks,
                           prefetch_blocks=fcfg.prefetch_blocks, desc=f"cluster {job['cluster']} AE")
    written = write_outputs(ctx, model, x, recon=out)
    return {"cluster": job["cluster"], "n_cells": int(x.shape[0]), "steps": info["steps"],
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


# -- store helpers -------------------------------------------------------------------------------
def _read(store, key: str):
    """A committed element by its own path (working keys sit in folders without group metadata)."""
    from anndata.io import read_elem

    if not store.has(key):
        raise InputError(f"{store.root}: the run has no '{key}' (iterate's working data is incomplete)")
    return read_elem(zarr.open(store.path_of(key), mode="r"))


def _read_graph(ctx, t: int):
    return _read(ctx.store, _key(t, "graph"))


def _read_labels(ctx, t: int) -> np.ndarray:
    return _dense_labels(np.asarray(_read(ctx.store, _key(t, "labels"))))


def _dense_labels(labels) -> np.ndarray:
    """Cluster ids as 0..k-1 (int32), in order of first sorted id."""
    labels = np.asarray(labels)
    _, dense = np.unique(labels, return_inverse=True)
    return dense.astype(np.int32).reshape(-1)


def _snapshot_first_pass(ctx) -> None:
    """Keep the first pass's embedding, graph, graph embedding and clusters in ``work/first_pass``.

    Iterate replaces them under their usual keys, but needs the first graph (``L0``) and clusters
    (``c_0``) and a rerun of iterate (another iterate config) must start from them again: the
    snapshot is reused while the cluster stage's chain hash is unchanged, retaken otherwise.
    """
    ctx.store.delete(WORK)  # left by a run of another config
    source = str(ctx.store.manifest.get("stages", {}).get("cluster", {}).get("hash", ""))
    if source and ctx.store.has(f"{FIRST_PASS}/labels") and _snapshot_source(ctx.store) == source:
        ctx.log.info("iterate: starting again from the first pass kept in %s", FIRST_PASS)
        return
    clusters = ctx.store.read_elem("obs/scgnn_cluster")
    with ctx.store.staging("iterate_first_pass") as st:
        for key, name in _FIRST_PASS_KEYS.items():
            if key.startswith("obsm/"):
                _copy_array(ctx.store.open_array(key), st, f"{FIRST_PASS}/{name}")
            elif key == "obs/scgnn_cluster":
                st.write_elem(f"{FIRST_PASS}/{name}", clusters)
            else:
                st.write_elem(f"{FIRST_PASS}/{name}", ctx.store.read_elem(key))
        st.write_elem(f"{FIRST_PASS}/labels", _dense_labels(np.asarray(clusters)))
        st.write_elem(f"{FIRST_PASS}/source", np.array([source]))


def _snapshot_source(store) -> str:
    try:
        return str(np.asarray(_read(store, f"{FIRST_PASS}/source")).ravel()[0])
    except (InputError, IndexError, KeyError):
        return ""


def forget_first_pass(store) -> None:
    """Remove the first pass's snapshot (the stages it came from are being redone)."""
    store.delete(FIRST_PASS)


def restore_first_pass(store) -> bool:
    """Put the first pass's results (kept by iterate) back under their usual keys.

    For the orchestrator: a rerun of the graph, gae or cluster stage after iterate has replaced
    ``obsm/X_scgnn_feature``, ``obsp/scgnn_graph``, ``obsm/X_scgnn`` and ``obs/scgnn_cluster`` must
    read the first pass's versions. Returns False when there is no snapshot (iterate never ran).
    """
    if not store.has(f"{FIRST_PASS}/labels"):
        return False
    with store.staging("iterate_restore") as st:
        for key, name in _FIRST_PASS_KEYS.items():
            if key.startswith("obsm/"):
                _copy_array(store.open_array(f"{FIRST_PASS}/{name}"), st, key)
            else:
                st.write_elem(key, _read(store, f"{FIRST_PASS}/{name}"))
    return True


def _cleanup_iteration(ctx, t: int) -> None:
    """Remove iteration ``t``'s arrays and model once ``t + 1`` has committed (iteration 0 holds L0)."""
    if t >= 1:
        ctx.store.delete(f"{WORK}/{t}")
        _model_path(ctx, t).unlink(missing_ok=True)


def _cleanup_all(ctx, keep_model: int | None = None) -> None:
    ctx.store.delete(WORK)
    models = ctx.store.root / "models"
    for path in models.glob("iterate_feature_*.pt"):
        if keep_model is None or path != _model_path(ctx, keep_model):
            path.unlink(missing_ok=True)


def _commit_final(ctx, t: int, history: list[dict], stopped: str, truth) -> dict:
    """Write the last iteration's results to their usual keys (one atomic commit)."""
    from .cluster import as_categorical

    labels = _read_labels(ctx, t)
    k = int(labels.max()) + 1 if len(labels) else 0
    with ctx.store.staging(ctx.stage) as st:
        _copy_array(ctx.store.open_array(_key(t, "feature")), st, "obsm/X_scgnn_feature")
        _copy_array(ctx.store.open_array(_key(t, "gae")), st, "obsm/X_scgnn")
        st.write_elem("obsp/scgnn_graph", _read_graph(ctx, t))
        st.write_elem("obs/scgnn_cluster", as_categorical(labels))
    info = {"iterations": t, "stopped": stopped, "history": history, "n_clusters": k,
            "model": str(_model_path(ctx, t)),
            "final_ari_to_previous": history[-1]["ari_to_previous"] if history else None}
    if truth is not None:
        scores = _label_scores(truth, labels)
        info["metrics"] = {"iterate_ari": scores["ari_to_label"], "iterate_nmi": scores["nmi_to_label"]}
    return info


def _keep_final_recon(ctx, t: int) -> None:
    """Keep the last iteration's reconstruction ``R_T`` as :data:`FINAL_RECON` (for impute.input "final").

    A rename once the stage's checkpoint says finished: with the copy it replaces, the stage took 57 s
    after a 1M-cell iteration's stopping decision on an H200; with the rename 20 s. Before the
    checkpoint, a resumed run must still find it under ``work/iterate/<t>/recon`` for
    :func:`_commit_final`.
    """
    ctx.store.move(_key(t, "recon"), FINAL_RECON)


def _copy_array(src, staging, key: str) -> None:
    dst = staging.create_matrix(key, tuple(src.shape), src.dtype)
    for a, b, block in iter_row_blocks(src, int(dst.chunks[0])):
        dst[a:b] = block


def _label_column(ctx) -> np.ndarray | None:
    """The reference labels (``--label-key``) if the run carries them, for per-iteration ARI/NMI."""
    obs = ctx.store.read_elem("obs")
    for column in (ctx.config.ingest.label_key, "label"):
        if column and column in obs.columns:
            return np.asarray(obs[column].astype(str))
    return None


def _label_scores(truth: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"ari_to_label": float(adjusted_rand_score(truth, labels)),
            "nmi_to_label": float(normalized_mutual_info_score(truth, labels))}


def _num(value) -> float:
    return float("nan") if value is None else float(value)
