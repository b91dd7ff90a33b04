"""The pca stage (principal components of library-normalised counts) and the cell graph searched beside them,
against dense references of the formulas and planted structure."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from scgnn_scale import run
from scgnn_scale.cell_graph import knn_graph, searched_embedding
from scgnn_scale.config import GraphConfig, build_config
from scgnn_scale.errors import InputError
from scgnn_scale.keys import KEYS
from scgnn_scale.stages import pca as pca_stage
from scgnn_scale.testing import stage_context

N_TYPES = 3


@pytest.fixture(scope="module")
def planted():
    """Counts of 3 planted types (each with its own 12 marker genes) and library sizes spread tenfold, plus
    a never-expressed gene (never chosen)."""
    rng = np.random.default_rng(7)
    n, g = 360, 150
    types = np.arange(n) % N_TYPES
    base = rng.gamma(0.6, 1.0, size=g)
    profile = np.tile(base, (N_TYPES, 1))
    for t in range(N_TYPES):
        profile[t, 12 * t:12 * (t + 1)] *= 12.0
    depth = np.exp(rng.uniform(np.log(0.3), np.log(3.0), size=n))
    counts = rng.poisson(profile[types] * depth[:, None]).astype(np.float32)
    counts[:, -1] = 0  # never expressed
    return counts, types


def reference(counts, n_top, n_comps, target_sum=0.0):
    """The dense formulas: normalise to the median library size, Seurat's normalised dispersion on 20 equal-width
    bins of log1p(mean) (a lone gene in its bin: 1), log1p, and a PCA by SVD of the centred matrix."""
    x = counts.astype(np.float64)
    library = x.sum(axis=1)
    target = target_sum or np.median(library[library > 0])
    norm = x * (target / library)[:, None]
    expressed = np.flatnonzero((x != 0).any(axis=0))
    mean = norm[:, expressed].mean(axis=0)
    var = norm[:, expressed].var(axis=0, ddof=1)
    mean = np.where(mean == 0, 1e-12, mean)
    disp = np.full(len(expressed), np.nan)
    positive = var / mean > 0
    disp[positive] = np.log((var / mean)[positive])
    log_mean = np.log1p(mean)
    lo, hi = log_mean.min(), log_mean.max()
    edges = np.linspace(lo, hi, 21)
    edges[0] -= (hi - lo) * 0.001  # the lowest bin holds the minimum (right-closed bins)
    which = np.clip(np.searchsorted(edges, log_mean, side="left") - 1, 0, 19)
    z = np.full(len(expressed), np.nan)
    for b in range(20):
        members = np.flatnonzero((which == b) & ~np.isnan(disp))
        if len(members) == 1:
            z[members] = 1.0
        elif len(members) > 1:
            z[members] = (disp[members] - disp[members].mean()) / disp[members].std(ddof=1)
    finite = np.sort(z[~np.isnan(z)])[::-1]
    cut = finite[min(n_top, len(finite)) - 1]
    genes = expressed[np.nan_to_num(z, nan=-np.inf) >= cut]
    y = np.log1p(norm[:, genes])
    y = y - y.mean(axis=0)
    u, s, vt = np.linalg.svd(y, full_matrices=False)
    return genes, (u * s)[:, :n_comps], s[:n_comps] ** 2 / (len(y) - 1)


def _preprocessed(tmp_path, counts, name="run", **preprocess):
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(counts.shape[0])]
    adata.var_names = [f"gene{j}" for j in range(counts.shape[1])]
    config = build_config({"preprocess": {"min_cell_fraction": 0.0, "min_gene_fraction": 0.0, **preprocess},
                           "store": {"chunk_rows": 64, "chunk_genes": 32}, "runtime": {"n_workers": 2}})
    return run(adata, tmp_path / name, config=config, until="preprocess", quiet=True), config


def _pca(store, config, **options):
    config = build_config({"pca": options}, base=config)
    ctx = stage_context(store, "pca", config)
    try:
        info = pca_stage.run(ctx)
    finally:
        ctx.runtime.close()
    return info, (np.asarray(zarr.open_array(store.path_of(KEYS.pca), mode="r")[:]) if store.has(KEYS.pca) else None)


def _same_up_to_sign(ours, ref, variance, rtol=1e-4):
    """Each component equal to the reference's up to its sign, to within what float32 determines of it.

    A component's axis turns by about float32's rounding times ``largest variance / gap to its nearest
    neighbour``, so the tolerance grows with that ratio, and a near tie (the ratio above 1e4) is not compared.
    The first three components are well apart here, so the comparison is never empty."""
    compared = 0
    for i in range(ours.shape[1]):
        gap = min(abs(variance[i] - variance[j]) for j in (i - 1, i + 1) if 0 <= j < len(variance))
        conditioning = variance[0] / max(gap, 1e-300)
        if conditioning > 1e4:
            continue  # an eigenvalue near a tie: its axis is not determined
        tol = max(rtol, 1e-6 * conditioning)
        sign = np.sign(ours[:, i] @ ref[:, i])
        np.testing.assert_allclose(ours[:, i] * sign, ref[:, i], rtol=tol, atol=tol * np.abs(ref[:, i]).max())
        compared += 1
    assert compared >= min(3, ours.shape[1])


def test_matches_dense_reference(tmp_path, planted):
    counts, _ = planted
    store, config = _preprocessed(tmp_path, counts)
    info, scores = _pca(store, config, n_top_genes=60, n_comps=10)
    genes, ref_scores, ref_var = reference(counts, 60, 10)
    np.testing.assert_array_equal(store.read_elem(pca_stage.PCA_GENES), genes)
    assert len(genes) >= 60 and counts.shape[1] - 1 not in genes
    assert scores.shape == (counts.shape[0], 10) and scores.dtype == np.float32
    _same_up_to_sign(scores, ref_scores, ref_var)
    np.testing.assert_allclose(info["target_sum"], np.median(counts.sum(axis=1)), rtol=1e-9)
    assert ad.read_zarr(store.adata_path).obsm["X_pca"].shape == (counts.shape[0], 10)


def test_fixed_target_sum_and_every_gene(tmp_path, planted):
    """A set target_sum, and more genes asked than vary: all genes of finite dispersion are used."""
    counts, _ = planted
    store, config = _preprocessed(tmp_path, counts)
    info, scores = _pca(store, config, n_top_genes=5000, n_comps=5, target_sum=1000.0)
    genes, ref_scores, ref_var = reference(counts, 5000, 5, target_sum=1000.0)
    assert info["n_genes"] == len(genes) == int((counts != 0).any(axis=0).sum())
    _same_up_to_sign(scores, ref_scores, ref_var)


def test_sampled_fit_keeps_the_planted_types_apart(tmp_path, planted):
    """Axes fitted on 90 of 360 cells: every cell is projected, and the planted types stay apart."""
    counts, types = planted
    store, config = _preprocessed(tmp_path, counts)
    info, scores = _pca(store, config, n_top_genes=60, n_comps=5, max_cells=90)
    assert info["n_fit_cells"] == 90 and scores.shape[0] == counts.shape[0]
    centres = np.stack([scores[types == t, :2].mean(axis=0) for t in range(N_TYPES)])
    nearest = np.argmin(((scores[:, None, :2] - centres[None]) ** 2).sum(-1), axis=1)
    assert (nearest == types).mean() > 0.98


def test_reads_the_input_copy_without_raw(tmp_path, planted):
    """preprocess.keep_counts off: the counts come from work/input, with the same result."""
    counts, _ = planted
    with_raw, config = _preprocessed(tmp_path, counts, name="raw")
    without, config_no_raw = _preprocessed(tmp_path, counts, name="input", keep_counts=False)
    assert not without.has(KEYS.raw) and without.has(KEYS.input)  # kept: pca is still to read it
    _, a = _pca(with_raw, config, n_top_genes=60, n_comps=5)
    _, b = _pca(without, config_no_raw, n_top_genes=60, n_comps=5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_off_removes_the_components(tmp_path, planted):
    counts, _ = planted
    store, config = _preprocessed(tmp_path, counts)
    _pca(store, config, n_top_genes=60, n_comps=5)
    info, scores = _pca(store, config, n_comps=0)
    assert info == {"n_comps": 0} and scores is None and not store.has(pca_stage.PCA_GENES)


@pytest.mark.parametrize("option, value", [("n_top_genes", 1), ("max_cells", 1), ("n_comps", -1),
                                           ("target_sum", -5.0)])
def test_bad_options(tmp_path, planted, option, value):
    counts, _ = planted
    store, config = _preprocessed(tmp_path, counts)
    with pytest.raises(InputError, match=f"pca.{option}"):
        _pca(store, config, **{option: value})


def test_side_by_side_parts_weigh_the_same(tmp_path, rng):
    """Each part centred and scaled to a mean squared row norm of 1, in memory and streamed alike."""
    a = rng.normal(5.0, 30.0, size=(500, 8)).astype(np.float32)
    b = rng.normal(-2.0, 0.1, size=(500, 3)).astype(np.float32)
    za = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=a.shape, dtype=np.float32, chunks=(64, 8))
    zb = zarr.create_array(store=str(tmp_path / "b.zarr"), shape=b.shape, dtype=np.float32, chunks=(64, 3))
    za[:], zb[:] = a, b
    with searched_embedding([za, zb], streamed=False) as whole:
        assert whole.shape == (500, 11)
        for part in (whole[:, :8], whole[:, 8:]):
            np.testing.assert_allclose(part.mean(axis=0), 0, atol=1e-5)
            assert abs((part.astype(np.float64) ** 2).sum(axis=1).mean() - 1.0) < 1e-5
        with searched_embedding([za, zb], streamed=True, scratch_dir=tmp_path) as streamed:
            np.testing.assert_array_equal(streamed[:], whole)
    with searched_embedding([za], streamed=False) as alone:
        np.testing.assert_array_equal(alone, a)  # one part: searched as it is (the published graph)


def test_graph_stage_searches_both(tmp_path, planted):
    """The graph stage's graph is the KNN graph of [feature | PCA] unit-scaled, and of the feature embedding alone
    with pca.n_comps 0."""
    from scgnn_scale.keys import FIRST_PASS
    from scgnn_scale.stages import graph as graph_stage

    counts, types = planted
    store, config = _preprocessed(tmp_path, counts)
    _pca(store, config, n_top_genes=60, n_comps=5)
    rng = np.random.default_rng(3)
    feature = rng.normal(size=(counts.shape[0], 16)).astype(np.float32)  # noise: the graph must come from the PCA
    with store.staging("feature") as st:
        st.create_matrix(FIRST_PASS.feature_embedding, feature.shape, np.float32)[:] = feature

    def graph_of(n_comps):
        cfg = build_config({"pca": {"n_comps": n_comps}}, base=config)
        ctx = stage_context(store, "graph", cfg)
        graph_stage.run(ctx)
        ctx.runtime.close()
        return store.read_elem(FIRST_PASS.graph)

    pcs = np.asarray(zarr.open_array(store.path_of(KEYS.pca))[:], dtype=np.float64)
    both = np.hstack([(p - p.mean(0)) / np.sqrt(((p - p.mean(0)) ** 2).sum(1).mean())
                      for p in (feature.astype(np.float64), pcs)]).astype(np.float32)
    expected, _ = knn_graph(both, GraphConfig(), device="cpu", seed=0)
    got = graph_of(5)
    assert (got != expected).nnz == 0
    alone = graph_of(0)
    assert (alone != knn_graph(feature, GraphConfig(), device="cpu", seed=0)[0]).nnz == 0
    same_type = lambda g: (types[g.tocoo().row] == types[g.tocoo().col]).mean()  # noqa: E731
    assert same_type(got) > 0.9 > 0.5 > same_type(alone)  # the planted types come from the PCA part


def test_run_without_raw_keeps_the_input_copy_until_pca_has_finished(tmp_path, planted):
    """--preprocess-keep-counts false: work/input outlives preprocess for the pca stage, then is removed."""
    counts, _ = planted
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(counts.shape[0])]
    adata.var_names = [f"gene{j}" for j in range(counts.shape[1])]
    config = build_config({"preprocess": {"keep_counts": False}, "ltmg": {"enabled": False},
                           "feature": {"hidden": 32, "latent": 8, "min_steps": 5, "max_epochs": 1},
                           "pca": {"n_top_genes": 60, "n_comps": 5}, "runtime": {"n_workers": 1}})
    store = run(adata, tmp_path / "run", config=config, until="feature", quiet=True)
    assert store.has(KEYS.input) and not store.has(KEYS.raw)  # pca is still to read it
    store = run(adata, tmp_path / "run", config=config, until="pca", quiet=True)
    assert store.has(KEYS.pca) and not store.has(KEYS.input)
    genes, ref_scores, ref_var = reference(counts, 60, 5)
    _same_up_to_sign(np.asarray(zarr.open_array(store.path_of(KEYS.pca))[:]), ref_scores, ref_var)
