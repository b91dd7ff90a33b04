"""Stage ``cluster``: the first pass's clusters (docs/METHOD.md step 6; :mod:`scgnn_scale.clustering`).

Reads the first pass's graph embedding and cell graph and writes its clusters; the pipeline
publishes them as ``obs/scgnn_cluster``.
"""

from __future__ import annotations

from ..clustering import cluster_cells
from ..keys import FIRST_PASS


def run(ctx) -> dict:
    """Stage entry point: the first pass's graph embedding and graph -> its clusters."""
    with ctx.store.staging(ctx.stage) as staging:
        _, info = cluster_cells(ctx, staging, embedding_key=FIRST_PASS.embedding, graph_key=FIRST_PASS.graph,
                                out_key=FIRST_PASS.clusters)
    return info
