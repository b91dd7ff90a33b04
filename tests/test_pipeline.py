"""End to end through the CLI on a tiny planted atlas: outputs, skip, resume after SIGKILL, refusals."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import anndata
import numpy as np
import pytest
from conftest import TINY_CONFIG, planted_adata

from scgnn_scale import read_run
from scgnn_scale.cli import main
from scgnn_scale.evaluate import clustering_metrics
from scgnn_scale.pipeline import INTERMEDIATE_RECONS
from scgnn_scale.store import RunStore


@pytest.fixture(scope="module")
def tiny_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("input")
    path = d / "tiny.h5ad"
    planted_adata(n_cells=240, n_genes=150, n_types=3, seed=1).write_h5ad(path)
    cfg = d / "tiny.toml"
    cfg.write_text(TINY_CONFIG)
    return path, cfg


def _run_args(inp, cfg, out, *extra):
    return ["run", str(inp), "--out", str(out), "--config", str(cfg), "--label-key", "label", "--quiet", *extra]


@pytest.fixture(scope="module")
def full_run(tiny_input, tmp_path_factory):
    inp, cfg = tiny_input
    out = tmp_path_factory.mktemp("runs") / "full"
    assert main(_run_args(inp, cfg, out)) == 0
    return out


def test_full_run_outputs(full_run, tiny_input):
    adata = read_run(full_run)
    n = adata.n_obs
    assert adata.layers["ltmg"].dtype == np.uint8
    assert adata.layers["imputed"].shape == adata.shape
    assert np.isfinite(adata.layers["imputed"][:50].compute()).all()
    assert adata.obsm["X_scgnn_feature"].shape == (n, 128)
    assert adata.obsm["X_scgnn"].shape == (n, 16)
    graph = adata.obsp["scgnn_graph"]
    assert graph.shape == (n, n) and (graph != graph.T).nnz == 0
    history = adata.uns["scgnn"]["history"]
    assert 1 <= len(history) <= 2
    # the planted types are found
    m = clustering_metrics(adata.obs["label"], adata.obs["scgnn_cluster"])
    assert m["ari"] > 0.8, m
    # the whole store opens with plain anndata too
    plain = anndata.read_zarr(full_run / "adata.zarr")
    assert "scgnn_cluster" in plain.obs


def test_rerun_skips_finished_stages(full_run, tiny_input, capsys):
    inp, cfg = tiny_input
    before = (full_run / "manifest.json").read_text()
    t0 = time.perf_counter()
    assert main(_run_args(inp, cfg, full_run)) == 0
    assert time.perf_counter() - t0 < 20
    assert (full_run / "manifest.json").read_text().count('"hash"') == before.count('"hash"')


def test_other_config_is_refused_without_overwrite(full_run, tiny_input, capsys):
    inp, cfg = tiny_input
    manifest = (full_run / "manifest.json").read_text()
    assert main(_run_args(inp, cfg, full_run, "--graph-k", "7")) == 2
    err = capsys.readouterr().err
    assert "graph.k 10 -> 7" in err and "Traceback" not in err
    # the stages a rerun keeps and redoes are named
    assert "keeps ingest, preprocess, ltmg, feature, pca and redoes graph, gae, cluster, iterate, impute" in err
    assert (full_run / "manifest.json").read_text() == manifest


@pytest.mark.parametrize("kill_after_stage", ["ltmg", "iterate"])
def test_sigkill_then_resume_gives_the_same_result(full_run, tiny_input, tmp_path, kill_after_stage):
    """Kill the run while the stage after `kill_after_stage`'s predecessor works, rerun, compare."""
    inp, cfg = tiny_input
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "scgnn_scale.cli", *_run_args(inp, cfg, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    manifest = out / "manifest.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and f'"{kill_after_stage}"' in manifest.read_text():
            break
        time.sleep(0.05)
    time.sleep(0.5)  # into the next stage
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main(_run_args(inp, cfg, out)) == 0
    a, b = read_run(full_run), read_run(out)
    np.testing.assert_array_equal(a.obs["scgnn_cluster"].to_numpy(), b.obs["scgnn_cluster"].to_numpy())
    np.testing.assert_allclose(a.obsm["X_scgnn"], b.obsm["X_scgnn"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.layers["imputed"][:100].compute(), b.layers["imputed"][:100].compute(),
                               rtol=1e-4, atol=1e-5)
    assert not (out / "staging").exists() or not any((out / "staging").iterdir())


def _stages_run(caplog, args) -> set[str]:
    """Run the CLI and return the stages it ran (the pipeline logs 'STAGE: started'), not those it skipped.

    (Comparing the manifest's seconds before and after failed once: a redone tiny stage took 1.016 s again.)
    """
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scgnn_scale"):
        assert main(args) == 0
    return {m.split(":")[0] for m in (r.getMessage() for r in caplog.records) if m.endswith(": started")}


def _cells_by_genes_arrays(run_dir, n_genes) -> list[str]:
    """The arrays under work.zarr (and its staging) with one column per gene."""
    import zarr

    found = []
    for meta in (run_dir / "work.zarr").rglob("zarr.json"):
        node = zarr.open(meta.parent, mode="r", zarr_format=3)
        if isinstance(node, zarr.Array) and node.ndim == 2 and node.shape[1] == n_genes:
            found.append(str(meta.parent.relative_to(run_dir)))
    return found


def test_finished_run_holds_no_reconstruction_and_recomputes_it_for_a_rerun(full_run, tiny_input, tmp_path,
                                                                            caplog):
    inp, cfg = tiny_input
    assert not any(RunStore.open(full_run).has(key) for key in INTERMEDIATE_RECONS)
    assert _cells_by_genes_arrays(full_run, read_run(full_run).n_vars) == []
    # the published imputation on the finished run: its input is computed again from the saved feature
    # autoencoder and the first pass's embedding (no feature stage), and the imputation equals that of a
    # run that kept work/recon
    published = ("--impute-l1", "0.5", "--impute-zero-weight", "published")
    out = tmp_path / "rerun"
    shutil.copytree(full_run, out)
    ran = _stages_run(caplog, _run_args(inp, cfg, out, "--overwrite", *published))
    assert ran == {"impute"}
    assert any("computed from the saved feature autoencoder" in r.getMessage() for r in caplog.records)
    assert not RunStore.open(out).has("work/recon")
    kept = tmp_path / "kept"
    assert main(_run_args(inp, cfg, kept, "--keep-work", *published)) == 0
    np.testing.assert_allclose(read_run(out).layers["imputed"].compute(), read_run(kept).layers["imputed"].compute(),
                               rtol=1e-4, atol=1e-4)


def test_input_copy_is_removed_after_preprocess_and_made_again_when_preprocess_is_redone(full_run, tiny_input,
                                                                                         tmp_path, caplog):
    """work/input is read only by preprocess: a finished run has none, and a rerun that must preprocess
    again ingests again first, to the same X as a fresh run with that option."""
    inp, cfg = tiny_input
    assert not RunStore.open(full_run).has("work/input")
    out = tmp_path / "reprocess"
    shutil.copytree(full_run, out)
    ran = _stages_run(caplog, _run_args(inp, cfg, out, "--overwrite", "--preprocess-n-top-genes", "100",
                                        "--until", "preprocess"))
    assert ran == {"ingest", "preprocess"}
    assert not RunStore.open(out).has("work/input")
    fresh = tmp_path / "fresh"
    assert main(_run_args(inp, cfg, fresh, "--preprocess-n-top-genes", "100", "--until", "preprocess")) == 0
    x, y = RunStore.open(out).open_array("X")[:], RunStore.open(fresh).open_array("X")[:]
    assert x.shape[1] == 100
    np.testing.assert_array_equal(x, y)


def test_missing_feature_model_redoes_the_feature_stage(full_run, tiny_input, tmp_path, caplog):
    """Without models/feature_ae.pt the reconstruction cannot be computed: the feature stage is redone."""
    inp, cfg = tiny_input
    out = tmp_path / "nomodel"
    shutil.copytree(full_run, out)
    (out / "models" / "feature_ae.pt").unlink()
    ran = _stages_run(caplog, _run_args(inp, cfg, out, "--overwrite", "--impute-l1", "0.5"))
    assert ran == {"feature", "pca", "graph", "gae", "cluster", "iterate", "impute"}


def test_other_cluster_resolution_redoes_only_the_clustering_and_after(full_run, tiny_input, tmp_path, caplog):
    inp, cfg = tiny_input
    out = tmp_path / "resolution"
    shutil.copytree(full_run, out)
    ran = _stages_run(caplog, _run_args(inp, cfg, out, "--overwrite", "--cluster-resolution", "0.5"))
    assert ran == {"cluster", "iterate", "impute"}


def test_redone_feature_stage_publishes_the_new_first_pass(full_run, tiny_input, tmp_path):
    """A finished run publishes the iteration's results; a rerun with another feature config until the graph
    must show the new feature AE's embedding and graph, and no clusters or graph embedding of the old run."""
    import torch

    from scgnn_scale.keys import FIRST_PASS, ITERATED
    from scgnn_scale.train import load_model

    inp, cfg = tiny_input
    out = tmp_path / "refeature"
    shutil.copytree(full_run, out)
    old = RunStore.open(out).open_array("obsm/X_scgnn_feature")[:]
    assert main(_run_args(inp, cfg, out, "--overwrite", "--feature-min-steps", "120", "--until", "graph")) == 0
    store = RunStore.open(out)
    model, _ = load_model(out / "models" / "feature_ae.pt", "cpu")
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(np.asarray(store.open_array("X")[:], dtype=np.float32)))[1].numpy()
    embedding = store.open_array("obsm/X_scgnn_feature")[:]
    assert not np.allclose(embedding, old, atol=1e-3)  # the new feature AE's, not the old run's
    np.testing.assert_allclose(embedding, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(embedding, store.open_array(FIRST_PASS.feature_embedding)[:])
    assert (store.read_elem("obsp/scgnn_graph") != store.read_elem(FIRST_PASS.graph)).nnz == 0
    # the stages after the graph are not done: their old results are not shown
    assert not store.has("obsm/X_scgnn") and "scgnn_cluster" not in store.read_elem("obs").columns
    assert store.has(ITERATED.clusters)  # stale, but iterate is not done: never published


def test_keep_work_keeps_the_reconstructions_and_gives_the_results_of_a_run_without(full_run, tiny_input, tmp_path,
                                                                                    caplog):
    """--keep-work stores work/recon and work/recon_final and reads them; a run without computes them from the
    saved models as it reads them. Same computation: the same clusters, and the imputed values equal within
    1e-4 (float32 sums in another order)."""
    inp, cfg = tiny_input
    out = tmp_path / "kept"
    assert main(_run_args(inp, cfg, out, "--keep-work")) == 0
    store = RunStore.open(out)
    assert store.has("work/recon") and store.has("work/recon_final")
    assert store.has("work/input")  # kept too
    n_genes = read_run(out).n_vars
    assert sorted(_cells_by_genes_arrays(out, n_genes)) == ["work.zarr/recon", "work.zarr/recon_final"]
    kept, lean = read_run(out), read_run(full_run)
    np.testing.assert_array_equal(kept.obs["scgnn_cluster"].to_numpy(), lean.obs["scgnn_cluster"].to_numpy())
    np.testing.assert_allclose(kept.obsm["X_scgnn"], lean.obsm["X_scgnn"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(kept.layers["imputed"].compute(), lean.layers["imputed"].compute(), rtol=1e-4,
                               atol=1e-4)
    assert _stages_run(caplog, _run_args(inp, cfg, out, "--keep-work", "--overwrite", "--impute-l1", "0.5",
                                         "--impute-zero-weight", "published")) == {"impute"}
    assert RunStore.open(out).manifest["stages"]["impute"]["info"]["input"] == "work/recon"
    assert not any("computed from" in r.getMessage() for r in caplog.records)  # read the kept work/recon


def test_a_finished_run_leaves_no_object_frozen(full_run):
    """Between stages the survivors are frozen so that collections skip them; the run gives them back."""
    import gc

    assert gc.get_freeze_count() == 0


def test_until_stops_after_the_stage(tiny_input, tmp_path):
    inp, cfg = tiny_input
    out = tmp_path / "partial"
    assert main(_run_args(inp, cfg, out, "--until", "preprocess")) == 0
    adata = anndata.read_zarr(out / "adata.zarr")
    assert adata.n_vars <= 150 and "ltmg" not in adata.layers
