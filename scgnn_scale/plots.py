"""The run report's figures, each returned as PNG bytes.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through pyplot:
pyplot's global backend and figure registry would change the state of the caller's session (a
notebook that runs ``scgnn_scale.tl.scgnn``), and a Figure not registered with pyplot is freed as soon
as it is no longer referenced.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np

#: figure width in inches at :data:`DPI`: 1,000 pixels, the page's column
WIDTH = 10.0
DPI = 100
#: categories beyond this many get no legend (the colours then only separate neighbours)
MAX_LEGEND = 30


def _figure(height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def category_colors(n: int) -> np.ndarray:
    """``n`` distinguishable RGBA colours: tab10/tab20 while they suffice, else evenly spaced on turbo."""
    from matplotlib import colormaps

    if n <= 10:
        return colormaps["tab10"](np.arange(n))
    if n <= 20:
        return colormaps["tab20"](np.arange(n))
    return colormaps["turbo"](np.linspace(0.02, 0.98, n))


def _natural_order(values: Sequence[str]) -> list[str]:
    """Category names with their numbers in numeric order: '2' before '10', 'type2' before 'type10'."""
    def key(name: str) -> list:
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]

    return sorted(set(values), key=key)


def scatter(xy: np.ndarray, panels: list[tuple[str, np.ndarray]], *, axis_names: tuple[str, str]) -> bytes:
    """One scatter panel per ``(title, categories)`` of the same 2-D points, coloured by category."""
    fig, axes = _figure(5.0 if len(panels) > 1 else 6.0, len(panels))
    size = float(np.clip(8000 / max(len(xy), 1), 0.5, 12))  # fewer points, bigger dots
    for ax, (title, values) in zip(axes, panels, strict=True):
        values = np.asarray(values, dtype=object)
        known = np.array([v is not None and v == v for v in values])  # NaN or None: no category
        names = _natural_order([str(v) for v in values[known]])
        colors = category_colors(len(names))
        as_text = np.array([str(v) for v in values])
        if (~known).any():
            ax.scatter(xy[~known, 0], xy[~known, 1], s=size, color="0.8", linewidths=0, label="(none)")
        for name, color in zip(names, colors, strict=True):
            mask = known & (as_text == name)
            ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=color, linewidths=0, label=name)
        ax.set_title(f"{title} ({len(names)})")
        ax.set_xlabel(axis_names[0])
        ax.set_ylabel(axis_names[1])
        ax.set_xticks([])
        ax.set_yticks([])
        if len(names) <= MAX_LEGEND:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=(25 / size) ** 0.5,
                      frameon=False, ncols=1 if len(names) <= 15 else 2)
    return _png(fig)


def curves(panels: list[tuple[str, str, np.ndarray, np.ndarray]]) -> bytes:
    """Loss curves, one panel per ``(title, x label, x, y)``; a log scale where the loss spans a decade."""
    fig, axes = _figure(3.2, len(panels))
    for ax, (title, xlabel, x, y) in zip(axes, panels, strict=True):
        ax.plot(x, y, marker="." if len(x) < 30 else None, color="tab:blue")
        y = np.asarray(y, dtype=float)
        if (y > 0).all() and y.max() / y.min() > 10:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    return _png(fig)


def iterations(iteration: np.ndarray, n_clusters: np.ndarray, ari: np.ndarray, change: np.ndarray, *,
               ari_stop: float, threshold: float | None) -> bytes:
    """Cluster count per iteration (0 = the first pass), ARI and graph change to the previous iteration,
    each with its stopping line."""
    fig, axes = _figure(3.2, 3)
    axes[0].plot(iteration, n_clusters, marker="o")
    axes[0].set_title("clusters")
    axes[0].set_ylim(0, max(n_clusters.max(), 1) * 1.15)
    axes[1].plot(iteration[1:], ari[1:], marker="o")
    axes[1].axhline(ari_stop, color="tab:red", linestyle="--", label=f"stop above {ari_stop:g}")
    axes[1].set_title("ARI to the previous iteration")
    axes[1].set_ylim(min(0.0, np.nanmin(ari[1:], initial=0.0)), 1.05)
    axes[2].plot(iteration[1:], change[1:], marker="o")
    if threshold is not None:
        axes[2].axhline(threshold, color="tab:red", linestyle="--", label=f"stop below {threshold:.3g}")
    positive = change[1:][np.isfinite(change[1:])]
    if positive.size and (positive > 0).all() and (threshold is None or threshold > 0):
        axes[2].set_yscale("log")
    axes[2].set_title("graph change")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.set_xticks(iteration)
        ax.grid(alpha=0.3)
    for ax in axes[1:]:
        ax.legend(fontsize=8)
    return _png(fig)


def bars(labels: Sequence[str], values: Sequence[float], *, xlabel: str, title: str) -> bytes:
    """A vertical bar chart with the value above each bar (the LTMG component counts)."""
    fig, (ax,) = _figure(3.0)
    pos = np.arange(len(labels))
    ax.bar(pos, values, color="tab:blue")
    for p, v in zip(pos, values, strict=True):
        ax.annotate(f"{v:,.0f}", (p, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(pos, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("genes")
    ax.set_title(title)
    ax.set_ylim(0, max(max(values, default=0), 1) * 1.15)
    return _png(fig)


def stage_costs(stages: Sequence[str], seconds: Sequence[float], peak_mb: Sequence[float]) -> bytes:
    """Seconds and peak memory per stage, as two horizontal bar panels in stage order."""
    fig, axes = _figure(0.35 * len(stages) + 1.2, 2)
    pos = np.arange(len(stages))
    for ax, values, label, fmt in ((axes[0], seconds, "seconds", "{:,.1f} s"),
                                   (axes[1], peak_mb, "peak memory (MiB)", "{:,.0f} MiB")):
        ax.barh(pos, values, color="tab:blue")
        for p, v in zip(pos, values, strict=True):
            ax.annotate(fmt.format(v), (v, p), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_yticks(pos, stages)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.set_xlim(0, max(max(values, default=0), 1e-9) * 1.25)
    return _png(fig)
