"""What a finished run says about itself: final scores, ``uns['scgnn']`` and the summary printed at the end."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pandas as pd

from .atomic import as_stored
from .keys import CLUSTER_COLUMN, KEYS
from .store import RunStore

log = logging.getLogger("scgnn_scale")

VERSIONED = ("scgnn-scale", "torch", "zarr", "anndata", "dask", "pynndescent", "scikit-learn", "igraph", "leidenalg")


def final_metrics(store: RunStore, source: Any, config) -> dict:
    """Cluster count and sizes of the run's final clusters; ARI/NMI/silhouette against ``ingest.label_key``.

    The label column is metadata: when the run's obs lacks it (the key was added after ingest), it is
    read from the input's obs, matched by cell name, and written into the run's obs first.
    """
    obs = store.read_elem(KEYS.obs)
    if CLUSTER_COLUMN not in obs.columns:
        return {}
    clusters = obs[CLUSTER_COLUMN]
    sizes = clusters.value_counts(sort=True)
    out: dict[str, Any] = {"n_cells": int(len(obs)), "n_clusters": int(sizes.size),
                           "cluster_sizes": {str(k): int(v) for k, v in sizes.items()}}
    key = config.ingest.label_key
    if not key:
        return out
    if key not in obs.columns:
        from .labels import align_labels, attach_labels, labels_from_input

        labels = align_labels(labels_from_input(source, key, config), obs.index, f"obs column {key!r} of the input")
        obs = attach_labels(store, labels, key)
    from .evaluate import score_clusters

    scores = score_clusters(store, obs, key, seed=config.runtime.seed)
    out.update({k: v for k, v in scores.items() if k != "n_clusters"})
    return out


def _in_stage_order(stages: dict) -> dict:
    from .pipeline import STAGE_NAMES

    return {s: stages[s] for s in STAGE_NAMES if s in stages}


def _for_uns(value: Any) -> Any:
    """A value anndata can write as a mapping leaf: nested dicts stay mappings; None is dropped."""
    if isinstance(value, dict):
        return {str(k): v for k, v in ((k, _for_uns(v)) for k, v in value.items()) if v is not None}
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | float | str | np.integer | np.floating):
        return value
    if isinstance(value, list | tuple):
        if not value:
            return None
        if all(isinstance(v, bool | int | float | np.number) and not isinstance(v, bool) for v in value):
            return np.asarray(value)
        if all(isinstance(v, str) for v in value):
            return np.asarray(value, dtype=object)
        if all(isinstance(v, dict) for v in value):
            # records (loss histories, per-cluster results) as one table: a few arrays, not one per value
            table = pd.DataFrame([{k: x for k, x in v.items() if isinstance(x, int | float | str | bool)}
                                  for v in value])
            return table if table.shape[1] else None
        return np.asarray([str(v) for v in value], dtype=object)
    if isinstance(value, np.ndarray):
        return value
    return None if value is None else str(value)


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in VERSIONED:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def uns_summary(store: RunStore, metrics: dict) -> dict:
    """``uns['scgnn']``: the resolved config, versions, per-stage results and times, final metrics, history.

    Every part is a mapping (``adata.uns['scgnn']['config']['graph']['k']``); ``metrics`` scores the
    final clusters (after the iterations), ``stage_metrics`` what each stage reported when it ran.
    """
    # the manifest as stored, not the records this process made: a stage recorded by an earlier invocation
    # (a run resumed after a kill) comes back from manifest.json with sorted keys, so without this its tables
    # (loss histories, the iteration history) had their columns in another order than in a run of one process
    manifest = as_stored({"stages": store.manifest["stages"], "config": store.manifest["config"]})
    stages = _in_stage_order(manifest["stages"])
    infos = {s: dict(e.get("info", {})) for s, e in stages.items()}
    history = infos.get("iterate", {}).pop("history", None)
    summary = {
        "config": manifest["config"],
        "versions": package_versions(),
        "timings": {s: e["seconds"] for s, e in stages.items()},
        "stages": infos,
        "metrics": metrics,
        "stage_metrics": {s: i["metrics"] for s, i in infos.items() if i.get("metrics")},
    }
    summary = _for_uns(summary)
    if history:
        summary["history"] = pd.DataFrame(history)
    return summary


def run_summary(store: RunStore, metrics: dict, *, wall_seconds: float) -> dict:
    """The facts the summary prints, as a mapping."""
    stages = _in_stage_order(store.manifest["stages"])
    out = {"run_dir": str(store.root), "n_cells": store.n_obs, "n_genes": int(store.open_array(KEYS.x).shape[1]),
           "stages": {s: e["seconds"] for s, e in stages.items()},
           "peak_rss_mb": max((e.get("info", {}).get("peak_rss_mb", 0) for e in stages.values()), default=0),
           "wall_seconds": wall_seconds, "metrics": metrics}
    ingest = stages.get("ingest", {}).get("info", {})
    out["input_shape"] = (ingest.get("n_cells"), ingest.get("n_genes"))
    if store.has(KEYS.imputed):
        arr = store.open_array(KEYS.imputed)
        out["imputed"] = (tuple(arr.shape), str(arr.dtype))
    if store.has("raw/X"):
        out["raw_shape"] = tuple(store.open_group("raw/X").attrs["shape"])
    return out


def format_summary(summary: dict, max_sizes: int = 12, open_hint: str | None = None) -> str:
    """The lines a user reads at the end of ``scgnn-scale run``."""
    root = summary["run_dir"]
    n_in, g_in = summary["input_shape"]
    lines = [f"finished {root}",
             f"  cells x genes: {summary['n_cells']:,} x {summary['n_genes']:,} after preprocessing"
             + (f" (input {n_in:,} x {g_in:,})" if n_in and g_in else "")]
    m = summary["metrics"]
    if m.get("n_clusters"):
        sizes = list(m["cluster_sizes"].items())
        shown = ", ".join(f"{k}: {v:,}" for k, v in sizes[:max_sizes])
        more = f", ... ({len(sizes) - max_sizes} more)" if len(sizes) > max_sizes else ""
        lines.append(f"  clusters: {m['n_clusters']} (obs['scgnn_cluster']; cells per cluster {shown}{more})")
    if "ari" in m:
        sil = f", silhouette {m['silhouette']:.3f}" if m.get("silhouette") is not None else ""
        lines.append(f"  against obs['{m['label_key']}'] ({m['n_labels']} labels): ARI {m['ari']:.3f}, "
                     f"NMI {m['nmi']:.3f}{sil}")
    if "imputed" in summary:
        (n, g), dtype = summary["imputed"]
        lines.append(f"  imputed expression: layers['imputed'] ({n:,} x {g:,}, {dtype})")
    if "raw_shape" in summary:
        n, g = summary["raw_shape"]
        lines.append(f"  counts of every input gene: .raw ({n:,} x {g:,}, sparse)")
    times = ", ".join(f"{s} {sec:.1f}" for s, sec in summary["stages"].items())
    total = sum(summary["stages"].values())
    lines.append(f"  time: stages {total:.1f} s in all ({times}); this invocation {summary['wall_seconds']:.1f} s")
    lines.append(f"  peak memory: {summary['peak_rss_mb']:,.0f} MiB")
    lines.append(f"  {open_hint}" if open_hint else f"  open with: adata = scgnn_scale.read_run({root!r})")
    return "\n".join(lines)
