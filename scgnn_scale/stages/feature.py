"""Stage ``feature``: the LTMG-regularised feature autoencoder of the first pass (docs/METHOD.md step 3).

Trains on minibatches of ``X`` (and ``layers/ltmg``) streamed from the store (:mod:`scgnn_scale.train`
has the loop, the loss and the schedule) and writes the first pass's 128-d embedding (published as
``obsm/X_scgnn_feature``), the reconstruction ``work/recon`` that iterate and impute start from, and
the model ``models/feature_ae.pt``.
"""

from __future__ import annotations

import numpy as np

from ..keys import FEATURE_MODEL, FIRST_PASS, KEYS, ltmg_key
from ..train import cpu_threads, load_model, train_feature, write_outputs


def run(ctx) -> dict:
    """Stage ``feature``: train on ``X`` (+ ``layers/ltmg``), write the embedding and the reconstruction."""
    with ctx.store.staging(ctx.stage) as st:
        info = train_feature(ctx, st, x_key=KEYS.x, trs_key=ltmg_key(ctx.store, ctx.config), steps=None,
                             model_in=None, model_out=ctx.store.model_path(FEATURE_MODEL),
                             embedding_key=FIRST_PASS.feature_embedding, recon_key=KEYS.recon)
    info["metrics"] = {"feature_recon_mse": info["recon_mse"]}
    return info


def rewrite_reconstruction(ctx) -> bool:
    """Write ``work/recon`` again from the saved feature autoencoder: one inference pass over X, no training.

    The run removes the reconstruction when it ends (disk); a later change of the iteration or
    imputation options needs it back. Returns False when the model is not saved (or does not fit X).
    """
    path = ctx.store.model_path(FEATURE_MODEL)
    if not path.is_file() or not ctx.store.has(KEYS.x):
        return False
    device = ctx.runtime.device
    model, _ = load_model(path, device)
    x = ctx.store.open_array(KEYS.x)
    if model.n_genes != int(x.shape[1]):
        return False
    with ctx.store.staging("feature-recon") as st, cpu_threads(device, ctx.config.feature.torch_threads):
        recon = st.create_matrix(KEYS.recon, tuple(x.shape), np.float32)
        write_outputs(model, x, recon=recon, progress=ctx.progress, name="reconstruction from the saved model")
    return True
