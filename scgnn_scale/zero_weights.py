"""Loss weights of the imputation autoencoder that tell a dropout zero from an expected one.

Single-cell counts hold two kinds of zeros: a gene the cell does not express (or expresses so little that
none of its molecules was caught), and a dropout, a gene expressed well that the assay missed. An
autoencoder trained to reproduce ``X`` learns both back; one that weighs every zero a little (the
published loss: ``gamma`` = 0.1 against ``gamma + alpha * state`` for an expressed entry) is still pulled
down wherever dropouts are common. Measured (bench/RESULTS.md, "Why goolam loses the imputation to scVI"):
on goolam, whose zeros are nearly all dropouts, that pull puts the flipped entries at 4.75 against a truth
of 5.45; dropping the zeros' weight altogether fixes goolam and overshoots on klein_subset, where most
zeros are real.

Here the weight of an observed zero is the chance of a zero where it stands: under a Poisson with the
mean of that gene's values (``expm1`` of ``X``, the counts when ``X`` is ``log1p`` of counts) over the
cell's cluster, ``P(0) = exp(-mean)``. A zero in a cluster whose cells carry hundreds of that gene's
molecules weighs nothing; a zero of a gene the cluster barely expresses keeps ``gamma``. A non-zero entry
keeps the published weight ``gamma + alpha * state``. Nothing is stored: :class:`EntryWeights` computes
each block of weights from ``X``, the LTMG states and a clusters x genes table when the loader reads it.
"""

from __future__ import annotations

import numpy as np

from .loader import iter_row_blocks
from .reconstruction import _rows


def cluster_mean_expression(x, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """``(n_clusters, G)`` mean of ``expm1(x)`` over each cluster's cells, in one streamed pass over ``x``."""
    import scipy.sparse as sp

    labels = np.asarray(labels, dtype=np.int64)
    sums = np.zeros((n_clusters, int(x.shape[1])), np.float64)
    for a, b, block in iter_row_blocks(x, int(x.chunks[0])):
        member = sp.csr_matrix((np.ones(b - a), (labels[a:b], np.arange(b - a))), shape=(n_clusters, b - a))
        sums += member @ np.expm1(np.asarray(block, dtype=np.float64))
    counts = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    return sums / np.maximum(counts, 1.0)[:, None]


class EntryWeights:
    """Per-entry loss weights, computed when rows are read (the loader's ``trs`` array, with the loss's own
    ``gamma`` 0 and ``alpha`` 1): ``gamma + alpha * state`` where ``x > 0``, ``gamma * exp(-mean)`` of the
    cell's cluster and the gene where ``x == 0``.

    Parameters
    ----------
    x
        The ``(N, G)`` values trained on (zarr array, or anything read in row slices).
    states
        The LTMG states of ``x`` (same shape), or None: every non-zero then weighs ``gamma``.
    labels
        ``(N,)`` cluster of each cell, 0..K-1.
    cluster_mean
        ``(K, G)`` mean of ``expm1(x)`` per cluster (:func:`cluster_mean_expression`).
    gamma, alpha
        The feature autoencoder's weights of the plain and the state-weighted squared error.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, x, states, labels: np.ndarray, cluster_mean: np.ndarray, gamma: float, alpha: float):
        self.x, self.states = x, states
        self.labels = np.asarray(labels, dtype=np.int64)
        self.cluster_mean = np.asarray(cluster_mean, dtype=np.float64)
        self.gamma, self.alpha = float(gamma), float(alpha)
        self.shape = (int(x.shape[0]), int(x.shape[1]))
        self.chunks = (int(x.chunks[0]), self.shape[1])
        if self.labels.shape != (self.shape[0],):
            raise ValueError(f"{len(self.labels)} labels for {self.shape[0]} cells")
        if self.cluster_mean.shape[1] != self.shape[1] or self.labels.max(initial=-1) >= len(self.cluster_mean):
            raise ValueError(f"cluster means {self.cluster_mean.shape} do not cover the labels and {self.shape[1]} genes")
        if states is not None and tuple(states.shape) != self.shape:
            raise ValueError(f"states {tuple(states.shape)} and x {self.shape} differ in shape")
        #: P(0) under a Poisson of each cluster's mean, times gamma: an observed zero's weight
        self.zero_weight = (self.gamma * np.exp(-self.cluster_mean)).astype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        rows = _rows(key, self.shape[0])
        x = np.asarray(self.x[rows])
        weights = self.zero_weight[self.labels[rows]]
        nonzero = x != 0
        if self.states is None:
            weights[nonzero] = self.gamma
        else:
            states = np.asarray(self.states[rows], dtype=np.float32)
            weights[nonzero] = self.gamma + self.alpha * states[nonzero]
        return weights

    def on(self, device) -> EntryWeights:
        """Itself: the weights are computed with numpy on any device. A data-parallel rank takes an array with
        ``on`` as it is (it pickles with its zarr arrays)."""
        return self
