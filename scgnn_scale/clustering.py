"""Cell clusters from the graph and the GAE embedding (docs/METHOD.md step 6); the cluster stage and each
iteration call :func:`cluster_cells`.

Methods (``cluster.method``):

- ``'louvaink'``, the paper's rule: Louvain (igraph's multilevel, on the pruned CSR graph, never
  densified) gives a count ``k_L``; ``k = int(k_L x factor)`` with factor 0.8 below 2000 cells and
  0.5 from 2000 on, and ``k = 2`` when ``k_L <= 3`` (as the published code); then KMeans with k on
  the 16-d embedding (MiniBatchKMeans above ``cluster.kmeans_max_cells``).
- ``'leiden'`` / ``'louvain'``: the communities themselves (igraph's ``community_leiden`` with the
  modularity objective and ``cluster.resolution``, or multilevel Louvain), on the graph chosen by
  ``cluster.graph``: a KNN graph of the GAE embedding (``'embedding'``) or the pruned cell graph.

With a fixed number of clusters (the scGNN iterations after the first pass, ``iterate.cluster_count
= 'first'``): LouvainK runs KMeans with that number; Leiden/Louvain search the resolution that gives
it (:func:`communities_with_count`), since a fixed resolution over-splits the thin clusters the
iterations make (see :mod:`scgnn_scale.stages.iterate`).

Then, for every method: clusters under ``min_cluster_size`` cells, and all but the
``max_clusters`` largest, are merged whole into the kept cluster whose centroid (in the embedding)
is nearest to theirs; labels are renumbered by decreasing size and written as a Categorical of
strings "0".."k-1" at ``obs/scgnn_cluster``.

**Default (Leiden, resolution 0.3, on the pruned graph)**, chosen by ARI against gold labels
(mean over the sets; GAE defaults: standardised input, linear output):

===================================  ===========================  ==========================
rule                                 pipeline runs, 5 sets (a)    PCA-50 input, 7 sets (b)
===================================  ===========================  ==========================
Leiden, pruned graph, res 0.2        0.672                        0.585
Leiden, pruned graph, res 0.3        0.601                        0.611
Leiden, pruned graph, res 0.5        0.524                        0.556
Leiden, pruned graph, res 1.0        0.470                        0.471
Leiden, 15-NN of GAE emb., res 0.3   0.518                        0.516
LouvainK (the paper)                 0.429                        0.379
===================================  ===========================  ==========================

(a) ``scgnn-scale run --until gae`` (feature AE embedding) on klein, zeisel, goolam, pollen, baron
toy, 3 seeds of GAE and clustering; (b) PCA-50 of log1p counts on those plus mouse bladder top2000
and worm neuron, 2 seeds. Sets with many classes (pollen, bladder, worm) prefer higher resolutions,
so 0.3 is the compromise. The scanpy default scores 0.543 on the 7 sets of (b).

With ``cluster.restarts`` R > 1 (first pass, 'leiden'/'louvain', up to ``cluster.restarts_max_cells``
cells): R runs and their consensus (:func:`consensus_communities`). R = 10 by default since the cell graph
is searched beside the PCA of the normalised counts: on HALF_A of the gold sets it then raised the mean
ARI over 5 seeds and left an SD of at most 0.007 on every set (bench/RESULTS.md, "Ten Leiden runs and
their consensus on the graph beside the PCA"); on the graph of the feature embedding alone it had
lowered the mean ("Clusters from seed to seed").

With ``cluster.gpu = true`` on a CUDA device with cugraph importable, Louvain/Leiden run in cuGraph
(**off by default and untested here: no GPU with cugraph was available; the CPU path is the tested one**).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import igraphs
from .cell_graph import knn_graph
from .config import ClusterConfig, GraphConfig
from .errors import InputError
from .keys import KEYS
from .leiden_parts import CoarseGraph, coarse_graph, igraph_bytes, stored_edges

log = logging.getLogger("scgnn_scale")

#: cells x restarts up to which the consensus keeps every run's membership (int32: 256 MB)
KEEP_RUNS_MAX = 64_000_000
#: partitions tried at most when searching the resolution that gives a fixed number of clusters
COUNT_SEARCH_STEPS = 16


def louvaink_count(k_louvain: int, n_cells: int, cfg: ClusterConfig) -> int:
    """The paper's number of KMeans clusters from the Louvain count (published ``scGNN.py``).

    ``int(k_L * factor)`` with factor ``small_factor`` below 2000 cells else ``large_factor``;
    2 when ``k_L <= 3``; at least 2, at most ``max_clusters`` and fewer than the cells.
    """
    factor = cfg.small_factor if n_cells < 2000 else cfg.large_factor
    k = int(k_louvain * factor) if k_louvain > 3 else 2
    return int(max(2, min(k, cfg.max_clusters, n_cells - 1)))


def _igraph(graph: sp.csr_matrix):
    coo = sp.triu(graph, k=1).tocoo()
    return igraphs.from_edges(graph.shape[0], np.column_stack([coo.row, coo.col]))


def _cugraph_available(use_gpu: bool) -> bool:
    if not use_gpu:
        return False
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import cugraph  # noqa: F401
    except ImportError:
        return False
    return True


def communities(graph: sp.csr_matrix | CoarseGraph, method: str, *, resolution: float = 1.0, n_iterations: int = -1,
                seed: int = 0, use_gpu: bool = False, initial_membership: np.ndarray | None = None,
                igraph_graph=None) -> tuple[np.ndarray, str]:
    """Louvain or Leiden (modularity) communities of an undirected CSR graph, or of the cells of a
    :class:`~scgnn_scale.leiden_parts.CoarseGraph` (its aggregate graph, weighted, lifted to the cells).

    ``initial_membership`` starts Leiden from a partition (igraph only): a resolution search
    starting each step from the previous step's partition took 21 s instead of 87 s at 1M cells.
    ``igraph_graph`` is ``graph`` already converted (:func:`_igraph`, 9 s at 1M cells).

    Returns
    -------
    membership, backend
        Community id per node (int64) and 'igraph' or 'cugraph'.
    """
    coarse = graph if isinstance(graph, CoarseGraph) else None
    if coarse is None and _cugraph_available(use_gpu):
        return _communities_cugraph(graph, method, resolution=resolution), "cugraph"
    if coarse is not None:  # the aggregate graph of micro-communities, weighted (cluster.partition 'parts')
        g, weights = coarse.igraph(), "weight"
        # Leiden's default node weights leave self-loops out: give each node its cells' degree sum
        node_weights = coarse.node_weights().tolist()
        if initial_membership is not None:
            initial_membership = coarse.coarsen(initial_membership)
    else:
        g = igraph_graph if igraph_graph is not None else _igraph(graph)
        weights = "weight" if "weight" in g.es.attributes() else None  # the consensus graph's co-assignment
        node_weights = None
    with igraphs.seeded(seed):
        if method == "leiden":
            init = None if initial_membership is None else np.asarray(initial_membership).tolist()
            part = g.community_leiden(objective_function="modularity", weights=weights, resolution=resolution,
                                      n_iterations=n_iterations, initial_membership=init, node_weights=node_weights)
        elif method == "louvain":
            part = g.community_multilevel(weights=weights, resolution=resolution)
        else:
            raise ValueError(method)
    membership = np.asarray(part.membership, dtype=np.int64)
    return (coarse.lift(membership) if coarse is not None else membership), "igraph"


def _communities_cugraph(graph: sp.csr_matrix, method: str, *, resolution: float) -> np.ndarray:  # pragma: no cover
    """cuGraph Louvain/Leiden. UNTESTED: written against cuGraph 24.x's documented API, never run here."""
    import cudf
    import cugraph

    coo = sp.triu(graph, k=1).tocoo()
    edges = cudf.DataFrame({"src": coo.row.astype(np.int32), "dst": coo.col.astype(np.int32)})
    g = cugraph.Graph(directed=False)
    g.from_cudf_edgelist(edges, source="src", destination="dst")
    fn = cugraph.leiden if method == "leiden" else cugraph.louvain
    parts, _ = fn(g, resolution=resolution)
    parts = parts.to_pandas()
    membership = np.full(graph.shape[0], -1, np.int64)
    membership[parts["vertex"].to_numpy()] = parts["partition"].to_numpy()
    isolated = membership < 0  # vertices without edges are absent from cuGraph's output
    membership[isolated] = membership.max() + 1 + np.arange(int(isolated.sum()))
    return membership


def consensus_communities(graph: sp.csr_matrix, method: str, *, restarts: int, threshold: float = 0.5,
                          max_rounds: int = 5, resolution: float = 1.0, n_iterations: int = -1,
                          seed: int = 0, weighted: bool = False) -> tuple[np.ndarray, dict]:
    """Consensus of ``restarts`` Leiden/Louvain runs (Lancichinetti & Fortunato 2012), on the graph's edges only.

    Round 1 runs the method ``restarts`` times (seeds ``seed .. seed + restarts - 1``) on ``graph``
    (unweighted, as :func:`communities`; ``weighted``: with the graph's values as edge weights, e.g. a
    consensus graph of partitions found elsewhere). Every edge is weighted by the fraction of the runs that put
    its two ends in one community; edges under ``threshold`` are dropped, and the next round runs the
    method ``restarts`` times on that weighted graph (same resolution), until all runs of a round agree
    on every edge (each edge's fraction 0 or 1) or after ``max_rounds`` rounds. The result is the
    round's run that agrees with the majority (fraction >= 0.5) on the most edges (on convergence all
    agree). Cells whose edges were all dropped come out as singletons, for
    :func:`merge_small_clusters`. Memory: the edge list, one byte of count per edge and one membership,
    O(edges) (and the round's memberships up to :data:`KEEP_RUNS_MAX` cells x restarts); never cells x
    cells. igraph only (cuGraph is not used here).

    Returns
    -------
    membership, info
        Community id per node and ``restarts``, ``threshold``, ``rounds``, ``converged``,
        ``edges_kept`` (fraction of the graph's edges left in the last round's graph).
    """
    if not 1 <= restarts <= 255:
        raise InputError(f"cluster.restarts {restarts}: must be 1..255")
    coo = sp.triu(graph, k=1).tocoo()
    rows, cols = coo.row.astype(np.int64), coo.col.astype(np.int64)
    n, n_edges = graph.shape[0], rows.size
    weights = coo.data.astype(np.float64) if weighted else None
    converged = False
    rounds = 0
    best = None
    keep_runs = n * restarts <= KEEP_RUNS_MAX  # memberships kept to choose among them, within a bound
    for rounds in range(1, max(1, max_rounds) + 1):
        g = igraphs.from_edges(n, np.column_stack([rows, cols]), weights)
        together = np.zeros(rows.size, np.uint8)  # runs that put the edge's two ends together
        runs = []
        for r in range(restarts):
            membership, _ = communities(graph, method, resolution=resolution, n_iterations=n_iterations,
                                        seed=seed + r, igraph_graph=g)
            together += membership[rows] == membership[cols]
            if keep_runs:
                runs.append(membership.astype(np.int32))
        converged = bool(np.all((together == 0) | (together == restarts)))
        if converged or rounds == max_rounds or restarts == 1:
            majority = together * 2 >= restarts
            if runs:
                agree = [int(np.count_nonzero((m[rows] == m[cols]) == majority)) for m in runs]
                best = runs[int(np.argmax(agree))]
            else:  # too many cells x restarts to keep: one more run on the last graph
                best = communities(graph, method, resolution=resolution, n_iterations=n_iterations,
                                   seed=seed, igraph_graph=g)[0]
            break
        keep = together.astype(np.float64) >= threshold * restarts
        rows, cols, weights = rows[keep], cols[keep], together[keep].astype(np.float64) / restarts
    info = {"restarts": int(restarts), "threshold": float(threshold), "rounds": int(rounds),
            "converged": converged, "edges_kept": round(float(rows.size / max(n_edges, 1)), 4)}
    return np.asarray(best, dtype=np.int64), info


def _kmeans(z: np.ndarray, k: int, cfg: ClusterConfig, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if z.shape[0] <= cfg.kmeans_max_cells:
        model = KMeans(n_clusters=k, n_init=10, random_state=seed)
    else:
        model = MiniBatchKMeans(n_clusters=k, n_init=3, batch_size=8192, random_state=seed)
    return model.fit_predict(z).astype(np.int64)


def merge_small_clusters(labels: np.ndarray, embedding: np.ndarray, *, min_size: int, max_clusters: int
                         ) -> np.ndarray:
    """Merge small and surplus clusters into the nearest kept one; renumber by decreasing size.

    A cluster is kept when it has at least ``min_size`` cells and is among the ``max_clusters``
    largest (the largest is always kept). Every other cluster moves whole to the kept cluster whose
    centroid is nearest (Euclidean, in ``embedding``) to its own centroid. Labels are then
    ``0..k-1`` with 0 the largest (ties: the smaller original label first).
    """
    labels = np.asarray(labels)
    _, labels = np.unique(labels, return_inverse=True)
    sizes = np.bincount(labels)
    n_clusters = sizes.size
    by_size = np.lexsort((np.arange(n_clusters), -sizes))
    kept = np.zeros(n_clusters, bool)
    kept[by_size[:max_clusters]] = True
    kept &= sizes >= min_size
    kept[by_size[0]] = True
    if not kept.all():
        emb = np.asarray(embedding, np.float64)
        centroids = np.zeros((n_clusters, emb.shape[1]))
        np.add.at(centroids, labels, emb)
        centroids /= sizes[:, None]
        kept_ids = np.flatnonzero(kept)
        dropped = np.flatnonzero(~kept)
        d2 = ((centroids[dropped, None, :] - centroids[None, kept_ids, :]) ** 2).sum(-1)
        target = np.arange(n_clusters)
        target[dropped] = kept_ids[np.argmin(d2, axis=1)]
        labels = target[labels]
    sizes = np.bincount(labels, minlength=n_clusters)
    present = np.flatnonzero(sizes)
    order = present[np.lexsort((present, -sizes[present]))]
    rank = np.empty(n_clusters, np.int64)
    rank[order] = np.arange(order.size)
    return rank[labels]


def communities_with_count(graph: sp.csr_matrix, method: str, n_clusters: int, *, embedding: np.ndarray,
                           cfg: ClusterConfig, seed: int = 0, use_gpu: bool = False,
                           max_steps: int = COUNT_SEARCH_STEPS) -> tuple[np.ndarray, dict]:
    """Leiden/Louvain communities at the resolution that gives ``n_clusters`` clusters.

    The count is taken after :func:`merge_small_clusters` (what the stage reports). The resolution
    starts at ``cfg.resolution`` and moves geometrically (halved / doubled until the target count
    is bracketed, then bisected on the log scale), at most ``max_steps`` partitions, each Leiden run
    starting from the previous one's partition;
    the count is not strictly monotone in the resolution, so the partition whose count is nearest
    the target (ties: the resolution nearest ``cfg.resolution``) is returned when none hits it. The
    search stops early when the count is down to the number of connected components of at least
    ``cfg.min_cluster_size`` cells (no resolution gives fewer).

    Returns
    -------
    labels, info
        Merged ``0..k-1`` labels and ``resolution``, ``target_clusters``, ``resolution_steps``,
        ``communities`` (before merging), ``backend``.
    """
    target = int(max(1, n_clusters))
    start = float(cfg.resolution) if cfg.resolution > 0 else 1.0
    # every connected component of min_cluster_size cells or more stays at least one cluster
    from scipy.sparse.csgraph import connected_components

    if isinstance(graph, CoarseGraph):
        component = graph.component_of_cells()
    else:
        _, component = connected_components(graph, directed=False)
    floor = min(int((np.bincount(component) >= cfg.min_cluster_size).sum()), cfg.max_clusters)
    low = high = None  # resolutions known to give too few / too many clusters
    best = None
    resolution = start
    steps = 0
    # on igraph: convert once, and start each Leiden run from the previous step's partition
    ig = None if _cugraph_available(use_gpu) or isinstance(graph, CoarseGraph) else _igraph(graph)
    previous = None
    while steps < max(1, max_steps):
        steps += 1
        t_step = time.perf_counter()
        membership, backend = communities(graph, method, resolution=resolution, n_iterations=cfg.n_iterations,
                                          seed=seed, use_gpu=use_gpu, initial_membership=previous,
                                          igraph_graph=ig)
        previous = membership if method == "leiden" else None
        labels = merge_small_clusters(membership, embedding, min_size=cfg.min_cluster_size,
                                      max_clusters=cfg.max_clusters)
        count = int(labels.max()) + 1
        log.info("cluster: resolution %.4g gives %d clusters (target %d), %.1f s", resolution, count, target,
                 time.perf_counter() - t_step)
        score = (abs(count - target), abs(np.log(resolution / start)))
        if best is None or score < best[0]:
            best = (score, labels, resolution, int(np.unique(membership).size), backend)
        if count == target or (count > target and count <= floor):
            break  # hit, or as few as the components allow
        if count > target:
            high = resolution if high is None else min(high, resolution)
        else:
            low = resolution if low is None else max(low, resolution)
        if high is not None and low is not None and high <= low:
            break  # the count is not monotone here: keep the nearest
        if high is None:
            resolution = resolution * 2.0
        elif low is None:
            resolution = resolution / 2.0
        else:
            resolution = float(np.sqrt(low * high))
        if not 1e-6 <= resolution <= 1e3:
            break
    _, labels, resolution, n_comm, backend = best
    return labels, {"resolution": round(float(resolution), 6), "target_clusters": target,
                    "resolution_steps": steps, "communities": n_comm, "backend": backend}


def cluster_embedding(z: np.ndarray, graph: sp.csr_matrix | None, cfg: ClusterConfig, *, device, seed: int = 0,
                      graph_cfg: GraphConfig | None = None, use_gpu: bool = False,
                      n_clusters: int | None = None) -> tuple[np.ndarray, dict]:
    """Cluster cells given their embedding and pruned graph (no store involved).

    Parameters
    ----------
    z
        ``(N, d)`` GAE embedding.
    graph
        Pruned cell graph (needed by 'louvaink' and by ``cluster.graph = 'pruned'``).
    cfg
        Cluster options.
    device
        Torch device of the embedding's KNN graph (``cluster.graph = 'embedding'``).
    seed
        Seed of Louvain/Leiden and KMeans.
    graph_cfg
        KNN options for the embedding graph (backend choice); defaults otherwise.
    use_gpu
        Allow cuGraph when present.
    n_clusters
        None: the method chooses the number of clusters (the first pass). A number: the clusters
        are that many (the later iterations with ``iterate.cluster_count = 'first'``): 'louvaink'
        skips the Louvain count and runs KMeans with ``n_clusters``; 'leiden'/'louvain' search the
        resolution that gives ``n_clusters`` (:func:`communities_with_count`).

    Returns
    -------
    labels, info
        ``0..k-1`` int64 labels (0 the largest cluster) and a JSON-able summary.
    """
    t0 = time.perf_counter()
    z = np.ascontiguousarray(z, dtype=np.float32)
    n = z.shape[0]
    if n < 3:
        raise InputError(f"cluster: {n} cells are too few to cluster")
    info: dict = {"method": cfg.method}
    if cfg.method == "louvaink":
        if graph is None:
            raise InputError("cluster.method 'louvaink' needs the pruned cell graph")
        if n_clusters is None:
            membership, backend = communities(graph, "louvain", resolution=1.0, seed=seed, use_gpu=use_gpu)
            k_louvain = int(np.unique(membership).size)
            k = louvaink_count(k_louvain, n, cfg)
            info.update({"louvain_clusters": k_louvain, "backend": backend})
        else:
            k = int(max(2, min(n_clusters, cfg.max_clusters, n - 1)))
            info["target_clusters"] = int(n_clusters)
        labels = _kmeans(z, k, cfg, seed)
        info.update({"kmeans_k": k, "kmeans": "full" if n <= cfg.kmeans_max_cells else "minibatch"})
    elif cfg.method in ("leiden", "louvain"):
        if cfg.graph == "pruned":
            if graph is None:
                raise InputError("cluster.graph 'pruned' needs the pruned cell graph")
            cluster_graph = graph
        else:
            gcfg = graph_cfg or GraphConfig()
            k_emb = min(cfg.embedding_k, n - 1)
            from dataclasses import replace

            cluster_graph, ginfo = knn_graph(z, replace(gcfg, k=k_emb), device=device, seed=seed, prune="none")
            info["embedding_graph"] = {"k": k_emb, "method": ginfo["method"], "n_edges": ginfo["n_edges"]}
        restarts = cfg.restarts if n <= cfg.restarts_max_cells else 1
        consensus = restarts > 1 and not isinstance(cluster_graph, CoarseGraph)
        if n_clusters is None and restarts > 1 and not consensus:
            log.warning("cluster: cluster.restarts %d is not applied to a graph clustered by parts; one run",
                        restarts)
            info["consensus"] = "not applied: cluster.partition 'parts'"
        if n_clusters is None and consensus:
            membership, cinfo = consensus_communities(cluster_graph, cfg.method, restarts=restarts,
                                                      threshold=cfg.consensus_threshold, resolution=cfg.resolution,
                                                      max_rounds=cfg.consensus_rounds,
                                                      n_iterations=cfg.n_iterations, seed=seed)
            info.update({"graph": cfg.graph, "resolution": cfg.resolution, "backend": "igraph",
                         "communities": int(np.unique(membership).size), "consensus": cinfo})
            labels = membership
        elif n_clusters is None:
            membership, backend = communities(cluster_graph, cfg.method, resolution=cfg.resolution,
                                              n_iterations=cfg.n_iterations, seed=seed, use_gpu=use_gpu)
            info.update({"graph": cfg.graph, "resolution": cfg.resolution, "backend": backend,
                         "communities": int(np.unique(membership).size)})
            labels = membership
        else:
            labels, search = communities_with_count(cluster_graph, cfg.method, n_clusters, embedding=z, cfg=cfg,
                                                    seed=seed, use_gpu=use_gpu)
            info.update({"graph": cfg.graph, **search})
    else:
        raise InputError(f"cluster.method {cfg.method!r}: not one of louvaink, leiden, louvain")
    labels = merge_small_clusters(labels, z, min_size=cfg.min_cluster_size, max_clusters=cfg.max_clusters)
    sizes = np.bincount(labels)
    info.update({"n_clusters": int(sizes.size), "sizes": sizes.tolist()[:50],
                 "seconds": round(time.perf_counter() - t0, 3)})
    return labels, info


def as_categorical(labels: np.ndarray) -> pd.Categorical:
    """Labels ``0..k-1`` as a Categorical of strings "0".."k-1" (category order = label order)."""
    k = int(labels.max()) + 1 if labels.size else 0
    cats = [str(i) for i in range(k)]
    return pd.Categorical.from_codes(np.asarray(labels, dtype=np.int64), categories=cats)


def _use_gpu(ctx) -> bool:
    return ctx.config.cluster.gpu and ctx.runtime.cuda


def cluster_cells(ctx, staging, *, embedding_key: str, graph_key: str,
                  out_key: str, n_clusters: int | None = None) -> tuple[np.ndarray, dict]:
    """Cluster the cells of a run and stage the labels at ``out_key``.

    Parameters
    ----------
    ctx
        Stage context (config ``cluster`` and ``graph``, seed, device).
    staging
        Where the labels are written; inputs staged there by the caller are read from it.
    embedding_key, graph_key, out_key
        Store keys of the GAE embedding, the pruned graph and the output obs column.
    n_clusters
        A fixed number of clusters (see :func:`cluster_embedding`), or None (the method decides).

    Returns
    -------
    labels, info
        int64 labels ``0..k-1`` (0 the largest cluster) and a summary; ``info['metrics']`` holds
        ARI/NMI/silhouette when obs carries the label column (``ingest.label_key`` or 'label').
    """
    cfg = ctx.config.cluster
    z = np.asarray(staging.read_elem(embedding_key), dtype=np.float32)
    needs_graph = cfg.method == "louvaink" or cfg.graph == "pruned"
    graph = None
    partition = "whole"
    if needs_graph:
        location = staging.location_of(graph_key)
        partition = graph_partition(cfg, stored_edges(location))
        if partition == "parts":
            with ctx.progress(z.shape[0], "micro-communities by part") as bar:
                graph = coarse_graph(location, z, part_cells=cfg.part_cells, micro_resolution=cfg.micro_resolution,
                                     seed=ctx.config.runtime.seed, progress=bar)
        else:
            graph = staging.read_elem(graph_key).tocsr()
    labels, info = cluster_embedding(z, graph, cfg, device=ctx.runtime.device, seed=ctx.config.runtime.seed,
                                     graph_cfg=ctx.config.graph, use_gpu=_use_gpu(ctx), n_clusters=n_clusters)
    info["partition"] = partition
    if isinstance(graph, CoarseGraph):
        info["parts"] = graph.info
    staging.write_elem(out_key, as_categorical(labels))
    truth = _reference_labels(ctx, n_cells=z.shape[0])
    if truth is not None:
        from .evaluate import clustering_metrics

        key, values = truth
        info["metrics"] = clustering_metrics(values, labels, embedding=z, seed=ctx.config.runtime.seed)
        info["metrics"]["label_key"] = key
    ctx.log.info("cluster: %d clusters (%s)%s", info["n_clusters"], cfg.method,
                 f", ARI {info['metrics']['ari']:.3f}" if "metrics" in info else "")
    return labels, info


def graph_partition(cfg: ClusterConfig, n_edges: int) -> str:
    """'whole' (the graph in igraph) or 'parts' (:mod:`scgnn_scale.leiden_parts`) for ``n_edges``
    undirected edges: ``cluster.partition``, where 'auto' picks 'parts' when igraph would take more
    than ``cluster.memory_budget_mb``."""
    if cfg.partition != "auto":
        return cfg.partition
    return "parts" if igraph_bytes(n_edges) > cfg.memory_budget_mb * 2**20 else "whole"


def _reference_labels(ctx, n_cells: int):
    """``(key, values)`` of obs's label column when the run carries one, else None."""
    key = ctx.config.ingest.label_key or "label"
    try:
        obs = ctx.store.read_elem(KEYS.obs)
    except InputError:
        return None
    if key not in obs.columns or len(obs) != n_cells:
        return None
    return key, obs[key].to_numpy()
