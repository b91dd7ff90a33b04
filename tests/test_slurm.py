"""``scgnn-scale slurm`` on a real single-node SLURM (slurmctld + slurmd + munged on 127.0.0.1), started and
stopped by deploy/slurm/start-local-slurm.sh: the Dask work runs in SLURM jobs, the run equals the embedded
one, a partition that starts no job gives one line, and nothing of SLURM is left afterwards.

Needs SLURM installed: apt-get install -y --no-install-recommends slurm-wlm (brings munge); skipped only
when slurmctld is not installed.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from scgnn_scale.cli import main
from scgnn_scale.config import load_config
from scgnn_scale.errors import MissingDependencyError
from scgnn_scale.evaluate import clustering_metrics
from scgnn_scale.pipeline import read_run

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "slurm" / "start-local-slurm.sh"
PARTITION = "scgnntest"

# the built-in example, few steps (as tests/test_pipeline.py's TINY); 2 embedded workers of 1 thread, as the
# 2 SLURM jobs of 1 core
TINY = """
[feature]
min_steps = 200
iter_steps = 100
[gae]
epochs = 50
[iterate]
max_iterations = 2
cluster_steps = 100
[impute]
steps = 100
[ltmg]
max_iter = 30
[runtime]
n_workers = 2
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(state: Path, ctld_port: str) -> list[psutil.Process]:
    """Live processes of this test's SLURM: the daemons (their command lines name the state directory) and
    the jobs' processes (SLURM_WORKING_CLUSTER names the cluster's slurmctld port)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if str(state) in " ".join(p.cmdline()):
                found.append(p)
            elif p.environ().get("SLURM_WORKING_CLUSTER", "").startswith(f"scgnn-local:127.0.0.1:{ctld_port}:"):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """The SLURM of deploy/slurm/start-local-slurm.sh, with SLURM_CONF set for this process; stopped after the
    module, and then no daemon and no job process of it may be left."""
    if shutil.which("slurmctld") is None:
        pytest.skip("slurmctld is not installed (apt-get install -y --no-install-recommends slurm-wlm)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SCGNN_SLURM_STATE": str(state), "SLURMCTLD_PORT": str(_free_port()),
           "SLURMD_PORT": str(_free_port()), "SLURM_PARTITION": PARTITION}
    mp = pytest.MonkeyPatch()
    try:
        started = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        mp.setenv("SLURM_CONF", str(state / "slurm.conf"))
        yield state
    finally:
        mp.undo()
        stopped = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True,
                                 timeout=180)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    left = _ours(state, env["SLURMCTLD_PORT"])
    assert not left, [(p.pid, p.cmdline()) for p in left]
    assert not (state / "slurm.conf").exists() and not (state / "run").exists()


def _squeue() -> list[str]:
    done = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[:-1]


def _soon(condition, timeout: float = 30.0) -> bool:
    """Whether ``condition()`` holds within ``timeout`` s: a cancelled job is COMPLETING, and written to
    jobcomp.log, a few seconds after scancel returns."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    d = tmp_path_factory.mktemp("example")
    assert main(["simulate", str(d / "example.h5ad"), "--cells", "600", "--genes", "300", "--types", "4",
                 "--quiet"]) == 0
    (d / "tiny.toml").write_text(TINY)
    return d / "example.h5ad", d / "tiny.toml"


@pytest.fixture(scope="module")
def embedded_run(example, tmp_path_factory):
    inp, cfg = example
    out = tmp_path_factory.mktemp("embedded") / "run"
    assert main(["run", str(inp), "--out", str(out), "--config", str(cfg), "--label-key", "label", "--quiet"]) == 0
    return out


@pytest.mark.slurm
def test_example_runs_in_slurm_jobs(local_slurm, example, embedded_run, tmp_path):
    from scgnn_scale.slurm import SlurmOptions, run_on_slurm

    inp, cfg = example
    out = tmp_path / "run"
    report = run_on_slurm(str(inp), out, config=load_config(cfg, {"ingest": {"label_key": "label"}}),
                          options=SlurmOptions(jobs=2, cores=1, memory="2GiB", walltime="00:20:00",
                                               queue=PARTITION, interface="lo", worker_timeout=120),
                          quiet=True)

    # the Dask work ran in the two SLURM jobs: each worker has its job's SLURM_JOB_ID (set by slurmstepd),
    # is another process than this one, and executed tasks
    jobs = report["jobs"]
    assert len(jobs) == 2 and len(set(jobs)) == 2
    workers = list(report["workers"].values())
    assert sorted(w["job"] for w in workers) == sorted(jobs)
    assert all(w["pid"] != os.getpid() and w["tasks"] > 0 for w in workers), workers
    assert report["scheduler"].startswith("tcp://127.0.0.1:")  # --interface lo: nothing beyond loopback
    # SLURM itself ran them: its job log names both, and their output files hold the workers' start
    log_dir = Path(report["log_directory"])
    assert log_dir == Path(str(out) + ".slurm-logs")
    comp = local_slurm / "jobcomp.log"

    def finished() -> dict[str, str]:  # job id -> its jobcomp line
        return {line.split()[0].removeprefix("JobId="): line for line in comp.read_text().splitlines()}

    assert _soon(lambda: set(jobs) <= set(finished())), comp.read_text()
    for job in jobs:
        assert "Name=scgnn-worker" in finished()[job]
        assert "Start worker at" in (log_dir / f"scgnn-worker-{job}.err").read_text()
    # the launcher cancelled its jobs, and wrote what it did into the run's log
    assert _soon(lambda: not [line for line in _squeue() if line.split()[0] in jobs]), _squeue()
    run_log = (out / "run.log").read_text()
    assert f"slurm: jobs {', '.join(jobs)}" in run_log

    adata = read_run(out, lazy=False)
    planted = adata.obs["label"].to_numpy()
    clusters = adata.obs["scgnn_cluster"].to_numpy()
    assert clustering_metrics(planted, clusters)["ari"] > 0.8
    # the same config's embedded run: the same clusters (the method is seeded; a cluster AE trains with
    # its worker's one thread in both), the imputation equal up to float noise
    embedded = read_run(embedded_run, lazy=False)
    np.testing.assert_array_equal(clusters, embedded.obs["scgnn_cluster"].to_numpy())
    np.testing.assert_allclose(np.asarray(adata.layers["imputed"]), np.asarray(embedded.layers["imputed"]),
                               atol=1e-4)


@pytest.mark.slurm
def test_partition_down_is_one_line_and_cancels_the_jobs(local_slurm, example, tmp_path, capsys):
    inp, cfg = example
    subprocess.run(["scontrol", "update", f"PartitionName={PARTITION}", "State=DOWN"], check=True, timeout=30)
    try:
        code = main(["slurm", str(inp), "--out", str(tmp_path / "run"), "--config", str(cfg), "--quiet",
                     "--jobs", "2", "--memory", "1GiB", "--queue", PARTITION, "--interface", "lo",
                     "--worker-timeout", "8"])
    finally:
        subprocess.run(["scontrol", "update", f"PartitionName={PARTITION}", "State=UP"], check=True, timeout=30)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("scgnn-scale: error: no Dask worker joined within 8 s"), err
    assert "PENDING (PartitionDown)" in err[-1]
    assert _soon(lambda: not _squeue()), _squeue()  # both pending jobs were cancelled
    assert not (tmp_path / "run").exists()  # nothing was run
    assert not (tmp_path / "run.slurm-logs").exists()  # no job wrote a log: the empty directory is removed


@pytest.mark.slurm
def test_sigterm_cancels_the_jobs(local_slurm, example, tmp_path):
    """A launcher ended by SIGTERM (a walltime, scancel of the job it runs in, kill) cancels its worker jobs."""
    inp, cfg = example
    subprocess.run(["scontrol", "update", f"PartitionName={PARTITION}", "State=DOWN"], check=True, timeout=30)
    try:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "scgnn_scale.cli", "slurm", str(inp), "--out", str(tmp_path / "run"),
             "--config", str(cfg), "--quiet", "--jobs", "2", "--memory", "1GiB", "--queue", PARTITION,
             "--interface", "lo", "--worker-timeout", "300"], stderr=subprocess.PIPE, text=True)
        try:
            assert _soon(lambda: len(_squeue()) == 2, timeout=60), _squeue()  # both jobs pending
            launcher.send_signal(signal.SIGTERM)
            code = launcher.wait(timeout=60)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    finally:
        subprocess.run(["scontrol", "update", f"PartitionName={PARTITION}", "State=UP"], check=True, timeout=30)
    err = launcher.stderr.read()
    assert code == 130 and "interrupted" in err, err
    assert _soon(lambda: not _squeue()), _squeue()


@pytest.mark.slurm
def test_unknown_partition_is_refused_before_submitting(local_slurm, example, tmp_path, capsys):
    inp, cfg = example
    code = main(["slurm", str(inp), "--out", str(tmp_path / "run"), "--config", str(cfg), "--quiet",
                 "--queue", "nosuchpartition", "--interface", "lo"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("scgnn-scale: error: SLURM refuses the worker jobs:"), err
    assert "partition" in err[-1].lower()
    assert not _squeue()  # nothing was submitted


def test_missing_dask_jobqueue_names_the_extra(monkeypatch, tmp_path):
    from scgnn_scale.slurm import run_on_slurm

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import fails as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"scgnn-scale\[slurm\]"):
        run_on_slurm(str(tmp_path / "in.h5ad"), tmp_path / "run")
