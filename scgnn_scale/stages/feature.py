"""Stage ``feature``: the LTMG-regularised feature autoencoder of the first pass (docs/METHOD.md step 3).

Trains on minibatches of ``X`` (and ``layers/ltmg``) streamed from the store (:mod:`scgnn_scale.train`
has the loop, the loss and the schedule) and writes the first pass's 128-d embedding (published as
``obsm/X_scgnn_feature``) and the model ``models/feature_ae.pt``. The reconstruction that iterate and
impute start from is ``decoder(embedding)``, computed again where it is read
(:mod:`scgnn_scale.reconstruction`); only ``runtime.keep_work`` stores it, as ``work/recon``.
"""

from __future__ import annotations

from ..keys import FEATURE_MODEL, FIRST_PASS, KEYS, ltmg_key
from ..train import train_feature


def run(ctx) -> dict:
    """Stage ``feature``: train on ``X`` (+ ``layers/ltmg``), write the embedding (and, kept, the reconstruction)."""
    keep = ctx.config.runtime.keep_work
    if not keep:
        ctx.store.delete(KEYS.recon)  # an earlier run's: never read beside this model
    with ctx.store.staging(ctx.stage) as st:
        info = train_feature(ctx, st, x_key=KEYS.x, trs_key=ltmg_key(ctx.store, ctx.config), steps=None,
                             model_in=None, model_out=ctx.store.model_path(FEATURE_MODEL),
                             embedding_key=FIRST_PASS.feature_embedding, recon_key=KEYS.recon if keep else None)
    info["metrics"] = {"feature_recon_mse": info["recon_mse"]}
    return info
