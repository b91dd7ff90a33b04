"""cluster.restarts: the consensus of several Leiden runs on planted structure (stochastic block models)."""

import statistics

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from scgnn_scale import clustering
from scgnn_scale.config import ClusterConfig, build_config
from scgnn_scale.errors import InputError


def sbm(sizes, p_in, p_out, seed=0):
    """Adjacency (CSR, symmetric, unweighted) of a stochastic block model and its block labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rows, cols = np.triu_indices(labels.size, 1)
    p = np.where(labels[rows] == labels[cols], p_in, p_out)
    keep = rng.random(p.size) < p
    a = sp.coo_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(labels.size,) * 2)
    return (a + a.T).tocsr(), labels


def test_consensus_recovers_the_planted_blocks():
    g, labels = sbm([100] * 6, 0.1, 0.02)
    membership, info = clustering.consensus_communities(g, "leiden", restarts=10, resolution=1.0, seed=0)
    assert adjusted_rand_score(labels, membership) > 0.9
    assert info["restarts"] == 10 and info["rounds"] >= 1 and 0 < info["edges_kept"] <= 1


def test_consensus_reduces_the_spread_of_a_noisy_clustering():
    # blocks near the limit of detection: single Leiden runs disagree with each other from seed to seed
    g, labels = sbm([100] * 6, 0.1, 0.03)
    single = [adjusted_rand_score(labels, clustering.communities(g, "leiden", resolution=1.0, seed=100 * s)[0])
              for s in range(10)]
    consensus = [adjusted_rand_score(labels, clustering.consensus_communities(
        g, "leiden", restarts=10, resolution=1.0, seed=100 * s)[0]) for s in range(10)]
    assert statistics.stdev(single) > 0.04  # the noise is real
    assert statistics.stdev(consensus) < 0.5 * statistics.stdev(single)
    assert statistics.mean(consensus) >= statistics.mean(single) - 0.01


def test_one_restart_is_the_single_run():
    g, _ = sbm([80] * 4, 0.1, 0.03)
    single, _ = clustering.communities(g, "leiden", resolution=0.3, seed=5)
    one, info = clustering.consensus_communities(g, "leiden", restarts=1, resolution=0.3, seed=5)
    np.testing.assert_array_equal(single, one)
    assert info["rounds"] == 1


def test_consensus_without_keeping_the_runs(monkeypatch):
    # beyond KEEP_RUNS_MAX cells x restarts the memberships are not kept: one more run on the last graph
    g, labels = sbm([100] * 6, 0.1, 0.02)
    monkeypatch.setattr(clustering, "KEEP_RUNS_MAX", 0)
    membership, _ = clustering.consensus_communities(g, "leiden", restarts=5, resolution=1.0, seed=0)
    assert adjusted_rand_score(labels, membership) > 0.9


def test_consensus_is_deterministic_per_seed():
    g, _ = sbm([80] * 4, 0.1, 0.035)
    a, _ = clustering.consensus_communities(g, "leiden", restarts=5, resolution=1.0, seed=2)
    b, _ = clustering.consensus_communities(g, "leiden", restarts=5, resolution=1.0, seed=2)
    np.testing.assert_array_equal(a, b)


def test_cluster_embedding_uses_the_consensus_with_restarts():
    g, labels = sbm([100] * 6, 0.1, 0.02)
    z = np.eye(6, 16, dtype=np.float32)[labels] * 5  # centroids for merging the small clusters
    cfg = ClusterConfig(resolution=1.0, restarts=4)
    pred, info = clustering.cluster_embedding(z, g, cfg, device="cpu", seed=0)
    assert info["consensus"]["restarts"] == 4
    assert adjusted_rand_score(labels, pred) > 0.9
    _, plain = clustering.cluster_embedding(z, g, ClusterConfig(resolution=1.0, restarts=1), device="cpu", seed=0)
    assert "consensus" not in plain  # restarts = 1: the single run


def test_restarts_stop_above_their_cell_limit():
    """Above cluster.restarts_max_cells the first pass runs Leiden once: the single run's clusters exactly."""
    g, labels = sbm([100] * 6, 0.1, 0.03)
    z = np.eye(6, 16, dtype=np.float32)[labels] * 5
    assert ClusterConfig().restarts == 10  # the default
    capped, info = clustering.cluster_embedding(z, g, ClusterConfig(resolution=1.0, restarts_max_cells=599),
                                                device="cpu", seed=3)
    single, _ = clustering.cluster_embedding(z, g, ClusterConfig(resolution=1.0, restarts=1), device="cpu", seed=3)
    assert "consensus" not in info
    np.testing.assert_array_equal(capped, single)
    _, within = clustering.cluster_embedding(z, g, ClusterConfig(resolution=1.0, restarts_max_cells=600),
                                             device="cpu", seed=3)
    assert within["consensus"]["restarts"] == 10


def test_restarts_out_of_range_is_an_input_error():
    g, _ = sbm([30] * 2, 0.2, 0.01)
    with pytest.raises(InputError):
        clustering.consensus_communities(g, "leiden", restarts=0)
    with pytest.raises(InputError):
        clustering.consensus_communities(g, "leiden", restarts=256)


def test_restarts_is_an_option():
    cfg = build_config(overrides={"cluster": {"restarts": 5, "consensus_threshold": 0.6}})
    assert cfg.cluster.restarts == 5 and cfg.cluster.consensus_threshold == 0.6


def test_consensus_memory_is_in_edges_not_cells_squared():
    # 20,000 cells in 20 planted blocks, about 11 edges a cell: a dense cells x cells float32 matrix would
    # take 1.6 GB; the consensus holds the edge list, a byte per edge and the restarts' memberships
    import tracemalloc

    rng = np.random.default_rng(0)
    n, blocks = 20_000, 20
    labels = np.repeat(np.arange(blocks), n // blocks)
    src = np.repeat(np.arange(n), 11)
    same = rng.integers(0, n // blocks, src.size) + (labels[src] * (n // blocks))
    dst = np.where(np.arange(src.size) % 11 == 10, rng.integers(0, n, src.size), same)  # 1 in 11 anywhere
    a = sp.coo_matrix((np.ones(src.size, np.float32), (src, dst)), shape=(n, n)).tocsr()
    a = ((a + a.T) > 0).astype(np.float32)
    a.setdiag(0)
    a.eliminate_zeros()
    tracemalloc.start()
    membership, _ = clustering.consensus_communities(a, "leiden", restarts=3, resolution=1.0, seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert adjusted_rand_score(labels, membership) > 0.9
    assert peak < 64 * 2**20, peak  # numpy's allocations; 1.6 GB if it were dense


def test_restarts_are_not_applied_to_a_graph_clustered_by_parts(tmp_path):
    # cluster.partition 'parts' clusters an aggregate graph: one run there, said in the stage's info
    from test_leiden_parts import planted_graph, stored

    from scgnn_scale import leiden_parts

    g, z, labels = planted_graph([250, 150, 100], seed=5)
    coarse = leiden_parts.coarse_graph(stored(tmp_path, g), z, part_cells=200, micro_resolution=10.0, seed=0)
    pred, info = clustering.cluster_embedding(z, coarse, ClusterConfig(restarts=5), device="cpu", seed=0)
    assert info["consensus"].startswith("not applied")
    assert adjusted_rand_score(labels, pred) > 0.95
