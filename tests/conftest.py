import os
from pathlib import Path

import numpy as np
import pytest

# pynndescent/numba compile on first use: keep the cache between test runs and CI steps
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".numba_cache"))


#: the real data sets of the project (../shared/data beside the repository): present in CI, absent for users
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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


class DaskProcesses:
    """A ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (tests marked ``cluster``).

    ``workers`` maps each worker's address to its process (with ``nanny``, the nanny's: the nanny starts
    a new worker process when its worker dies). :meth:`stop` ends every process it started.
    """

    def __init__(self, log_path: Path, n_workers: int = 2, *, nanny: bool = False):
        import subprocess
        import sys

        from distributed import Client

        self._subprocess = subprocess
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
                               "--worker-port", str(wport), "--name", f"w{i}")
            self.procs.append(proc)
            self.workers[f"tcp://127.0.0.1:{wport}"] = proc
        if n_workers:
            with Client(self.address, timeout="30s") as client:
                client.wait_for_workers(n_workers, timeout=60)

    def _start(self, python, *args):
        return self._subprocess.Popen([python, "-m", "dask", *args], stdout=self.log,
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
