"""Stage ``iterate``: cluster autoencoders and the scGNN iteration to convergence (docs/METHOD.md steps 7-8).

Iteration ``t = 1, 2, ...`` starts from the previous feature-autoencoder reconstruction ``R_(t-1)``
(the feature stage's for t = 1) and the previous clusters ``c_(t-1)`` (the cluster stage's
``obs/scgnn_cluster`` for t = 1). No cells x genes array is stored (:mod:`scgnn_scale.reconstruction`):
``R_(t-1)`` is ``decoder_(t-1)(embedding_(t-1))``, computed from the saved model and the 128-d
embedding as it is read, and ``X_t`` from the cluster AEs' saved models:

1. **Cluster autoencoders** (:mod:`scgnn_scale.cluster_autoencoders`). One
   :class:`~scgnn_scale.nn.autoencoder.DenseAutoencoder` per cluster, trained only on that cluster's
   rows of ``R_(t-1)`` (the paper; the published code at HEAD trains them on all cells because a fix
   was reverted), loss ``cluster_gamma * SE + l1 * sum|w|`` (no LTMG term), started from the current
   feature AE's weights as the published code does (``model.load_state_dict(ptstatus)``;
   ``iterate.cluster_init``). Their outputs, in cell order, are ``X_t``, the next input.
2. **Feature AE, continued** from the previous iteration's saved model and optimiser
   (``feature.iter_steps`` steps, LTMG term per ``iterate.feature_ltmg``), then the cell graph,
   the graph autoencoder and the clusters ``c_t``, with the functions the first pass's stages use.
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

    work/first_pass/{X_scgnn_feature, graph, X_scgnn, cluster}
                                                     the first pass (feature, graph, gae, cluster
                                                     stages): L0 and c_0 come from here; only read
    work/iterate/<t>/feature, graph, gae, cluster, labels
    work/iterate/<t>/recon                           R_t, only with runtime.keep_work
    models/iterate_cluster_<t>_<c>.pt                cluster c's AE, removed once iteration t has committed
    models/iterate_feature_<t>.pt                    the feature AE (and optimiser) after iteration t
    work/iterated/{X_scgnn_feature, graph, X_scgnn, cluster}
                                                     after the stage: the last iteration's results
    work/recon_final                                 after the stage, only with runtime.keep_work: R_T,
                                                     the last iteration's feature-AE reconstruction

Each iteration is one staged commit (its steps read what the earlier steps staged), and the
stage checkpoints (``ctx.save_checkpoint``) after every finished iteration: a killed run resumes
at the last finished iteration, from the same stored embedding, clusters and model file,
with seeds that depend only on (seed, iteration, cluster), so it ends with the same result as an
uninterrupted run. Iteration ``t - 1``'s arrays and model are removed once iteration ``t`` has
committed. Disk: no cells x genes array (with ``runtime.keep_work``: ``R_(t-1)`` and ``R_t``, and
``work/recon_final`` once the stage has ended). The
stage announces ``iteration_started`` and ``iteration_committed`` (with ``t``) and ``finished``
through ``ctx.event``.

Outputs: the last iteration's embedding, graph, graph embedding and clusters under
``work/iterated/`` (the pipeline publishes them as ``obsm/X_scgnn_feature``, ``obsp/scgnn_graph``,
``obsm/X_scgnn``, ``obs/scgnn_cluster``; the first pass stays where its stages wrote it); the info
dict carries the per-iteration ``history`` (``uns/scgnn/history``). ``R_T`` (``impute.input =
"final"``) is the last feature model, kept in ``models/``, applied to ``work/iterated/X_scgnn_feature``
(with ``runtime.keep_work`` also stored at ``work/recon_final``); the default imputation input is the
first pass's reconstruction (the published ``reconOri``). A run with no
iteration (``max_iterations = 0``) or a rerun from scratch removes ``work/iterated`` and a
``work/recon_final`` left by an earlier config. ``work/iterate`` is removed when the stage ends;
the last feature model stays in ``models/`` (its path is in the info dict).
"""

from __future__ import annotations

import time

import numpy as np

from .. import convergence as cv
from ..cell_graph import build_graph
from ..cluster_autoencoders import CLUSTER_MODELS, dense_labels, run_cluster_autoencoders
from ..clustering import as_categorical, cluster_cells
from ..errors import InputError
from ..graph_autoencoder import train_gae
from ..keys import FIRST_PASS, ITERATE_MODELS, ITERATED, KEYS, iterate_model, ltmg_key
from ..memory import peak_rss_mb
from ..reconstruction import DecodedRows, feature_reconstruction
from ..train import train_feature

WORK = KEYS.iterate_work


# -- keys and files ------------------------------------------------------------------------------
def iteration_key(t: int, name: str) -> str:
    """Where iteration ``t`` keeps ``name`` (recon, feature, graph, gae, cluster, labels, x) while it runs."""
    return f"{WORK}/{t}/{name}"


def _model_path(ctx, t: int):
    return ctx.store.model_path(iterate_model(t))


def _embedding_key(t: int) -> str:
    """The feature embedding after iteration ``t`` (the first pass's for 0)."""
    return FIRST_PASS.feature_embedding if t == 0 else iteration_key(t, "feature")


def _reconstruction(ctx, t: int) -> DecodedRows:
    """``R_t``, the feature AE's reconstruction after iteration ``t``: ``decoder_t(embedding_t)``, computed
    as it is read from the saved model and embedding (both kept until iteration ``t + 1`` has committed)."""
    recon = feature_reconstruction(ctx.store, _model_path(ctx, t), _embedding_key(t), ctx.runtime.device)
    if recon is None:
        raise InputError(f"{ctx.store.root}: the run has no '{_model_path(ctx, t).name}' or '{_embedding_key(t)}' "
                         "(the feature autoencoder's model and embedding); run the stages before iterate")
    return recon


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
        _forget_iterated(ctx.store)  # an earlier config's; the first pass is the result
        return {"iterations": 0, "stopped": "max_iterations", "history": []}
    for key in (FIRST_PASS.feature_embedding, FIRST_PASS.graph, FIRST_PASS.clusters):
        if not ctx.store.has(key):
            raise InputError(f"{ctx.store.root}: the run has no '{key}' yet; run the stages before iterate")

    state = ctx.load_checkpoint()
    if state and state.get("finished"):
        _keep_final_recon(ctx, state["info"]["iterations"])  # killed between the checkpoint and the move
        _cleanup_all(ctx, keep_model=state["info"]["iterations"])
        return state["info"]
    if not state:
        _forget_iterated(ctx.store)  # an earlier config's: never read next to this run's results
        ctx.store.delete(WORK)
        state = {"done": 0, "history": [], "stopped": None}
        ctx.save_checkpoint(state)
    else:
        ctx.log.info("iterate: resuming after iteration %d", state["done"])

    threshold = cv.graph_threshold(_reference_graph(ctx), cfg.graph_tol)
    truth = _label_column(ctx)
    done, history, stopped = int(state["done"]), list(state["history"]), state.get("stopped")
    labels_prev = _read_labels(ctx, done) if done else _first_pass_labels(ctx)

    bar = ctx.progress(cfg.max_iterations, "iterations", unit="it", initial=done)
    try:
        t = done
        while stopped is None and t < cfg.max_iterations:
            t += 1
            t0 = time.perf_counter()
            ctx.event("iteration_started", t=t)
            step = _run_iteration(ctx, t, labels_prev)
            ctx.event("iteration_committed", t=t)
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
    ctx.event("finished", t=final)
    _keep_final_recon(ctx, final)
    _cleanup_all(ctx, keep_model=final)
    return info


def _reference_graph(ctx):
    """``L0`` of the first pass's graph, read again whenever needed: held through an iteration it took
    about 175 MB at 1M cells (and the previous smoothed graph, from iteration 2 on, 175-350 MB more)."""
    return cv.reference_graph(ctx.store.read_elem(FIRST_PASS.graph), ctx.config.iterate.graph_reference)


def _graph_change(ctx, t: int) -> float:
    """The change of the smoothed graph from iteration ``t - 1`` (the first pass's: ``L0`` itself) to ``t``."""
    lam = ctx.config.iterate.graph_lambda
    reference = _reference_graph(ctx)
    previous = reference if t == 1 else cv.smoothed_graph(_read_graph(ctx, t - 1), reference, lam)
    return cv.graph_change(cv.smoothed_graph(_read_graph(ctx, t), reference, lam), previous)


def _run_iteration(ctx, t: int, labels_prev: np.ndarray) -> dict:
    """One iteration; its outputs are committed together under ``work/iterate/<t>/``."""
    import torch

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
            ctx, source=_reconstruction(ctx, t - 1), labels=labels_prev,
            model_in=_model_path(ctx, t - 1) if cfg.cluster_init == "feature" else None, iteration=t)
        done("cluster_autoencoders")
        # X_t, the cluster AEs' outputs, is computed again from their models as the feature AE reads it
        feature_info = train_feature(
            ctx, st, x_key=iteration_key(t, "x"), x_array=cluster_info.pop("outputs"),
            trs_key=ltmg_key(ctx.store, ctx.config) if cfg.feature_ltmg else None,
            steps=ctx.config.feature.iter_steps, model_in=_model_path(ctx, t - 1), model_out=_model_path(ctx, t),
            embedding_key=iteration_key(t, "feature"),
            recon_key=iteration_key(t, "recon") if ctx.config.runtime.keep_work else None, seed=seed + t)
        done("feature")
        build_graph(ctx, st, embedding_key=iteration_key(t, "feature"), graph_key=iteration_key(t, "graph"))
        done("graph")
        train_gae(ctx, st, embedding_key=iteration_key(t, "feature"), graph_key=iteration_key(t, "graph"), out_key=iteration_key(t, "gae"))
        done("gae")
        n_clusters = _first_pass_count(ctx) if cfg.cluster_count == "first" else None
        labels, cinfo = cluster_cells(ctx, st, embedding_key=iteration_key(t, "gae"), graph_key=iteration_key(t, "graph"),
                                      out_key=iteration_key(t, "cluster"), n_clusters=n_clusters)
        done("cluster")
        labels = dense_labels(labels)
        st.write_elem(iteration_key(t, "labels"), labels)
    for name in cluster_info["models"]:  # only this iteration's feature AE reads them (X_t)
        ctx.store.remove_model(name)
    return {"labels": labels, "feature": feature_info, "cluster_ae_loss": cluster_info["loss_mean"],
            "cluster_ae_seconds": cluster_info["seconds"], "cluster": cinfo, "peak_rss_mb_after": peaks,
            "seconds": seconds}


def _first_pass_labels(ctx) -> np.ndarray:
    """``c_0``: the first pass's clusters as 0..k-1."""
    return dense_labels(np.asarray(ctx.store.read_elem(FIRST_PASS.clusters)))


def _first_pass_count(ctx) -> int:
    """The number of clusters of the first pass."""
    return int(_first_pass_labels(ctx).max()) + 1


def _read_graph(ctx, t: int):
    return ctx.store.read_elem(iteration_key(t, "graph"))


def _read_labels(ctx, t: int) -> np.ndarray:
    return dense_labels(np.asarray(ctx.store.read_elem(iteration_key(t, "labels"))))


def _forget_iterated(store) -> None:
    """Remove an earlier run's iteration results (the first pass is then what the pipeline publishes)."""
    for key in (*ITERATED, KEYS.final_recon):
        store.delete(key)


def _cleanup_iteration(ctx, t: int) -> None:
    """Remove iteration ``t``'s arrays and model once ``t + 1`` has committed (iteration 0 holds L0)."""
    if t >= 1:
        ctx.store.delete(f"{WORK}/{t}")
        ctx.store.remove_model(iterate_model(t))


def _cleanup_all(ctx, keep_model: int | None = None) -> None:
    ctx.store.delete(WORK)
    for path in ctx.store.model_paths(CLUSTER_MODELS):  # an interrupted iteration's
        path.unlink(missing_ok=True)
    for path in ctx.store.model_paths(ITERATE_MODELS):
        if keep_model is None or path != _model_path(ctx, keep_model):
            path.unlink(missing_ok=True)


def _commit_final(ctx, t: int, history: list[dict], stopped: str, truth) -> dict:
    """Write the last iteration's results under ``work/iterated`` (one atomic commit)."""
    labels = _read_labels(ctx, t)
    k = int(labels.max()) + 1 if len(labels) else 0
    with ctx.store.staging(ctx.stage) as st:
        st.copy_array(ITERATED.feature_embedding, ctx.store.open_array(iteration_key(t, "feature")))
        st.copy_array(ITERATED.embedding, ctx.store.open_array(iteration_key(t, "gae")))
        st.write_elem(ITERATED.graph, _read_graph(ctx, t))
        st.write_elem(ITERATED.clusters, as_categorical(labels))
    info = {"iterations": t, "stopped": stopped, "history": history, "n_clusters": k,
            "model": str(_model_path(ctx, t)),
            "final_ari_to_previous": history[-1]["ari_to_previous"] if history else None}
    if truth is not None:
        scores = _label_scores(truth, labels)
        info["metrics"] = {"iterate_ari": scores["ari_to_label"], "iterate_nmi": scores["nmi_to_label"]}
    return info


def _keep_final_recon(ctx, t: int) -> None:
    """Keep the last iteration's reconstruction ``R_T`` as ``work/recon_final`` (for impute.input "final").

    Only with ``runtime.keep_work`` (otherwise impute computes it from the last model and
    ``work/iterated/X_scgnn_feature``). A rename once the stage's checkpoint says finished: with the
    copy it replaces, the stage took 57 s after a 1M-cell iteration's stopping decision on an H200;
    with the rename 20 s.
    """
    if ctx.config.runtime.keep_work:
        ctx.store.move(iteration_key(t, "recon"), KEYS.final_recon)


def _label_column(ctx) -> np.ndarray | None:
    """The reference labels (``--label-key``) if the run carries them, for per-iteration ARI/NMI."""
    obs = ctx.store.read_elem(KEYS.obs)
    for column in (ctx.config.ingest.label_key, "label"):
        if column and column in obs.columns:
            return np.asarray(obs[column].astype(str))
    return None


def _label_scores(truth: np.ndarray, labels: np.ndarray) -> dict:
    from ..partition_scores import adjusted_rand_index, normalized_mutual_information

    return {"ari_to_label": adjusted_rand_index(truth, labels),
            "nmi_to_label": normalized_mutual_information(truth, labels)}


def _num(value) -> float:
    return float("nan") if value is None else float(value)
