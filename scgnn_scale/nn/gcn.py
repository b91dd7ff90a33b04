"""Graph autoencoder in pure torch: two GCN layers, inner-product decoder, negative-sampled BCE.

The encoder is docs/METHOD.md step 5: ``Z = act(A~ ReLU(A~ E W1) W2)`` with
``A~ = D^-1/2 (A + I) D^-1/2`` and ``D = rowsum(A + I)``; ``act`` is the identity (the published
code's ``GCNModelAE``, the default: it clustered better on the gold sets) or ReLU (the paper's formula). Layers have no bias and
Glorot-uniform weights, as scGNN's ``GraphConvolution``. Message passing is a torch sparse
matrix product (CSR), so the graph is never densified; the same encoder runs on the whole graph
(one ``A~``) or on sampled blocks (one rectangular block per layer, see :mod:`.sampling`).

The loss (:func:`edge_bce_loss`) replaces the published ``N x N`` reconstruction. The published
code weights its dense BCE with ``pos_weight = (N^2 - |E|)/|E|`` and ``norm = N^2 / (2 (N^2 - |E|))``,
which is exactly ``0.5 * (mean BCE over edges + mean BCE over non-edges)``. That balanced form is
kept: the positive term averages over the given edges, the negative term over uniformly sampled
non-edges, so the sampled loss is an unbiased estimate of
``0.5 * (mean_{A_ij=1} -log s(z_i.z_j) + mean_{A_ij=0, i!=j} -log(1 - s(z_i.z_j)))`` whatever the
number of negatives (``neg_ratio`` changes its variance, not its expectation). Unlike the published
code, self pairs ``(i, i)`` are neither positives nor negatives (their score ``|z_i|^2`` carries no
graph information).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


def sparse_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` without the 'beta state' warning on every call (its entries are valid)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def normalized_adjacency(crow: torch.Tensor, col: torch.Tensor, n: int, values: torch.Tensor | None = None,
                         dtype=torch.float32) -> torch.Tensor:
    """``D^-1/2 (A + I) D^-1/2`` as a sparse CSR tensor, from the CSR arrays of a symmetric ``A``.

    The diagonal entry of each row is inserted at its sorted place (no COO sort: at 1M cells and
    14M edges the coalesce of ``A + I`` held about 1.2 GB at once and took 3.4 s).

    Parameters
    ----------
    crow, col
        CSR row pointer (length n + 1) and column indices of ``A``: columns sorted within rows, no
        self loops (:class:`~scgnn_scale.nn.sampling.CSRGraph` holds its graph so).
    n
        Number of nodes.
    values
        Edge weights (None: 1.0).
    """
    crow = crow.to(torch.int64)
    col = col.to(torch.int64)
    device = col.device
    if values is None:
        values = torch.ones(col.numel(), dtype=dtype, device=device)
    values = values.to(dtype)
    row = torch.repeat_interleave(torch.arange(n, device=device), crow[1:] - crow[:-1])
    if bool((col == row).any()):
        raise ValueError("normalized_adjacency: A has self loops; the identity is added here")
    dinv = torch.ones(n, dtype=dtype, device=device).index_add_(0, row, values).rsqrt()
    # row i's diagonal entry follows the row's columns below i
    loop_at = crow[:-1] + torch.arange(n, device=device) + torch.bincount(row[col < row], minlength=n)
    is_edge = torch.ones(col.numel() + n, dtype=torch.bool, device=device)
    is_edge[loop_at] = False
    cols = torch.empty(col.numel() + n, dtype=torch.int64, device=device)
    cols[loop_at] = torch.arange(n, device=device)
    cols[is_edge] = col
    vals = torch.empty(col.numel() + n, dtype=dtype, device=device)
    vals[loop_at] = dinv * dinv
    vals[is_edge] = values * dinv[row] * dinv[col]
    return sparse_csr(crow + torch.arange(n + 1, device=device), cols, vals, (n, n))


def propagate(adj: torch.Tensor, x: torch.Tensor, block_rows: int = 65536) -> torch.Tensor:
    """``adj @ x`` for a sparse CSR ``adj``, row block by row block.

    torch's CSR product holds a second buffer the size of its output (1M x 128: +1 GB at its peak
    instead of the 512 MB result); per block that buffer is a block's size.
    """
    crow, col, values = adj.crow_indices(), adj.col_indices(), adj.values()
    n = adj.shape[0]
    out = torch.empty((n, x.shape[1]), dtype=x.dtype, device=x.device)
    for a in range(0, n, block_rows):
        b = min(n, a + block_rows)
        lo, hi = int(crow[a]), int(crow[b])
        block = sparse_csr(crow[a:b + 1] - lo, col[lo:hi], values[lo:hi], (b - a, adj.shape[1]))
        out[a:b] = torch.sparse.mm(block, x)
    return out


class GCNEncoder(nn.Module):
    """Two graph-convolution layers ``in -> hidden -> latent``.

    ``forward(x, adjs)`` takes node features and either one square ``A~`` (whole graph) or a list
    of two sparse blocks ``[block_1, block_2]`` (sampled: ``block_l`` maps the nodes of layer l-1 to
    those of layer l). With ``precomputed=True`` the first propagation ``A~ x`` is already applied
    to ``x`` (it does not depend on the weights), and ``adjs`` holds only the second layer's matrix.
    """

    def __init__(self, in_dim: int, hidden: int = 32, latent: int = 16, *, final_relu: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(in_dim, hidden))
        self.w2 = nn.Parameter(torch.empty(hidden, latent))
        nn.init.xavier_uniform_(self.w1, generator=generator)
        nn.init.xavier_uniform_(self.w2, generator=generator)
        self.final_relu = final_relu

    def forward(self, x: torch.Tensor, adjs, *, precomputed: bool = False) -> torch.Tensor:
        if isinstance(adjs, torch.Tensor):
            adjs = [adjs] if precomputed else [adjs, adjs]
        if precomputed:
            (adj2,) = adjs
            h = torch.relu(x @ self.w1)
        else:
            adj1, adj2 = adjs
            h = torch.relu(torch.sparse.mm(adj1, x @ self.w1))  # project first: 128 -> 32 before propagating
        z = torch.sparse.mm(adj2, h @ self.w2)
        return torch.relu(z) if self.final_relu else z


def pair_logits(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """Inner-product decoder for given pairs: ``z_a[i] . z_b[i]`` (logits of ``sigmoid(Z Z^T)``)."""
    return (z_a * z_b).sum(-1)


def edge_bce_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor, pos_weight: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``0.5 * (mean BCE(pos, 1) + mean BCE(neg, 0))``: the published balanced BCE, negative-sampled.

    ``pos_weight`` (optional, per positive pair) turns the positive mean into a weighted mean;
    the minibatch mode uses it to weight each target's sampled edge by the target's degree, so that
    the positive term estimates the mean over all edges.
    """
    pos = F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits), reduction="none")
    if pos_weight is not None:
        pos_term = (pos * pos_weight).sum() / pos_weight.sum()
    else:
        pos_term = pos.mean()
    neg_term = F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits))
    return 0.5 * (pos_term + neg_term)
