"""What the machine causes ends in one line too: a full disk, --out inside the input."""

import json
import shutil
import subprocess
import uuid

import pytest
from conftest import planted_adata

from scgnn_scale.cli import main


@pytest.fixture
def tiny_disk(tmp_path):
    """A 400 KB tmpfs (root can mount one; elsewhere the test cannot make a full disk and says so)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_finished_stages(tmp_path, tiny_disk, capsys):
    inp = tmp_path / "in.h5ad"
    planted_adata(n_cells=300, n_genes=200).write_h5ad(inp)
    out = tiny_disk / "run"
    code = main(["run", str(inp), "--out", str(out), "--quiet", "--until", "feature", "--feature-min-steps", "20"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "No space left on device" in err and str(out) in err
    finished = set(json.loads((out / "manifest.json").read_text())["stages"])
    assert "ingest" in finished and "feature" not in finished  # what finished is kept for the rerun
    # with room again (the run moved to a real disk) the same command resumes and finishes
    moved = tmp_path / "run"
    shutil.copytree(out, moved)
    assert main(["run", str(inp), "--out", str(moved), "--quiet", "--until", "feature",
                 "--feature-min-steps", "20"]) == 0


def test_out_inside_a_directory_input_is_refused(tmp_path, capsys):
    store = tmp_path / "input.zarr"
    planted_adata(n_cells=40, n_genes=30).write_zarr(store)
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    assert main(["run", str(store), "--out", str(store / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "lies inside the input" in err and "Traceback" not in err
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before  # nothing written into the input
