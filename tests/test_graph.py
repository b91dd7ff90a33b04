"""KNN backends, pruning rules and the graph stage against dense references."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist

from scgnn_scale import cell_graph, knn
from scgnn_scale.config import GraphConfig, build_config
from scgnn_scale.errors import InputError
from scgnn_scale.keys import FIRST_PASS
from scgnn_scale.stages import graph as graph_stage
from scgnn_scale.testing import stage_context, store_with_matrix

#: the stores here hold an embedding, no counts: the graph of the feature embedding alone (no pca stage)
FEATURE_ALONE = build_config({"pca": {"n_comps": 0}})


def _blobs(n, d, centres, seed=0, spread=1.0, scale=4.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, centres, n)
    c = rng.normal(0, scale, (centres, d))
    return (c[labels] + rng.normal(0, spread, (n, d))).astype(np.float32), labels


def _brute_force(x, k):
    d = cdist(x.astype(np.float64), x.astype(np.float64))
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, 1)


def test_exact_knn_equals_brute_force(rng):
    x = rng.normal(size=(400, 12)).astype(np.float32)
    ref_idx, ref_dist = _brute_force(x, 10)
    idx, dist = knn.knn_exact(x, 10, block_bytes=40_000)  # several blocks
    assert idx.dtype == np.int64 and dist.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5)


def test_torch_knn_equals_brute_force(rng):
    x = rng.normal(size=(300, 8)).astype(np.float32)
    ref_idx, ref_dist = _brute_force(x, 7)
    idx, dist = knn.knn_torch(x, 7, device="cpu", query_block=64, block_bytes=4 * 64 * 100)  # 100-row reference blocks
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5)


def test_torch_knn_grouped_selection_equals_brute_force(rng):
    # 2,500-column reference blocks: wide enough for smallest_k's grouped path, with a ragged last group
    # (ties are smallest_k's test below: with tied neighbours any of them is an exact answer)
    x = rng.normal(size=(2500, 6)).astype(np.float32)
    ref_idx, ref_dist = _brute_force(x, 10)
    idx, dist = knn.knn_torch(x, 10, device="cpu", query_block=500)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width,k,group", [(5000, 7, 32), (4999, 18, 16), (300, 5, 32), (1000, 1, 8)])
def test_smallest_k_is_topk(width, k, group):
    import torch

    gen = torch.Generator().manual_seed(width)
    d = torch.randint(0, 50, (40, width), generator=gen).float()  # many ties
    d[3] = torch.inf
    d[3, :k] = 0.0
    values, cols = knn.smallest_k(d, k, group=group)
    expect = torch.topk(d, k, dim=1, largest=False).values
    torch.testing.assert_close(values.sort(1).values, expect.sort(1).values)
    torch.testing.assert_close(torch.gather(d, 1, cols), values)  # the columns hold those values
    assert all(len(set(r.tolist())) == k for r in cols)


def test_exact_knn_never_returns_self_with_duplicate_cells(rng):
    x = rng.normal(size=(50, 4)).astype(np.float32)
    x[10] = x[3]  # two identical cells: each is the other's nearest, at distance 0
    idx, dist = knn.knn_exact(x, 5)
    assert not (idx == np.arange(50)[:, None]).any()
    assert idx[3, 0] == 10 and idx[10, 0] == 3 and dist[3, 0] == 0


def test_strip_self_wherever_it_is():
    ind = np.array([[0, 5, 6, 7], [4, 1, 6, 7], [3, 4, 5, 6]])
    dist = np.arange(12, dtype=np.float32).reshape(3, 4)
    out, d = knn._strip_self(ind, dist, 3)
    np.testing.assert_array_equal(out, [[5, 6, 7], [4, 6, 7], [3, 4, 5]])  # row 2: self absent, farthest dropped
    np.testing.assert_array_equal(d, [[1, 2, 3], [4, 6, 7], [8, 9, 10]])


@pytest.mark.slow  # pynndescent's numba compilation: ~1-2 min of CPU per process, not cached across processes
def test_pynndescent_recall_on_blobs_and_determinism():
    x, _ = _blobs(3000, 32, 10, spread=1.0, scale=1.0)
    idx, dist = knn.knn_pynndescent(x, 10, n_neighbors=30, n_jobs=2, seed=3)
    assert idx.shape == (3000, 10)
    assert not (idx == np.arange(3000)[:, None]).any()
    assert (np.diff(dist, axis=1) >= 0).all()
    recall = knn.knn_recall(x, idx, sample=3000)
    assert recall >= 0.9, recall
    again, _ = knn.knn_pynndescent(x, 10, n_neighbors=30, n_jobs=2, seed=3)
    np.testing.assert_array_equal(idx, again)


def test_knn_recall_counts_misses(rng):
    x = rng.normal(size=(200, 5)).astype(np.float32)
    idx, _ = knn.knn_exact(x, 10)
    assert knn.knn_recall(x, idx, sample=200) == 1.0
    broken = idx.copy()
    broken[:, 5:] = (broken[:, 5:] + 1) % 200  # half the neighbours replaced (almost always wrong)
    assert 0.4 < knn.knn_recall(x, broken, sample=200) < 0.6
    # in blocks of a few query rows (what bounds its memory at 1M cells) the count is the same
    assert knn.knn_recall(x, broken, sample=200, block_bytes=12 * 200 * 7) == knn.knn_recall(x, broken, sample=200)


def test_prune_std_equals_dense_reference(rng):
    dist = np.sort(rng.gamma(3.0, 1.0, (500, 10)), axis=1).astype(np.float32)
    keep = knn.prune_std(dist)
    for i in range(500):  # the published per-cell loop
        d = dist[i].astype(np.float64)
        boundary = np.mean(d) + np.std(d)
        np.testing.assert_array_equal(keep[i], d <= boundary)
    assert keep[:, 0].all() and not keep.all()


def test_prune_isolation_forest_equals_forest_prediction(rng):
    dist = np.sort(rng.gamma(3.0, 1.0, (3000, 10)), axis=1).astype(np.float32)
    dist[:50, -1] *= 4  # a few planted far neighbours
    keep = knn.prune_isolation_forest(dist, seed=1, fit_sample=5000)
    # reference: the same pooled forest asked directly for every standardised distance
    forest, z = knn._pooled_forest(dist, seed=1, n_estimators=100, max_samples=256, fit_sample=5000)
    outlier = forest.predict(z.reshape(-1, 1)).reshape(z.shape) == -1
    expected = ~(outlier & (z > 0))
    expected[:, 0] = True
    np.testing.assert_array_equal(keep, expected)
    assert not keep[:50, -1].any()  # the planted far neighbours go
    assert keep.mean() > 0.5


def test_symmetric_graph_is_the_union_of_kept_edges(rng):
    x = rng.normal(size=(120, 6)).astype(np.float32)
    g, info = cell_graph.knn_graph(x, GraphConfig(k=5, method="exact"), device="cpu")
    assert g.indptr.dtype == np.int64 and g.indices.dtype == np.int64 and g.dtype == np.float32
    assert (g != g.T).nnz == 0
    assert g.diagonal().sum() == 0
    assert set(np.unique(g.data)) == {1.0}
    idx, dist = knn.knn_exact(x, 5)
    keep = knn.prune_std(dist)
    dense = np.zeros((120, 120))
    rows = np.repeat(np.arange(120), 5)
    dense[rows[keep.ravel()], idx[keep]] = 1
    dense = np.maximum(dense, dense.T)
    np.testing.assert_array_equal(g.toarray(), dense)
    assert info["n_edges"] == int(dense.sum() // 2)
    assert info["mean_degree"] == pytest.approx(dense.sum() / 120, abs=1e-3)


def test_graph_auto_method_and_pruning_options(rng):
    x = rng.normal(size=(80, 4)).astype(np.float32)
    assert cell_graph.choose_method(GraphConfig(), 80, cuda=False) == "exact"
    assert cell_graph.choose_method(GraphConfig(exact_max_cells=10), 80, cuda=False) == "pynndescent"
    assert cell_graph.choose_method(GraphConfig(exact_max_cells=10), 80, cuda=True) == "torch"
    g_none, info_none = cell_graph.knn_graph(x, GraphConfig(k=6, prune="none"), device="cpu")
    g_std, _ = cell_graph.knn_graph(x, GraphConfig(k=6, prune="std"), device="cpu")
    g_if, _ = cell_graph.knn_graph(x, GraphConfig(k=6, prune="isolation_forest"), device="cpu")
    assert info_none["kept_fraction"] == 1.0
    assert g_std.nnz < g_none.nnz and g_if.nnz <= g_none.nnz
    assert (g_std - g_std.multiply(g_none)).nnz == 0  # pruning only removes edges


def _run_with_embedding(tmp_path, emb, config=None):
    store = store_with_matrix(tmp_path / "run", np.ones((emb.shape[0], 3), np.float32))
    with store.staging("feature") as st:
        st.write_elem(FIRST_PASS.feature_embedding, emb)
    return store


def test_graph_stage_writes_symmetric_csr(tmp_path):
    emb, _ = _blobs(200, 16, 3)
    store = _run_with_embedding(tmp_path, emb)
    info = graph_stage.run(stage_context(store, "graph", FEATURE_ALONE))
    g = store.read_elem(FIRST_PASS.graph)
    assert sp.issparse(g) and g.shape == (200, 200)
    assert g.indptr.dtype == np.int64 and g.dtype == np.float32
    assert (g != g.T).nnz == 0
    assert info["method"] == "exact" and info["recall"] == 1.0
    assert info["n_edges"] == g.nnz // 2 and info["mean_degree"] > 5


def test_graph_stage_refuses_too_few_cells(tmp_path):
    store = _run_with_embedding(tmp_path, np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
    with pytest.raises(InputError, match="too few"):
        graph_stage.run(stage_context(store, "graph", build_config({"graph": {"k": 10}, "pca": {"n_comps": 0}})))
