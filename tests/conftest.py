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
