"""The whole method on two data-parallel ranks (gloo, CPU processes): started by --gpus, or by torchrun."""

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import SHORT_CONFIG, planted_adata

from scgnn_scale import read_run
from scgnn_scale.cli import main
from scgnn_scale.evaluate import clustering_metrics
from scgnn_scale.store import RunStore

TINY = SHORT_CONFIG + 'device = "cpu"\n'


def test_the_whole_method_on_two_ranks_gives_the_clusters_of_one(tmp_path):
    inp = tmp_path / "tiny.h5ad"
    planted_adata(n_cells=300, n_genes=120, n_types=3, seed=2).write_h5ad(inp)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}"
        assert main(["run", str(inp), "--out", str(out), "--config", str(cfg), "--label-key", "label", "--quiet",
                     "--gpus", str(ranks)]) == 0
        runs[ranks] = read_run(out)
    feature = RunStore.open(tmp_path / "ranks2").stage_info("feature")
    assert feature["ranks"] == 2 and feature["global_batch"] >= feature["batch_size"] * 2
    one, two = runs[1].obs["scgnn_cluster"], runs[2].obs["scgnn_cluster"]
    assert clustering_metrics(one, two)["ari"] > 0.95
    assert clustering_metrics(runs[2].obs["label"], two)["ari"] > 0.9


def test_torchrun_launches_the_same_run(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun comes with torch"
    inp = tmp_path / "tiny.h5ad"
    planted_adata(n_cells=200, n_genes=80, n_types=3, seed=3).write_h5ad(inp)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "run"
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "scgnn_scale.cli", "run",
                           str(inp), "--out", str(out), "--config", str(cfg), "--quiet", "--until", "gae"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data-parallel training on 2 ranks (gloo)" in proc.stderr
    store = RunStore.open(out)
    assert store.stage_info("feature")["ranks"] == 2 and store.stage_info("gae")["ranks"] == 2
