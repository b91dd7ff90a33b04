"""Leiden by parts (scgnn_scale.leiden_parts): the aggregate graph keeps the whole graph's modularity, and
the path recovers planted structure with the graph streamed from the store."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from anndata.io import write_elem
from sklearn.metrics import adjusted_rand_score

from scgnn_scale import clustering, leiden_parts
from scgnn_scale.config import ClusterConfig, build_config
from scgnn_scale.keys import FIRST_PASS
from scgnn_scale.stages import cluster as cluster_stage
from scgnn_scale.testing import stage_context, store_with_matrix


def planted_graph(sizes, degree=12, p_in=0.9, seed=0):
    """Symmetric unweighted graph of planted blocks (each cell draws ``degree`` neighbours, ``p_in`` of
    them in its own block) and an embedding in which each block is a blob; cells shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    n = labels.size
    members = [np.flatnonzero(labels == b) for b in range(len(sizes))]
    src = np.repeat(np.arange(n), degree)
    own = np.array([rng.choice(members[labels[i]]) for i in src])
    dst = np.where(rng.random(src.size) < p_in, own, rng.integers(n, size=src.size))
    a = sp.coo_matrix((np.ones(src.size, np.float32), (src, dst)), shape=(n, n)).tocsr()
    a = ((a + a.T) > 0).astype(np.float32).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    centres = rng.normal(0, 10, (len(sizes), 16))
    z = (centres[labels] + rng.normal(0, 1, (n, 16))).astype(np.float32)
    return a, z, labels


def stored(tmp_path, graph) -> str:
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    write_elem(group, "graph", graph)
    return str(tmp_path / "g.zarr" / "graph")


def modularity(graph: sp.csr_matrix, labels, resolution=1.0) -> float:
    """The dense reference: Q = 1/2m sum_ij (A_ij - gamma k_i k_j / 2m) [c_i = c_j]."""
    a = graph.toarray().astype(np.float64)
    k = a.sum(1)
    two_m = a.sum()
    same = np.equal.outer(labels, labels)
    return float(((a - resolution * np.outer(k, k) / two_m) * same).sum() / two_m)


def test_upper_edges_stream_each_edge_once(tmp_path):
    g, _, _ = planted_graph([60, 40])
    graph = leiden_parts.StoredGraph(stored(tmp_path, g))
    assert leiden_parts.stored_edges(stored(tmp_path, g)) == g.nnz // 2 == graph.n_entries // 2
    blocks = list(graph.upper_edges(block_entries=97))
    assert len(blocks) > 5
    i = np.concatenate([b[0] for b in blocks])
    j = np.concatenate([b[1] for b in blocks])
    upper = sp.triu(g, k=1).tocoo()
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == sorted(
        zip(upper.row.tolist(), upper.col.tolist(), strict=True))


def test_aggregate_graph_keeps_the_modularity_of_lifted_partitions(tmp_path):
    g, _, _ = planted_graph([50, 30, 20], p_in=0.6, seed=1)
    rng = np.random.default_rng(0)
    micro = rng.integers(25, size=g.shape[0])
    micro = np.unique(micro, return_inverse=True)[1]
    edges, weights = leiden_parts.aggregate_edges(leiden_parts.StoredGraph(stored(tmp_path, g)), micro, merge_at=10)
    assert weights.sum() == g.nnz // 2
    coarse = leiden_parts.CoarseGraph(micro=micro, edges=edges, weights=weights)
    degree_sums = np.bincount(micro, weights=np.asarray(g.sum(1)).ravel())
    assert np.allclose(coarse.igraph().strength(weights="weight"), degree_sums)
    assert np.allclose(coarse.node_weights(), degree_sums)
    for resolution in (0.3, 1.0):
        nodes = rng.integers(4, size=coarse.n_nodes)
        cells = coarse.lift(nodes)
        assert coarse.igraph().modularity(nodes, weights="weight", resolution=resolution) == pytest.approx(
            modularity(g, cells, resolution), abs=1e-9)
    assert np.array_equal(coarse.lift(coarse.coarsen(cells)), cells)


def test_micro_communities_optimise_the_whole_graphs_modularity(tmp_path):
    """One part: CPM with whole-graph degrees and gamma / 2m is modularity, so the micro-communities at
    the whole path's resolution match its quality and the planted blocks."""
    g, _, labels = planted_graph([80, 60, 40], seed=2)
    parts = np.zeros(g.shape[0], np.int32)
    graph = leiden_parts.StoredGraph(stored(tmp_path, g))
    local, _ = leiden_parts.index_in_part(parts)
    degree, inner = leiden_parts.spill_part_edges(graph, parts, local, tmp_path)
    assert np.array_equal(degree, np.diff(g.indptr)) and inner[0] == g.nnz // 2
    micro = leiden_parts.micro_communities(parts, degree, tmp_path, resolution=1.0, n_iterations=-1, seed=0)
    whole, _ = clustering.communities(g, "leiden", resolution=1.0, seed=0)
    assert adjusted_rand_score(labels, micro) > 0.95
    assert modularity(g, micro) == pytest.approx(modularity(g, whole), abs=0.01)


def test_parts_split_by_the_embedding_and_index_cells_within():
    parts = np.array([2, 0, 2, 1, 0, 2])
    local, sizes = leiden_parts.index_in_part(parts)
    assert sizes.tolist() == [2, 1, 3]
    assert local.tolist() == [0, 0, 1, 0, 1, 2]


@pytest.mark.parametrize("method", ["leiden", "louvain"])
def test_communities_by_parts_recover_planted_blocks(tmp_path, method):
    g, z, labels = planted_graph([300, 200, 150, 100], seed=3)
    coarse = leiden_parts.coarse_graph(stored(tmp_path, g), z, part_cells=200, micro_resolution=10.0, seed=0)
    assert coarse.info["parts"] >= 4
    # micro-communities never straddle planted blocks
    purity = pd.crosstab(coarse.micro, labels).max(axis=1).sum() / labels.size
    assert purity > 0.99
    assert coarse.info["micro_communities"] < labels.size / 3
    membership, backend = clustering.communities(coarse, method, resolution=0.3, seed=0)
    assert backend == "igraph" and membership.shape == labels.shape
    assert adjusted_rand_score(labels, membership) > 0.95


def test_count_search_on_the_aggregate_graph(tmp_path):
    g, z, labels = planted_graph([200, 200, 150, 100, 100], seed=4)
    coarse = leiden_parts.coarse_graph(stored(tmp_path, g), z, part_cells=300, micro_resolution=10.0, seed=0)
    for target in (3, 5):
        got, info = clustering.communities_with_count(coarse, "leiden", target, embedding=z, cfg=ClusterConfig(),
                                                      seed=0)
        assert int(got.max()) + 1 == target, info
    assert adjusted_rand_score(labels, got) > 0.95


def test_auto_partition_follows_the_memory_budget():
    cfg = ClusterConfig(memory_budget_mb=100)
    edges_in_budget = 100 * 2**20 // leiden_parts.IGRAPH_BYTES_PER_EDGE
    assert clustering.graph_partition(cfg, edges_in_budget) == "whole"
    assert clustering.graph_partition(cfg, edges_in_budget + 1) == "parts"
    assert clustering.graph_partition(ClusterConfig(partition="whole", memory_budget_mb=0), 10**9) == "whole"
    assert clustering.graph_partition(ClusterConfig(partition="parts"), 10) == "parts"


def test_cluster_stage_by_parts_streams_the_stored_graph(tmp_path, monkeypatch):
    g, z, labels = planted_graph([250, 150, 100], seed=5)
    store = store_with_matrix(tmp_path / "run", np.ones((labels.size, 3), np.float32), labels=labels)
    with store.staging("gae") as st:
        st.write_elem(FIRST_PASS.graph, g)
        st.write_elem(FIRST_PASS.embedding, z)

    def no_whole_read(*args, **kwargs):
        raise AssertionError("the whole graph was read")

    monkeypatch.setattr(clustering, "_igraph", no_whole_read)
    cfg = build_config({"cluster": {"partition": "auto", "memory_budget_mb": 0, "part_cells": 200}})
    info = cluster_stage.run(stage_context(store, "cluster", cfg))
    assert info["partition"] == "parts" and info["parts"]["parts"] >= 3
    assert info["metrics"]["ari"] > 0.95


def test_streamed_modularity_equals_the_dense_reference(tmp_path):
    g, _, labels = planted_graph([70, 50, 30], p_in=0.7, seed=6)
    graph = leiden_parts.StoredGraph(stored(tmp_path, g))
    noisy = np.where(np.random.default_rng(0).random(labels.size) < 0.2, 0, labels)
    for resolution in (0.3, 1.0):
        assert leiden_parts.modularity(graph, noisy, resolution) == pytest.approx(modularity(g, noisy, resolution),
                                                                                   abs=1e-9)


def test_leiden_on_the_aggregate_graph_keeps_the_whole_graphs_null_model(tmp_path):
    """A ring of 30 cliques of 10 cells: modularity keeps every clique apart (merging two gains one edge
    and costs 92^2 / 2m = 3.1), on the cells and on the aggregate graph, where the cliques' edges are
    self-loops that Leiden must count in each node's degree (igraph's default leaves them out and merges
    neighbouring cliques)."""
    n_cliques, size = 30, 10
    labels = np.repeat(np.arange(n_cliques), size)
    i, j = np.triu_indices(size, k=1)
    rows = [(c * size + i, c * size + j) for c in range(n_cliques)]
    rows.append((np.arange(n_cliques) * size, ((np.arange(n_cliques) + 1) % n_cliques) * size + 1))
    src = np.concatenate([r[0] for r in rows])
    dst = np.concatenate([r[1] for r in rows])
    g = sp.coo_matrix((np.ones(src.size, np.float32), (src, dst)), shape=(labels.size,) * 2).tocsr()
    g = (g + g.T).tocsr()
    angle = 2 * np.pi * labels / n_cliques
    z = np.column_stack([np.cos(angle), np.sin(angle)]).astype(np.float32) * 100
    z += np.random.default_rng(0).normal(0, 0.1, z.shape).astype(np.float32)
    coarse = leiden_parts.coarse_graph(stored(tmp_path, g), z, part_cells=100, micro_resolution=10.0, seed=0)
    assert pd.crosstab(coarse.micro, labels).max(axis=1).sum() == labels.size  # no micro-community straddles
    whole, _ = clustering.communities(g, "leiden", resolution=1.0, seed=0)
    assert adjusted_rand_score(labels, whole) == 1.0
    for method in ("leiden", "louvain"):
        by_parts, _ = clustering.communities(coarse, method, resolution=1.0, seed=0)
        assert adjusted_rand_score(labels, by_parts) == 1.0, method
