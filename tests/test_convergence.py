"""The iteration's stopping rules against dense reference implementations of the formulas."""

import numpy as np
import pytest
import scipy.sparse as sp

from scgnn_scale import convergence as cv


def _random_graph(n, k, seed, isolated=()):
    """A symmetric 0/1 kNN-like graph with some isolated cells."""
    rng = np.random.default_rng(seed)
    dense = np.zeros((n, n))
    for i in range(n):
        if i in isolated:
            continue
        choices = [j for j in range(n) if j != i and j not in isolated]
        for j in rng.choice(choices, size=k, replace=False):
            dense[i, j] = dense[j, i] = 1.0
    return dense


def _dense_laplacian(a):
    deg = a.sum(axis=1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    return np.diag(inv) @ (np.diag(deg) - a) @ np.diag(inv)


def _dense_smoothed(a, l0, lam, axis=1):
    s = a.sum(axis=axis, keepdims=True)
    p = np.divide(a, s, out=np.zeros_like(a), where=s != 0)
    return lam * l0 + (1 - lam) * p


def test_reference_graph_matches_dense_and_networkx():
    a = _random_graph(25, 3, seed=1, isolated=(7,))
    l0 = cv.reference_graph(sp.csr_matrix(a), "laplacian").toarray()
    np.testing.assert_allclose(l0, _dense_laplacian(a), atol=1e-12)
    assert l0[7].sum() == 0 and l0[0, 0] == pytest.approx(1.0)
    nx = pytest.importorskip("networkx")
    g = nx.Graph()
    g.add_nodes_from(range(25))
    g.add_weighted_edges_from([(i, j, 1.0) for i, j in zip(*np.nonzero(np.triu(a)), strict=True)])
    np.testing.assert_allclose(l0, nx.normalized_laplacian_matrix(g, nodelist=range(25)).toarray(), atol=1e-12)
    adj = cv.reference_graph(sp.csr_matrix(a), "adjacency").toarray()
    deg = a.sum(1)
    inv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0)
    np.testing.assert_allclose(adj, inv[:, None] * a * inv[None, :], atol=1e-12)


@pytest.mark.parametrize("kind", ["laplacian", "adjacency"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9])
def test_graph_change_equals_dense_mean_over_all_entries(kind, lam):
    n = 30
    a0 = _random_graph(n, 4, seed=0, isolated=(3,))
    a1 = _random_graph(n, 4, seed=2)
    a2 = a1.copy()
    a2[0, 1] = a2[1, 0] = 1 - a2[0, 1]  # one edge flipped
    l0 = cv.reference_graph(sp.csr_matrix(a0), kind)
    dense_l0 = l0.toarray()
    s1 = cv.smoothed_graph(sp.csr_matrix(a1), l0, lam)
    s2 = cv.smoothed_graph(sp.csr_matrix(a2), l0, lam)
    d1, d2 = _dense_smoothed(a1, dense_l0, lam), _dense_smoothed(a2, dense_l0, lam)
    np.testing.assert_allclose(s1.toarray(), d1, atol=1e-12)
    assert cv.graph_change(s2, s1) == pytest.approx(np.mean(np.abs(d2 - d1)), rel=1e-12, abs=1e-15)
    # first iteration compares with A'_0 = L0, as the published code does
    assert cv.graph_change(s1, l0) == pytest.approx(np.mean(np.abs(d1 - dense_l0)), rel=1e-12)
    assert cv.graph_threshold(l0, 0.01) == pytest.approx(0.01 * np.mean(np.abs(dense_l0)), rel=1e-12)
    # the published code divides by column sums: same criterion for symmetric graphs
    c1, c2 = _dense_smoothed(a1, dense_l0, lam, axis=0), _dense_smoothed(a2, dense_l0, lam, axis=0)
    assert np.mean(np.abs(c2 - c1)) == pytest.approx(cv.graph_change(s2, s1), rel=1e-12, abs=1e-15)


def test_unchanged_graph_stops_changed_graph_does_not():
    a0 = _random_graph(40, 5, seed=3)
    l0 = cv.reference_graph(sp.csr_matrix(a0))
    same = cv.smoothed_graph(sp.csr_matrix(a0), l0, 0.5)
    threshold = cv.graph_threshold(l0, 0.01)
    assert cv.graph_change(same, same) == 0.0
    other = cv.smoothed_graph(sp.csr_matrix(_random_graph(40, 5, seed=4)), l0, 0.5)
    change = cv.graph_change(other, same)
    assert change > threshold
    assert cv.should_stop(ari=0.5, change=change, threshold=threshold, ari_stop=0.99) is None
    assert cv.should_stop(ari=0.5, change=0.0, threshold=threshold, ari_stop=0.99) == "graph"
    assert cv.should_stop(ari=0.995, change=change, threshold=threshold, ari_stop=0.99) == "clusters"
    assert cv.should_stop(ari=None, change=None, threshold=threshold, ari_stop=0.99) is None


def test_row_normalize_keeps_isolated_rows_zero():
    a = sp.csr_matrix(np.array([[0, 2, 2], [1, 0, 0], [0, 0, 0]], dtype=float))
    p = cv.row_normalize(a).toarray()
    np.testing.assert_allclose(p, [[0, 0.5, 0.5], [1, 0, 0], [0, 0, 0]])


def test_clustering_ari():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert cv.clustering_ari(a, np.array([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)
    assert cv.clustering_ari(a, np.zeros(6, int)) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        cv.clustering_ari(a, a[:3])


def test_store_index_dtypes_are_accepted():
    """Stored graphs carry int64 indptr (and int32 or int64 indices): same numbers as plain CSR."""
    a = sp.csr_matrix(_random_graph(20, 3, seed=5).astype(np.float32))
    mixed = sp.csr_matrix((a.data, a.indices.astype(np.int32), a.indptr.astype(np.int64)), shape=a.shape)
    l0 = cv.reference_graph(mixed)
    np.testing.assert_allclose(l0.toarray(), cv.reference_graph(a).toarray())
    assert cv.mean_abs(cv.smoothed_graph(mixed, l0, 0.5)) == pytest.approx(cv.mean_abs(cv.smoothed_graph(a, l0, 0.5)))


# -- the loss plateau -------------------------------------------------------------------------------
def _stop_step(curve, rel_tol, window=50, **kw):
    plateau = cv.LossPlateau(rel_tol, **kw)
    for step, loss in cv.window_means(curve, window):
        if plateau.update(step, loss):
            return step
    return None


def test_plateau_stops_where_an_exponential_decay_flattens():
    steps = np.arange(1, 2001)
    curve = 100.0 + 1000.0 * np.exp(-steps / 100.0)  # floor 100; the fall per 50 steps shrinks by e^-0.5
    stop = _stop_step(curve, 0.01)
    means = dict(cv.window_means(curve, 50))
    # the first window whose mean fell by less than 1% of the previous one's, and not one before it
    falls = {s: (means[s - 50] - means[s]) / means[s - 50] for s in list(means)[1:]}
    expected = min(s for s, f in falls.items() if f < 0.01)
    assert stop == expected
    assert all(f >= 0.01 for s, f in falls.items() if s < expected)
    assert 500 <= stop <= 1000  # and well before the 2,000-step cap


def test_plateau_never_stops_a_curve_that_keeps_falling_or_when_off():
    steps = np.arange(1, 1001)
    falling = 1e6 * 0.98 ** (steps / 50.0 * 1.5)  # 3% per window, forever
    assert _stop_step(falling, 0.01) is None
    flat = np.full(1000, 5.0)
    assert _stop_step(flat, 0.0) is None  # 0: the fixed step count
    assert _stop_step(flat, 0.01) == 100  # the first comparison there is


def test_plateau_patience_min_steps_and_noise():
    rng = np.random.default_rng(0)
    noisy_floor = 10.0 + rng.normal(0, 0.01, 1000)  # no trend, only noise well below 1%
    assert _stop_step(noisy_floor, 0.01, patience=3) == 200  # three flat windows in a row: 100, 150, 200
    assert _stop_step(noisy_floor, 0.01, min_steps=400) == 400
    rising = np.linspace(10, 12, 1000)
    assert _stop_step(rising, 0.01) == 100  # a rise is no fall
    with pytest.raises(ValueError):
        cv.LossPlateau(-0.1)
