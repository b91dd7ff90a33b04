"""Every key of the run store in one place (the layout is in docs/STAGE_CONTRACT.md).

``KEYS.<name>`` is a store key (``RunStore.has(KEYS.graph)``). The *published* results are what a
user reads in ``adata.zarr``: the last pass's embeddings, graph and clusters. The stages write their
own passes under ``work/`` (:data:`FIRST_PASS` by the feature, graph, gae and cluster stages,
:data:`ITERATED` by iterate) and the pipeline publishes the latest pass (:mod:`scgnn_scale.results`),
so no stage writes over another stage's output.
"""

from __future__ import annotations

from typing import NamedTuple


class StoreKeys(NamedTuple):
    # the AnnData a user reads
    x: str = "X"
    obs: str = "obs"
    var: str = "var"
    raw: str = "raw"
    ltmg: str = "layers/ltmg"
    ltmg_weights: str = "varm/ltmg_weights"
    ltmg_means: str = "varm/ltmg_means"
    ltmg_sds: str = "varm/ltmg_sds"
    imputed: str = "layers/imputed"
    feature_embedding: str = "obsm/X_scgnn_feature"
    pca: str = "obsm/X_pca"  # principal components of the normalised counts (stage pca)
    embedding: str = "obsm/X_scgnn"
    graph: str = "obsp/scgnn_graph"
    clusters: str = "obs/scgnn_cluster"
    summary: str = "uns/scgnn"
    # working data
    input: str = "work/input"
    preprocess: str = "work/preprocess"
    kept_cells: str = "work/preprocess/cells"  # int64 indices into the input's cells
    kept_genes: str = "work/preprocess/genes"
    input_obs: str = "work/input/obs"
    input_var: str = "work/input/var"
    recon: str = "work/recon"
    final_recon: str = "work/recon_final"
    iterate_work: str = "work/iterate"


KEYS = StoreKeys()
#: obs column of the clusters
CLUSTER_COLUMN = "scgnn_cluster"
#: the cells x genes reconstructions that iterate and impute start from, removed when a run ends
INTERMEDIATE_RECONS = (KEYS.recon, KEYS.final_recon)


class Pass(NamedTuple):
    """Where one pass of feature AE -> graph -> GAE -> clusters keeps its results."""

    feature_embedding: str
    graph: str
    embedding: str
    clusters: str


def pass_keys(prefix: str) -> Pass:
    return Pass(f"{prefix}/X_scgnn_feature", f"{prefix}/graph", f"{prefix}/X_scgnn", f"{prefix}/cluster")


#: the first pass (the feature, graph, gae and cluster stages) and the iteration's last pass
FIRST_PASS = pass_keys("work/first_pass")
ITERATED = pass_keys("work/iterated")
#: the published keys, in the order of :class:`Pass`
PUBLISHED = Pass(KEYS.feature_embedding, KEYS.graph, KEYS.embedding, KEYS.clusters)


def ltmg_key(store, config) -> str | None:
    """``layers/ltmg`` when LTMG is enabled and computed, else None (the autoencoders' TRS input)."""
    return KEYS.ltmg if config.ltmg.enabled and store.has(KEYS.ltmg) else None


#: saved models (``RunStore.model_path(name)``): the first pass's feature AE, the imputation AE, and the
#: feature AE after iteration t
FEATURE_MODEL = "feature_ae"
IMPUTE_MODEL = "impute_ae"


ITERATE_MODELS = "iterate_feature_*"  # glob of the iteration's models


def iterate_model(t: int) -> str:
    return FEATURE_MODEL if t == 0 else ITERATE_MODELS.replace("*", str(t))
