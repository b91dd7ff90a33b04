"""``raw``: the input counts of every input gene for the cells preprocess keeps (preprocess.keep_counts)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from scgnn_scale import run
from scgnn_scale.config import build_config
from scgnn_scale.export import export_run
from scgnn_scale.stages import preprocess


@pytest.fixture
def counts():
    """Counts where the cell filter bites: near-empty cells (some all-zero) spread among normal ones."""
    rng = np.random.default_rng(3)
    n, g = 240, 70
    x = (rng.random((n, g)) < 0.3) * rng.negative_binomial(2, 0.4, (n, g))
    sparse_cells = rng.choice(n, 30, replace=False)
    x[sparse_cells] = 0
    for k, i in enumerate(sparse_cells[:24]):  # 0..11 non-zeros, around 10% of the 70 genes
        x[i, rng.choice(g, k % 12, replace=False)] = k + 1
    return x.astype(np.float32)


def _run(tmp_path, counts, name="run", overwrite=False, **options):
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(counts.shape[0])]
    adata.var_names = [f"gene{j}" for j in range(counts.shape[1])]
    config = build_config({"preprocess": {"min_gene_fraction": 0.1, "n_top_genes": 20, **options},
                           "store": {"chunk_rows": 32, "chunk_genes": 16}, "ingest": {"block_rows": 19},
                           "runtime": {"n_workers": 2}})
    return run(adata, tmp_path / name, config=config, until="preprocess", overwrite=overwrite, quiet=True)


def _reference(counts, min_gene_fraction=0.1):
    """Kept cells by the published filter (genes in >= 1% of cells, cells on >= the fraction of them)."""
    expressed = (counts != 0).sum(axis=0) >= 0.01 * counts.shape[0]
    return np.flatnonzero((counts[:, expressed] != 0).sum(axis=1) >= min_gene_fraction * expressed.sum())


# entries per raw chunk: the default (one copy task) and small odd ones (tasks whose ranges cut cells)
@pytest.mark.parametrize("chunk", [None, 97, 7])
def test_raw_equals_input_counts_of_kept_cells(tmp_path, counts, monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr(preprocess, "CSR_CHUNK", chunk)
    store = _run(tmp_path, counts)
    kept = _reference(counts)
    assert 0 < counts.shape[0] - len(kept) < 30  # the filter dropped some cells, not all near-empty ones
    adata = ad.read_zarr(store.adata_path)
    assert adata.raw is not None
    assert list(adata.raw.obs_names) == list(adata.obs_names) == [f"cell{i}" for i in kept]
    assert list(adata.raw.var_names) == [f"gene{j}" for j in range(counts.shape[1])]  # every input gene
    raw_x = adata.raw.X
    assert sp.issparse(raw_x) and raw_x.format == "csr" and raw_x.dtype == np.float32
    np.testing.assert_array_equal(raw_x.toarray(), counts[kept])
    attrs = zarr.open_group(store.adata_path / "raw" / "X", mode="r").attrs
    assert attrs["encoding-type"] == "csr_matrix" and list(attrs["shape"]) == [len(kept), counts.shape[1]]
    assert store.stage_info("preprocess")["raw_nnz"] == np.count_nonzero(counts[kept])

    lazy = store.read_raw()
    np.testing.assert_array_equal(lazy["X"].compute().toarray(), counts[kept])
    eager = store.read_raw(lazy=False)
    np.testing.assert_array_equal(eager["X"].toarray(), counts[kept])
    pd.testing.assert_index_equal(eager["var"].index, adata.raw.var_names)
    rebuilt = ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var, raw=eager)
    np.testing.assert_array_equal(rebuilt.raw[:, "gene5"].X.toarray().ravel(), counts[kept, 5])


def test_empty_kept_cells(tmp_path, counts, monkeypatch):
    """min_gene_fraction 0 keeps the all-zero cells: their rows are empty in raw."""
    monkeypatch.setattr(preprocess, "CSR_CHUNK", 17)
    store = _run(tmp_path, counts, min_gene_fraction=0.0)
    raw = store.read_raw(lazy=False)["X"]
    assert (np.diff(raw.indptr) == 0).sum() == 8
    np.testing.assert_array_equal(raw.toarray(), counts)


def test_no_raw_without_keep_counts(tmp_path, counts):
    store = _run(tmp_path, counts, keep_counts=False)
    assert ad.read_zarr(store.adata_path).raw is None
    assert store.read_raw() is None
    assert not (store.adata_path / "raw").exists()
    # a redo without keep_counts removes the raw an earlier run wrote
    store = _run(tmp_path, counts, name="again")
    assert store.read_raw() is not None
    store = _run(tmp_path, counts, name="again", overwrite=True, keep_counts=False)
    assert ad.read_zarr(store.adata_path).raw is None
    assert not (store.adata_path / "raw").exists()


def test_h5ad_export_carries_raw(tmp_path, counts):
    store = _run(tmp_path, counts)
    out = export_run(store.root, tmp_path / "res.h5ad", block_rows=50)
    got = ad.read_h5ad(out)
    kept = _reference(counts)
    assert got.raw is not None and got.raw.shape == (len(kept), counts.shape[1])
    assert list(got.raw.var_names) == [f"gene{j}" for j in range(counts.shape[1])]
    np.testing.assert_array_equal(got.raw.X.toarray(), counts[kept])
    np.testing.assert_array_equal(got.X, ad.read_zarr(store.adata_path).X)
    without = _run(tmp_path, counts, name="bare", keep_counts=False)
    assert ad.read_h5ad(export_run(without.root, tmp_path / "bare.h5ad")).raw is None
