"""The streamed minibatch loader: coverage, alignment, determinism, memory vs streamed, bounded reads."""

import threading
import time

import numpy as np
import pytest
import zarr

from scgnn_scale.loader import BackgroundWriter, MinibatchLoader, iter_row_blocks

N, CHUNK = 203, 16


@pytest.fixture
def arrays(tmp_path):
    """X (float32, X[i, 0] = i) and T (uint8, T[i] = i % 251) chunked by 16 rows, as the store writes them."""
    x = zarr.create_array(tmp_path / "x.zarr", shape=(N, 5), chunks=(CHUNK, 3), dtype="float32")
    values = np.random.default_rng(0).random((N, 5), dtype=np.float32)
    values[:, 0] = np.arange(N)
    x[:] = values
    t = zarr.create_array(tmp_path / "t.zarr", shape=(N, 3), chunks=(CHUNK, 3), dtype="uint8")
    t[:] = np.repeat((np.arange(N) % 251)[:, None], 3, axis=1).astype(np.uint8)
    return x, t, values


class RecordingArray:
    """Wraps an array and records every row range read, to check reads are block-aligned."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype, self.chunks = arr, arr.shape, arr.dtype, arr.chunks
        self.reads = []

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self.arr[key]


class BrokenFrom(RecordingArray):
    """Fails every read that starts at row ``first_bad`` or later, as a disk that went away."""

    def __init__(self, arr, first_bad):
        super().__init__(arr)
        self.first_bad = first_bad

    def __getitem__(self, key):
        if key.start >= self.first_bad:
            raise OSError("disk gone")
        return super().__getitem__(key)


def _epoch(loader, epoch):
    return [(b.row_index.copy(), [p.copy() for p in b]) for b in loader.epoch(epoch)]


def test_every_row_once_per_epoch_and_aligned(arrays):
    x, t, values = arrays
    loader = MinibatchLoader([x, t], 24, seed=3, memory_budget_mb=0, buffer_blocks=3)
    assert loader.mode == "stream" and len(loader) == -(-N // 24)
    for epoch in range(2):
        batches = list(iter(loader))
        assert len(batches) == len(loader)
        rows = np.concatenate([b.row_index for b in batches])
        assert np.array_equal(np.sort(rows), np.arange(N))
        assert all(len(b.row_index) == 24 for b in batches[:-1]) and len(batches[-1].row_index) == N % 24
        for b in batches:
            assert b.epoch == epoch
            np.testing.assert_array_equal(b[0], values[b.row_index])
            np.testing.assert_array_equal(b[1][:, 0], b.row_index % 251)
        assert not np.array_equal(rows, np.arange(N))  # shuffled


def test_deterministic_per_seed_and_epoch(arrays):
    x, t, _ = arrays
    rows = lambda seed, epoch: np.concatenate(  # noqa: E731
        [b.row_index for b in MinibatchLoader([x, t], 20, seed=seed).epoch(epoch)])
    assert np.array_equal(rows(1, 0), rows(1, 0))
    assert not np.array_equal(rows(1, 0), rows(2, 0))
    assert not np.array_equal(rows(1, 0), rows(1, 1))


def _assert_same_batches(one, other, epochs=(0, 1)):
    for epoch in epochs:
        a, b = _epoch(one, epoch), _epoch(other, epoch)
        assert len(a) == len(b)
        for (ra, pa), (rb, pb) in zip(a, b, strict=True):
            assert np.array_equal(ra, rb)
            for u, v in zip(pa, pb, strict=True):
                np.testing.assert_array_equal(u, v)


def test_memory_and_streamed_give_the_same_batches(arrays):
    x, t, _ = arrays
    stream = MinibatchLoader([x, t], 32, seed=7, memory_budget_mb=0, prefetch=2)
    memory = MinibatchLoader([x, t], 32, seed=7, memory_budget_mb=100)
    assert stream.mode == "stream" and memory.mode == "memory"
    _assert_same_batches(stream, memory)


def test_streaming_reads_whole_aligned_blocks_and_mixes_a_few(arrays):
    x, _, _ = arrays
    rec = RecordingArray(x)
    loader = MinibatchLoader([rec], 10, seed=0, memory_budget_mb=0, buffer_blocks=2)
    first = next(iter(loader.epoch(0)))
    blocks_in_first = np.unique(first.row_index // CHUNK)
    assert len(blocks_in_first) <= 2  # rows of the first batch come from the first shuffle buffer only
    list(loader.epoch(0))
    for a, b in rec.reads:
        assert a % CHUNK == 0 and b - a <= CHUNK and (b == N or b - a == CHUNK)


def test_unshuffled_is_storage_order(arrays):
    x, _, values = arrays
    batches = list(MinibatchLoader([x], 50, seed=0, shuffle=False).epoch(0))
    np.testing.assert_array_equal(np.concatenate([b.row_index for b in batches]), np.arange(N))
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), values)


def test_drop_last(arrays):
    x, _, _ = arrays
    loader = MinibatchLoader([x], 50, seed=0, drop_last=True)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == N // 50 and all(len(b.row_index) == 50 for b in batches)


def test_breaking_early_stops_the_prefetch_thread(arrays):
    x, t, _ = arrays
    loader = MinibatchLoader([x, t], 8, seed=0, memory_budget_mb=0, prefetch=1)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert not [th for th in threading.enumerate() if th.name == "scgnn-prefetch"]


def test_read_errors_reach_the_consumer(arrays):
    x, _, _ = arrays

    with pytest.raises(OSError, match="disk gone"):
        list(MinibatchLoader([BrokenFrom(x, 3 * CHUNK)], 8, seed=0, shuffle=False, memory_budget_mb=0).epoch(0))


def test_arrays_must_share_rows(arrays, tmp_path):
    x, _, _ = arrays
    other = zarr.create_array(tmp_path / "o.zarr", shape=(N - 1, 2), chunks=(CHUNK, 2), dtype="float32")
    with pytest.raises(ValueError):
        MinibatchLoader([x, other], 8, seed=0)


def test_iter_row_blocks_in_order(arrays):
    x, _, values = arrays
    for prefetch in (0, 2):
        blocks = list(iter_row_blocks(x, 40, prefetch=prefetch))
        assert [(a, b) for a, b, _ in blocks] == [(s, min(s + 40, N)) for s in range(0, N, 40)]
        np.testing.assert_array_equal(np.concatenate([v for _, _, v in blocks]), values)
    default = list(iter_row_blocks(x))
    assert [b - a for a, b, _ in default][:-1] == [CHUNK] * (len(default) - 1)
    part = list(iter_row_blocks(values, 16, start=20, stop=70))
    assert [(a, b) for a, b, _ in part] == [(20, 32), (32, 48), (48, 64), (64, 70)]


def test_a_subset_of_rows_reads_only_its_blocks(arrays):
    x, t, values = arrays
    subset = np.r_[3, 5, 40:60, 199, 200]  # blocks 0, 2, 3, 12
    rec = RecordingArray(x)
    stream = MinibatchLoader([rec, t], 7, seed=2, memory_budget_mb=0, rows=subset[::-1])
    memory = MinibatchLoader([x, t], 7, seed=2, memory_budget_mb=100, rows=subset)
    assert len(stream) == -(-len(subset) // 7) and stream.n_selected == len(subset)
    got = list(stream.epoch(0))
    assert sorted(np.concatenate([b.row_index for b in got])) == sorted(subset)
    for b in got:
        np.testing.assert_array_equal(b[0], values[b.row_index])
        np.testing.assert_array_equal(b[1][:, 0], b.row_index % 251)
    assert sorted({a // CHUNK for a, _ in rec.reads}) == [0, 2, 3, 12]
    for b1, b2 in zip(got, memory.epoch(0), strict=True):
        assert np.array_equal(b1.row_index, b2.row_index)
        np.testing.assert_array_equal(b1[0], b2[0])
    with pytest.raises(ValueError):
        MinibatchLoader([x], 4, seed=0, rows=[N])


def test_parallel_block_reads_give_the_same_batches(arrays):
    x, t, _ = arrays
    one = MinibatchLoader([x, t], 24, seed=5, memory_budget_mb=0, read_threads=1)
    four = MinibatchLoader([x, t], 24, seed=5, memory_budget_mb=0, read_threads=4, prefetch=3)
    _assert_same_batches(one, four)


def test_parallel_reads_stop_on_break_and_pass_errors_on(arrays):
    x, _, _ = arrays
    loader = MinibatchLoader([x], 8, seed=0, memory_budget_mb=0, read_threads=3)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert not [th for th in threading.enumerate() if th.name.startswith(("scgnn-prefetch", "scgnn-read"))]

    with pytest.raises(OSError, match="disk gone"):
        list(MinibatchLoader([BrokenFrom(x, 5 * CHUNK)], 8, seed=0, shuffle=False, memory_budget_mb=0, read_threads=3).epoch(0))


def test_background_writer_writes_in_order_and_bounds_the_pending():
    out = []

    def slow_write(i):
        time.sleep(0.01)
        out.append(i)

    with BackgroundWriter(depth=2) as writer:
        for i in range(20):
            writer.submit(slow_write, i)
            assert i + 1 - len(out) <= 2  # submitted but not yet written: at most depth
    assert out == list(range(20))


def test_background_writer_raises_a_failed_write():
    def write(i):
        if i == 3:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter(depth=1) as writer:
            for i in range(10):
                writer.submit(write, i)
