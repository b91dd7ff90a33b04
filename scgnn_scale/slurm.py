"""``scgnn-scale slurm``: one run whose Dask work runs in SLURM jobs (a dask-jobqueue SLURMCluster).

The launcher starts a Dask scheduler in this process, submits ``jobs`` batch jobs that each start one
Dask worker (same Python executable, so the same environment), waits for them, and runs the pipeline
with ``runtime.scheduler`` set to that scheduler: the Dask work (preprocessing passes, LTMG gene blocks,
cluster autoencoders) runs in the jobs, the rest (reading the input, the feature and graph autoencoders)
in this process. The jobs are cancelled when the run ends, fails or is interrupted (SIGTERM included);
if this process is killed outright, each worker stops when its connection to the scheduler breaks, and
its job ends with it.

Workers open the run directory and the input themselves: both must lie on a filesystem that the
compute nodes see under the same path (trivially true on one node). dask-jobqueue is an optional
dependency (``pip install 'scgnn-scale[slurm]'``), imported only here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, MissingDependencyError

log = logging.getLogger("scgnn_scale")

#: the name of every worker job (squeue shows it; its logs are <name>-<job id>.out/.err)
JOB_NAME = "scgnn-worker"


@dataclass(frozen=True)
class SlurmOptions:
    """What each worker job asks SLURM for, and how long to wait for the workers."""

    jobs: int = 2
    cores: int = 1
    memory: str = "4GiB"
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    job_extra: tuple[str, ...] = field(default_factory=tuple)
    interface: str | None = None
    log_directory: str | None = None
    worker_timeout: float = 300.0


def default_log_directory(out: str | os.PathLike) -> Path:
    """``RUN_DIR.slurm-logs`` beside the run: nothing but a run is ever written into RUN_DIR."""
    text = str(out).rstrip("/")
    if "://" in text:  # a run on an object store: the job logs need a POSIX path
        return Path.cwd() / "slurm-logs"
    return Path(text + ".slurm-logs")


def _import_jobqueue():
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise MissingDependencyError(
            f"scgnn-scale slurm needs dask-jobqueue ({exc}); install it with: pip install 'scgnn-scale[slurm]'"
        ) from None
    return SLURMCluster


def _check_options(options: SlurmOptions) -> None:
    if options.jobs < 1:
        raise InputError(f"--jobs {options.jobs}: at least 1")
    if options.cores < 1:
        raise InputError(f"--cores {options.cores}: at least 1")
    if options.worker_timeout <= 0:
        raise InputError(f"--worker-timeout {options.worker_timeout}: must be positive")
    from dask.utils import parse_bytes

    try:
        parse_bytes(options.memory)
    except (ValueError, TypeError):
        raise InputError(f"--memory {options.memory!r}: not a size such as 4GiB") from None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _check_submission(cluster) -> None:
    """``sbatch --test-only`` of the workers' job script: a bad partition, account or walltime is one line now,
    not a traceback from dask-jobqueue's background task and a wait for workers that never come."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(cluster.job_script())
    try:
        done = _run(["sbatch", "--test-only", f.name])
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise InputError(f"SLURM refuses the worker jobs: {lines[-1] if lines else f'sbatch exited {done.returncode}'}")


def _job_ids(cluster) -> list[str]:
    return [str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)]


def _job_states(ids: list[str]) -> dict[str, str] | None:
    """``{job id: 'STATE (reason)'}`` from squeue for the jobs it still lists; None when squeue fails."""
    if not ids:
        return {}
    try:
        done = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    states = {}
    for line in done.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            states[parts[0]] = parts[1] + (f" ({parts[2]})" if len(parts) > 2 and parts[2] != "None" else "")
    return states


def _wait_for_workers(client, cluster, options: SlurmOptions, log_dir: Path) -> int:
    """Wait until every job's worker joined; after ``worker_timeout`` go on with those that came, or fail with
    one line naming the jobs' states when none came (a partition that is down, too few free nodes, ...)."""
    deadline = time.monotonic() + options.worker_timeout
    next_poll = 0.0
    while True:
        n = len(client.nthreads())
        if n >= options.jobs:
            return n
        now = time.monotonic()
        ids = _job_ids(cluster)
        if now >= next_poll and ids and n == 0:
            next_poll = now + 5
            # every job already left the queue and no worker came: it failed to start (see its log)
            if _job_states(ids) == {} and len(ids) == options.jobs:
                raise InputError(f"SLURM jobs {', '.join(ids)} ended without starting a Dask worker; see their "
                                 f"logs in {log_dir}")
        if now >= deadline:
            if n:
                log.warning("slurm: %d of %d worker(s) joined within %g s; going on with them", n, options.jobs,
                            options.worker_timeout)
                return n
            states = _job_states(ids) or {}
            what = ", ".join(f"job {i} {states.get(i, 'not queued')}" for i in ids) or "no job was submitted"
            raise InputError(f"no Dask worker joined within {options.worker_timeout:g} s (--worker-timeout): "
                             f"{what}; worker logs in {log_dir}")
        time.sleep(0.5)


def _worker_place(dask_worker) -> dict[str, Any]:
    """Where a worker runs and what it did (run on each worker by the launcher at the end)."""
    import socket

    state = getattr(dask_worker, "state", None)
    return {"job": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": os.getpid(),
            "tasks": int(getattr(state, "executed_count", 0) or 0)}


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (``scancel``, a walltime, ``kill``) ends the run as Ctrl-C does, so the jobs are cancelled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _log_to_run(out: str | os.PathLike, lines: list[str]) -> None:
    """Print the launcher's account of the run and append it to RUN_DIR/run.log, once the run directory exists."""
    handler = None
    run_log = Path(out) / "run.log"
    if "://" not in str(out) and run_log.is_file():
        handler = logging.FileHandler(run_log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        log.addHandler(handler)
    try:
        for line in lines:
            log.info("%s", line)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def run_on_slurm(source: Any, out: str | os.PathLike, *, config=None, options: SlurmOptions | None = None,
                 until: str | None = None, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run the pipeline (:func:`scgnn_scale.pipeline.run`) with its Dask work in ``options.jobs`` SLURM jobs.

    Returns what the launcher saw: ``jobs`` (the SLURM job ids), ``workers`` (per worker address: ``job``,
    ``host``, ``pid``, ``tasks`` it executed), ``scheduler``, ``log_directory`` and ``seconds_to_workers``.
    """
    from .config import RunConfig
    from .pipeline import run

    config = config or RunConfig()
    options = options or SlurmOptions()
    if config.runtime.scheduler:
        raise InputError("--scheduler and 'scgnn-scale slurm' both name the Dask cluster; give one")
    _check_options(options)
    SLURMCluster = _import_jobqueue()
    # what the run would refuse, refused before any job is submitted
    if isinstance(source, str | os.PathLike) and "://" not in str(source) and not Path(source).exists():
        raise InputError(f"{source}: no such file or directory")
    if "://" not in str(out):
        from .store import check_out_dir

        check_out_dir(out)
    for cmd in ("sbatch", "squeue", "scancel"):
        if shutil.which(cmd) is None:
            raise InputError(f"{cmd}: not found; 'scgnn-scale slurm' runs where SLURM's commands are on the PATH")
    log_dir = Path(options.log_directory) if options.log_directory else default_log_directory(out)
    made_log_dir = not log_dir.exists()
    log_dir.mkdir(parents=True, exist_ok=True)

    worker_args = []
    if options.interface:
        from distributed.utils import get_ip_interface

        try:
            host = get_ip_interface(options.interface)
        except ValueError as exc:
            raise InputError(f"--interface {options.interface}: {exc}") from None
        # the workers' HTTP endpoints (health, metrics) on the same interface as their Dask ports
        worker_args = ["--dashboard-address", f"{host}:0"]

    # scheduler and workers log their INFO lines to the job logs, not to our users' terminal
    for name in ("distributed", "distributed.scheduler", "dask_jobqueue"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from distributed import Client

    report: dict[str, Any] = {"log_directory": str(log_dir), "jobs": [], "workers": {}}
    cluster = client = None
    with _sigterm_interrupts():
        try:
            cluster = SLURMCluster(
                cores=options.cores, processes=1, memory=options.memory, walltime=options.walltime,
                queue=options.queue, account=options.account, job_extra_directives=list(options.job_extra),
                interface=options.interface, log_directory=str(log_dir), job_name=JOB_NAME,
                python=sys.executable, worker_extra_args=worker_args,
                scheduler_options={"dashboard": False}, silence_logs=logging.ERROR)
            report["scheduler"] = cluster.scheduler_address
            _check_submission(cluster)
            t0 = time.perf_counter()
            cluster.scale(jobs=options.jobs)
            client = Client(cluster)
            log.info("slurm: submitted %d job(s) of %d core(s), %s, %s%s; scheduler %s; waiting for their workers",
                     options.jobs, options.cores, options.memory, options.walltime,
                     f", partition {options.queue}" if options.queue else "", cluster.scheduler_address)
            n = _wait_for_workers(client, cluster, options, log_dir)
            report["seconds_to_workers"] = round(time.perf_counter() - t0, 1)
            report["jobs"] = _job_ids(cluster)
            log.info("slurm: %d worker(s) joined in %.1f s from jobs %s", n, report["seconds_to_workers"],
                     ", ".join(report["jobs"]))

            run_config = dataclasses.replace(
                config, runtime=dataclasses.replace(config.runtime, scheduler=cluster.scheduler_address))
            run(source, out, config=run_config, until=until, overwrite=overwrite, quiet=quiet)

            report["workers"] = client.run(_worker_place)
        finally:
            ids = _job_ids(cluster) if cluster is not None else []
            report["jobs"] = ids or report["jobs"]
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()  # scancel of every job it submitted
            if made_log_dir:
                with contextlib.suppress(OSError):
                    log_dir.rmdir()  # when no job wrote a log (none was submitted or started)
    per_job = [f"job {w['job']} ran {w['tasks']} task(s)" for w in report["workers"].values()]
    _log_to_run(out, [
        f"slurm: jobs {', '.join(report['jobs'])} (scheduler {report['scheduler']}; workers joined in "
        f"{report['seconds_to_workers']} s); " + ", ".join(per_job),
        f"slurm: jobs cancelled; worker logs in {log_dir}",
    ])
    return report
