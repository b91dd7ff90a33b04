"""The 'blocks' KNN backend, the streamed recall and the blocked symmetrisation against references."""

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from scgnn_scale import cell_graph, knn, knn_blocks
from scgnn_scale.config import GraphConfig, build_config
from scgnn_scale.errors import InputError
from scgnn_scale.keys import FIRST_PASS
from scgnn_scale.stages import graph as graph_stage
from scgnn_scale.testing import stage_context, store_with_matrix


def _blobs(n=3000, d=16, centres=10, seed=0):
    """Planted Gaussian blobs whose centres (std 1) overlap the unit noise: parts cut through blobs."""
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 1.0, (centres, d))
    return (c[rng.integers(0, centres, n)] + rng.normal(0, 1.0, (n, d))).astype(np.float32)


def _as_zarr(x, path):
    arr = zarr.create_array(store=str(path), shape=x.shape, chunks=(256, x.shape[1]), dtype="float32")
    arr[:] = x
    return arr


def _overlap(found, truth):
    return np.mean([len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)])


def _check_contract(x, idx, dist, k):
    n = x.shape[0]
    assert idx.shape == (n, k) and dist.shape == (n, k)
    assert idx.dtype == np.int64 and dist.dtype == np.float32
    assert not (idx == np.arange(n)[:, None]).any()
    assert all(len(set(row)) == k for row in idx.tolist())
    step = np.diff(dist, axis=1)
    assert (step >= 0).all() and (np.diff(idx, axis=1)[step == 0] > 0).all()  # by distance, then index
    exact = np.linalg.norm(x[idx].astype(np.float64) - x[:, None, :].astype(np.float64), axis=2)
    np.testing.assert_allclose(dist, exact, rtol=1e-6)


def test_blocks_recall_contract_and_determinism(tmp_path):
    x = _blobs()
    cfg = GraphConfig(block_cells=500)
    arr = _as_zarr(x, tmp_path / "emb.zarr")
    idx, dist, info = knn_blocks.knn_blocks(arr, 10, cfg, seed=1, scratch_dir=tmp_path)
    assert info["n_parts"] >= 6 and info["part_cells_max"] <= 3 * 500  # several parts, bounded
    _check_contract(x, idx, dist, 10)
    truth, _ = knn.knn_exact(x, 10)
    assert _overlap(idx, truth) >= 0.95
    assert (idx == truth).all(axis=1).mean() < 1.0  # the parts do miss some neighbours: the check can fail
    again, again_dist, _ = knn_blocks.knn_blocks(x, 10, cfg, seed=1)  # numpy input: the same graph
    np.testing.assert_array_equal(idx, again)
    np.testing.assert_array_equal(dist, again_dist)
    assert list(tmp_path.iterdir()) == [tmp_path / "emb.zarr"]  # scratch removed


def test_blocks_below_three_parts_is_one_exact_part():
    x = _blobs(1000)
    idx, dist, info = knn_blocks.knn_blocks(x, 10, GraphConfig(block_cells=500), seed=0)  # 2 parts
    assert info["n_parts"] == 1
    truth, truth_dist = knn.knn_exact(x, 10)
    # the same neighbours and distances; knn_exact orders float32 ties by their float64 distances
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(truth, axis=1))
    np.testing.assert_array_equal(dist, truth_dist)


def test_blocks_parts_stay_bounded_with_a_dominant_cluster():
    # 70% of the cells in one blob: plain k-means gave a part of 1,001 home cells and 1,063 second-nearest
    # ones (2,064 > 3 x 400); its large parts are split and its guests capped
    rng = np.random.default_rng(0)
    labels = rng.choice(10, 4000, p=np.r_[0.7, np.full(9, 0.3 / 9)])
    x = (rng.normal(0, 2.0, (10, 32))[labels] + rng.normal(0, 1, (4000, 32))).astype(np.float32)
    idx, _, info = knn_blocks.knn_blocks(x, 10, GraphConfig(block_cells=400), seed=0)
    assert info["part_cells_max"] <= 3 * 400 and info["n_parts"] > 10
    assert _overlap(idx, knn.knn_exact(x, 10)[0]) >= 0.8  # an isotropic 32-d blob cut in pieces loses some


@pytest.mark.slow  # pynndescent's numba compilation in this process
def test_blocks_with_pynndescent_parts():
    x = _blobs(4000, d=32)
    cfg = GraphConfig(block_cells=600, exact_max_cells=0, n_jobs=2)
    idx, dist, _ = knn_blocks.knn_blocks(x, 10, cfg, seed=3)
    _check_contract(x, idx, dist, 10)
    assert _overlap(idx, knn.knn_exact(x, 10)[0]) >= 0.95
    np.testing.assert_array_equal(idx, knn_blocks.knn_blocks(x, 10, cfg, seed=3)[0])


def test_blocks_refuses_non_finite_embedding():
    x = _blobs(2000)
    x[1234, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        knn_blocks.knn_blocks(x, 10, GraphConfig(block_cells=500), seed=0)


def test_merge_nearest_counts_a_neighbour_found_twice_once():
    best_idx = np.full((2, 3), -1, np.int64)
    best_dist = np.full((2, 3), np.inf, np.float32)
    cells = np.array([0, 1])
    knn_blocks.merge_nearest(best_idx, best_dist, cells, np.array([[5, 7], [2, 3]]),
                             np.array([[1.0, 2.0], [0.5, 0.7]], np.float32))
    knn_blocks.merge_nearest(best_idx, best_dist, cells, np.array([[7, 4], [9, 8]]),
                             np.array([[2.0, 2.0], [0.6, 0.6]], np.float32))
    np.testing.assert_array_equal(best_idx, [[5, 4, 7], [2, 8, 9]])  # 7 once; ties by index
    np.testing.assert_array_equal(best_dist, np.float32([[1.0, 2.0, 2.0], [0.5, 0.6, 0.6]]))


def test_streamed_recall_equals_in_memory_recall(tmp_path):
    x = _blobs(1500)
    idx, _ = knn.knn_exact(x, 10)
    broken = idx.copy()
    broken[:, 6:] = (broken[:, 6:] + 1) % 1500
    arr = _as_zarr(x, tmp_path / "emb.zarr")
    expected = knn.knn_recall(x, broken, sample=200, seed=4)
    assert 0.5 < expected < 0.7
    assert knn.knn_recall_streamed(arr, broken, sample=200, seed=4, block_rows=97) == expected
    rows = np.sort(np.random.default_rng(0).choice(1500, 50, replace=False))
    np.testing.assert_array_equal(knn.streamed_neighbours_of(arr, rows, 10, block_rows=97), idx[rows])


def _scipy_union(indices, keep, n):
    """symmetric_graph as it was: scipy's directed.maximum(directed.T)."""
    counts = keep.sum(axis=1)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    directed = sp.csr_matrix((np.ones(int(indptr[-1]), np.float32), indices[keep].astype(np.int64), indptr),
                             shape=(n, n))
    graph = directed.maximum(directed.T).tocsr()
    graph.setdiag(0)
    graph.eliminate_zeros()
    graph.sort_indices()
    return graph


@pytest.mark.parametrize("n,k,block_rows", [(50, 5, 7), (1000, 10, 100), (3000, 12, 1 << 18)])
def test_blocked_symmetric_graph_equals_scipy_union(n, k, block_rows):
    rng = np.random.default_rng(n)
    indices = rng.integers(0, n, (n, k))
    indices[::7, 0] = np.arange(0, n, 7)  # self edges and repeated neighbours occur too
    keep = rng.random((n, k)) < 0.8
    graph = cell_graph.symmetric_graph(indices, keep, n, block_rows=block_rows)
    graph.check_format(full_check=True)
    reference = _scipy_union(indices, keep, n)
    assert graph.indptr.dtype == np.int64 and graph.indices.dtype == np.int64 and graph.data.dtype == np.float32
    np.testing.assert_array_equal(graph.indptr, reference.indptr)
    np.testing.assert_array_equal(graph.indices, reference.indices)
    assert (graph.data == 1.0).all() and graph.has_sorted_indices


def test_auto_picks_blocks_only_above_the_memory_budget():
    cfg = GraphConfig(memory_budget_mb=1)
    assert cell_graph.choose_method(cfg, 5000, cuda=True, embedding_bytes=(1 << 20) + 1) == "blocks"
    assert cell_graph.choose_method(cfg, 5000, cuda=False, embedding_bytes=1 << 20) == "exact"
    assert cell_graph.choose_method(cfg, 50000, cuda=True, embedding_bytes=1 << 20) == "torch"
    assert cell_graph.choose_method(GraphConfig(), 10**6, cuda=False, embedding_bytes=10**6 * 512) == "pynndescent"


def test_graph_stage_with_blocks(tmp_path):
    x = _blobs()
    store = store_with_matrix(tmp_path / "run", np.ones((x.shape[0], 3), np.float32))
    with store.staging("feature") as st:
        st.write_elem(FIRST_PASS.feature_embedding, x)
    config = build_config({"graph": {"method": "blocks", "block_cells": 500}, "pca": {"n_comps": 0}})
    info = graph_stage.run(stage_context(store, "graph", config))
    graph = store.read_elem(FIRST_PASS.graph)
    assert info["method"] == "blocks" and info["n_parts"] >= 6 and info["recall"] >= 0.95
    assert graph.shape == (3000, 3000) and graph.indices.dtype == np.int64 and (graph != graph.T).nnz == 0
    exact, _ = cell_graph.knn_graph(x, GraphConfig(method="exact"), device="cpu")
    shared = exact.multiply(graph).nnz
    assert shared >= 0.95 * exact.nnz and info["n_edges"] == graph.nnz // 2
