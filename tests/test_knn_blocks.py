"""The streamed recall and the blocked symmetrisation against references."""

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from scgnn_scale import cell_graph, knn


def _blobs(n=3000, d=16, centres=10, seed=0):
    """Planted Gaussian blobs whose centres (std 1) overlap the unit noise: parts cut through blobs."""
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 1.0, (centres, d))
    return (c[rng.integers(0, centres, n)] + rng.normal(0, 1.0, (n, d))).astype(np.float32)


def _as_zarr(x, path):
    arr = zarr.create_array(store=str(path), shape=x.shape, chunks=(256, x.shape[1]), dtype="float32")
    arr[:] = x
    return arr


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
