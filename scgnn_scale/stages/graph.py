"""Stage ``graph``: the first pass's cell graph (docs/METHOD.md step 4; :mod:`scgnn_scale.cell_graph`).

Reads the first pass's 128-d feature embedding and writes its pruned KNN graph; the pipeline
publishes it as ``obsp/scgnn_graph``.
"""

from __future__ import annotations

from ..cell_graph import build_graph
from ..keys import FIRST_PASS


def run(ctx) -> dict:
    """Stage entry point: the first pass's feature embedding -> its cell graph."""
    with ctx.store.staging(ctx.stage) as staging:
        return build_graph(ctx, staging, embedding_key=FIRST_PASS.feature_embedding, graph_key=FIRST_PASS.graph)
