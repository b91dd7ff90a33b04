"""Stage ``ltmg``: LTMG regulatory states of every cell and gene, distributed over gene blocks with Dask.

Reads ``X`` (log1p values; LTMG models the values before the log, expm1(X)) and writes

- ``layers/ltmg``: uint8 states, N x G, chunked like ``X``;
- ``var/ltmg_k`` (fitted components, 0 = no fit), ``var/ltmg_zcut`` (censoring point, log scale);
- ``varm/ltmg_weights``, ``varm/ltmg_means``, ``varm/ltmg_sds``: G x k_max, sorted by mean, NaN where
  unused; genes without censored values hold the empty component (0, -inf, NaN) in column 0.

The math and the state numbering are in :mod:`scgnn_scale.ltmg`. Work, in distributed passes over gene
blocks (``block_genes`` rounded to whole ``X`` gene chunks, so that no two tasks write one chunk):

1. scan: each task streams its gene block's row chunks and returns each gene's smallest positive value and
   number of zeros; it also keeps, on its worker, the block's values at a seeded sample of at most
   ``max_cells`` cells (the same cells for every gene). The driver fits ``Zcut_G`` to the minima.
2. fit: each task takes its block's sample (moved between workers by Dask only if needed), fits every
   gene and returns the per-gene parameters (G_block x k_max floats).
3. label: each task takes one block's fit and a range of whole row chunks (blocks x ranges at least twice
   the workers), streams those chunks again and writes their states into ``layers/ltmg``.

Only per-gene numbers reach the driver; nothing N x G passes through the scheduler. A worker lost mid-stage
costs only its tasks, which Dask reruns elsewhere (a rerun rewrites the same whole chunks).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

import numpy as np

from .. import ltmg as L
from ..errors import InputError
from ..keys import KEYS

log = logging.getLogger("scgnn_scale")


def sample_rows(n_cells: int, max_cells: int, seed: int) -> np.ndarray:
    """Sorted indices of the cells the fits use: all cells, or ``max_cells`` drawn without replacement."""
    if max_cells <= 0 or n_cells <= max_cells:
        return np.arange(n_cells, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x17A6])  # a stream of its own, apart from other stages' draws
    return np.sort(rng.choice(n_cells, size=max_cells, replace=False)).astype(np.int64)


def gene_blocks(n_genes: int, chunk_genes: int, block_genes: int) -> list[tuple[int, int]]:
    """[g0, g1) gene blocks made of whole gene chunks (at least one chunk each)."""
    per = max(1, math.ceil(block_genes / chunk_genes)) * chunk_genes
    return [(g0, min(g0 + per, n_genes)) for g0 in range(0, n_genes, per)]


def _check_config(cfg) -> None:
    if cfg.k_min < 1:
        raise InputError(f"config option ltmg.k_min: {cfg.k_min} must be at least 1")
    if cfg.k_max < max(2, cfg.k_min):
        raise InputError(f"config option ltmg.k_max: {cfg.k_max} must be at least max(2, ltmg.k_min)")
    if cfg.k_max > 254:
        raise InputError(f"config option ltmg.k_max: {cfg.k_max} does not fit uint8 states (at most 254)")
    if cfg.max_iter < 1:
        raise InputError(f"config option ltmg.max_iter: {cfg.max_iter} must be at least 1")
    if not cfg.min_sd > 0:
        raise InputError(f"config option ltmg.min_sd: {cfg.min_sd} must be positive")
    if cfg.block_genes < 1:
        raise InputError(f"config option ltmg.block_genes: {cfg.block_genes} must be at least 1")


# -- tasks (run on Dask workers; arguments and results are small) ------------------------------------

def _scan_block(x_path: str, g0: int, g1: int, rows: np.ndarray) -> dict:
    """Smallest positive value and number of zeros of each gene of [g0, g1); the block's sample rows."""
    import zarr

    x = zarr.open_array(x_path, mode="r")
    n = x.shape[0]
    step = x.chunks[0]
    mins = np.full(g1 - g0, np.inf, np.float32)
    n_zero = np.zeros(g1 - g0, np.int64)
    sample = np.empty((rows.size, g1 - g0), np.float32)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        block = np.asarray(x[r0:r1, g0:g1], dtype=np.float32)
        bmin, bzero = L.min_positive(block)
        mins = np.fmin(mins, np.where(np.isnan(bmin), np.inf, bmin))
        n_zero += bzero
        lo, hi = np.searchsorted(rows, [r0, r1])
        sample[lo:hi] = block[rows[lo:hi] - r0]
    mins = np.where(np.isfinite(mins), mins, np.nan).astype(np.float32)
    return {"min_pos": mins, "n_zero": n_zero, "sample": sample}


def _scan_min(scan: dict) -> np.ndarray:
    return scan["min_pos"]


def _fit_block(scan: dict, g0: int, zcut_global: float, params: dict) -> dict:
    """Fit the genes of one block on their sample."""
    t0 = time.perf_counter()
    zcut, cut, censored = L.gene_cuts(scan["min_pos"], scan["n_zero"], zcut_global, log1p_input=True)
    fit = L.fit_genes(scan["sample"], zcut=zcut, cut=cut, censored=censored, log1p_input=True,
                      k_min=params["k_min"], k_max=params["k_max"], max_iter=params["max_iter"],
                      tol=params["tol"], min_sd=params["min_sd"], n_cells_total=params["n_cells"])
    return {"g0": g0, "fit": fit, "fit_seconds": time.perf_counter() - t0}


def _label_rows(fitted: dict, x_path: str, out_path: str, g0: int, g1: int, r0: int, r1: int,
                params: dict) -> dict:
    """Write the states of cells [r0, r1) and genes [g0, g1) into ``out_path`` (whole chunks only)."""
    import zarr

    t0 = time.perf_counter()
    x = zarr.open_array(x_path, mode="r")
    out = zarr.open_array(out_path, mode="r+")
    bp, table = L.state_table(fitted["fit"], log1p_input=True, numbering=params["numbering"], dtype=np.float32)
    step = out.chunks[0]
    state_counts = np.zeros(256, np.int64)
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        states = L.assign_states(np.asarray(x[a:b, g0:g1], dtype=np.float32), bp, table)
        out[a:b, g0:g1] = states
        state_counts += np.bincount(states.reshape(-1), minlength=256)
    return {"state_counts": state_counts, "label_seconds": time.perf_counter() - t0,
            "genes": (g1 - g0) * (r1 - r0) / x.shape[0]}


def row_parts(n_cells: int, chunk_rows: int, n_parts: int) -> list[tuple[int, int]]:
    """[r0, r1) cell ranges of whole row chunks, ``n_parts`` at most (as even as the chunks allow)."""
    n_chunks = max(1, math.ceil(n_cells / chunk_rows))
    edges = np.linspace(0, n_chunks, min(max(1, n_parts), n_chunks) + 1).round().astype(int) * chunk_rows
    return [(int(a), int(min(b, n_cells))) for a, b in zip(edges[:-1], edges[1:], strict=True) if a < b]


# -- the stage ----------------------------------------------------------------------------------------

def run(ctx) -> dict:
    """Compute LTMG states for every cell and gene of ``X``; see the module docstring."""
    cfg = ctx.config.ltmg
    if not cfg.enabled:
        ctx.log.info("ltmg: disabled (ltmg.enabled = false); no states written")
        return {"enabled": False}
    _check_config(cfg)
    t_start = time.perf_counter()
    x = ctx.store.open_array(KEYS.x)
    n, g = x.shape
    if n == 0 or g == 0:
        raise InputError(f"{ctx.store.root}: X is empty ({n} x {g}); nothing to model")
    x_path = ctx.store.path_of(KEYS.x)
    rows = sample_rows(n, cfg.max_cells, ctx.config.runtime.seed)
    blocks = gene_blocks(g, x.chunks[1], cfg.block_genes)
    params = {"k_min": cfg.k_min, "k_max": cfg.k_max, "max_iter": cfg.max_iter, "tol": cfg.tol,
              "min_sd": cfg.min_sd, "numbering": cfg.state_numbering, "n_cells": int(n)}
    client = ctx.client()
    from distributed import as_completed

    with ctx.store.staging(ctx.stage) as st:
        st.create_matrix(KEYS.ltmg, (n, g), np.uint8, chunks=x.chunks)  # tasks fill it by gene block
        out_path = st.path_of(KEYS.ltmg)
        rows_future = client.scatter(rows, broadcast=True) if rows.size > 50_000 else rows
        scans = [client.submit(_scan_block, x_path, g0, g1, rows_future) for g0, g1 in blocks]
        mins = [client.submit(_scan_min, s) for s in scans]
        with ctx.progress(g, "scan (min positive per gene)", unit="genes") as bar:
            for fut in as_completed(mins):
                bar.update(int(fut.result().size))
        min_pos = np.concatenate(client.gather(mins))
        t_scan = time.perf_counter() - t_start
        zcut_global = L.global_zcut(L.to_log(min_pos, log1p_input=True), min_sd=cfg.min_sd)
        ctx.log.info("ltmg: Zcut_G = %.4g (log scale) from %d genes' smallest positive values",
                     zcut_global, int(np.isfinite(min_pos).sum()))
        # fits by gene block; labels by gene block x row part, so that every worker has work while the
        # gene blocks are fewer than the workers (8 blocks of 256 genes at 2,000 genes)
        workers = max(1, sum(client.nthreads().values()))
        parts = row_parts(n, x.chunks[0], math.ceil(2 * workers / len(blocks)))
        fits = [client.submit(_fit_block, s, g0, zcut_global, params, pure=False)
                for s, (g0, _) in zip(scans, blocks, strict=True)]
        labels = [client.submit(_label_rows, f, x_path, out_path, g0, g1, r0, r1, params, pure=False)
                  for f, (g0, g1) in zip(fits, blocks, strict=True) for r0, r1 in parts]
        del scans, mins  # a block's sample is freed once its fit is done
        label_results = []
        with ctx.progress(g, "fit + label", unit="genes") as bar:
            for fut in as_completed(labels):
                res = fut.result()
                label_results.append(res)
                bar.update(res["genes"])
        results = sorted(client.gather(fits), key=lambda r: r["g0"])
        del fits, labels
        fit = L.LTMGFit.concat([r["fit"] for r in results])
        st.write_elem("var/ltmg_k", fit.k.astype(np.int64))
        st.write_elem("var/ltmg_zcut", fit.zcut.astype(np.float64))
        st.write_elem(KEYS.ltmg_weights, fit.weights)
        st.write_elem(KEYS.ltmg_means, fit.means)
        st.write_elem(KEYS.ltmg_sds, fit.sds)
    seconds = time.perf_counter() - t_start
    k_counts = dict(sorted(Counter(int(k) for k in fit.k).items()))
    ctx.log.info("ltmg: K per gene %s (genes with censored values: %d, without: %d, no fit: %d)",
                 ", ".join(f"K={k}: {c}" for k, c in k_counts.items()), int(fit.censored.sum()),
                 int((~fit.censored).sum()), int((fit.k == 0).sum()))
    state_counts = sum(r["state_counts"] for r in label_results)
    total = max(int(state_counts.sum()), 1)
    fit_s = sum(r["fit_seconds"] for r in results)
    label_s = sum(r["label_seconds"] for r in label_results)
    return {
        "n_cells": int(n), "n_genes": int(g), "sample_cells": int(rows.size), "n_blocks": len(blocks),
        "label_tasks": len(blocks) * len(parts),
        "zcut_global": float(zcut_global) if np.isfinite(zcut_global) else None,
        "k_counts": {str(k): c for k, c in k_counts.items()},
        "genes_with_censoring": int(fit.censored.sum()), "genes_without_fit": int((fit.k == 0).sum()),
        "state_fractions": {str(s): round(int(c) / total, 6) for s, c in enumerate(state_counts) if c},
        "metrics": {
            "seconds": round(seconds, 3), "scan_seconds": round(t_scan, 3),
            "genes_per_s": round(g / seconds, 2) if seconds > 0 else None,
            "fit_task_seconds": round(fit_s, 3), "label_task_seconds": round(label_s, 3),
        },
    }

