"""Stage ``impute``: the imputation autoencoder (by default weighing zeros by their chance; the published rule is
regularised by the final cell graph and clusters).

Two rules, ``impute.zero_weight``. ``'expected'`` trains the autoencoder on ``X`` itself and weighs each
observed zero by its chance under a Poisson of its cluster's mean of that gene
(:mod:`scgnn_scale.zero_weights`): dropouts of well-expressed genes barely count, zeros the cluster
expects keep the published weight; the clusters enter there, not as regularisers, and ``impute.input``,
``gamma1`` and ``gamma2`` are not used. ``'published'`` is the paper's, described below.

docs/METHOD.md step 9, as the published scGNN runs it (``scGNN.py``, "Starts Imputation"): after the
iterations, the autoencoder is reset to its state before any training (``ptfileStart``: the
feature autoencoder's initial weights and a fresh Adam) and trained ``EM_epochs`` (200) epochs on
``reconOri``, the feature autoencoder's reconstruction stored right after its first training
("Store reconOri for imputation"), as input and target, with the final graph and clusters as
regularisers; its output is the imputed matrix. Here:

* **input and target** ``impute.input``: ``recon`` (default) is the feature stage's
  reconstruction of ``X``, i.e. ``reconOri``; ``final`` is the last iteration's feature-AE
  reconstruction (the first pass's when iterate ran no iteration). Both are computed from the
  saved model and its embedding as they are read (:func:`input_array`), or read from
  ``work/recon`` / ``work/recon_final`` where ``runtime.keep_work`` stored them;
  ``X`` is the preprocessed matrix itself (the paper's wording, "on the original X").
* **network** the feature autoencoder's shape, seeded with ``runtime.seed`` as the feature AE
  is: the same initial weights as the published reset; fresh optimiser.
* **steps** ``impute.steps`` (200) at least, ``max_epochs`` passes once that is more, at most
  ``max_steps`` (2,000) unless ``steps`` asks for more (the
  feature AE's schedule rule, batch size, learning rate and loader); full batch, as the
  original, while N is at most ``feature.batch_size``.
* **loss** the feature autoencoder's (``gamma * SE + alpha * TRS o SE``, the alpha term when
  ``layers/ltmg`` exists and ``impute.use_ltmg``) plus the paper's Eq. 9-11::

      gamma1 * sum(A . (R - Rhat)^2) + gamma2 * sum(B . (R - Rhat)^2) + l1 * sum|w|

  with ``R`` the input, ``A = obsp/scgnn_graph`` and ``B`` the same-cluster indicator of
  ``obs/scgnn_cluster``. Both N x N terms are exactly per-cell weights on each cell's summed
  squared error, ``gamma1 * degree_j + gamma2 * |cluster(j)|`` (derivation and the scale-free
  cluster term in :func:`scgnn_scale.nn.losses.imputation_cell_weights`): no N x N matrix is
  ever formed. Deviation from the published defaults, kept from the paper's Eq. 12: the
  published imputation loss has ``gammaImputePara = 0`` and no LTMG term (``--EMreguTag`` off).

Why not ``X``: the scored entries of the dropout protocol (:mod:`scgnn_scale.dropout`) are zeros
in ``X``, and an autoencoder trained to reproduce ``X`` learns them back (the ReLU output makes
many exactly 0). The feature autoencoder does not reproduce single zeros (its first
reconstruction already predicts the flipped entries better than kNN smoothing), and the
imputation AE trained on that reconstruction keeps them filled. Measured with
bench/bench_imputation.py's protocol (10% of the non-zeros flipped, one masking, median L1 over
the flipped entries on the log1p scale; scGNN / kNN smoothing / zeros): goolam 0.38 / 0.61 / 5.53,
klein_subset 0.29 / 0.39 / 1.79, zeisel_subset 0.31 / 0.47 / 1.10, baron_pancreas_toy
0.44 / 0.48 / 1.10, mouse_bladder_top2000 0.50 / 0.58 / 0.69 with the defaults; with
``input = "X"`` (500 steps) goolam 3.22, klein_subset 0.46, zeisel_subset 0.66, baron_pancreas_toy
0.91, all worse than kNN smoothing. ``final`` gave 0.30, 0.31, 0.45, 0.50 on goolam, zeisel,
baron and mouse bladder (better on goolam, worse on baron, equal on the others): no consistent
gain over ``recon``, which is the published input.

Writes ``layers/imputed`` (N x G, the reconstruction, block by block; float32, or float16 with
``impute.dtype``; each value rounded to ``impute.mantissa_bits`` as it is written, :mod:`..bit_rounding`)
and ``models/impute_ae.pt``.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..keys import FEATURE_MODEL, FIRST_PASS, IMPUTE_MODEL, ITERATE_MODELS, ITERATED, KEYS, ltmg_key
from ..nn.losses import ORIGINAL_BATCH_CELLS, imputation_cell_weights
from ..paths import as_path
from ..reconstruction import feature_reconstruction
from ..train import train_and_write
from ..zero_weights import EntryWeights, cluster_mean_expression

#: ``impute.input`` -> the store key the imputation AE reconstructs
INPUT_KEYS = {"recon": KEYS.recon, "final": KEYS.final_recon, "X": KEYS.x}


def cluster_codes(ctx, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """The committed clusters as codes 0..K-1 per cell, and each cluster's size."""
    clusters = np.asarray(ctx.store.read_elem(KEYS.clusters)).astype(str)
    if clusters.shape[0] != n_cells:
        raise InputError(f"{ctx.store.root}: obs/scgnn_cluster has {clusters.shape[0]} cells, X has {n_cells}")
    _, inverse, counts = np.unique(clusters, return_inverse=True, return_counts=True)
    return inverse, counts


def regulariser_weights(ctx, n_cells: int) -> tuple[np.ndarray, dict]:
    """Per-cell weights of the graph and cell-type regularisers from the committed graph and clusters."""
    icfg = ctx.config.impute
    graph = ctx.store.read_elem(KEYS.graph)
    if tuple(graph.shape) != (n_cells, n_cells):
        raise InputError(f"{ctx.store.root}: obsp/scgnn_graph is {graph.shape[0]} x {graph.shape[1]}, "
                         f"X has {n_cells} cells")
    degree = np.asarray(graph.sum(axis=0), dtype=np.float64).reshape(-1)  # colsum(A): sum(A @ E) = colsum . e
    inverse, counts = cluster_codes(ctx, n_cells)
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


def input_array(ctx) -> tuple[str, object]:
    """What the imputation AE reconstructs, from ``impute.input`` (see the module docstring): its name and
    the array (stored, or computed from the saved feature model and its embedding as it is read).

    ``recon`` is the first feature AE's reconstruction: ``work/recon`` when the run kept it
    (``runtime.keep_work``), else ``decoder(embedding)`` of ``models/feature_ae.pt`` and the first
    pass's embedding. ``final`` is the last feature-AE reconstruction the run holds: ``work/recon_final``,
    or the last iteration's model applied to ``work/iterated/X_scgnn_feature``, or the first pass's
    when iterate ran no iteration.
    """
    choice = ctx.config.impute.input
    if choice not in INPUT_KEYS:
        raise InputError(f"impute.input: '{choice}' is not one of {', '.join(INPUT_KEYS)}")
    store, device = ctx.store, ctx.runtime.device
    if choice == "X":
        if not store.has(KEYS.x):
            raise InputError(f"{store.root}: the run has no X; run preprocess first")
        return KEYS.x, store.open_array(KEYS.x)
    if choice == "final" and store.has(KEYS.final_recon):
        return KEYS.final_recon, store.open_array(KEYS.final_recon)
    if choice == "final" and store.has(ITERATED.feature_embedding):
        models = sorted(store.model_paths(ITERATE_MODELS), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        recon = feature_reconstruction(store, models[-1], ITERATED.feature_embedding, device) if models else None
        if recon is None:
            raise InputError(f"{store.root}: impute.input=final needs the last iteration's feature model "
                             f"({ITERATE_MODELS}.pt in models/), which the run does not hold; redo iterate")
        ctx.log.info("impute: input %s computed from %s and %s", KEYS.final_recon, as_path(recon.model_path).name,
                     ITERATED.feature_embedding)
        return KEYS.final_recon, recon
    if store.has(KEYS.recon):
        return KEYS.recon, store.open_array(KEYS.recon)
    recon = feature_reconstruction(store, store.model_path(FEATURE_MODEL), FIRST_PASS.feature_embedding, device)
    if recon is None:
        raise InputError(f"{store.root}: impute.input={choice} needs {KEYS.recon}, or the feature autoencoder's "
                         f"model (models/{FEATURE_MODEL}.pt) and embedding ({FIRST_PASS.feature_embedding}), which "
                         "the run does not hold (the feature stage writes them)")
    ctx.log.info("impute: input %s computed from the saved feature autoencoder and %s", KEYS.recon,
                 FIRST_PASS.feature_embedding)
    return KEYS.recon, recon


def run(ctx) -> dict:
    """Stage ``impute``: train the imputation autoencoder and write ``layers/imputed``: on ``X`` with the
    expected zeros' weights (``impute.zero_weight = 'expected'``), or the published way."""
    fcfg, icfg = ctx.config.feature, ctx.config.impute
    if icfg.zero_weight == "expected":
        return _run_expected_zeros(ctx)
    n_cells = int(ctx.store.open_array(KEYS.x).shape[0])
    weights, weight_info = regulariser_weights(ctx, n_cells)
    x_key, x = input_array(ctx)
    info = _train(ctx, x_key=x_key, x_array=x, trs_key=ltmg_key(ctx.store, ctx.config) if icfg.use_ltmg else None,
                  gamma=fcfg.gamma, alpha=fcfg.alpha, cell_weight=weights)
    info["regularisers"] = weight_info
    return info


def _run_expected_zeros(ctx) -> dict:
    """The imputation AE on ``X``, each observed zero weighted by its chance under its cluster's mean
    (:class:`~scgnn_scale.zero_weights.EntryWeights`); the clusters enter there, not as regularisers."""
    fcfg, icfg = ctx.config.feature, ctx.config.impute
    x = ctx.store.open_array(KEYS.x)
    labels, sizes = cluster_codes(ctx, int(x.shape[0]))
    means = cluster_mean_expression(x, labels, len(sizes))
    states_key = ltmg_key(ctx.store, ctx.config) if icfg.use_ltmg else None
    weights = EntryWeights(x, ctx.store.open_array(states_key) if states_key else None, labels, means,
                           gamma=fcfg.gamma, alpha=fcfg.alpha)
    # the weights carry gamma and alpha: the loss adds them as an alpha-1 "state" over a gamma of 0
    info = _train(ctx, x_key=KEYS.x, x_array=x, trs_key="weights of the entries (computed)", trs_array=weights,
                  gamma=0.0, alpha=1.0, cell_weight=None)
    info["ltmg"] = states_key is not None
    info["zero_weight"] = {"rule": "expected", "clusters": len(sizes),
                           "mean_zero_weight_over_clusters_and_genes": round(float(weights.zero_weight.mean()), 6)}
    return info


def _train(ctx, *, x_key: str, x_array, trs_key, gamma: float, alpha: float, cell_weight, trs_array=None) -> dict:
    """The imputation AE of either rule: trained on ``x_key`` from fresh weights
    (or the feature AE's, ``impute.init = 'feature'``), ``layers/imputed`` written."""
    icfg = ctx.config.impute
    with ctx.store.staging(ctx.stage) as st:
        info = train_and_write(
            ctx, st, x_key=x_key, x_array=x_array, trs_key=trs_key, trs_array=trs_array, steps=None,
            model_in=ctx.store.model_path(FEATURE_MODEL) if icfg.init == "feature" else None,
            model_out=ctx.store.model_path(IMPUTE_MODEL), embedding_key=None, recon_key=KEYS.imputed, gamma=gamma,
            alpha=alpha, l1=icfg.l1, min_steps=icfg.steps, max_epochs=icfg.max_epochs, max_steps=icfg.max_steps,
            cell_weight=cell_weight, resume=True, desc="imputation autoencoder", recon_dtype=np.dtype(icfg.dtype),
            recon_mantissa_bits=icfg.mantissa_bits)
    info["input"] = x_key
    info["mantissa_bits"] = min(icfg.mantissa_bits, int(np.finfo(icfg.dtype).nmant))
    info["metrics"] = {"impute_recon_mse": info["recon_mse"]}
    return info
