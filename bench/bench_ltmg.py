"""Benchmark of the ``ltmg`` stage on simulated atlases; prints one JSON object per run.

For each ``--cells`` size: simulate counts (``scgnn_scale.simulate.simulate_atlas``, NB with planted
types and 30% dropout), write ``X = log1p(counts)`` into a run store block by block (bounded memory),
then for each ``--workers`` count run the stage on an embedded LocalCluster and report wall seconds,
genes/s, the stage's own timings and the peak RSS of every process (driver and each Dask worker),
sampled every 0.2 s. ``--agreement`` also fits on every cell (``max_cells`` = N) and reports how often
the states of the sample fit equal those of the full fit (all entries, and the non-zero ones), and
``--sweep 5000,10000,...`` repeats the sample fit at those ``max_cells`` (to choose the default).

Examples::

    python bench/bench_ltmg.py --cells 10000 --workers 1 2
    python bench/bench_ltmg.py --cells 100000 --workers 2 --agreement --sweep 10000,20000,50000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import zarr

from scgnn_scale.config import build_config
from scgnn_scale.stages import ltmg as ltmg_stage
from scgnn_scale.store import RunStore
from scgnn_scale.testing import stage_context


def simulated_store(root: Path, n_cells: int, n_genes: int, config, seed: int = 0) -> RunStore:
    """A run store whose X is log1p of a simulated atlas, written in row blocks."""
    from scgnn_scale.simulate import simulate_atlas

    root.mkdir(parents=True, exist_ok=True)
    atlas = simulate_atlas(root / "atlas.zarr", n_cells=n_cells, n_genes=n_genes, seed=seed, overwrite=True)
    g = zarr.open_group(atlas, mode="r")
    indptr = g["X/indptr"][:]
    data, indices = g["X/data"], g["X/indices"]
    store = RunStore.create(root / "run", identity={"bench": n_cells}, config=config, overwrite=True)
    step = config.store.chunk_rows * 4
    with store.staging("preprocess") as st:
        x = st.create_matrix("X", (n_cells, n_genes), np.float32)
        for r0 in range(0, n_cells, step):
            r1 = min(r0 + step, n_cells)
            a, b = int(indptr[r0]), int(indptr[r1])
            block = np.zeros((r1 - r0, n_genes), np.float32)
            rows = np.repeat(np.arange(r1 - r0), np.diff(indptr[r0:r1 + 1]))
            block[rows, indices[a:b]] = np.log1p(data[a:b])
            x[r0:r1] = block
        st.write_elem("obs", pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)])))
        st.write_elem("var", pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(n_genes)])))
    shutil.rmtree(atlas)
    return store


class PeakRSS:
    """Peak resident memory of this process and of each descendant (Dask nannies and workers)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    role = "driver" if p.pid == me.pid else _role(p)
                except psutil.Error:
                    continue
                old = self.peaks.get(p.pid, (role, 0))
                self.peaks[p.pid] = (role, max(old[1], rss))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self) -> list[dict]:
        return [{"pid": pid, "role": role, "peak_rss_mb": round(rss / 2**20, 1)}
                for pid, (role, rss) in sorted(self.peaks.items())]


def _role(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    if "resource_tracker" in cmd:
        return "multiprocessing-resource-tracker"
    if "spawn_main" in cmd or "forkserver" in cmd:
        return "dask-worker"  # LocalCluster: the nannies live in the driver, each worker is a process
    return p.name()


def run_stage(store: RunStore, config, n_workers: int, tag: str) -> tuple[dict, list[dict], float]:
    ctx = stage_context(store, "ltmg", config)
    ctx.chain_hash = f"bench-{tag}"
    ctx.client()  # start the cluster outside the timed part
    try:
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            info = ltmg_stage.run(ctx)
            wall = time.perf_counter() - t0
    finally:
        ctx.runtime.close()
    return info, rss.report(), wall


def agreement(store: RunStore, key_a: str, key_b: str) -> dict:
    """Fraction of equal states between two stored state layers, all entries and expressed entries."""
    a, b, x = store.open_array(key_a), store.open_array(key_b), store.open_array("X")
    same = same_expr = n_expr = 0
    step = x.chunks[0]
    for r0 in range(0, x.shape[0], step):
        r1 = min(r0 + step, x.shape[0])
        eq = a[r0:r1] == b[r0:r1]
        expr = x[r0:r1] > 0
        same += int(eq.sum())
        same_expr += int(eq[expr].sum())
        n_expr += int(expr.sum())
    total = x.shape[0] * x.shape[1]
    return {"all": round(same / total, 5), "expressed": round(same_expr / max(n_expr, 1), 5)}


def _keep_layer(store: RunStore, name: str) -> None:
    """Move the committed layers/ltmg aside so that a later run does not overwrite it."""
    src = Path(store.path_of("layers/ltmg"))
    dst = src.with_name(name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[10000])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--max-cells", type=int, default=None, help="ltmg.max_cells (default: the config's)")
    ap.add_argument("--agreement", action="store_true", help="also fit on every cell and compare states")
    ap.add_argument("--sweep", default="", help="comma-separated max_cells values to compare with the full fit")
    ap.add_argument("--workdir", default=None, help="where stores are written (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    base = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ltmg_"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        for n_cells in args.cells:
            overrides = {"runtime": {"seed": args.seed}}
            if args.max_cells is not None:
                overrides["ltmg"] = {"max_cells": args.max_cells}
            config = build_config(overrides)
            t0 = time.perf_counter()
            root = base / f"cells{n_cells}"
            store = simulated_store(root, n_cells, args.genes, config, seed=args.seed)
            sim_s = time.perf_counter() - t0
            for n_workers in args.workers:
                cfg = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, n_workers=n_workers))
                info, rss, wall = run_stage(store, cfg, n_workers, f"w{n_workers}")
                print(json.dumps({
                    "bench": "ltmg", "cells": n_cells, "genes": args.genes, "workers": n_workers,
                    "max_cells": cfg.ltmg.max_cells, "sample_cells": info["sample_cells"],
                    "wall_s": round(wall, 2), "genes_per_s": round(args.genes / wall, 2),
                    "stage": info["metrics"], "k_counts": info["k_counts"], "zcut_global": info["zcut_global"],
                    "peak_rss": rss, "simulate_and_store_s": round(sim_s, 1),
                    "chunks": [cfg.store.chunk_rows, cfg.store.chunk_genes], "block_genes": cfg.ltmg.block_genes,
                    "machine": f"{platform.node()} {os.cpu_count()} cores",
                }), flush=True)
            if args.agreement or args.sweep:
                n_workers = max(args.workers)
                cfg_run = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, n_workers=n_workers))
                _keep_layer(store, "ltmg_sample")
                full_cfg = dataclasses.replace(cfg_run, ltmg=dataclasses.replace(cfg_run.ltmg, max_cells=n_cells))
                info_full, _, wall_full = run_stage(store, full_cfg, n_workers, "full")
                _keep_layer(store, "ltmg_full")
                sizes = [int(s) for s in args.sweep.split(",") if s] or [config.ltmg.max_cells]
                for size in sizes:
                    if size != config.ltmg.max_cells or args.sweep:
                        scfg = dataclasses.replace(cfg_run, ltmg=dataclasses.replace(cfg_run.ltmg, max_cells=size))
                        info_s, _, wall_s = run_stage(store, scfg, n_workers, f"s{size}")
                        _keep_layer(store, "ltmg_sample")
                    else:
                        info_s, wall_s = info, wall
                    print(json.dumps({
                        "bench": "ltmg-agreement", "cells": n_cells, "genes": args.genes, "workers": n_workers,
                        "max_cells": size, "agreement": agreement(store, "layers/ltmg_sample", "layers/ltmg_full"),
                        "sample_wall_s": round(wall_s, 2), "full_wall_s": round(wall_full, 2),
                        "sample_fit_task_s": info_s["metrics"]["fit_task_seconds"],
                        "full_fit_task_s": info_full["metrics"]["fit_task_seconds"],
                        "k_counts_sample": info_s["k_counts"], "k_counts_full": info_full["k_counts"],
                    }), flush=True)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
