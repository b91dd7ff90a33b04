"""Sparse GCN, samplers, negative-sampled loss and the GAE stage against dense references."""

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from scgnn_scale import graph_autoencoder
from scgnn_scale.config import GAEConfig
from scgnn_scale.errors import InputError
from scgnn_scale.keys import FIRST_PASS
from scgnn_scale.nn.gcn import GCNEncoder, edge_bce_loss, normalized_adjacency, pair_logits, propagate
from scgnn_scale.nn.sampling import CSRGraph, sample_blocks, sample_neighbors
from scgnn_scale.stages import gae as gae_stage
from scgnn_scale.testing import stage_context, store_with_matrix
from scgnn_scale.train import cpu_threads


def random_graph(n, p, seed=0):
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < p, k=1)
    dense = (upper | upper.T).astype(np.float32)
    return sp.csr_matrix(dense)


def sbm(sizes, p_in, p_out, seed=0):
    """Stochastic block model: symmetric CSR adjacency and the planted blocks."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    n = labels.size
    prob = np.where(labels[:, None] == labels[None, :], p_in, p_out)
    upper = np.triu(rng.random((n, n)) < prob, k=1)
    return sp.csr_matrix((upper | upper.T).astype(np.float32)), labels


def dense_normalized(adj: np.ndarray) -> np.ndarray:
    a = adj + np.eye(adj.shape[0])
    dinv = 1.0 / np.sqrt(a.sum(1))
    return dinv[:, None] * a * dinv[None, :]


def test_sparse_gcn_forward_equals_dense_formula():
    g = random_graph(40, 0.15, seed=1)
    graph = CSRGraph.from_scipy(g)
    a_sparse = normalized_adjacency(torch.from_numpy(graph.indptr), torch.from_numpy(graph.indices), 40)
    a_dense = dense_normalized(g.toarray())
    np.testing.assert_allclose(a_sparse.to_dense().numpy(), a_dense, rtol=1e-5, atol=1e-7)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    for final_relu in (True, False):
        enc = GCNEncoder(12, 6, 3, final_relu=final_relu, generator=torch.Generator().manual_seed(1))
        w1, w2 = enc.w1.detach().double().numpy(), enc.w2.detach().double().numpy()
        z_ref = a_dense @ np.maximum(a_dense @ x.double().numpy() @ w1, 0) @ w2
        if final_relu:
            z_ref = np.maximum(z_ref, 0)
        with torch.no_grad():
            z = enc(x, a_sparse).double().numpy()
            z_pre = enc(torch.sparse.mm(a_sparse, x), a_sparse, precomputed=True).double().numpy()
        np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(z_pre, z_ref, rtol=1e-4, atol=1e-5)
    for block_rows in (7, 40, 64):  # blocks that do and do not divide the rows
        np.testing.assert_allclose(propagate(a_sparse, x, block_rows=block_rows).double().numpy(),
                                   a_dense @ x.double().numpy(), rtol=1e-5, atol=1e-6)


def test_normalized_adjacency_with_weights_and_isolated_nodes_equals_dense():
    rng = np.random.default_rng(3)
    upper = np.triu(rng.random((50, 50)) < 0.1, k=1) * rng.uniform(0.5, 2.0, (50, 50))
    upper[:, [7, 31]] = 0  # two isolated nodes: only their own loop
    upper[[7, 31], :] = 0
    g = sp.csr_matrix(upper + upper.T)
    g.sort_indices()
    a_sparse = normalized_adjacency(torch.from_numpy(g.indptr), torch.from_numpy(g.indices), 50,
                                    values=torch.from_numpy(g.data))
    np.testing.assert_allclose(a_sparse.to_dense().numpy(), dense_normalized(g.toarray()), rtol=1e-5, atol=1e-7)
    crow = a_sparse.crow_indices().numpy()
    cols = a_sparse.col_indices().numpy()
    assert all(np.all(np.diff(cols[crow[i]:crow[i + 1]]) > 0) for i in range(50))  # sorted, one diagonal entry
    looped = g + sp.identity(50, format="csr")
    with pytest.raises(ValueError, match="self loops"):
        normalized_adjacency(torch.from_numpy(looped.indptr), torch.from_numpy(looped.indices), 50)


def dense_balanced_bce(z: np.ndarray, adj: np.ndarray) -> float:
    """The published weighted BCE (pos_weight, norm) without self pairs: 0.5 (mean over edges + over non-edges)."""
    s = z @ z.T
    log_sig = -np.logaddexp(0, -s)
    log_one_minus = -np.logaddexp(0, s)
    off = ~np.eye(adj.shape[0], dtype=bool)
    pos = adj.astype(bool) & off
    neg = ~adj.astype(bool) & off
    return 0.5 * (-log_sig[pos].mean() - log_one_minus[neg].mean())


def test_published_weighting_is_the_balanced_mean():
    # norm * BCE(pos_weight) over all non-diagonal pairs == 0.5 (mean over edges + mean over non-edges)
    g = random_graph(30, 0.2, seed=2).toarray()
    z = np.random.default_rng(0).normal(size=(30, 4))
    off = ~np.eye(30, dtype=bool)
    s = torch.from_numpy((z @ z.T)[off])
    labels = torch.from_numpy(g[off]).double()
    n2, e = float(off.sum()), float(labels.sum())
    published = n2 / (2 * (n2 - e)) * F.binary_cross_entropy_with_logits(
        s, labels, pos_weight=torch.tensor((n2 - e) / e, dtype=torch.float64))
    assert float(published) == pytest.approx(dense_balanced_bce(z, g), rel=1e-10)


def test_negative_sampled_loss_is_unbiased():
    # a dense graph (35% edges), so that a sampler which let edges through would be visibly biased:
    # drawing negatives among all pairs shifts this average by ~0.012, 7-8 standard errors
    g = random_graph(25, 0.35, seed=3)
    graph = CSRGraph.from_scipy(g)
    z = torch.from_numpy(np.random.default_rng(4).normal(size=(25, 3)))
    dense = dense_balanced_bce(z.numpy(), g.toarray())
    ps, pd_ = graph.upper_edges()
    pos = pair_logits(z[ps], z[pd_])
    rng = np.random.default_rng(5)
    draws = []
    for _ in range(3000):
        ns, nd = graph.sample_non_edges(40, rng)
        draws.append(float(edge_bce_loss(pos, pair_logits(z[ns], z[nd]))))
    draws = np.array(draws)
    stderr = draws.std() / np.sqrt(draws.size)
    assert stderr < 0.002
    assert abs(draws.mean() - dense) < 4 * stderr, (draws.mean(), dense, stderr)


def test_negative_sampler_draws_only_non_edges_uniformly():
    g = random_graph(12, 0.3, seed=6)
    graph = CSRGraph.from_scipy(g)
    src, dst = graph.sample_non_edges(60000, np.random.default_rng(0))
    dense = g.toarray()
    assert (src != dst).all() and (dense[src, dst] == 0).all()
    counts = np.zeros((12, 12))
    np.add.at(counts, (src, dst), 1)
    allowed = (dense == 0) & ~np.eye(12, dtype=bool)
    expected = 60000 / allowed.sum()
    assert (counts[~allowed] == 0).all()
    assert np.abs(counts[allowed] - expected).max() < 5 * np.sqrt(expected)
    # sources restricted to a subset
    src, dst = graph.sample_non_edges(500, np.random.default_rng(1), sources=np.array([2, 7]))
    assert set(np.unique(src)) <= {2, 7} and (dense[src, dst] == 0).all()


def test_neighbor_sampler_returns_true_neighbours_within_fanout():
    g = random_graph(200, 0.08, seed=7)
    graph = CSRGraph.from_scipy(g)
    nodes = np.arange(0, 200, 3)
    owner, nb, n_sampled = sample_neighbors(graph, nodes, 5, np.random.default_rng(0))
    dense = g.toarray()
    assert (dense[nodes[owner], nb] == 1).all()
    counts = np.bincount(owner, minlength=nodes.size)
    np.testing.assert_array_equal(counts, np.minimum(graph.degree[nodes], 5))
    np.testing.assert_array_equal(counts, n_sampled)
    pairs = nodes[owner] * 200 + nb
    assert np.unique(pairs).size == pairs.size  # without replacement


def test_sample_blocks_structure_and_normalisation():
    g = random_graph(150, 0.1, seed=8)
    graph = CSRGraph.from_scipy(g)
    targets = np.array([3, 17, 40, 99])
    input_nodes, blocks = sample_blocks(graph, targets, [4, 3], np.random.default_rng(1))
    assert len(blocks) == 2
    last, first = blocks[1], blocks[0]
    assert last.n_dst == targets.size and first.n_src == input_nodes.size and first.n_dst == last.n_src
    np.testing.assert_array_equal(input_nodes[:targets.size], targets)
    assert np.unique(input_nodes).size == input_nodes.size
    assert (graph.scratch_ids() == -1).all()  # the id table is left clean for the next minibatch
    dense = g.toarray()
    deg = dense.sum(1)
    # rebuild each layer's global node ids: block[-1] src = nodes of layer 1 = prefix of input_nodes
    layer1 = input_nodes[:first.n_dst]
    for block, dst_ids, src_ids, fanout in ((last, targets, layer1, 4), (first, layer1, input_nodes, 3)):
        m = block.to_dense()
        for r, i in enumerate(dst_ids):
            assert m[r, r] == pytest.approx(1.0 / (deg[i] + 1))
            cols = np.flatnonzero(m[r])
            nbrs = src_ids[cols[cols != r]]
            assert (dense[i, nbrs] == 1).all()  # every sampled neighbour is a true neighbour
            s = min(deg[i], fanout)
            assert nbrs.size == s
            expected = (deg[i] / s) / np.sqrt((deg[i] + 1) * (deg[nbrs] + 1))
            np.testing.assert_allclose(m[r, cols[cols != r]], expected, rtol=1e-5)


def test_sampled_block_is_unbiased_and_exact_with_all_neighbours():
    g = random_graph(60, 0.15, seed=9)
    graph = CSRGraph.from_scipy(g)
    a = dense_normalized(g.toarray())
    h = np.random.default_rng(0).normal(size=(60, 5))
    targets = np.array([0, 5, 33])
    inp, (block,) = sample_blocks(graph, targets, [-1], np.random.default_rng(0))
    np.testing.assert_allclose(block.to_dense() @ h[inp], (a @ h)[targets], rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(1)
    acc = np.zeros((3, 5))
    reps = 4000
    for _ in range(reps):
        inp, (block,) = sample_blocks(graph, targets, [2], rng)
        acc += block.to_dense() @ h[inp]
    np.testing.assert_allclose(acc / reps, (a @ h)[targets], atol=0.05)


def _embedding_ari(z, labels):
    pred = KMeans(len(np.unique(labels)), n_init=5, random_state=0).fit_predict(z)
    return adjusted_rand_score(labels, pred)


@pytest.mark.parametrize("mode,extra", [
    ("full", {}),
    ("minibatch", {"batch_size": 64, "epoch_cells": 256, "epochs": 80}),
    ("minibatch", {"batch_size": 64, "epoch_cells": 256, "epochs": 80, "sample_first_layer": True,
                   "fanouts": "5,5"}),
])
def test_gae_separates_planted_blocks(mode, extra):
    # blocks weak enough that the untrained encoder does not separate them (ARI 0.57-0.71 after one step)
    g, labels = sbm([60, 60, 60, 60], 0.2, 0.02, seed=0)
    graph = CSRGraph.from_scipy(g)
    x = np.random.default_rng(1).normal(size=(240, 16)).astype(np.float32)  # features carry no signal
    z, info = graph_autoencoder.fit_gae(x, graph, GAEConfig(mode=mode, **extra), device="cpu", seed=0)
    assert z.shape == (240, 16) and z.dtype == np.float32 and np.isfinite(z).all()
    assert info["mode"] == mode and info["loss_last"] < info["loss_first"]
    assert _embedding_ari(z, labels) > 0.9


def test_gae_mode_auto_and_determinism():
    g, _ = sbm([30, 30], 0.3, 0.02, seed=1)
    graph = CSRGraph.from_scipy(g)
    x = np.random.default_rng(2).normal(size=(60, 8)).astype(np.float32)
    cfg = GAEConfig(epochs=20)
    z1, info = graph_autoencoder.fit_gae(x, graph, cfg, device="cpu", seed=5)
    z2, _ = graph_autoencoder.fit_gae(x, graph, cfg, device="cpu", seed=5)
    z3, _ = graph_autoencoder.fit_gae(x, graph, cfg, device="cpu", seed=6)
    assert info["mode"] == "full"
    np.testing.assert_array_equal(z1, z2)
    assert not np.array_equal(z1, z3)
    _, info = graph_autoencoder.fit_gae(x, graph, GAEConfig(epochs=2, full_graph_max_nodes=50, batch_size=16), device="cpu", seed=5)
    assert info["mode"] == "minibatch"
    za, _ = graph_autoencoder.fit_gae(x, graph, GAEConfig(epochs=3, mode="minibatch", batch_size=16), device="cpu", seed=5)
    zb, _ = graph_autoencoder.fit_gae(x, graph, GAEConfig(epochs=3, mode="minibatch", batch_size=16), device="cpu", seed=5)
    np.testing.assert_array_equal(za, zb)


def test_parse_fanouts():
    assert graph_autoencoder.parse_fanouts("10, 5") == [10, 5]
    assert graph_autoencoder.parse_fanouts("-1,10") == [-1, 10]
    for bad in ("10", "a,b", "0,5", "10,10,10"):
        with pytest.raises(InputError, match="gae.fanouts"):
            graph_autoencoder.parse_fanouts(bad)


def test_gae_stage_writes_embedding(tmp_path):
    g, labels = sbm([40, 40, 40], 0.3, 0.01, seed=3)
    x = np.random.default_rng(0).normal(size=(120, 10)).astype(np.float32)
    store = store_with_matrix(tmp_path / "run", np.ones((120, 3), np.float32))
    with store.staging("graph") as st:
        st.write_elem(FIRST_PASS.feature_embedding, x)
        st.write_elem(FIRST_PASS.graph, g)
    info = gae_stage.run(stage_context(store, "gae"))
    z = store.read_elem(FIRST_PASS.embedding)
    assert z.shape == (120, 16) and z.dtype == np.float32
    assert info["mode"] == "full" and 0 < info["steps"] <= 200  # gae.plateau_tol may stop it before 200 epochs
    assert _embedding_ari(z, labels) > 0.9


def test_gae_refuses_mismatched_graph():
    g = random_graph(10, 0.5)
    with pytest.raises(InputError, match="nodes"):
        graph_autoencoder.fit_gae(np.zeros((12, 4), np.float32), CSRGraph.from_scipy(g), GAEConfig(epochs=1),
                                  device="cpu")


def test_standardize_columns():
    x = np.column_stack([np.arange(10.0) * 50 + 3, np.full(10, 7.0)]).astype(np.float32)
    s = graph_autoencoder.standardize_columns(x)
    np.testing.assert_allclose(s[:, 0].mean(), 0, atol=1e-6)
    np.testing.assert_allclose(s[:, 0].std(), 1, atol=1e-6)
    assert (s[:, 1] == 0).all()
    # in row blocks (what bounds its memory) it equals numpy's whole-array formula
    rng = np.random.default_rng(0)
    y = (rng.normal(size=(1000, 6)) * [1, 10, 100, 0.1, 5, 3] + [0, 5, -50, 1e3, 2, 0]).astype(np.float32)
    reference = ((y - y.mean(0, dtype=np.float64)) / y.std(0, dtype=np.float64)).astype(np.float32)
    np.testing.assert_allclose(graph_autoencoder.standardize_columns(y, block_rows=77), reference, rtol=1e-5, atol=1e-5)


def test_gae_stops_on_a_loss_plateau_and_still_separates_planted_blocks():
    g, labels = sbm([60, 60, 60, 60], 0.2, 0.02, seed=0)
    graph = CSRGraph.from_scipy(g)
    x = np.random.default_rng(1).normal(size=(240, 16)).astype(np.float32)
    z_fixed, fixed = graph_autoencoder.fit_gae(x, graph, GAEConfig(epochs=400, plateau_tol=0.0), device="cpu", seed=0)
    z, early = graph_autoencoder.fit_gae(x, graph, GAEConfig(epochs=400, plateau_tol=0.005, plateau_window=10),
                                         device="cpu", seed=0)
    assert fixed["epochs_run"] == 400 and not fixed["stopped_on_plateau"]
    assert early["stopped_on_plateau"] and early["epochs_run"] < 400 and early["epochs_run"] % 10 == 0
    # the run it stopped is the fixed run's beginning (same seed): its last window fell by less than 0.5%
    losses = [h["loss"] for h in fixed["loss_history"]]  # every other epoch (thinned to 200 points)
    assert early["loss_last"] == pytest.approx(losses[early["epochs_run"] // 2 - 1], abs=1e-5)
    assert _embedding_ari(z, labels) > 0.9 and _embedding_ari(z_fixed, labels) > 0.9


def test_has_edges_equals_a_dense_lookup_with_empty_and_long_rows():
    rng = np.random.default_rng(3)
    dense = rng.random((60, 60)) < 0.15
    dense[5, :] = dense[:, 5] = False  # an isolated node
    dense[7, :] = dense[:, 7] = True  # a node linked to all
    dense = dense | dense.T
    np.fill_diagonal(dense, False)
    graph = CSRGraph.from_scipy(sp.csr_matrix(dense.astype(np.float32)))
    assert graph.indices.dtype == np.int32
    src, dst = np.meshgrid(np.arange(60), np.arange(60), indexing="ij")
    np.testing.assert_array_equal(graph.has_edges(src.ravel(), dst.ravel()), dense.ravel())


@pytest.mark.parametrize("sample_first_layer", [False, True])
def test_features_on_disk_give_the_in_memory_embedding(sample_first_layer, tmp_path):
    g, _ = sbm([120, 120, 120], 0.1, 0.01, seed=4)
    graph = CSRGraph.from_scipy(g)
    x = np.random.default_rng(4).normal(3.0, 2.0, size=(360, 24)).astype(np.float32)
    cfg = GAEConfig(mode="minibatch", epochs=30, batch_size=64, epoch_cells=128, plateau_tol=0.0,
                    sample_first_layer=sample_first_layer)
    out = np.full((x.shape[0], cfg.latent), np.nan, np.float32)
    with cpu_threads(torch.device("cpu"), 1):
        z_memory, info_memory = graph_autoencoder.fit_gae(x, graph, cfg, device="cpu", seed=2)
        z_disk, info_disk = graph_autoencoder.fit_gae(x, graph, dataclasses.replace(cfg, memory_budget_mb=0),
                                                      device="cpu", seed=2, out=out)
    assert not info_memory["features_on_disk"] and info_disk["features_on_disk"] and z_disk is out
    assert info_disk["loss_last"] == pytest.approx(info_memory["loss_last"], rel=1e-5)
    np.testing.assert_allclose(z_disk, z_memory, rtol=1e-5, atol=1e-5)


def test_adjacency_rows_are_the_rows_of_the_normalised_adjacency():
    graph = CSRGraph.from_scipy(sbm([50, 50], 0.2, 0.02, seed=1)[0])
    full = normalized_adjacency(torch.from_numpy(graph.indptr), torch.from_numpy(graph.indices),
                                graph.n).to_dense().numpy()
    dinv = torch.from_numpy((graph.degree + 1).astype(np.float32)).rsqrt()
    for a, b in [(0, 1), (3, 40), (60, 100)]:
        block, cols = graph_autoencoder.adjacency_rows(graph, a, b, dinv)
        dense = np.zeros((b - a, graph.n), np.float32)
        dense[:, cols] = block.to_dense().numpy()
        np.testing.assert_array_equal(dense, full[a:b])


def test_features_on_disk_never_hold_the_whole_embedding(tmp_path, monkeypatch):
    import tracemalloc

    import zarr

    n, d = 60000, 128
    rng = np.random.default_rng(0)
    neighbours = rng.integers(n, size=(n, 6))
    g = sp.csr_matrix((np.ones(n * 6, np.float32), (np.repeat(np.arange(n), 6), neighbours.ravel())), shape=(n, n))
    g = (g + g.T).tocsr()
    g.setdiag(0)
    g.eliminate_zeros()
    graph = CSRGraph.from_scipy(g)
    x = zarr.create_array(tmp_path / "x.zarr", shape=(n, d), chunks=(1000, d), dtype=np.float32)
    x[:] = rng.normal(size=(n, d)).astype(np.float32)
    out = zarr.create_array(tmp_path / "z.zarr", shape=(n, 16), chunks=(1000, 16), dtype=np.float32)
    monkeypatch.setattr(graph_autoencoder, "BLOCK_ROWS", 1000)
    cfg = GAEConfig(mode="minibatch", epochs=2, batch_size=64, epoch_cells=256, memory_budget_mb=0)
    with cpu_threads(torch.device("cpu"), 1):  # as the stage trains; small torch ops on two threads crawl on a busy VM
        graph_autoencoder.fit_gae(x, graph, cfg, device="cpu", seed=0, out=out)  # lazy imports outside the trace
        tracemalloc.start()
        _, info = graph_autoencoder.fit_gae(x, graph, cfg, device="cpu", seed=0, out=out)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert info["features_on_disk"]
    assert peak < n * d * 4 / 4  # numpy's allocations: blocks and minibatches, never the N x d features
    z = out[:]
    assert np.isfinite(z).all() and z.std() > 0


def test_disk_rows_gather_in_windows_equals_numpy_take(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    table = rng.normal(size=(1000, 8)).astype(np.float32)
    rows = graph_autoencoder.DiskRows(tmp_path / "t.f32", table.shape)
    for a in range(0, 1000, 300):
        rows.write(a, table[a:a + 300])
    monkeypatch.setattr(graph_autoencoder, "MAP_WINDOW_BYTES", 64 * 8 * 4)  # windows of 64 rows
    mapped = []
    memmap = np.memmap

    def recording_memmap(*args, **kwargs):
        m = memmap(*args, **kwargs)
        mapped.append(m.shape[0])
        return m

    monkeypatch.setattr(graph_autoencoder.np, "memmap", recording_memmap)
    ids = np.r_[rng.integers(1000, size=500), [999, 0, 0, 63, 64]]  # unsorted, repeats, window edges
    np.testing.assert_array_equal(rows.take(ids), table[ids])
    assert mapped and max(mapped) <= 64  # no map of the whole file: only what the kernel may count resident
    np.testing.assert_array_equal(rows[100:437], table[100:437])
    assert rows.take(np.empty(0, np.int64)).shape == (0, 8)


def test_disk_rows_attach_to_an_existing_file_without_clearing_it(tmp_path):
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    graph_autoencoder.DiskRows(tmp_path / "t.f32", table.shape).write(0, table)
    attached = graph_autoencoder.DiskRows(tmp_path / "t.f32", table.shape, create=False)
    np.testing.assert_array_equal(attached.take(np.arange(10)), table)
    with pytest.raises(ValueError, match="not a float32 table"):
        graph_autoencoder.DiskRows(tmp_path / "t.f32", (11, 4), create=False)
