"""One run per directory: a second run on a directory in use is refused; a killed run's lock is gone."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import planted_adata

from scgnn_scale.cli import main


def _finished(out) -> set:
    try:
        return set(json.loads((out / "manifest.json").read_text())["stages"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return set()


def _args(inp, out, *extra):
    return ["run", str(inp), "--out", str(out), "--quiet", "--feature-min-steps", "3000", *extra]


def test_a_second_run_on_a_directory_in_use_is_refused_and_a_killed_runs_lock_released(tmp_path, capsys):
    inp = tmp_path / "in.h5ad"
    planted_adata(n_cells=200, n_genes=80).write_h5ad(inp)
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "scgnn_scale.cli", *_args(inp, out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and "ltmg" not in _finished(out):
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.1)
        assert main(_args(inp, out)) == 2
        err = capsys.readouterr().err
        assert "another scgnn-scale run is using this directory" in err and f"pid {first.pid}" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert (out / "run.log").read_text().count(" INFO run ") == 1  # the refused run did not even log
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the kernel released the killed run's lock: the same command resumes
    assert main(_args(inp, out, "--until", "ltmg")) == 0


def test_a_run_stopped_by_a_bad_input_does_not_block_the_corrected_one(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("gene,c1,c2\ng1,1,x\n")
    out = tmp_path / "run"
    assert main(["run", str(bad), "--out", str(out), "--quiet"]) == 2
    capsys.readouterr()
    good = tmp_path / "good.h5ad"
    planted_adata(n_cells=60, n_genes=40).write_h5ad(good)
    assert main(["run", str(good), "--out", str(out), "--quiet", "--until", "preprocess"]) == 0


def test_out_under_a_file_is_an_input_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    inp = tmp_path / "in.h5ad"
    planted_adata(n_cells=30, n_genes=20).write_h5ad(inp)
    assert main(["run", str(inp), "--out", str(blocker / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot create the run directory" in err and "Traceback" not in err
