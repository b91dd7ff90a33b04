"""Stage ``gae``: the first pass's graph embedding (docs/METHOD.md step 5; :mod:`scgnn_scale.graph_autoencoder`).

Reads the first pass's feature embedding and cell graph and writes its 16-d graph embedding; the
pipeline publishes it as ``obsm/X_scgnn``.
"""

from __future__ import annotations

from ..graph_autoencoder import train_gae
from ..keys import FIRST_PASS


def run(ctx) -> dict:
    """Stage entry point: the first pass's feature embedding and graph -> its graph embedding."""
    with ctx.store.staging(ctx.stage) as staging:
        return train_gae(ctx, staging, embedding_key=FIRST_PASS.feature_embedding, graph_key=FIRST_PASS.graph,
                         out_key=FIRST_PASS.embedding)
