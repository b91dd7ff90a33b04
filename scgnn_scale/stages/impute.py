"""Stage ``impute``: the imputation autoencoder, regularised by the final cell graph and clusters.

DESIGN.md step 9. A fresh autoencoder (the feature autoencoder's shape, batch size, learning rate,
loader and schedule rule) on the preprocessed ``X`` with the loss of the feature autoencoder
(``gamma * SE + alpha * TRS o SE``, the alpha term when ``layers/ltmg`` exists) plus the paper's
Eq. 9-11::

    gamma1 * sum(A . (X - Xhat)^2) + gamma2 * sum(B . (X - Xhat)^2) + l1 * sum|w|

with ``A = obsp/scgnn_graph`` and ``B`` the same-cluster indicator of ``obs/scgnn_cluster``.
Both N x N terms are exactly per-cell weights on each cell's summed squared error,
``gamma1 * degree_j + gamma2 * |cluster(j)|`` (derivation and the scale-free cluster term in
:func:`scgnn_scale.nn.losses.imputation_cell_weights`): no N x N matrix is ever formed.

Writes ``layers/imputed`` (float32 N x G, the reconstruction, block by block) and
``models/impute_ae.pt``.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..nn.losses import ORIGINAL_BATCH_CELLS, imputation_cell_weights
from .feature import ltmg_key, train_autoencoder_stage

MODEL_NAME = "impute_ae"


def regulariser_weights(ctx, n_cells: int) -> tuple[np.ndarray, dict]:
    """Per-cell weights of the graph and cell-type regularisers from the committed graph and clusters."""
    icfg = ctx.config.impute
    graph = ctx.store.read_elem("obsp/scgnn_graph")
    if tuple(graph.shape) != (n_cells, n_cells):
        raise InputError(f"{ctx.store.root}: obsp/scgnn_graph is {graph.shape[0]} x {graph.shape[1]}, "
                         f"X has {n_cells} cells")
    degree = np.asarray(graph.sum(axis=0), dtype=np.float64).reshape(-1)  # colsum(A): sum(A @ E) = colsum . e
    clusters = np.asarray(ctx.store.read_elem("obs/scgnn_cluster")).astype(str)
    if clusters.shape[0] != n_cells:
        raise InputError(f"{ctx.store.root}: obs/scgnn_cluster has {clusters.shape[0]} cells, X has {n_cells}")
    _, inverse, counts = np.unique(clusters, return_inverse=True, return_counts=True)
    cluster_size = counts[inverse].astype(np.float64)
    weights = imputation_cell_weights(degree, cluster_size, gamma1=icfg.gamma1, gamma2=icfg.gamma2,
                                      n_cells=n_cells)
    graph_part = icfg.gamma1 * degree
    info = {
        "n_clusters": int(len(counts)),
        "mean_degree": float(degree.mean()),
        "cluster_size_scale": float(min(n_cells, ORIGINAL_BATCH_CELLS) / n_cells),
        "mean_graph_weight": float(graph_part.mean()),
        "mean_celltype_weight": float((weights - graph_part).mean()),
    }
    return weights, info


def run(ctx) -> dict:
    """Stage ``impute``: train the regularised autoencoder on ``X`` and write ``layers/imputed``."""
    fcfg, icfg = ctx.config.feature, ctx.config.impute
    n_cells = int(ctx.store.open_array("X").shape[0])
    x_key = "X" if icfg.input == "X" else "work/recon"
    if not ctx.store.has(x_key):
        raise InputError(f"{ctx.store.root}: impute.input={icfg.input} needs '{x_key}', which the run does not hold")
    weights, weight_info = regulariser_weights(ctx, n_cells)
    with ctx.store.staging(ctx.stage) as st:
        info = train_autoencoder_stage(
            ctx, st, x_key=x_key, trs_key=ltmg_key(ctx) if icfg.use_ltmg else None, steps=None, model_in=None,
            model_out=ctx.store.root / "models" / f"{MODEL_NAME}.pt", embedding_key=None,
            recon_key="layers/imputed", gamma=fcfg.gamma, alpha=fcfg.alpha, l1=icfg.l1, min_steps=icfg.steps,
            max_epochs=icfg.max_epochs, cell_weight=weights, resume=True, desc="imputation autoencoder")
    info["regularisers"] = weight_info
    info["input"] = x_key
    info["metrics"] = {"impute_recon_mse": info["recon_mse"]}
    return info
