"""bench/compare_runs.py: two runs of one seed are identical, a run of another seed is not (exit 1, items named)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import planted_adata

from scgnn_scale import load_config, run

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compare_runs.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(seed: int):
    return load_config(overrides={
        "store": {"chunk_rows": 64, "chunk_genes": 64},  # several blocks of rows and genes
        "ingest": {"label_key": "label"},
        "ltmg": {"max_iter": 20},
        "feature": {"min_steps": 50, "max_steps": 50},
        "gae": {"epochs": 20},
        "runtime": {"n_workers": 1, "seed": seed},
    })


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    inp = d / "tiny.h5ad"
    planted_adata(n_cells=200, n_genes=120, n_types=3, seed=2).write_h5ad(inp)
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        out[name] = d / name
        run(str(inp), out[name], config=_config(seed), until="cluster", quiet=True)
    return out


def test_same_seed_is_identical(runs, capsys, tmp_path):
    compare_runs = _load_script()
    report_path = tmp_path / "report.json"
    # blocks of 50 rows: partial chunks of the stores' 64-row chunks
    rc = compare_runs.main([str(runs["a"]), str(runs["b"]), "--block-rows", "50", "--json", str(report_path)])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report["reasons"]
    assert report["identical"] and report["reasons"] == []
    assert json.loads(report_path.read_text())["identical"]
    items = report["items"]
    for name in ("obs/scgnn_cluster", "obsm/X_scgnn_feature", "obsm/X_scgnn", "layers/ltmg", "X", "obsp/scgnn_graph",
                 "raw/X", "obs_names", "var_names", "uns/metrics", "uns/stage_metrics/cluster"):
        assert items[name]["match"], (name, items[name])
    assert items["obsp/scgnn_graph"]["same_pattern"] and items["obs/scgnn_cluster"]["ari"] == 1.0
    assert items["X"]["n_values"] == items["X"]["shape"][0] * items["X"]["shape"][1]


def test_other_seed_is_not_identical(runs):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(runs["a"]), str(runs["other"])], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["identical"] and report["reasons"]
    named = {r.split(":")[0] for r in report["reasons"]}
    # the seed shapes the embeddings (and, from them, the graph); what differs is named with its numbers
    assert "obsm/X_scgnn_feature" in named, report["reasons"]
    item = report["items"]["obsm/X_scgnn_feature"]
    assert not item["allclose"] and item["max_abs_diff"] > 0 and item["n_not_close"] > 0
    # the input does not depend on the seed
    assert report["items"]["X"]["match"] and report["items"]["obs_names"]["match"]


def test_item_tolerance(runs, capsys):
    """--tol loosens one item (and what lies under it); the others keep the global tolerances."""
    compare_runs = _load_script()
    rc = compare_runs.main([str(runs["a"]), str(runs["other"]), "--no-work", "--tol", "obsm=1e9,1e9"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and report["tol"] == {"obsm": [1e9, 1e9]}
    assert report["items"]["obsm/X_scgnn_feature"]["match"] and report["items"]["obsm/X_scgnn"]["match"]
    assert not report["items"]["obsm/X_scgnn_feature"]["exact"]
    assert not any(k.startswith("work/") for k in report["items"])
