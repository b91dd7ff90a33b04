"""bench/bench_disk.dir_bytes counts a hard-linked file once, as du does, also across several roots."""

import importlib.util
import os
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_disk():
    spec = importlib.util.spec_from_file_location("bench_disk", BENCH / "bench_disk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_linked_file_counts_once_in_a_tree_and_across_roots(tmp_path):
    dir_bytes = _bench_disk().dir_bytes
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "shared").write_bytes(b"x" * 1000)
    os.link(tmp_path / "a" / "shared", tmp_path / "b" / "shared")
    (tmp_path / "b" / "own").write_bytes(b"y" * 10)
    assert dir_bytes(tmp_path) == 1010  # the whole tree: the linked file once
    assert dir_bytes(tmp_path / "b") == 1010  # a root alone counts what it holds
    seen = set()
    assert (dir_bytes(tmp_path / "a", seen), dir_bytes(tmp_path / "b", seen)) == (1000, 10)  # first root keeps it
