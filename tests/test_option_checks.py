"""Every bad option is refused before work starts: one line, exit 2, no run directory."""

import json
import time

import pytest
from conftest import planted_adata

from scgnn_scale.cli import main
from scgnn_scale.config import BOUNDS, build_config


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "in.h5ad"
    planted_adata(n_cells=40, n_genes=30).write_h5ad(path)
    return path


@pytest.mark.parametrize("flag, value, option", [
    ("--graph-k", "-3", "graph.k"),
    ("--seed", "-1", "runtime.seed"),
    ("--store-chunk-rows", "0", "store.chunk_rows"),
    ("--n-workers", "-1", "runtime.n_workers"),
    ("--feature-batch-size", "0", "feature.batch_size"),
    ("--cluster-resolution", "-1", "cluster.resolution"),
    ("--preprocess-min-cell-fraction", "1.5", "preprocess.min_cell_fraction"),
])
def test_out_of_range_options_are_refused_before_any_work(small_input, tmp_path, capsys, flag, value, option):
    out = tmp_path / "run"
    assert main(["run", str(small_input), "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err and "out of range" in err and "Traceback" not in err
    assert not out.exists()


def test_every_default_is_in_range_and_the_bounds_name_real_options():
    build_config({})  # the defaults pass their own checks
    from scgnn_scale.config import config_fields

    assert set(BOUNDS) <= {f"{s}.{f.name}" for s, f in config_fields()}


def test_an_unknown_device_is_refused_before_any_work(small_input, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(small_input), "--out", str(out), "--device", "tpu7"]) == 2
    assert "--device tpu7" in capsys.readouterr().err and not out.exists()


def test_more_neighbours_than_cells_stops_right_after_preprocessing(small_input, tmp_path, capsys):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(["run", str(small_input), "--out", str(out), "--graph-k", "50", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "graph.k = 50" in err and "40 are left after preprocessing" in err
    finished = set(json.loads((out / "manifest.json").read_text())["stages"])
    assert finished == {"ingest", "preprocess"}  # the feature autoencoder never trained
    assert time.perf_counter() - t0 < 60


def test_a_nul_byte_in_the_temporary_directory_names_the_option():
    """Found by tests/test_fuzz.py: a NUL byte in ingest.tmp_dir was reported against the input file."""
    from scgnn_scale.config import build_config
    from scgnn_scale.errors import InputError

    with pytest.raises(InputError, match=r"config option ingest.tmp_dir '\\x00': a path cannot hold a NUL byte"):
        build_config({"ingest": {"tmp_dir": "\x00"}})
