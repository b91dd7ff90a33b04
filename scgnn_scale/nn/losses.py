"""Losses of the scGNN autoencoders, with a reduction that does not drift with batch size or N.

The published code sums every term over a full batch (``reduction='sum'``, batch 12,800 cells)
and adds ``L1 * sum|w|``. With a sum, the weight of the reconstruction against the L1 penalty
grows with the number of cells in a batch, so a minibatch of 1,024 cells would weaken the
reconstruction 12-fold against L1 compared with the original. Here every reconstruction term is

    loss = R / b * sum_{j in batch} sum_g w_jg (x_jg - xhat_jg)^2,   R = min(N, 12,800)

i.e. the per-cell mean of the summed row error, scaled to the magnitude of one full batch of the
original: ``R`` cells, the original's batch (all N cells when N <= 12,800). Its expectation over
random minibatches does not depend on the batch size ``b``; for a full batch (b = N <= 12,800) it
*is* the original's sum, so together with ``l1 * l1_penalty(model)`` (the L1 weight kept as in the
paper, 1.0) the relative weight of the two terms is the original's, ``l1 / min(N, 12,800)`` per cell,
and it stops changing once N exceeds the original's batch.

The imputation autoencoder's N x N regularisers are per-cell weights on the squared error
(:func:`imputation_cell_weights`), passed to :func:`reconstruction_loss` as ``cell_weight``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

#: cells per batch of the published code (``--batch-size 12800``): the reference scale of every loss
ORIGINAL_BATCH_CELLS = 12_800


def reference_cells(n_cells: int) -> int:
    """Cells of one full batch of the original on a data set of ``n_cells``: ``min(n_cells, 12,800)``.

    Pass it as ``reference_cells`` to :func:`reconstruction_loss` so that the loss equals the
    original's full-batch sum when ``n_cells <= 12,800`` (and is its 12,800-cell magnitude above).
    """
    return int(max(1, min(int(n_cells), ORIGINAL_BATCH_CELLS)))


def reconstruction_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    *,
    trs: torch.Tensor | None = None,
    gamma: float,
    alpha: float,
    cell_weight: torch.Tensor | None = None,
    reference_cells: float = ORIGINAL_BATCH_CELLS,
) -> torch.Tensor:
    """Weighted squared reconstruction error of a minibatch, scale-free in the batch size.

    With ``E = (x - recon)^2`` (cells x genes)::

        loss = reference_cells / b * sum_j sum_g (gamma + alpha * trs_jg + cell_weight_j) * E_jg

    which is ``gamma * sum(E) + alpha * sum(TRS o E)`` (paper Eq. 4, the TRS state value as the
    weight as in the published ``regulation_mse_loss_function``) plus ``sum_j cell_weight_j *
    rowsum(E)_j`` (the imputation regularisers, see :func:`imputation_cell_weights`), reduced as the
    per-cell mean times ``reference_cells``.

    Parameters
    ----------
    x, recon
        Input and reconstruction, ``(b, G)`` float tensors.
    trs
        LTMG states ``(b, G)`` (any numeric dtype, e.g. uint8) or None: without it the alpha term
        is dropped (the published ``noregu`` loss).
    gamma, alpha
        Weights of the plain and the TRS-weighted squared error (paper: 0.1 and 0.9).
    cell_weight
        Optional ``(b,)`` extra weight per cell on its plain squared error.
    reference_cells
        Cells whose summed error the loss stands for: use :func:`reference_cells` of the data set
        size (``min(N, 12,800)``) to match the original. The default is the original's batch.

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    if x.shape != recon.shape:
        raise ValueError(f"x {tuple(x.shape)} and recon {tuple(recon.shape)} differ in shape")
    n = x.shape[0]
    if n == 0:
        return recon.sum() * 0.0
    sq = (recon - x) ** 2
    row_plain = sq.sum(dim=1)
    weight = torch.full_like(row_plain, float(gamma))
    if cell_weight is not None:
        weight = weight + cell_weight.to(dtype=row_plain.dtype, device=row_plain.device).reshape(-1)
    total = (weight * row_plain).sum()
    if trs is not None and alpha != 0:
        total = total + alpha * (sq * trs.to(dtype=sq.dtype, device=sq.device)).sum()
    return total * (float(reference_cells) / n)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """``sum |p|`` over every parameter (weights and biases, as the published code's L1 term)."""
    return sum(p.abs().sum() for p in model.parameters())


@torch.no_grad()
def add_l1_gradient(model: nn.Module, weight: float) -> torch.Tensor:
    """Add the gradient of ``weight * l1_penalty(model)`` to each parameter's ``.grad``; return the penalty.

    The same numbers as backpropagating the penalty (autograd's ``weight * sign(p)``, added to the
    reconstruction's gradient), without the graph and backward pass of a second loss over a million
    weights: 3-5% of an autoencoder step on CPU. Call it after ``backward()`` of the rest of the loss.
    """
    for p in model.parameters():
        if p.requires_grad:
            p.grad = weight * p.sign() if p.grad is None else p.grad.add_(p.sign(), alpha=weight)
    return l1_penalty(model)


def imputation_cell_weights(
    degree: np.ndarray,
    cluster_size: np.ndarray,
    *,
    gamma1: float,
    gamma2: float,
    n_cells: int | None = None,
    reference: int = ORIGINAL_BATCH_CELLS,
) -> np.ndarray:
    """Per-cell weights equal to the imputation autoencoder's N x N regularisers.

    With ``E = (X - Xhat)^2`` and ``e_j = rowsum(E)_j``, the paper's Eq. 9-10 (the published
    ``torch.matmul(graphregu, E)`` then a sum) are::

        gamma1 * sum(A @ E) = gamma1 * sum_j colsum(A)_j * e_j
        gamma2 * sum(B @ E) = gamma2 * sum_j |cluster(j)| * e_j      (B_ij = 1 iff same cluster, i = j included)

    so they are exactly a weight ``gamma1 * degree_j + gamma2 * |cluster(j)|`` on each cell's
    plain squared error, with no N x N matrix. The original applies them within a full batch of up
    to 12,800 cells; a cluster size grows with N, so at 1M cells it would outweigh every other term
    by orders of magnitude. The scale-free form counts a cluster's cells in a batch of the original's
    size, ``|cluster(j)| * min(N, reference) / N`` (the same share of 12,800 cells), which equals the
    original exactly for ``N <= 12,800``. The degree of a KNN graph does not grow with N and is kept.

    Parameters
    ----------
    degree
        Column sums of the cell graph A (its weighted degree), ``(N,)``.
    cluster_size
        Size of each cell's cluster, ``(N,)``.
    gamma1, gamma2
        Weights of the graph and the cell-type regulariser (paper: 0.3 and 0.1).
    n_cells
        N (default ``len(degree)``).
    reference
        The original's batch size (12,800).

    Returns
    -------
    np.ndarray
        ``(N,)`` float32 weights, to pass (per batch) as ``cell_weight`` of :func:`reconstruction_loss`.
    """
    degree = np.asarray(degree, dtype=np.float64).reshape(-1)
    cluster_size = np.asarray(cluster_size, dtype=np.float64).reshape(-1)
    if degree.shape != cluster_size.shape:
        raise ValueError(f"degree {degree.shape} and cluster_size {cluster_size.shape} differ in shape")
    n = int(n_cells if n_cells is not None else degree.shape[0])
    cluster_scale = min(n, reference) / max(n, 1)
    return (gamma1 * degree + gamma2 * cluster_size * cluster_scale).astype(np.float32)
