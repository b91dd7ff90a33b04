"""LTMG: the censored-mixture EM against dense formulas, planted mixtures, edge genes, and the stage."""

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from scipy.stats import norm

from scgnn_scale import ltmg as L
from scgnn_scale.config import RuntimeConfig, build_config
from scgnn_scale.errors import InputError
from scgnn_scale.runtime import Runtime
from scgnn_scale.stages import ltmg as stage
from scgnn_scale.testing import stage_context, store_with_matrix


def planted_gene(rng, n, weights, means, sds, zcut=None):
    """Raw values exp(y), y from a planted mixture; y < zcut set to 0 (left-censored). Component -1: censored."""
    weights, means, sds = map(np.asarray, (weights, means, sds))
    comp = rng.choice(len(weights), n, p=weights)
    y = rng.normal(means[comp], sds[comp])
    x = np.exp(y)
    if zcut is not None:
        x[y < zcut] = 0.0
        comp = np.where(y < zcut, -1, comp)
    return x, comp


# -- the EM step against the formulas, written out densely ------------------------------------------

def dense_em_step(y, n_cens, zcut, w, mu, sd):
    """One EM iteration on raw (uncompressed) uncensored values, every formula spelled out."""
    dens = w[None, :] * norm.pdf(y[:, None], mu[None, :], sd[None, :])
    r = dens / dens.sum(axis=1, keepdims=True)
    mass = w * norm.cdf(zcut, mu, sd)
    rc = mass / mass.sum()
    a = (zcut - mu) / sd
    lam = norm.pdf(a) / norm.cdf(a)
    e_y = mu - sd * lam  # E[y | y < zcut] per component
    nk = r.sum(axis=0) + n_cens * rc
    new_mu = (r.T @ y + n_cens * rc * e_y) / nk
    # E[(y - new_mu)^2 | y < zcut] = sd^2 (1 - a lam) + 2 (mu - new_mu)(-sd lam) + (mu - new_mu)^2
    e_sq = sd**2 * (1 - a * lam) - 2 * (mu - new_mu) * sd * lam + (mu - new_mu) ** 2
    new_var = ((r * (y[:, None] - new_mu[None, :]) ** 2).sum(axis=0) + n_cens * rc * e_sq) / nk
    loglik = np.log(dens.sum(axis=1)).sum() + n_cens * np.log(mass.sum())
    return nk / (len(y) + n_cens), new_mu, np.sqrt(new_var), loglik


def test_em_step_matches_dense_formulas(rng):
    # ties (rounded values) exercise the weighted unique-value compression
    y = np.round(np.concatenate([rng.normal(0.5, 0.4, 300), rng.normal(2.5, 0.5, 500)]), 2)
    y = y[y >= 0.2]
    n_cens, zcut = 250.0, 0.2
    w0, mu0, sd0 = np.array([0.4, 0.6]), np.array([0.0, 2.0]), np.array([0.8, 0.8])
    vals, counts, _ = L._unique_rows(y[None, :])
    assert vals.shape[1] < y.size  # compressed
    res = L.em_censored_mixture(vals, counts, np.array([n_cens]), np.array([zcut]), mu0[None], sd0[None],
                                w0[None], max_iter=1, tol=0.0, min_sd=1e-6)
    w1, mu1, sd1, _ = dense_em_step(y, n_cens, zcut, w0, mu0, sd0)
    np.testing.assert_allclose(res.weights[0], w1, rtol=1e-6)
    np.testing.assert_allclose(res.means[0], mu1, rtol=1e-6)
    np.testing.assert_allclose(res.sds[0], sd1, rtol=1e-6)
    # the returned log-likelihoods are those of the returned parameters
    _, _, _, ll1 = dense_em_step(y, n_cens, zcut, w1, mu1, sd1)
    np.testing.assert_allclose(res.loglik[0], ll1, rtol=1e-6)
    ll_unc = np.log((w1[None] * norm.pdf(y[:, None], mu1[None], sd1[None])).sum(axis=1)).sum()
    np.testing.assert_allclose(res.loglik_uncensored[0], ll_unc, rtol=1e-6)


def test_em_increases_likelihood_and_rows_are_independent(rng):
    y1 = np.sort(rng.normal(1.0, 1.0, 400))
    y2 = np.sort(rng.normal(3.0, 0.5, 250))
    vals = np.zeros((2, 400))
    counts = np.zeros((2, 400))
    vals[0], counts[0] = y1, 1
    vals[1, :250], counts[1, :250] = y2, 1
    vals[1, 250:] = y2[0]
    start = (np.array([[0.0, 2.0], [2.5, 3.5]]), np.ones((2, 2)), np.full((2, 2), 0.5))
    cens, zc = np.array([30.0, 0.0]), np.array([-0.5, 0.0])
    lls = [L.em_censored_mixture(vals, counts, cens, zc, *start, max_iter=it, tol=0.0).loglik
           for it in (1, 2, 5, 20)]
    assert np.all(np.diff(np.stack(lls), axis=0) >= -1e-6)
    both = L.em_censored_mixture(vals, counts, cens, zc, *start, max_iter=20, tol=0.0)
    alone = L.em_censored_mixture(vals[1:, :250], counts[1:, :250], cens[1:], zc[1:],
                                  *(s[1:] for s in start), max_iter=20, tol=0.0)
    np.testing.assert_allclose(both.means[1], alone.means[0], rtol=1e-10)


# -- planted mixtures ---------------------------------------------------------------------------------

CENSORED_CASES = [
    ((0.5, 0.5), (0.0, 2.5), (0.7, 0.5), 0.3),
    ((0.3, 0.4, 0.3), (0.0, 2.5, 5.0), (0.6, 0.4, 0.5), 0.3),
]
PLAIN_CASES = [
    ((1.0,), (2.0,), (0.5,)),
    ((0.4, 0.6), (1.0, 3.5), (0.5, 0.4)),
    ((0.2, 0.5, 0.3), (0.5, 2.5, 4.5), (0.5, 0.5, 0.5)),
]


@pytest.mark.parametrize("numbering", ["published", "one-based"])
def test_recovers_planted_mixtures(rng, numbering):
    n = 4000
    cols, comps = [], []
    for w, mu, sd, zc in CENSORED_CASES:
        x, c = planted_gene(rng, n, w, mu, sd, zc)
        cols.append(x)
        comps.append(c)
    for w, mu, sd in PLAIN_CASES:
        x, c = planted_gene(rng, n, w, mu, sd)
        cols.append(x)
        comps.append(c)
    values = np.stack(cols, axis=1)
    n_cens = len(CENSORED_CASES)
    # censoring as planted: the cut of the censored genes; the plain genes' own minima
    zcut = np.array([c[3] for c in CENSORED_CASES] + list(np.log(values[:, n_cens:].min(axis=0))))
    censored = np.arange(values.shape[1]) < n_cens
    fit = L.fit_genes(values, zcut=zcut, cut=np.exp(zcut), censored=censored, log1p_input=False)
    bp, table = L.state_table(fit, log1p_input=False, numbering=numbering)
    states = L.assign_states(values, bp, table)
    for g, (w, mu, sd, *_) in enumerate(CENSORED_CASES + PLAIN_CASES):
        k = len(w)
        assert fit.k[g] == k, f"gene {g}: BIC chose K={fit.k[g]}, planted {k}"
        col = 0 if censored[g] else 1
        np.testing.assert_allclose(fit.weights[g, col:col + k], w, atol=0.05)
        np.testing.assert_allclose(fit.means[g, col:col + k], mu, atol=0.15)
        np.testing.assert_allclose(fit.sds[g, col:col + k], sd, atol=0.1)
        assert np.all(np.isnan(fit.weights[g, col + k:]))
        if not censored[g]:
            assert fit.weights[g, 0] == 0 and fit.means[g, 0] == -np.inf  # the empty lowest component
        planted = comps[g]
        uncensored = planted >= 0
        offset = 0 if (numbering == "published" and censored[g]) else 1
        agree = (states[uncensored, g] == planted[uncensored] + offset).mean()
        assert agree >= 0.95, f"gene {g}: states agree with the planted components on {agree:.3f}"
        assert np.all(states[~uncensored, g] == 0)
    # the fit did not peek at the truth: the same genes through the global cut give the same K
    _, fit_global, _ = L.ltmg(values[:, :n_cens])
    np.testing.assert_array_equal(fit_global.k, fit.k[:n_cens])


def test_global_zcut_is_where_the_weighted_densities_cross(rng):
    w, mu, sd = np.array([0.7, 0.3]), np.array([0.0, 2.0]), np.array([0.3, 0.4])
    mins, _ = planted_gene(rng, 3000, w, mu, sd)
    zg = L.global_zcut(np.log(mins))
    grid = np.linspace(mu[0], mu[1], 20001)
    diff = w[0] * norm.pdf(grid, mu[0], sd[0]) - w[1] * norm.pdf(grid, mu[1], sd[1])
    planted_cross = grid[np.flatnonzero(np.diff(np.sign(diff)))[0]]
    assert abs(zg - planted_cross) < 0.1
    cross = L.intersect_two_gaussians(w, mu, sd)
    assert abs(cross - planted_cross) < 1e-3
    # nothing to cut: all minima equal, a single gene, no gene
    assert L.global_zcut(np.zeros(50)) == 0.0
    assert L.global_zcut(np.array([1.5, np.nan])) == 1.5
    assert L.global_zcut(np.array([np.nan])) == -np.inf


# -- states: the breakpoint table against evaluating every density ----------------------------------

def test_state_table_matches_dense_argmax(rng):
    n = 3000
    cols = [planted_gene(rng, n, w, mu, sd, zc)[0] for w, mu, sd, zc in CENSORED_CASES]
    cols += [planted_gene(rng, n, w, mu, sd)[0] for w, mu, sd in PLAIN_CASES]
    # a wide component on both sides of a narrow one: its states are not contiguous
    cols.append(np.exp(np.concatenate([rng.normal(2.0, 0.1, n // 2), rng.normal(2.0, 1.5, n - n // 2)])))
    values = np.stack(cols, axis=1)
    values[rng.random(values.shape) < 0.2] = 0
    for log1p_input, data in ((False, values), (True, np.log1p(values).astype(np.float32))):
        states, fit, _ = L.ltmg(data, log1p_input=log1p_input)
        for numbering in L.NUMBERINGS:
            bp, table = L.state_table(fit, log1p_input=log1p_input, numbering=numbering, dtype=data.dtype)
            got = L.assign_states(data, bp, table)
            want = L.dense_states(data, fit, log1p_input=log1p_input, numbering=numbering)
            np.testing.assert_array_equal(got, want)
        assert states.dtype == np.uint8
        assert np.all(states[data == 0] == 0)
    assert fit.k[-1] >= 2


def test_zero_weight_floor_gives_the_fit_of_minus_infinity(rng, monkeypatch):
    """The finite log-weight floor of padded components (kept out of BLAS as -inf) changes no fit."""
    values = np.exp(rng.normal(1.0, 0.8, (1000, 60))) * (rng.random((1000, 60)) > 0.5)
    states, fit, _ = L.ltmg(values)
    monkeypatch.setattr(L, "LOG_ZERO_WEIGHT", -np.inf)
    with np.errstate(invalid="ignore"):
        states_inf, fit_inf, _ = L.ltmg(values)
    np.testing.assert_array_equal(states, states_inf)
    for name in ("k", "weights", "means", "sds"):
        np.testing.assert_array_equal(getattr(fit, name), getattr(fit_inf, name))


# -- edge genes ---------------------------------------------------------------------------------------

def test_edge_genes_have_documented_states(rng):
    n = 500
    normal = np.exp(rng.normal(1.0, 0.5, n)) * (rng.random(n) > 0.3)
    cols = {
        "all_zero": np.zeros(n),
        "one_positive": np.where(np.arange(n) == 7, 5.0, 0.0),
        "all_equal": np.full(n, 3.0),
        "no_censored": np.exp(rng.normal(3.0, 0.3, n)),
        "huge": np.exp(rng.normal(60.0, 1.0, n)) * (rng.random(n) > 0.5),
        "bad_entries": np.where(np.arange(n) % 3 == 0, np.nan, np.where(np.arange(n) % 3 == 1, -1.0, normal)),
        "normal": normal,
    }
    values = np.stack(list(cols.values()), axis=1)
    col = {name: j for j, name in enumerate(cols)}
    with np.errstate(over="raise", invalid="raise"):  # no overflow, no NaN made anywhere
        states, fit, zg = L.ltmg(values)
        assert np.all(states[~(values > 0)] == 0) and states.dtype == np.uint8
        # below every gene's minimum the global cut censors nothing beyond each gene's own zeros, so that
        # each edge gene shows its own documented behaviour (with these few genes Zcut_G lands next to the
        # huge gene's minimum and censors everything else)
        min_pos, n_nonpos = L.min_positive(values)
        zcut, cut, censored = L.gene_cuts(min_pos, n_nonpos, -2.0, log1p_input=False)
        fit = L.fit_genes(values, zcut=zcut, cut=cut, censored=censored, log1p_input=False)
        states = L.assign_states(values, *L.state_table(fit, log1p_input=False))
    j = col["all_zero"]
    assert fit.k[j] == 0 and np.isnan(fit.zcut[j]) and np.all(states[:, j] == 0)
    j = col["one_positive"]
    assert fit.k[j] == 0 and np.all(states[:, j] == 0)
    j = col["all_equal"]
    assert not fit.censored[j] and fit.k[j] == 1 and np.all(states[:, j] == 1)
    j = col["no_censored"]
    assert not fit.censored[j] and fit.k[j] >= 1 and np.all(states[:, j] >= 1)
    j = col["huge"]
    assert fit.k[j] >= 1 and np.all(states[values[:, j] == 0, j] == 0)
    assert np.all(np.isfinite(fit.means[j, :fit.k[j]]))
    j = col["bad_entries"]
    bad = ~(values[:, j] > 0)
    assert np.all(states[bad, j] == 0) and fit.k[j] >= 1
    assert states.dtype == np.uint8 and states.max() <= 5
    assert np.isfinite(zg)


# -- sample fit against full fit ----------------------------------------------------------------------

def _atlas(tmp_path, n_cells, n_genes, seed):
    from scgnn_scale.simulate import simulate_atlas

    # the atlas the bounds below were set on: uniform dropout (with the expression model, the simulator's
    # default since 1232111, the 10k-cell sample agrees with the full fit on 0.984 of the entries)
    path = simulate_atlas(tmp_path / "atlas.zarr", n_cells=n_cells, n_genes=n_genes, seed=seed,
                          dropout_model="uniform")
    g = zarr.open_group(path, mode="r")
    counts = sp.csr_matrix((g["X/data"][:], g["X/indices"][:], g["X/indptr"][:]), shape=(n_cells, n_genes))
    return np.log1p(counts.toarray()).astype(np.float32)


def test_sample_fit_agrees_with_full_fit(tmp_path):
    n = 30000
    x = _atlas(tmp_path, n, 60, seed=3)
    full, fit_full, _ = L.ltmg(x, log1p_input=True)
    rows = stage.sample_rows(n, 10000, seed=0)
    sampled, fit_sample, _ = L.ltmg(x, log1p_input=True, fit_rows=rows)
    assert rows.size == 10000 and np.all(np.diff(rows) > 0)
    agree = (sampled == full).mean()
    assert agree >= 0.99, f"sample fit agrees with the full fit on {agree:.4f} of the entries"
    assert (fit_sample.k == fit_full.k).mean() >= 0.8


# -- the stage ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client_holder():
    runtime = Runtime.from_config(RuntimeConfig(n_workers=2), quiet=True)  # one Dask cluster for the module
    yield runtime
    runtime.close()


def _config(**ltmg):
    return build_config({"store": {"chunk_rows": 128, "chunk_genes": 32},
                         "ltmg": {"max_cells": 300, "block_genes": 40, **ltmg}})


def _run(tmp_path, name, counts, config, holder):
    store = store_with_matrix(tmp_path / name, counts, config=config)
    info = stage.run(stage_context(store, "ltmg", config, runtime=holder))
    return store, info


def test_row_parts_are_whole_chunks_covering_the_cells():
    assert stage.row_parts(500, 128, 3) == [(0, 128), (128, 384), (384, 500)]
    assert stage.row_parts(500, 128, 1) == [(0, 500)]
    assert stage.row_parts(500, 128, 99) == [(0, 128), (128, 256), (256, 384), (384, 500)]
    assert stage.row_parts(1, 128, 4) == [(0, 1)]


def test_stage_writes_states_like_the_dense_model(tmp_path, planted, client_holder, monkeypatch):
    counts, _ = planted  # 300 cells x 200 genes: 2 x 2 row chunks x gene chunks per block, a sample of 300
    counts = np.concatenate([counts, counts[:200] * 3], axis=0)  # 500 cells: the sample is a true subset
    config = _config()
    row_parts = stage.row_parts  # label tasks by block x 3 row ranges, whatever the worker count
    monkeypatch.setattr(stage, "row_parts", lambda n, rows, parts: row_parts(n, rows, 3))
    store, info = _run(tmp_path, "run", counts, config, client_holder)
    assert info["label_tasks"] == 3 * info["n_blocks"]
    n, g = counts.shape
    x = store.open_array("X")
    states = store.open_array("layers/ltmg")
    assert states.shape == (n, g) and states.dtype == np.uint8 and states.chunks == x.chunks
    assert info["n_blocks"] == 4 and info["sample_cells"] == 300  # blocks of 64 genes (whole 32-gene chunks)
    assert sum(info["k_counts"].values()) == g
    want, fit, zg = L.ltmg(x[:], log1p_input=True, fit_rows=stage.sample_rows(n, 300, config.runtime.seed))
    np.testing.assert_array_equal(states[:], want)
    np.testing.assert_array_equal(store.read_elem("var/ltmg_k"), fit.k)
    np.testing.assert_array_equal(store.read_elem("var/ltmg_zcut"), fit.zcut)
    for name in ("weights", "means", "sds"):
        arr = store.read_elem(f"varm/ltmg_{name}")
        assert arr.shape == (g, config.ltmg.k_max)
        # genes fitted in blocks here, all at once there: BLAS may round the batched products of the two
        # shapes differently (seen on an AVX-512 VM, 1e-16), so the EM's parameters agree to rounding
        np.testing.assert_allclose(arr, getattr(fit, name), rtol=1e-9, atol=1e-12)
    assert info["zcut_global"] == zg
    adata = anndata.read_zarr(store.adata_path)
    assert adata.layers["ltmg"].dtype == np.uint8
    assert {"ltmg_k", "ltmg_zcut"} <= set(adata.var.columns)
    assert adata.varm["ltmg_means"].shape == (g, config.ltmg.k_max)


def test_stage_is_deterministic(tmp_path, planted, client_holder):
    counts, _ = planted
    config = _config(max_cells=200)
    a, _ = _run(tmp_path, "a", counts, config, client_holder)
    b, _ = _run(tmp_path, "b", counts, config, client_holder)
    np.testing.assert_array_equal(a.open_array("layers/ltmg")[:], b.open_array("layers/ltmg")[:])
    np.testing.assert_array_equal(a.read_elem("varm/ltmg_means"), b.read_elem("varm/ltmg_means"))
    other = _config(max_cells=200)
    other = build_config({"runtime": {"seed": 1}}, other)
    c, _ = _run(tmp_path, "c", counts, other, client_holder)
    assert not np.array_equal(a.read_elem("varm/ltmg_means"), c.read_elem("varm/ltmg_means"))


def test_stage_options(tmp_path, planted, client_holder):
    counts, _ = planted
    store, info = _run(tmp_path, "off", counts, _config(enabled=False), client_holder)
    assert info == {"enabled": False} and not store.has("layers/ltmg")
    for bad in ({"k_min": 0}, {"k_max": 1}, {"min_sd": 0.0}):
        with pytest.raises(InputError, match="ltmg"):
            _run(tmp_path, f"bad{len(bad)}{list(bad)[0]}", counts, _config(**bad), client_holder)
    store, _ = _run(tmp_path, "onebased", counts, _config(state_numbering="one-based"), client_holder)
    one = store.open_array("layers/ltmg")[:]
    k = store.read_elem("var/ltmg_k")
    # one-based: every fitted component has a state of its own, censored values 0
    x = store.open_array("X")[:]
    assert np.all(one[x == 0] == 0)
    assert np.all(one.max(axis=0)[k > 0] >= 1) and np.all(one.max(axis=0) <= k)
