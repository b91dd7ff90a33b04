"""scanpy-style use on an in-memory AnnData: ``scgnn_scale.tl.scgnn(adata, **options)``.

The run streams through a run directory (a temporary one unless ``out`` is given) exactly as
``scgnn-scale run``; its results are then written into the AnnData under ``key_added``:

============================  ================================================================
``obs['{key}_cluster']``      final clusters (categorical; NaN for cells preprocessing removed)
``obsm['X_{key}']``           16-d graph embedding (NaN rows for removed cells)
``obsm['X_{key}_feature']``   128-d feature-autoencoder embedding
``obsp['{key}_graph']``       the pruned cell graph (no edges at removed cells)
``obsm['{key}_imputed']``     imputed log1p expression of the selected genes, a DataFrame with
                              the genes as columns (only when the run reached ``impute``)
``var['{key}_selected']``     the genes the method used (top genes by variance)
``uns['{key}']``              ``params`` (the options given), ``config`` (all options),
                              ``metrics`` (clusters, ARI/NMI with ``label_key``), ``run_dir``
============================  ================================================================
"""

from __future__ import annotations

import difflib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .config import config_fields
from .keys import CLUSTER_COLUMN, KEYS

#: short keyword names, as the CLI's short flags (--label-key, --seed, ...)
ALIASES = {"label_key": ("ingest", "label_key"), "orientation": ("ingest", "orientation"),
           "seed": ("runtime", "seed"), "device": ("runtime", "device"), "scheduler": ("runtime", "scheduler"),
           "n_workers": ("runtime", "n_workers"), "memory_limit": ("runtime", "memory_limit"),
           "keep_work": ("runtime", "keep_work")}


def options_to_overrides(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{'graph_k': 15, 'seed': 1}`` -> ``{'graph': {'k': 15}, 'runtime': {'seed': 1}}`` (the CLI's flag names
    with underscores); an unknown name is a TypeError that suggests the closest ones."""
    known = {f"{section}_{f.name}": (section, f.name) for section, f in config_fields()}
    known.update(ALIASES)
    out: dict[str, dict[str, Any]] = {}
    for name, value in options.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see 'scgnn-scale run --help'"
            raise TypeError(f"scgnn() got an unknown option {name!r}{hint}")
        section, option = known[name]
        out.setdefault(section, {})[option] = value
    return out


def scgnn(adata, *, key_added: str = "scgnn", out: str | Path | None = None, until: str | None = None,
          overwrite: bool = False, quiet: bool = False, copy: bool = False, **options: Any):
    """Run scGNN on ``adata`` (raw counts in ``X``) and write clusters, embeddings, graph and imputation into it.

    Parameters
    ----------
    adata
        Cells x genes counts in ``X`` (dense or sparse); never modified except for the keys added.
    key_added
        Prefix of the keys written (see the module docstring).
    out
        Run directory to keep (resumable, readable with :func:`scgnn_scale.read_run`); None: a
        temporary one, removed afterwards.
    until
        Stop after this stage (e.g. 'cluster' for clusters without iterations and imputation).
    overwrite, quiet
        As ``scgnn-scale run --overwrite`` / ``--quiet``.
    copy
        Return a copy with the results instead of writing into ``adata``.
    **options
        Any option of ``scgnn-scale run`` by its flag name with underscores: ``graph_k=15``,
        ``cluster_resolution=0.5``, ``iterate_max_iterations=3``, ``label_key='cell_type'``,
        ``seed=1``, ``device='cuda'``, ``memory_limit='8GiB'``.

    Returns
    -------
    The AnnData copy with ``copy=True``, else None.
    """
    from .config import build_config
    from .pipeline import run

    config = build_config(options_to_overrides(options))
    adata = adata.copy() if copy else adata
    tmp = None if out is not None else tempfile.mkdtemp(prefix="scgnn-")
    run_dir = Path(out) if out is not None else Path(tmp) / "run"
    try:
        hint = (f"results written into the AnnData: obs['{key_added}_cluster'], obsm['X_{key_added}'], "
                f"obsp['{key_added}_graph'], uns['{key_added}']"
                + (f"; run directory {run_dir} (scgnn_scale.read_run)" if out is not None else ""))
        store = run(adata, run_dir, config=config, until=until, overwrite=overwrite, quiet=quiet, open_hint=hint)
        _write_results(adata, store, key_added)
        metrics = store.read_elem(KEYS.summary).get("metrics", {}) if store.has(KEYS.summary) else {}
        adata.uns[key_added] = {"params": {k: _plain(v) for k, v in options.items()}, "config": config.to_dict(),
                                "metrics": dict(metrics), "run_dir": str(store.root) if out is not None else ""}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return adata if copy else None


def _plain(value: Any) -> Any:
    return value if isinstance(value, int | float | str | bool) else str(value)


def _write_results(adata, store, key: str) -> None:
    """Copy the run's results into ``adata``, cells and genes placed by the positions preprocessing kept."""
    if not store.has(KEYS.x):
        return
    n = adata.n_obs
    cells = np.asarray(store.read_elem(KEYS.kept_cells), dtype=np.int64)
    genes = np.asarray(store.read_elem(KEYS.kept_genes), dtype=np.int64)
    selected = np.zeros(adata.n_vars, dtype=bool)
    selected[genes] = True
    adata.var[f"{key}_selected"] = selected
    obs = store.read_elem(KEYS.obs)
    if CLUSTER_COLUMN in obs.columns:
        codes = np.full(n, -1, dtype=np.int64)
        codes[cells] = obs[CLUSTER_COLUMN].cat.codes.to_numpy()
        adata.obs[f"{key}_cluster"] = pd.Categorical.from_codes(
            codes, categories=obs[CLUSTER_COLUMN].cat.categories)
    for stored, added in ((KEYS.embedding, f"X_{key}"), (KEYS.feature_embedding, f"X_{key}_feature")):
        if store.has(stored):
            values = np.asarray(store.read_elem(stored), dtype=np.float32)
            full = np.full((n, values.shape[1]), np.nan, dtype=np.float32)
            full[cells] = values
            adata.obsm[added] = full
    if store.has(KEYS.graph):
        graph = sp.coo_matrix(store.read_elem(KEYS.graph))
        adata.obsp[f"{key}_graph"] = sp.csr_matrix((graph.data, (cells[graph.row], cells[graph.col])), shape=(n, n))
    if store.has(KEYS.imputed):
        imputed = np.full((n, genes.size), np.nan, dtype=np.float32)
        imputed[cells] = store.open_array(KEYS.imputed)[:]
        adata.obsm[f"{key}_imputed"] = pd.DataFrame(imputed, index=adata.obs_names,
                                                    columns=adata.var_names[genes].astype(str))
