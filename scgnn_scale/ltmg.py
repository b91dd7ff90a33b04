"""Left-truncated mixture Gaussian (LTMG) regulatory states: the math, vectorised over blocks of genes.

The model (Wan et al. 2019; scGNN, Wang et al. 2021, Methods; docs/METHOD.md step 2). For each gene, on the
positive expression values x (not log-transformed) with y = log(x):

1. A global cut ``Zcut_G``: fit a two-component Gaussian mixture to every gene's log(min positive value)
   and take the point between the two means where the weighted densities cross (:func:`global_zcut`).
2. Per gene, ``Zcut = max(Zcut_G, log(min positive value))``. Zeros and values with y < Zcut are
   left-censored: they are known only to lie below Zcut.
3. EM for a K-component Gaussian mixture in which each censored value contributes the mixture's mass below
   Zcut; its E-step uses the moments of the normal truncated above at Zcut (:func:`em_censored_mixture`).
   K = k_min..k_max, chosen by BIC with 3K - 1 parameters and the log-likelihood of the uncensored values
   (the published ``BIC_LTMG``; n = all cells of the gene).
4. A gene without censored values (no zeros, smallest value >= Zcut_G) gets a plain mixture for
   K = 1..k_max-1 (BIC over its values, n = their number) plus an empty lowest component
   (weight 0, mean -inf), as in the published ``LTMG``.
5. Components are sorted by mean. A value's state is 0 where it is censored or zero; otherwise it is
   the component with the largest weighted density ``w_k N(y; mu_k, sd_k)``, numbered as follows.

State numbering (``numbering``):

- ``"published"`` (default): the 0-based column of the winning component among the sorted components,
  as the published R code (``apply(y_value, 2, State_return) - 1``). For a gene with censored values the
  lowest fitted component therefore shares state 0 with the censored values (a gene whose fit keeps a
  single component is all 0); for a gene without censored values the empty component occupies column 0,
  so its fitted components are states 1..K.
- ``"one-based"``: every fitted component is numbered 1..K (censored and zero values stay 0).

States always equal the column of ``means``/``weights``/``sds`` for ``"published"`` (and that column + 1
for censored genes under ``"one-based"``).

Differences from the published R code, all deliberate:

- No random jitter. The R code adds N(0, 1e-4) noise to the log values, which makes ties at Zcut fall on
  either side at random; here values equal to Zcut are uncensored, and the standard deviation of each
  component is floored at ``min_sd`` (default 1e-4, the jitter's scale) so that a component on a run of
  equal values (integer counts) stays finite. Fits are deterministic.
- Initialisation: the published ``Fit_LTMG`` quantile start (means at the i/(K+1) quantiles of the
  uncensored values, the lowest at min - 1 and the highest at max + 1, equal weights, every sd the sd of
  the uncensored values); the plain mixtures of uncensored genes start at the same quantiles without the
  +-1 shift (the R code used ``mixtools::normalmixEM``'s random start).
- Exact EM: the M-step variance is taken around the new mean (the R code uses the previous mean; both
  have the same fixed points). EM stops when the mean log-likelihood changes by less than ``tol``.
- Runs of equal values are fitted once with their multiplicity as a weight (exact, and much faster on
  integer counts).
- A component whose weight falls below ``max(MIN_WEIGHT, 1/n)`` is removed during EM, and components
  that coincide (same mean and sd, e.g. two on one run of equal counts) are merged; BIC then counts only
  the components left. Such remnants explain no data, but each shifts the numbering of every state
  above it, which made fits on a sample and on all cells disagree (measured: bench/bench_ltmg.py).
- EM runs up to 500 iterations (the R code: 100); on counts it often needs 100-400 to converge.
- A fit on a sample of n of N cells chooses K by the BIC estimated for all N cells (log-likelihood
  times N/n, penalty with log N), so that it targets the same choice as a fit on every cell.

Edge genes (documented states):

- no positive value (all zeros): K = 0, Zcut NaN, every state 0;
- no K with more uncensored values than components (e.g. a single positive value next to zeros):
  K = 0, every state 0 (the published code's "too little conditions");
- all values equal and positive: no censored value, K = 1, every state 1 (if the value lies below
  Zcut_G, every value is censored: K = 0, every state 0);
- no censored value: a plain mixture, states 1..K;
- huge counts: the fit runs in float64 on log values; nothing overflows below 1e300.

Non-finite and negative inputs are treated as zeros (censored). This module knows no files and no Dask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.special import log_ndtr

_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)
LOG_ZERO_WEIGHT = -1e30  # log of a zero mixture weight in the batched densities (see _sufficient_stats)
NUMBERINGS = ("published", "one-based")
# EM removes a component whose weight falls below max(MIN_WEIGHT, 1 / number of cells)
MIN_WEIGHT = 1e-4

# elements of the (genes, components, values) work array of one EM sub-block: bounds EM memory (~16 MiB)
_EM_BUDGET = 1 << 21
# genes compressed together (bounds the memory of sorting a sample of cells)
_GENE_GROUP = 64
# fit every K in one EM call for sub-blocks with at most this many distinct values per gene
_STACK_MAX_VALUES = 512


# -- scales ------------------------------------------------------------------------------------------

def to_log(values: np.ndarray, *, log1p_input: bool) -> np.ndarray:
    """y = log(x) of positive values given as x (``log1p_input=False``) or as log1p(x) (``True``), float64."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.expm1(v)) if log1p_input else np.log(v)


def from_log(y: np.ndarray | float, *, log1p_input: bool) -> np.ndarray:
    """The inverse of :func:`to_log`: x = exp(y), or log1p(exp(y)) for log1p input (float64)."""
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(over="ignore"):
        return np.logaddexp(0.0, y) if log1p_input else np.exp(y)


def positive_mask(values: np.ndarray) -> np.ndarray:
    """Entries that count as expressed: finite and > 0 (NaN, inf, zeros and negatives do not)."""
    return np.isfinite(values) & (values > 0)


def min_positive(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the smallest expressed value (NaN if none) and the number of non-expressed entries.

    Parameters
    ----------
    values
        cells x genes block, any scale that keeps 0 at 0 (raw or log1p).

    Returns
    -------
    (min_pos, n_nonpositive)
        ``min_pos`` in the dtype of ``values`` promoted to float (exact, no rounding), ``n_nonpositive`` int64.
    """
    values = np.asarray(values)
    pos = positive_mask(values)
    dtype = values.dtype if values.dtype.kind == "f" else np.float64
    filled = np.where(pos, values, np.inf).astype(dtype, copy=False)
    mins = filled.min(axis=0) if values.shape[0] else np.full(values.shape[1], np.inf, dtype)
    mins = np.where(np.isfinite(mins), mins, np.nan).astype(dtype)
    return mins, (~pos).sum(axis=0).astype(np.int64)


# -- the EM kernel -----------------------------------------------------------------------------------

def em_censored_mixture(y: np.ndarray, weight: np.ndarray, n_censored: np.ndarray, zcut: np.ndarray,
                        means: np.ndarray, sds: np.ndarray, weights: np.ndarray, *, max_iter: int = 500,
                        tol: float = 1e-5, min_sd: float = 1e-4):
    """EM for Gaussian mixtures with left-censoring at ``zcut``, one independent mixture per row.

    Parameters
    ----------
    y, weight
        (B, m) uncensored log values of B genes and their multiplicities (0 for padding).
    n_censored
        (B,) number of censored values per gene; they contribute the mass below ``zcut``.
    zcut
        (B,) censoring point per gene (log scale); unused where ``n_censored`` is 0.
    means, sds, weights
        (B, K) starting parameters.
    max_iter, tol
        at most ``max_iter`` iterations; a gene stops when its mean log-likelihood changes by less than ``tol``.
    min_sd
        floor of every component's standard deviation.

    Returns
    -------
    EMResult
        fitted (B, K) ``weights``, ``means``, ``sds``; under them, ``loglik_uncensored`` (the uncensored
        values' log-likelihood, which BIC uses) and ``loglik`` (with the censored values' log mass below
        ``zcut``, what EM maximises), both (B,); ``n_iter`` (B,). A component whose weight falls below
        ``max(MIN_WEIGHT, 1 / n)`` (n: the gene's values, censored included) is removed: weight 0 from then
        on, its last mean and sd kept.
    """
    y = np.asarray(y, np.float64)
    weight = np.asarray(weight, np.float64)
    n_cens = np.asarray(n_censored, np.float64)
    zcut = np.asarray(zcut, np.float64)
    w = np.array(weights, np.float64)
    mu = np.array(means, np.float64)
    sd = np.maximum(np.array(sds, np.float64), min_sd)
    n_genes = y.shape[0]
    n_total = weight.sum(axis=1) + n_cens
    w_floor = np.maximum(MIN_WEIGHT, 1.0 / np.maximum(n_total, 1.0))
    has_cens = n_cens > 0
    feats = np.stack([y * y, y, np.ones_like(y)], axis=1)  # (B, 3, m): the log density is quadratic in y
    prev = np.full(n_genes, -np.inf)
    n_iter = np.zeros(n_genes, np.int64)
    active = np.arange(n_genes)
    # the rows computed each iteration: the active genes plus converged ones not yet compacted away
    # (copying the values of the active genes every iteration would cost as much as an E-step)
    work, fa, wta = active, feats, weight
    for it in range(max_iter):
        if active.size == 0:
            break
        if active.size < 0.75 * work.size:
            work = active
            fa, wta = feats[work], weight[work]
        wa, mua, sda = w[work], mu[work], sd[work]
        stats, ll = _sufficient_stats(fa, wta, wa, mua, sda)
        # from here on, only the active genes: a converged gene's parameters no longer change, so a
        # gene's fit does not depend on which genes share its block
        if work.size != active.size:
            keep = np.isin(work, active, assume_unique=True)
            stats, ll, wa, mua, sda = stats[keep], ll[keep], wa[keep], mua[keep], sda[keep]
        nk, sy, sy2 = stats[..., 0], stats[..., 1], stats[..., 2]
        ca = n_cens[active]
        if has_cens[active].any():
            cr, ey, ey2, ll_c = _censored_moments(zcut[active], wa, mua, sda)
            cr *= ca[:, None]
            nk += cr
            sy += cr * ey
            sy2 += cr * ey2
            ll = ll + np.where(ca > 0, ca * ll_c, 0.0)
        new_w = nk / n_total[active, None]
        # a component left with less than one cell's (or 1e-4 of the) mass is removed: such remnants only
        # shift the numbering of the states above them and differ between a sample and all cells
        top = new_w.max(axis=1, keepdims=True)
        alive = (new_w >= w_floor[active, None]) | (new_w == top)
        safe = np.where(alive, nk, 1.0)
        new_mu = np.where(alive, sy / safe, mua)
        var = sy2 / safe - new_mu * new_mu
        new_sd = np.where(alive, np.sqrt(np.maximum(var, min_sd * min_sd)), sda)
        new_w = np.where(alive, new_w, 0.0)
        _merge_duplicates(new_w, new_mu, new_sd)
        new_w /= new_w.sum(axis=1, keepdims=True)
        w[active] = new_w
        mu[active] = new_mu
        sd[active] = new_sd
        n_iter[active] = it + 1
        mean_ll = ll / n_total[active]
        done = np.abs(mean_ll - prev[active]) < tol
        prev[active] = mean_ll
        active = active[~done]
    _, ll_obs = _sufficient_stats(feats, weight, w, mu, sd, loglik_only=True)
    ll = ll_obs.copy()
    if has_cens.any():
        ll_c = _censored_moments(zcut[has_cens], w[has_cens], mu[has_cens], sd[has_cens])[3]
        ll[has_cens] += n_cens[has_cens] * ll_c
    return EMResult(w, mu, sd, ll_obs, ll, n_iter)


class EMResult(NamedTuple):
    weights: np.ndarray
    means: np.ndarray
    sds: np.ndarray
    loglik_uncensored: np.ndarray
    loglik: np.ndarray
    n_iter: np.ndarray


def _merge_duplicates(w, mu, sd) -> None:
    """Fold components that coincide (same mean and sd, e.g. two on one run of equal counts) into one.

    EM cannot separate identical components, and the copy would only renumber the states above it.
    In place: a later copy's weight moves to the first of its copies and becomes 0.
    """
    k = w.shape[1]
    tol = 1e-3 * np.minimum(sd[:, :, None], sd[:, None, :])
    same = ((np.abs(mu[:, :, None] - mu[:, None, :]) <= tol) & (np.abs(sd[:, :, None] - sd[:, None, :]) <= tol)
            & (w[:, :, None] > 0) & (w[:, None, :] > 0) & np.triu(np.ones((k, k), bool), 1)[None])
    if not same.any():
        return
    for j in range(1, k):
        rows = np.flatnonzero(same[:, :j, j].any(axis=1) & (w[:, j] > 0))
        if rows.size:
            first = np.argmax(same[rows, :j, j], axis=1)
            w[rows, first] += w[rows, j]
            w[rows, j] = 0.0


def _sufficient_stats(feats, weight, w, mu, sd, *, loglik_only: bool = False):
    """Responsibility-weighted sums of (1, y, y^2) per component (B, K, 3) and the log-likelihood (B,).

    ``feats`` is (B, 3, m) with rows y^2, y, 1; each component's log weighted density is the quadratic
    ``a y^2 + b y + c``, so one batched matrix product evaluates all of them.
    """
    inv_var = 1.0 / (sd * sd)
    with np.errstate(divide="ignore"):
        log_w = np.log(w)
    # a padded component (weight 0) gets a finite floor instead of -inf: OpenBLAS's AVX-512 kernels
    # multiply padding lanes by the coefficients and raise 'invalid' on -inf * 0; after the -80 clip
    # below, both give the same density
    np.maximum(log_w, LOG_ZERO_WEIGHT, out=log_w)
    c = log_w - np.log(sd) - _LOG_SQRT_2PI - 0.5 * mu * mu * inv_var
    coef = np.stack([-0.5 * inv_var, mu * inv_var, c], axis=2)  # (B, K, 3)
    lp = np.matmul(coef, feats)  # (B, K, m)
    top = lp.max(axis=1, keepdims=True)
    lp -= top
    # exp in float32 is ~4x faster than in float64 here; arguments are <= 0 and the relative error
    # (1e-7) of the densities only perturbs the responsibilities, while every sum stays in float64
    dens32 = lp.astype(np.float32)
    del lp
    np.maximum(dens32, -80.0, out=dens32)  # e^-80 is still a normal float32; far tails are 0 anyway
    np.exp(dens32, out=dens32)
    dens = dens32.astype(np.float64)
    del dens32
    total = dens.sum(axis=1)
    ll = ((np.log(total) + top[:, 0, :]) * weight).sum(axis=1)
    if loglik_only:
        return None, ll
    scale = weight / total  # responsibilities are dens / total, each value counted weight times
    # columns (1, y, y^2) of each value, scaled
    g = (feats[:, ::-1, :] * scale[:, None, :]).transpose(0, 2, 1)
    return np.matmul(dens, g), ll


def _censored_moments(zcut, w, mu, sd):
    """Posterior of each component given y < zcut, E[y] and E[y^2] below zcut, log P(y < zcut).

    For y ~ N(mu, sd^2) truncated above at q, with a = (q - mu)/sd and lam = phi(a)/Phi(a):
    E[y] = mu - sd lam and E[(y - mu)^2] = sd^2 (1 - a lam).
    """
    a = (zcut[:, None] - mu) / sd
    log_cdf = log_ndtr(a)
    lam = np.exp(-0.5 * a * a - _LOG_SQRT_2PI - log_cdf)
    with np.errstate(divide="ignore"):
        lc = np.log(w) + log_cdf
    top = lc.max(axis=1, keepdims=True)
    p = np.exp(lc - top)
    total = p.sum(axis=1, keepdims=True)
    post = p / total
    ey = mu - sd * lam
    ey2 = sd * sd * (1.0 - a * lam) + mu * mu - 2.0 * mu * sd * lam
    return post, ey, ey2, np.log(total[:, 0]) + top[:, 0]


# -- initialisation and one K for a block ------------------------------------------------------------

def _quantile_start(y, weight, k: int, shift_ends: bool, min_sd: float):
    """The published start: means at the sorted values of rank floor(i n / (K+1)), i = 1..K, equal weights,
    every sd the values' sd; for censored fits the lowest mean at min - 1 and the highest at max + 1.

    ``y`` holds each gene's sorted unique values and ``weight`` their multiplicities (0: padding).
    """
    n_obs = weight.sum(axis=1)
    cum = np.cumsum(weight, axis=1)
    means = np.empty((y.shape[0], k))
    for i in range(1, k + 1):
        rank = np.maximum(np.floor(i * n_obs / (k + 1)), 1.0)
        pos = (cum < rank[:, None]).sum(axis=1)  # first sorted value whose cumulative count reaches rank
        means[:, i - 1] = np.take_along_axis(y, np.minimum(pos, y.shape[1] - 1)[:, None], axis=1)[:, 0]
    lo, hi = _weighted_min(y, weight), _weighted_max(y, weight)
    if shift_ends and k > 1:
        means[:, 0] = lo - 1.0
        means[:, -1] = hi + 1.0
    safe_n = np.maximum(n_obs, 1.0)
    mean = (weight * y).sum(axis=1) / safe_n
    var = (weight * (y - mean[:, None]) ** 2).sum(axis=1) / np.maximum(n_obs - 1.0, 1.0)
    sd = np.maximum(np.sqrt(var), min_sd)
    return means, np.repeat(sd[:, None], k, axis=1), np.full((y.shape[0], k), 1.0 / k)


def _pad(a: np.ndarray, width: int, fill: float) -> np.ndarray:
    """(B, K) start parameters padded to ``width`` components (weight 0: dead from the start)."""
    return np.concatenate([a, np.full((a.shape[0], width - a.shape[1]), fill)], axis=1)


def _weighted_min(y, weight):
    return np.where(weight > 0, y, np.inf).min(axis=1)


def _weighted_max(y, weight):
    return np.where(weight > 0, y, -np.inf).max(axis=1)


# -- compressing a block into weighted unique values ------------------------------------------------

def _unique_rows(y_obs: np.ndarray):
    """Per row of (B, n) log values (NaN = not uncensored): sorted unique values and multiplicities, padded."""
    b, n = y_obs.shape
    s = np.sort(np.where(np.isnan(y_obs), np.inf, y_obs), axis=1)
    finite = np.isfinite(s)
    new = np.ones_like(finite)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    run = np.cumsum(new, axis=1) - 1
    n_unique = np.where(finite, run + 1, 0).max(axis=1) if n else np.zeros(b, np.int64)
    m = max(int(n_unique.max(initial=0)), 1)
    rows = np.broadcast_to(np.arange(b)[:, None], (b, n))
    flat = (rows * m + run)[finite]
    counts = np.bincount(flat, minlength=b * m).reshape(b, m).astype(np.float64)
    vals = np.zeros((b, m))
    vals.reshape(-1)[flat] = s[finite]
    # padding takes each row's smallest value so that every entry stays finite (weight 0 hides it)
    first = np.where(n_unique > 0, vals[:, 0], 0.0)
    vals = np.where(counts > 0, vals, first[:, None])
    return vals, counts, n_unique


# -- the global cut ----------------------------------------------------------------------------------

def global_zcut(log_min_positive: np.ndarray, *, min_sd: float = 1e-4, max_iter: int = 1000,
                tol: float = 1e-10) -> float:
    """``Zcut_G``: where the two components of a 2-Gaussian mixture over the genes' log minima cross.

    Parameters
    ----------
    log_min_positive
        log of each gene's smallest positive value (NaN for genes without one; ignored).
    min_sd, max_iter, tol
        as in :func:`em_censored_mixture` (plain mixture, no censoring).

    Returns
    -------
    float
        The crossing point of ``w1 N(m1, s1)`` and ``w2 N(m2, s2)`` between the two means (the one nearest
        their midpoint if there are two). Where there is nothing to cut (fewer than two distinct minima, or
        no crossing between the means) it returns the smallest minimum, so that ``Zcut = max(Zcut_G, own
        minimum)`` censors nothing beyond each gene's own minimum.
    """
    v = np.asarray(log_min_positive, np.float64)
    v = np.sort(v[np.isfinite(v)])
    if v.size == 0:
        return float("-inf")
    if v.size < 2 or v[-1] - v[0] <= 0:
        return float(v[0])
    vals, counts, _ = _unique_rows(v[None, :])
    n = float(v.size)
    means = np.array([[v[int(n / 3)], v[min(int(2 * n / 3), v.size - 1)]]])
    if means[0, 0] == means[0, 1]:
        means = np.array([[v[0], v[-1]]])
    sd = np.full((1, 2), max(float(v.std()), min_sd))
    res = em_censored_mixture(vals, counts, np.zeros(1), np.zeros(1), means, sd, np.full((1, 2), 0.5),
                              max_iter=max_iter, tol=tol, min_sd=min_sd)
    cut = intersect_two_gaussians(res.weights[0], res.means[0], res.sds[0])
    return float(v[0]) if cut is None else float(cut)


def intersect_two_gaussians(w, mu, sd) -> float | None:
    """The x between the two means where ``w[0] N(x; mu[0], sd[0]) = w[1] N(x; mu[1], sd[1])``, or None."""
    order = np.argsort(mu)
    (w1, w2), (m1, m2), (s1, s2) = np.asarray(w)[order], np.asarray(mu)[order], np.asarray(sd)[order]
    if not (w1 > 0 and w2 > 0) or m2 <= m1:
        return None
    # log(w1/s1) - (x-m1)^2/(2 s1^2) = log(w2/s2) - (x-m2)^2/(2 s2^2), a quadratic a x^2 + b x + c = 0
    a = 1.0 / (2 * s2 * s2) - 1.0 / (2 * s1 * s1)
    b = m1 / (s1 * s1) - m2 / (s2 * s2)
    c = (m2 * m2) / (2 * s2 * s2) - (m1 * m1) / (2 * s1 * s1) + np.log(w1 / s1) - np.log(w2 / s2)
    roots = _quadratic_roots(a, b, c)
    inside = [r for r in roots if m1 <= r <= m2]
    if not inside:
        return None
    mid = 0.5 * (m1 + m2)
    return min(inside, key=lambda r: abs(r - mid))


def _quadratic_roots(a: float, b: float, c: float) -> list[float]:
    scale = max(abs(a), abs(b), abs(c), 1e-300)
    if abs(a) <= 1e-12 * scale:
        return [] if b == 0 else [-c / b]
    disc = b * b - 4 * a * c
    if disc < 0:
        return []
    sq = np.sqrt(disc)
    # the numerically stable pair of roots
    q = -0.5 * (b + np.copysign(sq, b))
    roots = [q / a]
    if q != 0:
        roots.append(c / q)
    return roots


# -- per-gene fits -----------------------------------------------------------------------------------

@dataclass
class LTMGFit:
    """LTMG parameters of G genes (components sorted by mean; see the module docstring for states).

    Attributes
    ----------
    k : (G,) int
        fitted components (0: no fit, every state 0); the empty component of uncensored genes not counted.
    zcut : (G,) float64
        censoring point on the log scale (NaN: no positive value).
    cut : (G,) float64
        the same point on the input scale: input values below it are censored.
    censored : (G,) bool
        the gene has censored values (False: plain mixture plus the empty component in column 0).
    weights, means, sds : (G, k_max) float64
        NaN where unused; uncensored genes hold the empty component (0, -inf, NaN) in column 0.
    bic : (G,) float64
        BIC of the chosen K (NaN where K = 0).
    n_iter : (G,) int
        EM iterations of the chosen K.
    """

    k: np.ndarray
    zcut: np.ndarray
    cut: np.ndarray
    censored: np.ndarray
    weights: np.ndarray
    means: np.ndarray
    sds: np.ndarray
    bic: np.ndarray
    n_iter: np.ndarray

    @classmethod
    def concat(cls, fits: list[LTMGFit]) -> LTMGFit:
        return cls(*(np.concatenate([getattr(f, name) for f in fits]) for name in cls.__dataclass_fields__))


def gene_cuts(min_pos: np.ndarray, n_nonpositive: np.ndarray, zcut_global: float, *, log1p_input: bool):
    """Per-gene censoring point from the gene's smallest positive value and the global cut.

    Returns
    -------
    (zcut, cut, censored)
        ``zcut = max(Zcut_G, log min_pos)`` (NaN without a positive value); ``cut`` the same point on the
        input scale, exactly ``min_pos`` where the gene's own minimum wins (so its smallest values are
        uncensored); ``censored``: the gene has zeros or values below ``Zcut_G``.
    """
    min_pos = np.asarray(min_pos)
    y_min = to_log(min_pos, log1p_input=log1p_input)
    own = y_min >= zcut_global
    zcut = np.where(own, y_min, zcut_global)
    zcut = np.where(np.isnan(y_min), np.nan, zcut)
    global_cut = float(from_log(zcut_global, log1p_input=log1p_input)) if np.isfinite(zcut_global) else 0.0
    cut = np.where(own, min_pos.astype(np.float64), global_cut)
    cut = np.where(np.isnan(y_min), np.nan, cut)
    censored = (np.asarray(n_nonpositive) > 0) | ~own
    return zcut, cut, censored


def fit_genes(values: np.ndarray, *, zcut: np.ndarray, cut: np.ndarray, censored: np.ndarray,
              log1p_input: bool, k_min: int = 2, k_max: int = 5, max_iter: int = 500, tol: float = 1e-5,
              min_sd: float = 1e-4, n_cells_total: int | None = None) -> LTMGFit:
    """Fit LTMG to every column of a cells x genes block (cells: all, or a sample).

    Parameters
    ----------
    values
        (n, G) expression on the input scale (raw counts, or log1p of them with ``log1p_input``).
    zcut, cut, censored
        from :func:`gene_cuts` (computed on all cells, so that a sample fit uses the full data's cut).
    k_min, k_max
        K = k_min..k_max for genes with censored values; 1..k_max-1 plus the empty component otherwise.
    max_iter, tol, min_sd
        see :func:`em_censored_mixture`.
    n_cells_total
        when ``values`` is a sample of cells: the number of cells it was drawn from. K is then chosen by
        the BIC estimated for all cells, ``(3K - 1) log(N) - 2 (N / n) loglik_sample`` (the full data's
        log-likelihood estimated from the sample), so that the sample fit targets the same model choice as
        a fit on every cell. None: ``values`` holds every cell.

    Returns
    -------
    LTMGFit
    """
    values = np.asarray(values)
    n, g = values.shape
    zcut = np.asarray(zcut, np.float64)
    cut = np.asarray(cut, np.float64)
    censored = np.asarray(censored, bool)
    fit = LTMGFit(
        k=np.zeros(g, np.int64), zcut=zcut.copy(), cut=cut.copy(), censored=censored.copy(),
        weights=np.full((g, k_max), np.nan), means=np.full((g, k_max), np.nan), sds=np.full((g, k_max), np.nan),
        bic=np.full(g, np.nan), n_iter=np.zeros(g, np.int64),
    )
    scale = 1.0 if n_cells_total is None or n == 0 else n_cells_total / n
    # each gene's uncensored values as sorted unique values with multiplicities (compressed 64 genes at a
    # time to bound the memory of sorting)
    comp_vals, comp_counts = [], []
    n_unique = np.zeros(g, np.int64)
    for g0 in range(0, g, _GENE_GROUP):
        group = np.arange(g0, min(g0 + _GENE_GROUP, g))
        x = values[:, group]
        obs = positive_mask(x) & (x >= cut[None, group])
        y = np.where(obs, to_log(np.where(obs, x, 1), log1p_input=log1p_input), np.nan).T  # (genes, n)
        vals, counts, nu = _unique_rows(y)
        del x, obs, y
        n_unique[group] = nu
        comp_vals += [vals[j, :max(nu[j], 1)] for j in range(group.size)]
        comp_counts += [counts[j, :max(nu[j], 1)] for j in range(group.size)]
    n_obs = np.array([c.sum() for c in comp_counts]) if g else np.zeros(0)
    n_cens = n - n_obs
    # genes with similar numbers of unique values share an EM sub-block (padding to at most 4x the first
    # gene's values, few EM calls); its work arrays hold (genes x K values tried x components x values) floats at most _EM_BUDGET
    per_gene = k_max * max(k_max - k_min + 1, k_max - 1, 1)
    order = np.argsort(n_unique, kind="stable")
    start = 0
    while start < g:
        stop = start + 1
        first = max(int(n_unique[order[start]]), 1)
        while (stop < g and (stop - start + 1) * max(int(n_unique[order[stop]]), 1) * per_gene <= _EM_BUDGET
               and n_unique[order[stop]] <= 4 * first):
            stop += 1
        genes = order[start:stop]
        m = max(int(n_unique[genes].max()), 1)
        y = np.empty((genes.size, m))
        weight = np.zeros((genes.size, m))
        for r, gene in enumerate(genes):
            v = comp_vals[gene]
            y[r, :v.size] = v
            y[r, v.size:] = v[0]  # padding: a finite value with weight 0
            weight[r, :v.size] = comp_counts[gene]
        _fit_sub_block(fit, genes, y, weight, n_obs[genes], n_cens[genes], k_min=k_min, k_max=k_max,
                       max_iter=max_iter, tol=tol, min_sd=min_sd, scale=scale)
        start = stop
    return fit


def _fit_sub_block(fit: LTMGFit, genes, y, weight, n_obs, n_cens, *, k_min, k_max, max_iter, tol, min_sd,
                   scale):
    cens = fit.censored[genes]
    best_bic = np.full(genes.size, np.inf)
    best = [None] * genes.size
    for branch_censored, ks in ((True, range(k_min, k_max + 1)), (False, range(1, k_max))):
        rows = np.flatnonzero(cens == branch_censored)
        if rows.size == 0:
            continue
        # one EM call for every K when the genes have few distinct values (integer counts): EM is then
        # bound by per-iteration overhead, and K slots padded with dead components (weight 0) cost little
        stack = y.shape[1] <= _STACK_MAX_VALUES
        width = max(ks)
        jobs = []  # (rows of the sub-block, K, start)
        for k in ks:
            sel = rows[n_obs[rows] > k]  # the published "too little conditions": more values than components
            if sel.size == 0:
                break
            jobs.append((sel, k, _quantile_start(y[sel], weight[sel], k, branch_censored, min_sd)))
        if not jobs:
            continue
        groups = [jobs] if stack else [[job] for job in jobs]
        for group in groups:
            sel = np.concatenate([job[0] for job in group])
            starts = [np.concatenate([_pad(job[2][i], width, fill) for job in group])
                      for i, fill in ((0, 0.0), (1, 1.0), (2, 0.0))]
            ncens = n_cens[sel] if branch_censored else np.zeros(sel.size)
            res = em_censored_mixture(y[sel], weight[sel], ncens, fit.zcut[genes[sel]], *starts,
                                      max_iter=max_iter, tol=tol, min_sd=min_sd)
            # BIC_LTMG: n = all cells; BIC_ZIMG: n = the uncensored values (all cells too: none is censored).
            # A fit that lost components is a fit with fewer components: it pays for the live ones only.
            n_bic = (n_obs[sel] + ncens) * scale
            k_live = (res.weights > 0).sum(axis=1)
            bic = (3 * k_live - 1) * np.log(n_bic) - 2.0 * scale * res.loglik_uncensored
            # in order of K: on equal BIC the smaller K stays
            for j in range(sel.size):
                r = sel[j]
                if np.isfinite(bic[j]) and bic[j] < best_bic[r]:
                    best_bic[r] = bic[j]
                    best[r] = (res.weights[j], res.means[j], res.sds[j], res.n_iter[j])
    for r, gene in enumerate(genes):
        if best[r] is None:
            continue
        w, mu, sd, n_iter = best[r]
        keep = w > 0  # a component that lost all mass is no component
        order = np.argsort(mu[keep], kind="stable")
        w, mu, sd = w[keep][order], mu[keep][order], sd[keep][order]
        k = w.size
        col = 0 if cens[r] else 1
        if not cens[r]:
            fit.weights[gene, 0], fit.means[gene, 0] = 0.0, -np.inf
        fit.weights[gene, col:col + k] = w
        fit.means[gene, col:col + k] = mu
        fit.sds[gene, col:col + k] = sd
        fit.k[gene] = k
        fit.bic[gene] = best_bic[r]
        fit.n_iter[gene] = n_iter


# -- states ------------------------------------------------------------------------------------------

def state_table(fit: LTMGFit, *, log1p_input: bool, numbering: str = "published", dtype=np.float64):
    """Per gene, the input-scale breakpoints of the states and the state of each interval.

    The winner of ``argmax_k log w_k + log N(y; mu_k, sd_k)`` changes only where two of these quadratics in y
    cross, so each gene's states are a step function of its value: state ``table[g, j]`` for
    ``bp[g, j-1] <= x < bp[g, j]`` (``bp[g, 0]`` is the censoring cut; ``table[g, 0] = 0``).

    Parameters
    ----------
    fit
        the fitted genes.
    log1p_input
        whether the values to label are log1p(x) (as the store's X) or x.
    numbering
        ``"published"`` or ``"one-based"`` (module docstring).
    dtype
        the dtype of the values to label; float32 breakpoints are rounded up so that ``x >= bp`` in float32
        is exactly ``x >= breakpoint`` in real arithmetic.

    Returns
    -------
    (bp, table)
        (G, P) breakpoints padded with +inf, (G, P + 1) uint8 states.
    """
    if numbering not in NUMBERINGS:
        raise ValueError(f"numbering must be one of {NUMBERINGS}, not {numbering!r}")
    g = fit.k.size
    rows_bp: list[list[float]] = []
    rows_state: list[list[int]] = []
    for gene in range(g):
        if fit.k[gene] == 0 or not np.isfinite(fit.cut[gene]):
            rows_bp.append([np.inf])
            rows_state.append([0, 0])
            continue
        col0 = 0 if fit.censored[gene] else 1
        k = int(fit.k[gene])
        w = fit.weights[gene, col0:col0 + k]
        mu = fit.means[gene, col0:col0 + k]
        sd = fit.sds[gene, col0:col0 + k]
        offset = col0 + (1 if numbering == "one-based" and fit.censored[gene] else 0)
        ys, winners = _envelope(w, mu, sd, fit.zcut[gene])
        bps = [float(fit.cut[gene])] + [float(from_log(v, log1p_input=log1p_input)) for v in ys]
        rows_bp.append(bps)
        rows_state.append([0] + [offset + int(c) for c in winners])
    p = max(len(r) for r in rows_bp) if rows_bp else 1
    bp = np.full((g, p), np.inf)
    table = np.zeros((g, p + 1), np.uint8)
    for gene in range(g):
        nb = len(rows_bp[gene])
        bp[gene, :nb] = rows_bp[gene]
        table[gene, :nb + 1] = rows_state[gene]
        table[gene, nb + 1:] = rows_state[gene][-1]
    if np.dtype(dtype) == np.float32:
        bp = _ceil_to_float32(bp)
    return bp, table


def _envelope(w, mu, sd, zcut):
    """Breakpoints (log scale, > zcut) and winners of argmax_k [log w_k + log N(y; mu_k, sd_k)] on y >= zcut."""
    qa = -0.5 / (sd * sd)
    qb = mu / (sd * sd)
    qc = np.log(w) - np.log(sd) - 0.5 * mu * mu / (sd * sd)
    k = w.size
    cand = []
    for i in range(k):
        for j in range(i + 1, k):
            cand += _quadratic_roots(qa[i] - qa[j], qb[i] - qb[j], qc[i] - qc[j])
    cand = np.unique(np.array([c for c in cand if np.isfinite(c) and c > zcut], np.float64))

    def winner(y):
        return int(np.argmax(qa * y * y + qb * y + qc))

    edges = np.concatenate([[zcut], cand])
    reps = [0.5 * (edges[i] + edges[i + 1]) for i in range(len(cand))] + [edges[-1] + 1.0]
    wins = [winner(r) for r in reps]
    bps, out = [], [wins[0]]
    for c, win in zip(cand, wins[1:], strict=True):
        if win != out[-1]:
            bps.append(float(c))
            out.append(win)
    return bps, out


def _ceil_to_float32(bp: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        b32 = bp.astype(np.float32)
    low = b32.astype(np.float64) < bp
    b32[low] = np.nextafter(b32[low], np.float32(np.inf))
    return b32


def assign_states(values: np.ndarray, bp: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 states of a cells x genes block from :func:`state_table` (NaN and values below the cut: 0)."""
    values = np.asarray(values)
    idx = np.zeros(values.shape, np.uint8)
    for p in range(bp.shape[1]):
        idx += values >= bp[:, p]
    flat = np.arange(values.shape[1]) * table.shape[1]
    return table.reshape(-1)[flat[None, :] + idx]


def dense_states(values: np.ndarray, fit: LTMGFit, *, log1p_input: bool, numbering: str = "published"):
    """Reference labelling: evaluate every component's weighted density at every value (small inputs only)."""
    values = np.asarray(values)
    n, g = values.shape
    out = np.zeros((n, g), np.uint8)
    for gene in range(g):
        k = int(fit.k[gene])
        if k == 0:
            continue
        col0 = 0 if fit.censored[gene] else 1
        w = fit.weights[gene, col0:col0 + k]
        mu = fit.means[gene, col0:col0 + k]
        sd = fit.sds[gene, col0:col0 + k]
        x = values[:, gene]
        obs = positive_mask(x) & (x >= fit.cut[gene])
        y = to_log(x[obs], log1p_input=log1p_input)
        log_dens = np.log(w / sd)[None, :] - 0.5 * ((y[:, None] - mu[None, :]) / sd[None, :]) ** 2
        offset = col0 + (1 if numbering == "one-based" and fit.censored[gene] else 0)
        out[obs, gene] = offset + np.argmax(log_dens, axis=1)
    return out


# -- the whole model on a dense matrix ---------------------------------------------------------------

def ltmg(values: np.ndarray, *, log1p_input: bool = False, k_min: int = 2, k_max: int = 5, max_iter: int = 500,
         tol: float = 1e-5, min_sd: float = 1e-4, numbering: str = "published", fit_rows=None):
    """LTMG on an in-memory cells x genes matrix: global cut, per-gene fits, states of every cell.

    Parameters
    ----------
    values
        (n, G) non-negative expression (or its log1p with ``log1p_input``).
    fit_rows
        rows to fit on (a cell sample); None: all. Cuts always come from all rows; every row is labelled.
    k_min, k_max, max_iter, tol, min_sd, numbering
        as in :func:`fit_genes` and :func:`state_table`.

    Returns
    -------
    (states, fit, zcut_global)
        (n, G) uint8 states, the :class:`LTMGFit`, and ``Zcut_G``.
    """
    values = np.asarray(values)
    min_pos, n_nonpos = min_positive(values)
    zg = global_zcut(to_log(min_pos, log1p_input=log1p_input), min_sd=min_sd)
    zcut, cut, censored = gene_cuts(min_pos, n_nonpos, zg, log1p_input=log1p_input)
    sample = values if fit_rows is None else values[np.asarray(fit_rows)]
    fit = fit_genes(sample, zcut=zcut, cut=cut, censored=censored, log1p_input=log1p_input, k_min=k_min,
                    k_max=k_max, max_iter=max_iter, tol=tol, min_sd=min_sd,
                    n_cells_total=None if fit_rows is None else values.shape[0])
    bp, table = state_table(fit, log1p_input=log1p_input, numbering=numbering, dtype=values.dtype)
    return assign_states(values, bp, table), fit, zg
