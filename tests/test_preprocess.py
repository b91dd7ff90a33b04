"""Streamed preprocessing against dense references of the published formulas (docs/METHOD.md step 1)."""


import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from conftest import shared_dataset

from scgnn_scale import run
from scgnn_scale.config import build_config
from scgnn_scale.errors import InputError
from scgnn_scale.stages.preprocess import rank_genes_by_variance

# ---- references ---------------------------------------------------------------------------------------


def reference_dense(counts, *, min_cell_fraction=0.01, min_gene_fraction=0.01, n_top_genes=2000,
                    variance_on="raw", normalize_total=0.0):
    """The published preprocessing on a dense numpy matrix, formula by formula."""
    x = np.asarray(counts, dtype=np.float64)
    n = x.shape[0]
    expressed = np.flatnonzero((x != 0).sum(axis=0) >= min_cell_fraction * n)
    xg = x[:, expressed]
    cells = np.flatnonzero((xg != 0).sum(axis=1) >= min_gene_fraction * len(expressed))
    xc = xg[cells]
    if normalize_total:
        lib = xc.sum(axis=1)
        factor = np.divide(normalize_total, lib, out=np.zeros_like(lib), where=lib > 0)
        values = xc * factor[:, None]
    else:
        values = xc
    m = len(cells)
    if variance_on == "raw":
        ints = xc.astype(np.int64)
        assert np.array_equal(ints, xc), "the exact ranking reference needs integer counts"
        numerator = m * (ints**2).sum(axis=0) - ints.sum(axis=0) ** 2  # exact: ties are real ties
        order = np.lexsort((np.arange(len(expressed)), -numerator))
        ranked = xc
    else:
        ranked = np.log1p(values)
        order = np.lexsort((np.arange(len(expressed)), -ranked.var(axis=0, ddof=1)))
    top = np.sort(order[:n_top_genes])
    return {"cells": cells, "genes": expressed[top], "X": np.log1p(values[:, top]).astype(np.float32),
            "variance": ranked[:, top].var(axis=0, ddof=1), "mean": ranked[:, top].mean(axis=0),
            "n_cells_nonzero": (ranked[:, top] != 0).sum(axis=0)}


def reference_sparse(counts: sp.csr_matrix, *, min_cell_fraction=0.01, min_gene_fraction=0.01, n_top_genes=2000):
    """The same formulas (raw variance, no normalisation) with scipy.sparse, for data too big to densify."""
    x = sp.csr_matrix(counts, dtype=np.float64)
    x.eliminate_zeros()
    n = x.shape[0]
    expressed = np.flatnonzero(x.getnnz(axis=0) >= min_cell_fraction * n)
    xg = x[:, expressed]
    cells = np.flatnonzero(xg.getnnz(axis=1) >= min_gene_fraction * len(expressed))
    xc = xg[cells].tocsc()
    m = len(cells)
    sums = np.asarray(xc.sum(axis=0)).ravel().astype(np.int64)
    sums_sq = np.asarray(xc.multiply(xc).sum(axis=0)).ravel().astype(np.int64)
    numerator = [m * int(b) - int(a) ** 2 for a, b in zip(sums, sums_sq, strict=True)]
    order = sorted(range(len(expressed)), key=lambda j: (-numerator[j], j))
    top = np.sort(order[:n_top_genes])
    return {"cells": cells, "genes": expressed[top], "X": np.log1p(xc[:, top].toarray()).astype(np.float32)}


def test_sparse_reference_agrees_with_dense(toy_counts):
    dense = reference_dense(toy_counts, **FILTERS, n_top_genes=tie_cut(toy_counts))
    sparse = reference_sparse(sp.csr_matrix(toy_counts), **FILTERS, n_top_genes=tie_cut(toy_counts))
    for key in ("cells", "genes", "X"):
        np.testing.assert_array_equal(dense[key], sparse[key])


# ---- data -------------------------------------------------------------------------------------------------


@pytest.fixture
def toy_counts():
    """Counts whose filters all bite: rare and empty genes, near-empty cells, exact variance ties."""
    rng = np.random.default_rng(7)
    n, g = 260, 90
    detection = rng.uniform(0.0, 0.6, g)
    detection[:6] = [0.0, 0.004, 0.008, 0.02, 0.03, 0.045]  # around min_cell_fraction = 0.05 (13 cells)
    x = (rng.random((n, g)) < detection) * rng.negative_binomial(2, 0.4, (n, g))
    x[:8] = 0
    # exact ties: permutations of one column over the cells that stay (same variance, different cells);
    # tie_cut() puts the n_top_genes cut-off inside this group
    for j in TIED[1:]:
        x[8:, j] = rng.permutation(x[8:, TIED[0]])
    others = np.setdiff1d(np.arange(10, g), TIED)
    for i in range(1, 8):  # cells with 1..7 non-zeros: around min_gene_fraction of the kept genes
        x[i, rng.choice(others, size=i, replace=False)] = 1
    return x.astype(np.float32)


TIED = [30, 31, 40, 55, 70]
FILTERS = {"min_cell_fraction": 0.05, "min_gene_fraction": 0.1}


def tie_cut(counts) -> int:
    """An n_top_genes that keeps exactly two of the five tied genes (raw variance)."""
    ref = reference_dense(counts, **FILTERS, n_top_genes=10_000)
    x = counts[ref["cells"]][:, ref["genes"]].astype(np.int64)
    m = x.shape[0]
    numerator = m * (x**2).sum(0) - x.sum(0) ** 2
    order = list(np.lexsort((np.arange(len(numerator)), -numerator)))
    first = min(order.index(int(np.flatnonzero(ref["genes"] == j)[0])) for j in TIED)
    return first + 2


def _run_preprocess(tmp_path, counts, *, chunk_rows=32, block_rows=19, name="run", processes=False, **options):
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(counts.shape[0])]
    adata.var_names = [f"gene{j}" for j in range(counts.shape[1])]
    adata.obs["label"] = pd.Categorical(np.arange(counts.shape[0]) % 3)
    config = build_config({"preprocess": options, "store": {"chunk_rows": chunk_rows, "chunk_genes": 16},
                           "ingest": {"block_rows": block_rows, "label_key": "label"},
                           "runtime": {"n_workers": 2, "worker_processes": processes}})
    store = run(adata, tmp_path / name, config=config, until="preprocess", quiet=True)
    return store


def _assert_matches(store, ref, counts):
    cells = store.read_elem("work/preprocess/cells")
    genes = store.read_elem("work/preprocess/genes")
    np.testing.assert_array_equal(cells, ref["cells"])
    np.testing.assert_array_equal(genes, ref["genes"])
    X = zarr.open_array(store.path_of("X"), mode="r")[:]
    assert X.dtype == np.float32 and X.shape == ref["X"].shape
    np.testing.assert_allclose(X, ref["X"], rtol=1e-6, atol=1e-7)
    adata = ad.read_zarr(store.adata_path)
    assert list(adata.obs_names) == [f"cell{i}" for i in ref["cells"]]
    assert list(adata.var_names) == [f"gene{j}" for j in ref["genes"]]
    assert list(adata.obs["label"].astype(int)) == list(ref["cells"] % 3)
    if "variance" in ref:
        np.testing.assert_allclose(adata.var["variance"], ref["variance"], rtol=1e-9)
        np.testing.assert_allclose(adata.var["mean"], ref["mean"], rtol=1e-9)
        np.testing.assert_array_equal(adata.var["n_cells_nonzero"], ref["n_cells_nonzero"])


# ---- the stage against the references -----------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {**FILTERS, "n_top_genes": "tie_cut"},
    {**FILTERS, "n_top_genes": "tie_cut", "normalize_total": 1000.0},
    {**FILTERS, "n_top_genes": 25, "variance_on": "log"},
    {**FILTERS, "n_top_genes": 25, "variance_on": "log", "normalize_total": 500.0},
    {"n_top_genes": 2000},  # paper defaults; fewer genes than n_top_genes survive: all are kept
])
def test_matches_dense_reference(tmp_path, toy_counts, options):
    if options["n_top_genes"] == "tie_cut":
        options = {**options, "n_top_genes": tie_cut(toy_counts)}
    ref = reference_dense(toy_counts, **options)
    if options.get("variance_on") == "log":  # no near-tie at the cut-off, or float rounding decides
        all_genes = reference_dense(toy_counts, **{**options, "n_top_genes": 10_000})
        v = np.sort(all_genes["variance"])[::-1]
        k = options["n_top_genes"]
        assert v[k - 1] - v[k] > 1e-6 * v[k - 1]
    store = _run_preprocess(tmp_path, toy_counts, **options)
    _assert_matches(store, ref, toy_counts)
    info = store.stage_info("preprocess")
    assert info["n_cells"] == len(ref["cells"]) and info["n_genes"] == len(ref["genes"])


def test_filters_and_ties_bite(toy_counts):
    """The toy data exercises every rule (else the comparison above would prove little)."""
    ref = reference_dense(toy_counts, **FILTERS, n_top_genes=tie_cut(toy_counts))
    expressed = np.flatnonzero((toy_counts != 0).sum(0) >= 0.05 * toy_counts.shape[0])
    assert 5 < toy_counts.shape[1] - len(expressed) < 20  # some genes dropped, most kept
    assert 5 < toy_counts.shape[0] - len(ref["cells"]) < 10  # some cells dropped, not all near-empty ones
    kept_tied = [j for j in TIED if j in set(ref["genes"])]
    assert kept_tied == TIED[:2]  # the cut-off falls inside a group of exact ties, broken by gene order
    assert 20 < len(ref["genes"]) < 60


def test_same_result_whatever_the_block_layout(tmp_path, toy_counts):
    opts = {**FILTERS, "n_top_genes": tie_cut(toy_counts)}
    a = _run_preprocess(tmp_path, toy_counts, chunk_rows=7, block_rows=3, name="a", **opts)
    b = _run_preprocess(tmp_path, toy_counts, chunk_rows=1000, block_rows=1000, name="b", **opts)
    np.testing.assert_array_equal(zarr.open_array(a.path_of("X"))[:], zarr.open_array(b.path_of("X"))[:])


def test_worker_processes_give_the_same_matrix(tmp_path, toy_counts):
    """With runtime.worker_processes the passes run on the embedded cluster's worker processes."""
    opts = {**FILTERS, "n_top_genes": tie_cut(toy_counts)}
    ref = reference_dense(toy_counts, **opts)
    _assert_matches(_run_preprocess(tmp_path, toy_counts, processes=True, **opts), ref, toy_counts)


def test_rank_genes_by_variance_exact_and_float():
    # integer sums: exact ranking, ties by index; the float formula would call 1e16+1 and 1e16 equal
    sums = np.array([2.0, 2.0, 4.0, 0.0])
    sums_sq = np.array([4.0, 4.0, 10.0, 0.0])
    variance, order = rank_genes_by_variance(sums, sums_sq, 4)
    np.testing.assert_allclose(variance, [(4 - 4 / 4) / 3, 1.0, (10 - 16 / 4) / 3, 0.0])
    assert list(order) == [2, 0, 1, 3]
    variance, order = rank_genes_by_variance(sums + 0.5, sums_sq + 0.25, 4)
    assert list(order) == list(np.lexsort((np.arange(4), -variance)))


def test_nothing_left_after_filtering(tmp_path):
    counts = np.eye(300, 50, dtype=np.float32)  # every gene in one cell: none reaches 1% of the cells
    with pytest.raises(InputError, match="nothing left after filtering: no gene"):
        _run_preprocess(tmp_path, counts)
    one_gene_each = np.eye(200, 300, dtype=np.float32)  # a cell needs 150 of the 300 genes
    with pytest.raises(InputError, match="nothing left after filtering: no cell"):
        _run_preprocess(tmp_path, one_gene_each, name="b", min_cell_fraction=0.0, min_gene_fraction=0.5)


def test_bad_options(tmp_path, toy_counts):
    with pytest.raises(InputError, match="preprocess.min_cell_fraction"):
        _run_preprocess(tmp_path, toy_counts, min_cell_fraction=1.5)


# ---- real data ----------------------------------------------------------------------------------------------


def test_worm_neuron_matches_reference(tmp_path):
    """``run('../shared/data/worm_neuron/counts.h5ad', out, until='preprocess')`` equals the reference."""
    WORM = shared_dataset("worm_neuron")
    config = build_config({"store": {"chunk_rows": 1024}, "ingest": {"label_key": "label"},
                           "runtime": {"n_workers": 2}})
    store = run(str(WORM), tmp_path / "worm", config=config, until="preprocess", quiet=True)
    source = ad.read_h5ad(WORM)
    ref = reference_sparse(source.X)
    np.testing.assert_array_equal(store.read_elem("work/preprocess/cells"), ref["cells"])
    np.testing.assert_array_equal(store.read_elem("work/preprocess/genes"), ref["genes"])
    adata = ad.read_zarr(store.adata_path)
    assert adata.shape == (len(ref["cells"]), 2000)
    np.testing.assert_allclose(np.asarray(adata.X), ref["X"], rtol=1e-6, atol=1e-7)
    assert list(adata.var_names) == list(source.var_names[ref["genes"]])
    assert list(adata.obs["label"]) == list(source.obs["label"].iloc[ref["cells"]])
    # the filter really ran: worm_neuron keeps about a quarter of its 13,488 genes before selection
    assert store.stage_info("preprocess")["n_genes_expressed"] < source.n_vars // 2
