"""The LTMG stage on a real Dask cluster: a scheduler and two workers started as processes on 127.0.0.1."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import DaskProcesses, planted_counts

from scgnn_scale.config import build_config
from scgnn_scale.stages import ltmg as stage
from scgnn_scale.testing import stage_context, store_with_matrix

pytestmark = pytest.mark.cluster


@pytest.fixture
def dask_cluster(tmp_path):
    """(scheduler address, {worker address: process}); every process is stopped afterwards."""
    cluster = DaskProcesses(tmp_path / "dask.log", 2)
    try:
        yield cluster.address, cluster.workers
    finally:
        cluster.stop()


def _config(scheduler: str = ""):
    return build_config({"store": {"chunk_rows": 128, "chunk_genes": 16},
                         "ltmg": {"max_cells": 400, "block_genes": 16},
                         "runtime": {"n_workers": 2, "scheduler": scheduler}})


def _run(root, counts, config):
    store = store_with_matrix(root, counts, config=config)
    ctx = stage_context(store, "ltmg", config)
    try:
        stage.run(ctx)
    finally:
        ctx.runtime.close()
    return store.open_array("layers/ltmg")[:], store.read_elem("varm/ltmg_means")


@pytest.fixture(scope="module")
def counts():
    return planted_counts(n_cells=600, n_genes=128, seed=3)[0]


@pytest.fixture(scope="module")
def local_result(counts, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("local") / "run", counts, _config())


def test_cluster_run_equals_local_run(dask_cluster, counts, local_result, tmp_path):
    address, _ = dask_cluster
    states, means = _run(tmp_path / "run", counts, _config(address))
    np.testing.assert_array_equal(states, local_result[0])
    np.testing.assert_array_equal(means, local_result[1])


def test_worker_killed_mid_stage(dask_cluster, counts, local_result, tmp_path):
    from distributed import Client

    address, workers = dask_cluster
    outcome = {}

    def target():
        try:
            outcome["result"] = _run(tmp_path / "run", counts, _config(address))
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    killed = None
    with Client(address, timeout="30s") as watcher:
        runner = threading.Thread(target=target)
        runner.start()
        deadline = time.monotonic() + 40
        while runner.is_alive() and killed is None and time.monotonic() < deadline:
            for worker, keys in watcher.processing().items():
                if worker in workers and any(str(k).startswith("_fit_block") for k in keys):
                    os.kill(workers[worker].pid, signal.SIGKILL)  # the worker dies holding a fit task
                    killed = worker
                    break
            time.sleep(0.02)
        runner.join(timeout=60)
    assert killed is not None, "no fit task was seen running: nothing was killed"
    assert workers[killed].wait(timeout=10) == -signal.SIGKILL
    assert not runner.is_alive(), "the stage did not finish after a worker was killed"
    if "error" in outcome:
        raise outcome["error"]
    states, means = outcome["result"]
    np.testing.assert_array_equal(states, local_result[0])
    np.testing.assert_array_equal(means, local_result[1])
