"""The run report: ``RUN_DIR/report/index.html``, one static page with the pictures of a run.

Sections: a summary, a 2-D view of the graph embedding coloured by cluster (and by label with
``ingest.label_key``), the autoencoders' loss curves, the iterations, the LTMG component counts, each
stage's time and peak memory, and the config. Everything is drawn from the store and the manifest;
a section whose stage has not finished says so. The page is self-contained (PNG figures inlined as
base64, CSS in the page): it opens from disk, mailed or archived, with no network.

Memory stays bounded at any number of cells: the scatter reads a seeded subsample of at most
``max_cells`` rows (:func:`subsample`), chunk by chunk (:func:`read_rows`); everything else is per
gene, per stage or per iteration.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import plots
from .atomic import atomic_path
from .errors import InputError
from .keys import CLUSTER_COLUMN, KEYS
from .paths import as_path
from .store import RunStore

log = logging.getLogger("scgnn_scale")

#: cells drawn in the scatter; what the report reads of any cells x d array
REPORT_CELLS = 20_000
#: t-SNE (``projection="tsne"``) runs on at most this many of those cells
TSNE_CELLS = 5_000
PROJECTIONS = ("pca", "tsne")


# -- bounded reads ---------------------------------------------------------------------------------
def subsample(n: int, max_cells: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_cells`` of ``n`` rows, the same for the same seed."""
    if max_cells <= 0 or n <= max_cells:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5E7])  # a stream of its own, apart from the stages' draws
    return np.sort(rng.choice(n, size=max_cells, replace=False)).astype(np.int64)


def read_rows(array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` for sorted ``rows``, read one chunk of rows at a time: never more than a chunk of
    rows plus the result in memory, and chunks holding no selected row are not read."""
    rows = np.asarray(rows, dtype=np.int64)
    step = int(array.chunks[0]) if getattr(array, "chunks", None) else max(int(array.shape[0]), 1)
    out = np.empty((rows.size, *array.shape[1:]), dtype=array.dtype)
    starts = np.searchsorted(rows, np.arange(0, int(array.shape[0]) + step, step))
    for block, (i, j) in enumerate(zip(starts[:-1], starts[1:], strict=False)):
        if i < j:
            a = block * step
            out[i:j] = np.asarray(array[a:min(a + step, int(array.shape[0]))])[rows[i:j] - a]
    return out


def read_obs_column(store: RunStore, column: str, rows: np.ndarray) -> np.ndarray:
    """Values of an obs column at ``rows`` (categorical columns by their codes), as an object array."""
    import zarr

    node = zarr.open(store.path_of(f"obs/{column}"), mode="r", zarr_format=3)
    if node.attrs.get("encoding-type") == "categorical":
        codes = read_rows(node["codes"], rows)
        categories = np.asarray(store.read_elem(f"obs/{column}/categories"), dtype=object)
        values = np.where(codes >= 0, categories[np.clip(codes, 0, None)], None)
        return values.astype(object)
    return read_rows(node, rows).astype(object)


# -- 2-D view --------------------------------------------------------------------------------------
def project(x: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, tuple[str, str]]:
    """2-D coordinates of the rows of ``x`` and the axes' names.

    PCA by default: well under a second for 20,000 cells. UMAP and t-SNE draw the clusters apart
    better but cost too much to end every run with: on the 2-core development VM (under the load of
    other jobs, 2026-12-06) a 10,000-cell subsample of the example's 16-d embedding took 63 s in UMAP
    (umap-learn 0.5.12, numba cache warm; 35 s more to compile on first use) and 107 s in scikit-learn's
    t-SNE (2,000 cells: 13-26 s). ``scgnn-scale report --projection tsne`` draws t-SNE on request.
    """
    x = np.asarray(x, dtype=np.float64)
    if method == "tsne" and len(x) > 3:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(x) - 1) / 3.0)
        xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
        return xy, ("t-SNE 1", "t-SNE 2")
    centred = x - x.mean(axis=0)
    if len(x) < 2 or not np.any(centred):
        return np.zeros((len(x), 2)), ("PC1", "PC2")
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:2] * np.sign(vt[:2, [0]] + (vt[:2, [0]] == 0))  # a fixed sign: the same picture on every redraw
    xy = centred @ vt.T
    if xy.shape[1] < 2:
        xy = np.column_stack([xy, np.zeros(len(xy))])
    share = s**2 / max(float((s**2).sum()), 1e-30)
    names = tuple(f"PC{i + 1} ({100 * share[i]:.0f}% of the variance)" if i < len(share) else f"PC{i + 1}"
                  for i in range(2))
    return xy, names


# -- page ------------------------------------------------------------------------------------------
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1040px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; display: block; } figure { margin: 0.5em 0; }
figcaption, .caption { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.missing { color: #8a6d00; }
.config { column-count: 3; column-gap: 1.5em; } .config pre { break-inside: avoid; margin: 0 0 0.8em; font-size: 0.85em; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _table(header: list[str] | None, rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f'<td class="num">{v:,.4g}</td>' if abs(v) < 1e5 else f'<td class="num">{v:,.0f}</td>'
        if isinstance(v, int | np.integer):
            return f'<td class="num">{v:,}</td>'
        return f"<td>{_esc('' if v is None else v)}</td>"

    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _missing(text: str) -> str:
    return f'<p class="missing">{text}</p>'


def _stages(store: RunStore) -> dict[str, dict]:
    from .pipeline import STAGE_NAMES

    done = store.manifest.get("stages", {})
    return {s: done[s] for s in STAGE_NAMES if s in done}


# -- sections: each returns its HTML ----------------------------------------------------------------
def _summary_section(store: RunStore, stages: dict) -> str:
    from .pipeline import STAGE_NAMES

    m = store.manifest
    source = m.get("identity", {}).get("input", {})
    rows = [["run directory", str(store.root)],
            ["input", source.get("path") or source.get("url") or ("an AnnData in memory" if source else "")],
            ["stages finished", f"{len(stages)} of {len(STAGE_NAMES)}"
             + (f" (next: {next(s for s in STAGE_NAMES if s not in stages)})" if len(stages) < len(STAGE_NAMES)
                else "")]]
    ingest = stages.get("ingest", {}).get("info", {})
    if ingest.get("n_cells") is not None:
        rows.append(["input cells x genes", f"{ingest['n_cells']:,} x {ingest.get('n_genes', 0):,}"])
    if store.has(KEYS.x):
        n, g = store.open_array(KEYS.x).shape
        rows.append(["after preprocessing", f"{n:,} x {g:,}"])
    metrics = store.read_elem("uns/scgnn/metrics") if store.has("uns/scgnn/metrics") else {}
    if metrics.get("n_clusters"):
        rows.append(["clusters", str(metrics["n_clusters"])])
    if "ari" in metrics:
        sil = metrics.get("silhouette")
        rows.append([f"against obs['{metrics.get('label_key', '')}']",
                     f"ARI {metrics['ari']:.3f}, NMI {metrics['nmi']:.3f}"
                     + (f", silhouette {sil:.3f}" if sil is not None else "")])
    rows.append(["time in the stages", f"{sum(e.get('seconds', 0) for e in stages.values()):,.1f} s"])
    rows.append(["scgnn-scale", str(m.get("package_version", ""))])
    return _table(None, rows)


def _embedding_section(store: RunStore, max_cells: int, projection: str, seed: int) -> str:
    config = store.manifest.get("config", {})
    key = next((k for k in (KEYS.embedding, KEYS.feature_embedding) if store.has(k)), None)
    if key is None:
        return _missing("No embedding yet: the feature autoencoder's and the graph autoencoder's embeddings "
                        "appear when the feature and gae stages finish.")
    array = store.open_array(key)
    n = int(array.shape[0])
    rows = subsample(n, max_cells, seed)
    label_key = config.get("ingest", {}).get("label_key") or ""
    panels = []
    if store.has(f"obs/{CLUSTER_COLUMN}"):
        panels.append(("clusters", read_obs_column(store, CLUSTER_COLUMN, rows)))
    if label_key and store.has(f"obs/{label_key}"):
        panels.append((f"label '{label_key}'", read_obs_column(store, label_key, rows)))
    if not panels:
        panels.append(("no clusters yet", np.full(rows.size, None, dtype=object)))
    x = read_rows(array, rows)
    if projection == "tsne" and rows.size > TSNE_CELLS:
        keep = np.sort(np.random.default_rng(seed).choice(rows.size, TSNE_CELLS, replace=False))
        x, rows, panels = x[keep], rows[keep], [(t, v[keep]) for t, v in panels]
    xy, axes = project(x, projection, seed)
    what = "graph embedding (obsm['X_scgnn'])" if key == KEYS.embedding else \
        "feature autoencoder's embedding (obsm['X_scgnn_feature']; the graph embedding comes with the gae stage)"
    method = "The first two principal components" if projection == "pca" else "t-SNE"
    caption = (f"{method} of the {what}, {rows.size:,} of {n:,} cells"
               + (" (a seeded random subsample)" if rows.size < n else "") + ", coloured by "
               + " and by ".join(t for t, _ in panels) + ".")
    if label_key and not store.has(f"obs/{label_key}"):
        caption += f" The label column '{_esc(label_key)}' is not in the run's obs yet."
    return _figure(plots.scatter(xy, panels, axis_names=axes), f"2-D view of {key}", _esc(caption))


_LOSSES = (("feature", "feature autoencoder (first pass)", "step"),
           ("gae", "graph autoencoder (first pass)", "epoch"),
           ("impute", "imputation autoencoder", "step"))


def _loss_section(stages: dict) -> str:
    panels, absent = [], []
    for stage, title, x_name in _LOSSES:
        history = stages.get(stage, {}).get("info", {}).get("loss_history") or []
        if history:
            panels.append((title, x_name, np.array([h[x_name] for h in history]),
                           np.array([h["loss"] for h in history], dtype=float)))
        else:
            absent.append(f"{title}: {'not recorded by this run' if stage in stages else 'stage not finished'}")
    if not panels:
        return _missing("No loss curve yet (" + "; ".join(absent) + ").")
    caption = ("Training loss: the feature and imputation autoencoders' mean over each 50 steps, the graph "
               "autoencoder's per epoch." + (" Missing: " + "; ".join(absent) + "." if absent else ""))
    return _figure(plots.curves(panels), "loss curves", _esc(caption))


def _iterations_section(stages: dict, config: dict) -> str:
    if "iterate" not in stages:
        return _missing("The iterate stage has not finished.")
    info = stages["iterate"].get("info", {})
    history = info.get("history") or []
    if not history:
        return _missing("No iteration ran (iterate.max_iterations = 0): the first pass's clusters are the result.")
    first = stages.get("cluster", {}).get("info", {}).get("n_clusters")
    it = np.array([0] + [h["iteration"] for h in history])
    n_clusters = np.array([first if first is not None else np.nan] + [h["n_clusters"] for h in history], float)
    ari = np.array([np.nan] + [h.get("ari_to_previous", np.nan) for h in history], dtype=float)
    change = np.array([np.nan] + [h.get("graph_change", np.nan) for h in history], dtype=float)
    threshold = history[-1].get("graph_threshold")
    ari_stop = float(config.get("iterate", {}).get("ari_stop", 0.99))
    png = plots.iterations(it, n_clusters, ari, change, ari_stop=ari_stop, threshold=threshold)
    with_labels = any("ari_to_label" in h for h in history)
    header = ["iteration", "clusters", "ARI to previous", "graph change", "stop below"]
    header += ["ARI to label"] if with_labels else []
    rows = [[h["iteration"], h["n_clusters"], h.get("ari_to_previous"), h.get("graph_change"),
             h.get("graph_threshold")] + ([h.get("ari_to_label")] if with_labels else []) + [h.get("seconds")]
            for h in history]
    caption = (f"{len(history)} iteration(s), stopped by: {info.get('stopped', '?')}. Iteration 0 is the first "
               "pass (feature, graph, gae, cluster stages). The iterations stop when the ARI between consecutive "
               "clusterings exceeds the dashed line or the graph changes less than its threshold.")
    return _figure(png, "iterations", _esc(caption)) + _table(header + ["seconds"], rows)


def _ltmg_section(store: RunStore, stages: dict) -> str:
    if "ltmg" not in stages:
        return _missing("The ltmg stage has not finished.")
    if not store.has("var/ltmg_k"):
        return _missing("LTMG is disabled in this run (ltmg.enabled = false).")
    k = np.asarray(store.read_elem("var/ltmg_k")).astype(np.int64)
    values, counts = np.unique(k, return_counts=True)
    labels = [f"{v}" if v else "0 (no fit)" for v in values]
    png = plots.bars(labels, counts.tolist(), xlabel="components K", title=f"LTMG components per gene ({k.size:,} genes)")
    return _figure(png, "LTMG K distribution",
                   "Number of components of each gene's left-truncated Gaussian mixture (var['ltmg_k']), "
                   "chosen by BIC.")


def _stages_section(stages: dict) -> str:
    from .pipeline import STAGE_NAMES

    rows = []
    for s in STAGE_NAMES:
        e = stages.get(s)
        rows.append([s, "done" if e else "not done", e.get("seconds") if e else None,
                     e.get("info", {}).get("peak_rss_mb") if e else None, e.get("finished", "") if e else ""])
    if not stages:
        return _table(["stage", "state", "seconds", "peak memory (MiB)", "finished (UTC)"], rows)
    names = list(stages)
    png = plots.stage_costs(names, [float(stages[s].get("seconds", 0)) for s in names],
                            [float(stages[s].get("info", {}).get("peak_rss_mb", 0)) for s in names])
    caption = ("Wall-clock seconds of each stage and the peak resident memory of the run's process when the stage "
               "ended (the peak so far in that invocation, Dask worker threads included).")
    return _figure(png, "time and peak memory per stage", caption) + _table(
        ["stage", "state", "seconds", "peak memory (MiB)", "finished (UTC)"], rows)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return repr(value)


def _config_section(config: dict) -> str:
    def text(value: Any) -> str:
        return html.escape(str(value), quote=False)  # the TOML's quotes stay as typed

    blocks = "".join(f"<pre>[{text(section)}]\n" + "".join(f"{text(k)} = {text(_toml_value(v))}\n"
                                                          for k, v in options.items()) + "</pre>"
                     for section, options in config.items())
    return ('<p class="caption">Every option of the run (<code>uns/scgnn/config</code>), as a TOML file that '
            f'<code>--config</code> accepts.</p><div class="config">{blocks}</div>')


#: bumped when the page changes, so that a finished run's next invocation draws the new page
REPORT_FORMAT = 1
_DIGEST_TAG = '<meta name="scgnn-scale-report" content="{}">'


def run_digest(store: RunStore) -> str:
    """What the page is drawn from: the manifest's stages, config and published keys. Not the checkpoints
    of a stage in progress, nor the digest of ``uns/scgnn``: its silhouette can differ in the last float32
    digits between invocations (seen on the first rerun of the example), and the page shows three."""
    state = {k: v for k, v in store.manifest.items() if k not in ("checkpoints", "uns_digest")}
    text = json.dumps([REPORT_FORMAT, state], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_report(store: RunStore, *, max_cells: int = REPORT_CELLS, projection: str = "pca", seed: int = 0) -> str:
    """The report's HTML text."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection {projection!r}: one of {', '.join(PROJECTIONS)}")
    stages = _stages(store)
    config = store.manifest.get("config", {})
    sections = [
        ("summary", "Summary", _summary_section(store, stages)),
        ("embedding", "Graph embedding", _embedding_section(store, max_cells, projection, seed)),
        ("losses", "Loss curves", _loss_section(stages)),
        ("iterations", "Iterations", _iterations_section(stages, config)),
        ("ltmg", "LTMG components per gene", _ltmg_section(store, stages)),
        ("stages", "Stages: time and peak memory", _stages_section(stages)),
        ("config", "Configuration", _config_section(config)),
    ]
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(f'<section id="{sid}"><h2>{_esc(title)}</h2>{content}</section>' for sid, title, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{_DIGEST_TAG.format(run_digest(store))}'
            f"<title>scgnn-scale run report: {_esc(store.root.name)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>scgnn-scale run report</h1><p class=\"caption\">{_esc(store.root)}, drawn {now}</p>"
            f"{body}</body></html>")


def report_path(run_dir: str | Path) -> Path:
    """Where a run's report is written by default: ``RUN_DIR/report/index.html``."""
    return as_path(run_dir) / "report" / "index.html"


def write_report(run_dir: str | Path | RunStore, to: str | Path | None = None, *, max_cells: int = REPORT_CELLS,
                 projection: str = "pca", seed: int = 0, overwrite: bool = False) -> Path:
    """Draw the report of ``run_dir`` into ``to`` (default ``RUN_DIR/report/index.html``, always redrawn; a
    directory gets ``index.html`` inside; an existing file only with ``overwrite``); returns the file's path.
    Reads at most ``max_cells`` cells of any cells x d array."""
    store = run_dir if isinstance(run_dir, RunStore) else RunStore.open(run_dir)
    path = as_path(to) if to is not None else report_path(store.root)
    if path.is_dir():
        path = path / "index.html"
    if to is not None and path.exists() and not overwrite:
        raise InputError(f"{path}: exists; pass --overwrite to replace it")
    text = build_report(store, max_cells=max_cells, projection=projection, seed=seed)
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
    return path


def write_report_safely(store: RunStore) -> Path | None:
    """The end of ``scgnn-scale run``: the report of every stage finished so far; a failure to draw it is a
    warning, never the run's failure (its results are already committed)."""
    if not store.manifest.get("stages"):
        return None
    t0 = time.perf_counter()
    try:
        path = report_path(store.root)
        if path.is_file() and _DIGEST_TAG.format(run_digest(store)) in path.read_text(errors="replace")[:1000]:
            log.info("report: %s (up to date)", path)  # a rerun of a finished run: seconds saved
            return path
        path = write_report(store)
    except Exception as exc:  # the report must not fail the run it describes
        log.warning("report: not written (%s: %s); 'scgnn-scale report %s' draws it again",
                    type(exc).__name__, exc, store.root)
        return None
    log.info("report: %s (%.1f s)", path, time.perf_counter() - t0)
    return path
