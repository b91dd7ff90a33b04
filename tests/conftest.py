import os
import time
from pathlib import Path

import numpy as np
import pytest

# pynndescent/numba compile on first use: keep the cache between test runs and CI steps
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".numba_cache"))


#: the real data sets of the project (../shared/data beside the repository): present in CI, absent for users
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: a shorter config of the tiny planted atlas (one iteration; tests/test_integrity.py, tests/test_data_parallel_run.py)
SHORT_CONFIG = """
[feature]
min_steps = 150
iter_steps = 80
[iterate]
max_iterations = 1
cluster_steps = 60
[impute]
steps = 80
[ltmg]
max_iter = 30
[runtime]
n_workers = 1
"""

#: the tiny planted atlas's config of the whole-run tests (tests/test_pipeline.py, tests/test_object_store.py)
TINY_CONFIG = """
[feature]
min_steps = 200
iter_steps = 100
[iterate]
max_iterations = 2
cluster_steps = 100
[impute]
steps = 100
[ltmg]
max_iter = 30
[runtime]
n_workers = 1
"""



def shared_dataset(name: str) -> Path:
    """``../shared/data/<name>/counts.h5ad``, or skip the calling test (with the reason) when it is absent."""
    path = SHARED_DATA / name / "counts.h5ad"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the real data sets lie in ../shared/data beside the repository)")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def planted_counts(n_cells=300, n_genes=200, n_types=3, seed=0):
    """Small negative-binomial counts with planted types: each type up-regulates its own gene block."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_types, n_cells)
    base = rng.gamma(2.0, 1.0, n_genes)
    mu = np.tile(base, (n_cells, 1))
    block = n_genes // n_types
    for t in range(n_types):
        mu[labels == t, t * block:(t + 1) * block] *= 6.0
    counts = rng.negative_binomial(2, 2 / (2 + mu)).astype(np.float32)
    return counts, labels


def planted_adata(n_cells=240, n_genes=150, n_types=3, seed=1):
    """:func:`planted_counts` as an AnnData (sparse counts, names c<i>/g<j>, ``obs['label']`` as strings)."""
    import anndata
    import scipy.sparse as sp

    counts, labels = planted_counts(n_cells=n_cells, n_genes=n_genes, n_types=n_types, seed=seed)
    adata = anndata.AnnData(X=sp.csr_matrix(counts))
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    adata.obs["label"] = labels.astype(str)
    return adata


@pytest.fixture
def planted():
    return planted_counts()


def hiding(directory) -> tuple[str, ...]:
    """A command prefix that runs a command in its own mount namespace with an empty ``directory``: a Dask
    worker started so cannot read what the client keeps there (the tests' run directories, pytest's base
    temporary directory), as on a cluster without a shared disk (needs root). Only that directory is
    hidden, not all of /tmp: the interpreter and the checkout may live under /tmp themselves."""
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"',
            str(directory))


def hiding_works(directory) -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    return subprocess.run([*hiding(directory), "true"], capture_output=True).returncode == 0


class DaskProcesses:
    """A ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (tests marked ``cluster``).

    ``workers`` maps each worker's address to its process (with ``nanny``, the nanny's: the nanny starts
    a new worker process when its worker dies). :meth:`stop` ends every process it started.
    """

    def __init__(self, log_path: Path, n_workers: int = 2, *, nanny: bool = False, worker_prefix=()):
        """``worker_prefix``: a command the workers are started under (:func:`hiding`: without the client's
        temporary directory, so a worker handed a local path of the client's fails)."""
        import subprocess
        import sys

        from distributed import Client

        self._subprocess = subprocess
        self._worker_prefix = tuple(worker_prefix)
        self.log = open(log_path, "wb")
        self.procs: list = []
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.procs.append(self._start(sys.executable, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                      "--no-dashboard"))
        self.workers = {}
        for i in range(n_workers):
            wport = free_port()
            proc = self._start(sys.executable, "worker", self.address, "--nworkers", "1", "--nthreads", "1",
                               "--nanny" if nanny else "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
                               "--worker-port", str(wport), "--name", f"w{i}", prefix=self._worker_prefix)
            self.procs.append(proc)
            self.workers[f"tcp://127.0.0.1:{wport}"] = proc
        if n_workers:
            try:
                with Client(self.address, timeout="30s") as client:
                    client.wait_for_workers(n_workers, timeout=60)
            except BaseException:
                self.stop()  # no process of a cluster that never came up outlives the test
                raise

    def _start(self, python, *args, prefix=()):
        return self._subprocess.Popen([*prefix, python, "-m", "dask", *args], stdout=self.log,
                                      stderr=self._subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        import signal

        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the group: a nanny's worker process too
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except self._subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the secret key the tests give the S3 client: no log, manifest, report, error or uns/scgnn/config may hold it
S3_SECRET = "scgnn-test-secret-4Zq8vW"


class S3Server:
    """moto's S3 server (``python -m moto.server``) on 127.0.0.1 and the environment that points the AWS
    credential chain at it; every process started with :attr:`env` (a CLI run, a Dask worker) finds it."""

    def __init__(self, log_path: Path):
        import subprocess
        import sys
        import urllib.request

        self._subprocess = subprocess
        self.endpoint = f"http://127.0.0.1:{free_port()}"
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                      self.endpoint.rsplit(":", 1)[1]], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start (see {log_path})") from None
                time.sleep(0.2)
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "scgnn-test-key",
                    "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                    # no ~/.aws of the machine, and never the instance metadata address (not loopback)
                    "AWS_SHARED_CREDENTIALS_FILE": str(log_path.parent / "no-credentials"),
                    "AWS_CONFIG_FILE": str(log_path.parent / "no-config"), "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=self.env["AWS_ACCESS_KEY_ID"], secret=S3_SECRET)

    def bucket(self, name: str) -> str:
        """Create the bucket ``name`` (empty); its URL."""
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except self._subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3 API server on 127.0.0.1 for the session, with the process environment pointing at it (restored
    after); s3fs's cached filesystems are dropped on both sides so none talks to another endpoint."""
    pytest.importorskip("moto.server", reason="moto[server] comes with the dev extra: pip install -e '.[dev]'")
    s3fs = pytest.importorskip("s3fs", reason="s3fs comes with the dev extra: pip install -e '.[dev]'")
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield server
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
