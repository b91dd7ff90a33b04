"""Benchmark: simulate an atlas, ingest it, preprocess it; time and peak memory of each phase.

    python bench/bench_ingest.py --cells 100000 --genes 2000 [--format zarr|h5ad] [--workdir DIR]

Each phase runs in a fresh Python process so that its peak RSS is its own; the parent samples the
resident memory of that process and all its children (the whole process tree) every 50 ms with psutil,
and the child reports its own ``ru_maxrss`` too. Prints one JSON object: per phase the seconds,
cells/s (the stage's own time from the run manifest, and the whole call)
and peak RSS (MiB), plus the conditions (machine, chunk sizes, workers). Peak RSS should not
grow with --cells: every phase streams blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PHASES = ("simulate", "ingest", "preprocess")


def _config(args):
    from scgnn_scale.config import build_config

    return build_config({"store": {"chunk_rows": args.chunk_rows},
                         "ingest": {"block_rows": args.block_rows, "label_key": "label"},
                         "preprocess": {"n_top_genes": args.top_genes},
                         "runtime": {"n_workers": args.workers}})


def run_phase(args) -> None:
    """Child process: one phase, then a JSON line with its own resource usage."""
    atlas = Path(args.workdir) / f"atlas{'.h5ad' if args.format == 'h5ad' else '.zarr'}"
    run_dir = Path(args.workdir) / "run"
    from scgnn_scale import run
    from scgnn_scale.simulate import simulate_atlas

    info: dict = {}
    stage_seconds = None
    t0 = time.perf_counter()  # after the imports: they are not the phase's work
    if args.phase == "simulate":
        simulate_atlas(atlas, n_cells=args.cells, n_genes=args.genes, n_types=args.types, seed=args.seed,
                       block_rows=args.sim_block_rows, overwrite=True)
    else:
        if args.phase == "ingest" and run_dir.exists():
            shutil.rmtree(run_dir)
        store = run(str(atlas), run_dir, config=_config(args), until=args.phase, quiet=True)
        info = store.stage_info(args.phase)
        stage_seconds = store.manifest["stages"][args.phase]["seconds"]
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "stage_seconds": stage_seconds, "ru_maxrss_mib": usage.ru_maxrss / 1024,
                      "info": info}))


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(args, phase: str) -> dict:
    """Run one phase in a child process, sampling the RSS of its process tree."""
    import psutil

    cmd = [sys.executable, __file__, "--phase", phase, *sys.argv[1:]]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    proc = psutil.Process(child.pid)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _tree_rss(proc))
            except psutil.Error:
                pass
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"phase {phase} failed with exit code {child.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    # the stage alone (manifest timing) excludes the pipeline's own bookkeeping (uns summary, store set-up)
    seconds = result["stage_seconds"] or result["seconds"]
    return {"seconds": round(result["seconds"], 2), "stage_seconds": result["stage_seconds"],
            "cells_per_s": round(args.cells / seconds),
            "peak_rss_tree_mib": round(peak[0] / 2**20), "ru_maxrss_mib": round(result["ru_maxrss_mib"]),
            "info": result["info"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--types", type=int, default=10)
    parser.add_argument("--top-genes", type=int, default=2000, help="preprocess.n_top_genes")
    parser.add_argument("--format", choices=("zarr", "h5ad"), default="zarr", help="simulated atlas format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-block-rows", type=int, default=16384)
    parser.add_argument("--block-rows", type=int, default=8192, help="ingest.block_rows")
    parser.add_argument("--chunk-rows", type=int, default=2048, help="store.chunk_rows")
    parser.add_argument("--workers", type=int, default=0, help="threads for preprocess (0: one per core)")
    parser.add_argument("--workdir", help="where the atlas and run go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of phases")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run_phase(args)
        return
    own_tmp = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scgnn-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if own_tmp:
        sys.argv += ["--workdir", str(workdir)]
    try:
        results = {phase: measure(args, phase) for phase in args.phases.split(",")}
        atlas = workdir / f"atlas{'.h5ad' if args.format == 'h5ad' else '.zarr'}"
        size = atlas.stat().st_size if atlas.is_file() else sum(p.stat().st_size for p in atlas.rglob("*")
                                                                 if p.is_file())
        import psutil

        report = {
            "cells": args.cells, "genes": args.genes, "types": args.types, "format": args.format,
            "atlas_mib": round(size / 2**20),
            "conditions": {"machine": platform.machine(), "cpus": os.cpu_count(),
                           "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                           "python": platform.python_version(), "chunk_rows": args.chunk_rows,
                           "ingest_block_rows": args.block_rows, "sim_block_rows": args.sim_block_rows,
                           "preprocess_threads": args.workers or os.cpu_count()},
            "phases": results,
        }
        print(json.dumps(report, indent=1))
    finally:
        if own_tmp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
