"""What a new user meets: the summary at the end of a run, labels as metadata, uns['scgnn'] as mappings,
``evaluate --labels``, the scanpy-style ``tl.scgnn``, logging and progress outside a terminal."""

import logging
import os
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import planted_counts

import scgnn_scale
from scgnn_scale.cli import main
from scgnn_scale.evaluate import clustering_metrics
from scgnn_scale.progress import LogProgress
from scgnn_scale.store import RunStore

QUICK = """
[feature]
min_steps = 150
iter_steps = 50
[gae]
epochs = 100
[iterate]
max_iterations = 1
cluster_steps = 50
[impute]
steps = 50
[ltmg]
max_iter = 30
[runtime]
n_workers = 1
"""
QUICK_OPTIONS = {"feature_min_steps": 150, "feature_iter_steps": 50, "gae_epochs": 100, "iterate_max_iterations": 1,
                 "iterate_cluster_steps": 50, "impute_steps": 50, "ltmg_max_iter": 30, "n_workers": 1}


def _planted_adata(n_cells=240, n_genes=150, n_types=3, seed=1, empty_cells=()):
    counts, labels = planted_counts(n_cells=n_cells, n_genes=n_genes, n_types=n_types, seed=seed)
    counts[list(empty_cells)] = 0  # preprocessing removes cells without counts
    adata = anndata.AnnData(X=sp.csr_matrix(counts))
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    adata.obs["label"] = pd.Categorical([f"type{t}" for t in labels])
    return adata


@pytest.fixture(scope="module")
def quick_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("quick")
    path = d / "planted.h5ad"
    _planted_adata().write_h5ad(path)
    cfg = d / "quick.toml"
    cfg.write_text(QUICK)
    return path, cfg


def _stages_started(caplog) -> set[str]:
    return {m.split(":")[0] for m in (r.getMessage() for r in caplog.records) if m.endswith(": started")}


@pytest.fixture(scope="module")
def finished_without_labels(quick_input, tmp_path_factory):
    """A whole run of the planted atlas with no --label-key."""
    inp, cfg = quick_input
    out = tmp_path_factory.mktemp("runs") / "nolabels"
    assert main(["run", str(inp), "--out", str(out), "--config", str(cfg), "--quiet"]) == 0
    return out


def test_label_key_added_later_redoes_no_stage_and_scores_the_final_clusters(finished_without_labels, quick_input,
                                                                             caplog):
    inp, cfg = quick_input
    out = finished_without_labels
    assert "label" not in scgnn_scale.read_run(out).obs.columns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scgnn_scale"):
        assert main(["run", str(inp), "--out", str(out), "--config", str(cfg), "--quiet", "--label-key", "label"]) == 0
    assert _stages_started(caplog) == set()
    adata = scgnn_scale.read_run(out)
    source = anndata.read_h5ad(inp)
    assert list(adata.obs["label"].astype(str)) == list(source.obs.loc[adata.obs_names, "label"].astype(str))
    metrics = adata.uns["scgnn"]["metrics"]
    expected = clustering_metrics(adata.obs["label"], adata.obs["scgnn_cluster"])
    assert metrics["ari"] == pytest.approx(expected["ari"]) and metrics["label_key"] == "label"
    assert metrics["ari"] > 0.8  # the planted types are found
    # the summary at the end names the clusters, the score, the imputation, the times and how to open it
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("finished "))
    assert f"clusters: {metrics['n_clusters']} " in summary
    assert f"ARI {metrics['ari']:.3f}" in summary and "layers['imputed']" in summary
    assert "time: stages" in summary and "peak memory" in summary and "counts of every input gene: .raw" in summary
    assert f"scgnn_scale.read_run('{out}')" in summary


def test_uns_holds_mappings_with_the_final_metrics(finished_without_labels):
    uns = scgnn_scale.read_run(finished_without_labels).uns["scgnn"]
    assert uns["config"]["graph"]["k"] == 10  # a mapping, not a JSON string
    assert set(uns["timings"]) >= {"ingest", "feature", "iterate", "impute"}
    assert isinstance(uns["stages"]["iterate"], dict) and "iterations" in uns["stages"]["iterate"]
    assert "seconds" not in uns["metrics"]  # the metrics of the final clusters, not a stage's fields
    obs = scgnn_scale.read_run(finished_without_labels).obs
    assert uns["metrics"]["n_clusters"] == obs["scgnn_cluster"].nunique()
    assert sum(uns["metrics"]["cluster_sizes"].values()) == len(obs)
    assert not (finished_without_labels / "staging").exists()  # no empty staging/ left behind
    raw = scgnn_scale.read_run(finished_without_labels).raw  # the counts of all genes, lazily
    assert raw.shape == (len(obs), 150) and list(raw.obs_names) == list(obs.index)


def test_evaluate_takes_labels_from_a_file(finished_without_labels, tmp_path, capsys):
    out = tmp_path / "run"
    import shutil

    shutil.copytree(finished_without_labels, out)
    obs = scgnn_scale.read_run(out).obs
    truth = pd.Series(["type" + str(hash(c) % 2) for c in obs.index], index=obs.index)
    labels_file = tmp_path / "labels.tsv"
    truth.rename("cell_type").to_frame().to_csv(labels_file, sep="\t", index_label="cell")
    assert main(["evaluate", str(out), "--labels", str(labels_file), "--label-key", "cell_type"]) == 0
    printed = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    expected = clustering_metrics(truth.to_numpy(), obs["scgnn_cluster"].to_numpy())
    assert float(printed["ari"]) == pytest.approx(expected["ari"])
    assert list(scgnn_scale.read_run(out).obs["cell_type"].astype(str)) == list(truth)
    # a file whose cell names match none of the run's: one line, exit 2
    (tmp_path / "other.csv").write_text("cell,label\nx1,a\nx2,b\n")
    assert main(["evaluate", str(out), "--labels", str(tmp_path / "other.csv")]) == 2
    err = capsys.readouterr().err
    assert "none of the run's" in err and "other.csv" in err and len(err.strip().splitlines()) == 1


def test_tl_scgnn_writes_the_results_into_the_anndata():
    adata = _planted_adata(empty_cells=(5, 17))
    before = adata.copy()
    result = scgnn_scale.tl.scgnn(adata, copy=True, until="cluster", label_key="label", quiet=True,
                                  **QUICK_OPTIONS)
    # copy=True leaves the input as it was
    assert set(adata.obs.columns) == set(before.obs.columns) and not adata.obsm
    assert set(result.obsm) >= {"X_scgnn", "X_scgnn_feature"} and "scgnn_graph" in result.obsp
    kept = np.ones(result.n_obs, dtype=bool)
    kept[[5, 17]] = False
    clusters = result.obs["scgnn_cluster"]
    assert clusters[~kept].isna().all() and clusters[kept].notna().all()
    assert np.isnan(result.obsm["X_scgnn"][~kept]).all() and np.isfinite(result.obsm["X_scgnn"][kept]).all()
    graph = result.obsp["scgnn_graph"]
    assert graph.shape == (result.n_obs, result.n_obs) and graph[[5, 17]].nnz == 0 and graph[:, [5, 17]].nnz == 0
    assert clustering_metrics(result.obs["label"][kept], clusters[kept])["ari"] > 0.8
    assert result.uns["scgnn"]["params"]["feature_min_steps"] == 150  # the options given, as given
    assert result.uns["scgnn"]["config"]["feature"]["min_steps"] == 150
    assert result.uns["scgnn"]["metrics"]["ari"] > 0.8
    assert result.var["scgnn_selected"].sum() <= result.n_vars


def test_tl_scgnn_in_place_with_imputation_under_its_own_key(tmp_path):
    adata = _planted_adata(n_cells=200, n_genes=120)
    assert scgnn_scale.tl.scgnn(adata, key_added="mine", out=tmp_path / "kept_run", quiet=True,
                                **QUICK_OPTIONS) is None
    imputed = adata.obsm["mine_imputed"]
    assert isinstance(imputed, pd.DataFrame) and list(imputed.index) == list(adata.obs_names)
    assert list(imputed.columns) == list(adata.var_names[adata.var["mine_selected"].to_numpy()])
    assert np.isfinite(imputed.to_numpy()).all()
    assert "mine_cluster" in adata.obs and adata.uns["mine"]["run_dir"] == str((tmp_path / "kept_run").absolute())
    np.testing.assert_array_equal(scgnn_scale.read_run(tmp_path / "kept_run").obs["scgnn_cluster"].astype(str),
                                  adata.obs["mine_cluster"].astype(str))


def test_tl_scgnn_unknown_option_is_a_type_error_with_suggestions():
    with pytest.raises(TypeError, match="graph_kk.*graph_k"):
        scgnn_scale.tl.scgnn(_planted_adata(n_cells=30, n_genes=20), graph_kk=3)


def test_package_logger_prints_without_configuration_and_obeys_verbosity():
    code = ("import logging, scgnn_scale; log = logging.getLogger('scgnn_scale'); log.info('hello-info'); "
            "scgnn_scale.set_verbosity('warning'); log.info('hidden-info'); log.warning('shown-warning')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "hello-info" in proc.stderr and "shown-warning" in proc.stderr and "hidden-info" not in proc.stderr
    # with the root logger configured the records go there once, not twice
    code = ("import logging, scgnn_scale; logging.basicConfig(format='root:%(message)s'); "
            "logging.getLogger('scgnn_scale').warning('once')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.count("once") == 1 and "root:once" in proc.stderr


def test_cli_version_and_log_level(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scgnn_scale.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("scgnn-scale ")
    inp = tmp_path / "in.h5ad"
    _planted_adata(n_cells=60, n_genes=40).write_h5ad(inp)
    base = [sys.executable, "-m", "scgnn_scale.cli", "run", str(inp), "--until", "preprocess"]
    quiet = subprocess.run([*base, "--out", str(tmp_path / "a"), "--log-level", "warning"], capture_output=True,
                           text=True, timeout=300)
    assert quiet.returncode == 0 and "preprocess: started" not in quiet.stderr
    assert "preprocess: started" in (tmp_path / "a" / "run.log").read_text()  # the run log keeps everything
    loud = subprocess.run([*base, "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and "preprocess: started" in loud.stderr and "finished " in loud.stderr


def test_progress_outside_a_terminal_is_plain_log_lines(tmp_path, caplog):
    """A run whose stderr is a file: no carriage returns or escape codes; progress comes as log lines."""
    inp = tmp_path / "in.h5ad"
    _planted_adata(n_cells=120, n_genes=60).write_h5ad(inp)
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "scgnn_scale.cli", "run", str(inp), "--out", str(tmp_path / "r"),
                               "--until", "feature", "--feature-min-steps", "30"], stderr=err,
                              stdout=subprocess.DEVNULL, timeout=300)
    text = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "\x1b" not in text and "feature: started" in text
    bar = LogProgress(total=10, desc="feature: training", unit="steps", interval=0.0)
    with caplog.at_level(logging.INFO, logger="scgnn_scale"):
        bar.set_postfix(loss="1.5")
        bar.update(4)
        bar._start -= 10  # as if it had run for 10 s: closing logs how long it took
        bar.close()
    assert "feature: training: 4/10 steps (40%)" in caplog.text and "loss 1.5" in caplog.text
    assert "(done in 10." in caplog.text


def test_relative_out_is_resolved(tmp_path, monkeypatch):
    """Paths handed to Dask workers (whose working directory differs) are absolute."""
    inp = tmp_path / "in.h5ad"
    _planted_adata(n_cells=60, n_genes=40).write_h5ad(inp)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(inp), "--out", "rel_run", "--until", "preprocess", "--quiet"]) == 0
    store = RunStore.open("rel_run")
    assert store.root.is_absolute() and store.root == (tmp_path / "rel_run")
    assert os.path.isabs(store.path_of("X"))
