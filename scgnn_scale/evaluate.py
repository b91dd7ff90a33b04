"""Clustering quality against reference labels: ARI, NMI and silhouette (the paper's metrics).

:func:`clustering_metrics` works on arrays; :func:`evaluate_run` reads a finished run (its
``obs/scgnn_cluster`` and a label column of obs), writes ``RUN_DIR/metrics.json`` and returns the
numbers (``scgnn-scale evaluate RUN_DIR --label-key label``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .atomic import write_json
from .errors import InputError
from .keys import CLUSTER_COLUMN, KEYS
from .partition_scores import adjusted_rand_index, normalized_mutual_information, silhouette

SILHOUETTE_MAX_CELLS = 10_000


def clustering_metrics(labels_true, labels_pred, embedding=None, seed: int = 0,
                       silhouette_max_cells: int = SILHOUETTE_MAX_CELLS) -> dict:
    """ARI and NMI of ``labels_pred`` against ``labels_true``; silhouette of ``labels_pred`` in ``embedding``.

    Cells whose reference label is missing (NaN/None/empty) are left out of ARI and NMI.

    Parameters
    ----------
    labels_true, labels_pred
        Per-cell labels (any hashable values).
    embedding
        Optional ``(N, d)`` array; the silhouette (Euclidean) is computed on a random sample of at
        most ``silhouette_max_cells`` cells (exact silhouette is ``O(N^2)``).
    seed
        Seed of the silhouette sample.

    Returns
    -------
    dict
        ``ari``, ``nmi`` (arithmetic normalisation, scikit-learn's default), ``silhouette`` (None
        without embedding or with a single cluster), ``n_clusters``, ``n_labels``, ``n_cells``.
    """
    truth = pd.Series(np.asarray(labels_true, dtype=object))
    pred = np.asarray(labels_pred)
    if truth.size != pred.size:
        raise InputError(f"labels: {truth.size} reference labels for {pred.size} predicted ones")
    known = (truth.notna() & (truth.astype(str) != "")).to_numpy()
    if not known.any():
        raise InputError("labels: every reference label is missing")
    t = truth[known].astype(str).to_numpy()
    p = pred[known].astype(str)
    out = {
        "ari": adjusted_rand_index(t, p),
        "nmi": normalized_mutual_information(t, p),
        "silhouette": None,
        "n_clusters": int(np.unique(pred.astype(str)).size),
        "n_labels": int(np.unique(t).size),
        "n_cells": int(known.sum()),
    }
    if embedding is not None:
        emb = np.asarray(embedding)
        if emb.shape[0] != pred.size:
            raise InputError(f"embedding: {emb.shape[0]} rows for {pred.size} labels")
        rows = np.arange(pred.size)
        if pred.size > silhouette_max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(pred.size, silhouette_max_cells, replace=False))
        sample_labels = pred[rows].astype(str)
        n_sample_clusters = np.unique(sample_labels).size
        if 2 <= n_sample_clusters <= rows.size - 1:
            out["silhouette"] = silhouette(emb[rows], sample_labels)
        out["silhouette_cells"] = int(rows.size)
    return out


def evaluate_run(run_dir, label_key: str = "label", *, labels_file=None, seed: int = 0) -> dict:
    """Score a run's clusters against ``obs[label_key]``; write ``RUN_DIR/metrics.json``; return the metrics.

    The silhouette is computed in the run's graph embedding ``obsm/X_scgnn`` (when present).
    ``labels_file``: a CSV/TSV of cell names and labels (see :func:`scgnn_scale.labels.read_label_file`),
    matched to the run's cells by name and written into the run's obs as ``label_key`` first.

    Raises
    ------
    InputError
        When the directory is not a run, the run has no clusters yet, or obs lacks ``label_key``.
    """
    from .store import RunStore

    store = RunStore.open(run_dir)
    if not store.has(KEYS.x) and not (store.adata_path / "obs").exists():
        raise InputError(f"{run_dir}: the run has no cells yet (run the pipeline first)")
    obs = store.read_elem(KEYS.obs)
    if CLUSTER_COLUMN not in obs.columns:
        raise InputError(f"{run_dir}: the run has no clusters yet (obs/scgnn_cluster); run it through the "
                         "'cluster' stage first")
    if labels_file is not None:
        from .labels import align_labels, attach_labels, read_label_file

        labels = read_label_file(labels_file, label_key)
        obs = attach_labels(store, align_labels(labels, obs.index, str(labels_file)), label_key)
    if label_key not in obs.columns:
        others = [c for c in obs.columns if c != CLUSTER_COLUMN]
        raise InputError(f"{run_dir}: obs has no column '{label_key}' to compare with (columns: "
                         f"{', '.join(others) if others else 'none'}); name another one with "
                         "--label-key, give a file of labels with --labels FILE, or rerun 'scgnn-scale run' with "
                         "--label-key <column> (no stage is redone) so the input's labels are carried into the run")
    metrics = score_clusters(store, obs, label_key, seed=seed)
    write_json(store.root / "metrics.json", metrics)
    return metrics


def score_clusters(store, obs, label_key: str, *, seed: int = 0) -> dict:
    """ARI/NMI of the run's clusters against ``obs[label_key]``, silhouette in its graph embedding."""
    embedding = store.read_elem(KEYS.embedding) if store.has(KEYS.embedding) else None
    metrics = clustering_metrics(obs[label_key].to_numpy(), obs[CLUSTER_COLUMN].to_numpy(), embedding=embedding,
                                 seed=seed)
    metrics["label_key"] = label_key
    return metrics
