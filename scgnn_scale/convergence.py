"""Stopping rules of the scGNN iteration (docs/METHOD.md step 8), on sparse matrices.

Graph criterion. With ``A_t`` the pruned cell graph of iteration ``t`` and ``L0`` the reference
built from the first graph ``A_0``::

    A'_t = lambda * L0 + (1 - lambda) * A_t / rowsum(A_t)
    stop when  mean|A'_t - A'_(t-1)|  <  tol * mean|L0|          (means over all N^2 entries)

What ``L0`` is. The paper's text calls it the normalised adjacency ``D^-1/2 A_0 D^-1/2``; the
published code (``scGNN.py``: ``nlG0 = nx.normalized_laplacian_matrix(G0)``) uses the normalised
Laplacian ``I - D^-1/2 A_0 D^-1/2`` (zero row and column for an isolated cell, as networkx does), and
it starts the comparison from ``A'_0 = L0`` (``adjOld = nlG0``). We follow the code by default
(``kind="laplacian"``); ``kind="adjacency"`` gives the paper's text. The published code divides
by column sums (``adjGc / np.sum(adjGc, axis=0)``) where the paper divides by row sums: for a
symmetric graph and a symmetric ``L0`` the two smoothed matrices are transposes of each other, and
``mean|X - Y|`` is the same for ``X, Y`` as for their transposes, so the criterion is identical.
(The published code also orders the nodes of ``G0`` and ``G_t`` by first appearance in the edge
list, which can compare permuted matrices; here rows are always cells in store order.)

Why no N x N matrix is needed. Every matrix above is sparse: ``L0`` has the support of ``A_0``
plus the diagonal, ``A_t / rowsum`` the support of ``A_t``. Their difference is zero outside the
union of the supports, so ``sum over all N^2 entries of |A'_t - A'_(t-1)|`` equals the sum of
``|.|`` over the stored entries of the sparse difference, and the mean is that sum divided by
``N^2``. ``mean|L0|`` likewise is the sum of its stored absolute values over ``N^2``. Memory is
O(nnz) = O(N k).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

REFERENCE_KINDS = ("laplacian", "adjacency")


def _as_csr(matrix) -> sp.csr_matrix:
    m = sp.csr_matrix(matrix, dtype=np.float64)
    if m.indptr.dtype != m.indices.dtype:  # stores keep int64 indptr with int32 indices; scipy wants one dtype
        m = sp.csr_matrix((m.data, m.indices.astype(np.int64), m.indptr.astype(np.int64)), shape=m.shape)
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"a graph must be square, got shape {m.shape}")
    m.sum_duplicates()
    return m


def row_normalize(adjacency) -> sp.csr_matrix:
    """``A / rowsum(A)`` as a sparse matrix; rows that sum to zero (isolated cells) stay zero.

    Parameters
    ----------
    adjacency
        Sparse (or dense) N x N adjacency with non-negative weights.

    Returns
    -------
    scipy.sparse.csr_matrix
        float64, same sparsity pattern as ``adjacency``.
    """
    a = _as_csr(adjacency)
    rowsum = np.asarray(a.sum(axis=1)).ravel()
    inv = np.zeros_like(rowsum)
    nonzero = rowsum != 0
    inv[nonzero] = 1.0 / rowsum[nonzero]
    return sp.csr_matrix(sp.diags(inv) @ a)


def reference_graph(adjacency0, kind: str = "laplacian") -> sp.csr_matrix:
    """``L0`` from the first iteration's graph ``A_0``.

    Parameters
    ----------
    adjacency0
        The first pruned graph (N x N, symmetric, sparse).
    kind
        ``"laplacian"``: ``I - D^-1/2 A D^-1/2`` as in the published code (networkx's
        ``normalized_laplacian_matrix``: an isolated cell has a zero row and column);
        ``"adjacency"``: ``D^-1/2 A D^-1/2`` as the paper's text writes.

    Returns
    -------
    scipy.sparse.csr_matrix
        float64 N x N.
    """
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"kind must be one of {REFERENCE_KINDS}, got {kind!r}")
    a = _as_csr(adjacency0)
    degree = np.asarray(a.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(degree)
    connected = degree > 0
    inv_sqrt[connected] = 1.0 / np.sqrt(degree[connected])
    scale = sp.diags(inv_sqrt)
    if kind == "adjacency":
        return sp.csr_matrix(scale @ a @ scale)
    # networkx: DH (D - A) DH, with DH = diag(1/sqrt(deg)) and 0 for an isolated node
    laplacian = sp.diags(degree) - a
    return sp.csr_matrix(scale @ laplacian @ scale)


def smoothed_graph(adjacency, reference, lam: float) -> sp.csr_matrix:
    """``A' = lam * L0 + (1 - lam) * A / rowsum(A)`` (sparse).

    Parameters
    ----------
    adjacency
        This iteration's graph ``A_t`` (N x N).
    reference
        ``L0`` from :func:`reference_graph`.
    lam
        ``lambda`` in [0, 1], the weight of the reference.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {lam}")
    ref = _as_csr(reference)
    p = row_normalize(adjacency)
    if ref.shape != p.shape:
        raise ValueError(f"graph shape {p.shape} differs from the reference {ref.shape}")
    return sp.csr_matrix(lam * ref + (1.0 - lam) * p)


def mean_abs(matrix) -> float:
    """``mean |M|`` over all ``N^2`` entries of a sparse square matrix (zeros included)."""
    m = _as_csr(matrix)
    n = m.shape[0]
    if n == 0:
        return 0.0
    return float(np.abs(m.data).sum() / (float(n) * float(n)))


def graph_change(current, previous) -> float:
    """``mean |A'_t - A'_(t-1)|`` over all ``N^2`` entries, from the sparse difference."""
    return mean_abs(_as_csr(current) - _as_csr(previous))


def graph_threshold(reference, tol: float) -> float:
    """``tol * mean|L0|``: the graph has stopped changing below this."""
    return float(tol) * mean_abs(reference)


def clustering_ari(previous, current) -> float:
    """Adjusted Rand index between two labelings of the same cells (consecutive iterations)."""
    from .partition_scores import adjusted_rand_index

    previous = np.asarray(previous)
    current = np.asarray(current)
    if previous.shape != current.shape:
        raise ValueError(f"labelings differ in length: {previous.shape} vs {current.shape}")
    return adjusted_rand_index(previous, current)


def should_stop(*, ari: float | None, change: float | None, threshold: float, ari_stop: float) -> str | None:
    """The reason to stop after an iteration (``"clusters"`` / ``"graph"``), or None to go on.

    ``ari > ari_stop`` (consecutive clusterings agree) or ``change < threshold`` (the smoothed
    graph stopped moving): the published ``--converge-type either``.
    """
    if ari is not None and ari > ari_stop:
        return "clusters"
    if change is not None and change < threshold:
        return "graph"
    return None


class LossPlateau:
    """Stops a training loop once its loss has stopped falling; the step count it was given becomes a cap.

    The loop reports the mean loss of each window of steps (:meth:`update`). After a window whose mean
    fell by less than ``rel_tol`` of the previous window's, ``patience`` times in a row, and once at
    least ``min_steps`` steps have run, the loop stops. ``rel_tol`` 0 never stops (the fixed step
    count). A rise counts as a window that did not fall, so noise around a floor ends the loop too.

    Why a relative fall per window: the losses differ in scale by orders of magnitude between the
    autoencoders (a per-cell sum over 2,000 genes, the L1 of the weights) and the GAE (a mean BCE),
    and a fixed fraction per window reads the same on all of them.
    """

    def __init__(self, rel_tol: float, *, patience: int = 1, min_steps: int = 0):
        if rel_tol < 0 or patience < 1 or min_steps < 0:
            raise ValueError(f"rel_tol >= 0, patience >= 1 and min_steps >= 0, got {rel_tol}, {patience}, {min_steps}")
        self.rel_tol, self.patience, self.min_steps = float(rel_tol), int(patience), int(min_steps)
        self.previous: float | None = None
        self.flat = 0
        self.stopped_at: int | None = None

    @property
    def enabled(self) -> bool:
        return self.rel_tol > 0

    def update(self, step: int, window_loss: float) -> bool:
        """Record the mean loss of the window that ended at ``step``; True once the loop should stop."""
        loss = float(window_loss)
        if self.enabled and self.previous is not None and np.isfinite(loss):
            fall = (self.previous - loss) / max(abs(self.previous), 1e-12)
            self.flat = self.flat + 1 if fall < self.rel_tol else 0
        self.previous = loss
        if self.enabled and self.flat >= self.patience and step >= self.min_steps:
            self.stopped_at = int(step)
            return True
        return False


def window_means(losses, window: int) -> list[tuple[int, float]]:
    """``(last step, mean loss)`` of each whole window of ``window`` consecutive per-step losses."""
    losses = np.asarray(losses, dtype=np.float64)
    whole = len(losses) // max(1, window) * window
    means = losses[:whole].reshape(-1, window).mean(axis=1) if whole else np.empty(0)
    return [((i + 1) * window, float(m)) for i, m in enumerate(means)]
