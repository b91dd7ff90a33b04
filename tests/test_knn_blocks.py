"""The streamed recall against the in-memory one."""

import numpy as np
import zarr

from scgnn_scale import knn


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
