"""The whole method on a real Dask cluster (a scheduler and two workers started as processes on 127.0.0.1):
the same results as the embedded cluster, workers killed mid-stage, and no worker left; with RUN_DIR on an
S3 API server (moto's, on 127.0.0.1) and workers that cannot see the client's disk, no shared disk at all."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import DaskProcesses, hiding, hiding_works, planted_adata

from scgnn_scale import read_run
from scgnn_scale.cli import main
from scgnn_scale.evaluate import clustering_metrics
from scgnn_scale.store import RunStore

pytestmark = pytest.mark.cluster

TINY = """
[feature]
min_steps = 150
iter_steps = 80
[iterate]
max_iterations = 1
cluster_steps = 60
[impute]
steps = 80
[ltmg]
max_iter = 1000
tol = 0.0
block_genes = 16
[store]
chunk_rows = 64
chunk_genes = 16
[runtime]
n_workers = 2
device = "cpu"
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("input")
    inp = d / "tiny.h5ad"
    planted_adata(n_cells=300, n_genes=96, n_types=3, seed=6).write_h5ad(inp)
    cfg = d / "tiny.toml"
    cfg.write_text(TINY)
    return inp, cfg


def _args(tiny, out, *extra):
    inp, cfg = tiny
    return ["run", str(inp), "--out", str(out), "--config", str(cfg), "--label-key", "label", "--quiet", *extra]


@pytest.fixture(scope="module")
def embedded(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "run"
    assert main(_args(tiny, out)) == 0
    return read_run(out)


def _same_results(run, embedded):
    """Preprocessing and LTMG are exact wherever they run; the networks train in this process, so the
    clusters agree up to torch's float reductions on two threads (ARI 1.0 in practice)."""
    np.testing.assert_array_equal(run.X[:].compute(), embedded.X[:].compute())
    np.testing.assert_array_equal(run.layers["ltmg"][:].compute(), embedded.layers["ltmg"][:].compute())
    assert clustering_metrics(embedded.obs["scgnn_cluster"], run.obs["scgnn_cluster"])["ari"] > 0.95
    assert clustering_metrics(run.obs["label"], run.obs["scgnn_cluster"])["ari"] > 0.9


def test_every_distributed_stage_runs_on_the_workers_with_the_embedded_results(tiny, embedded, tmp_path):
    cluster = DaskProcesses(tmp_path / "dask.log", 2)
    try:
        out = tmp_path / "run"
        assert main(_args(tiny, out, "--scheduler", cluster.address)) == 0
        from distributed import Client

        with Client(cluster.address, timeout="30s") as client:
            # a lambda travels by value; a function of this test module would not import on the scheduler
            ran = set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    finally:
        cluster.stop()
    # task prefixes drop leading underscores: preprocess passes, LTMG fits and labels, the cluster AEs
    assert {"filter_and_stats", "fit_block", "label_rows", "train_cluster_autoencoder"} <= ran, ran
    assert RunStore.open(out).stage_info("iterate")["iterations"] == 1
    _same_results(read_run(out), embedded)


def _on_s3(tiny, s3_server, name: str, tmp_path) -> tuple:
    """The input uploaded to s3://<name>/tiny.h5ad, RUN_DIR s3://<name>/run, and the workers' command prefix
    that hides pytest's base temporary directory (every file of the client's: the input, the runs) from them."""
    hidden = tmp_path.parent  # tmp_path and the module's fixtures' directories all lie directly under it
    if not hiding_works(hidden):
        pytest.skip("hiding the client's files from the workers needs unshare --mount (root)")
    s3_server.bucket(name)
    s3_server.filesystem().put_file(str(tiny[0]), f"{name}/tiny.h5ad")
    return (f"s3://{name}/tiny.h5ad", tiny[1]), f"s3://{name}/run", hiding(hidden)


def test_every_distributed_stage_reads_and_writes_the_run_on_s3_itself(tiny, embedded, tmp_path, s3_server):
    """No shared disk: the input and RUN_DIR on the S3 server, the workers without the client's files (a local
    path handed to a worker would fail there); the workers open the store's URLs with their own credentials
    (the environment's AWS chain, as on a real cluster)."""
    source, out, prefix = _on_s3(tiny, s3_server, "cluster-run", tmp_path)
    cluster = DaskProcesses(tmp_path / "dask.log", 2, worker_prefix=prefix)
    try:
        assert main(_args(source, out, "--scheduler", cluster.address)) == 0
        from distributed import Client

        with Client(cluster.address, timeout="30s") as client:
            ran = set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
            seen = client.run(os.listdir, str(tmp_path.parent))  # the client's files, hidden from each worker
    finally:
        cluster.stop()
    assert {"filter_and_stats", "fit_block", "label_rows", "train_cluster_autoencoder"} <= ran, ran
    assert len(seen) == 2 and all(names == [] for names in seen.values()), seen
    assert RunStore.open(out).stage_info("iterate")["iterations"] == 1
    _same_results(read_run(out), embedded)


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_workers_killed_during_ltmg_and_the_cluster_autoencoders(tiny, embedded, tmp_path, where, request):
    # TINY's LTMG runs every EM to max_iter (tol 0) so that its fits last long enough to be seen running: with
    # early stops the six fits once finished within 0.4 s, between two looks of the watcher
    from distributed import Client

    out, prefix = tmp_path / "run", ()
    if where == "s3":
        tiny, out, prefix = _on_s3(tiny, request.getfixturevalue("s3_server"), "cluster-kill", tmp_path)
    # nannies start a new worker process
    cluster = DaskProcesses(tmp_path / "dask.log", 2, nanny=True, worker_prefix=prefix)
    outcome, killed = {}, []
    runner = threading.Thread(target=lambda: outcome.setdefault("code", main(_args(tiny, out, "--scheduler",
                                                                                    cluster.address))))
    try:
        with Client(cluster.address, timeout="30s") as watcher:
            runner.start()
            deadline = time.monotonic() + 600
            for prefix in ("_fit_block", "train_cluster_autoencoder"):
                while runner.is_alive() and time.monotonic() < deadline:
                    busy = [w for w, keys in watcher.processing().items() if any(str(k).startswith(prefix)
                                                                                  for k in keys)]
                    if busy:
                        pid = watcher.run(os.getpid, workers=[busy[0]])[busy[0]]
                        os.kill(pid, signal.SIGKILL)  # the worker process dies holding the task
                        killed.append((prefix, busy[0]))
                        break
                    time.sleep(0.02)
            runner.join(timeout=600)
    finally:
        cluster.stop()
    assert [k[0] for k in killed] == ["_fit_block", "train_cluster_autoencoder"], killed
    assert outcome.get("code") == 0
    _same_results(read_run(out), embedded)


def test_no_worker_left_is_a_clear_error_after_the_timeout(tiny, tmp_path, capsys):
    cluster = DaskProcesses(tmp_path / "dask.log", 0)  # a scheduler whose workers are all gone
    try:
        out = tmp_path / "run"
        t0 = time.monotonic()
        code = main(_args(tiny, out, "--scheduler", cluster.address, "--runtime-worker-timeout", "5"))
        waited = time.monotonic() - t0
    finally:
        cluster.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "no Dask worker for 5 s" in err[0] and cluster.address in err[0]
    assert waited < 120
    assert RunStore.open(out, check=False).stage_done  # the run directory stays usable
    assert "ingest" in RunStore.read_manifest(out)["stages"]  # the stages before it are kept
