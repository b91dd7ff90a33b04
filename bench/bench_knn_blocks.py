"""The cell graph from pynndescent on the whole embedding vs the 'blocks' backend, each in its own process.

Data: an N x 128 float32 embedding of Gaussian blobs (bench_knn.py's: ``--centres`` centres of std
``--spread``, unit noise, the same random stream) written once to a zarr array under bench/out (not in
the repository). Each backend then builds the pruned, symmetric graph with ``cell_graph.knn_graph``
(graph defaults: k 10, NN-descent degree 30, std pruning) in a subprocess of its own, so that the peak
RSS of its process tree (bench/measure.py::run_measured) is its own:

- ``pynndescent``: the array read whole, one NN-descent graph of all N cells;
- ``blocks``: the zarr array handed over as it is, read in row blocks, parts spilled under bench/out.

recall@10 is the graph stage's own: the same 256 sampled cells (``graph.recall_sample``, seed 0) for
both, in memory for pynndescent (``knn_recall``), streamed for blocks (``knn_recall_streamed``).
pynndescent's numba compilation (not cached across processes) runs first on a tiny input in each
process and is reported apart; ``rss_after_warmup_mib`` is the process before the embedding is read.

Usage::

    nice -n 5 python bench/bench_knn_blocks.py --n 1000000 --out bench/out/knn_blocks.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import run_measured  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".numba_cache"))


def write_blobs(path: Path, n: int, dim: int, centres: int, spread: float, seed: int) -> None:
    """bench_knn.blobs(n, dim, centres, spread, seed), written to a zarr array block by block."""
    import numpy as np
    import zarr

    rng = np.random.default_rng(seed)
    c = rng.normal(0.0, spread, (centres, dim)).astype(np.float32)
    arr = zarr.create_array(store=str(path), shape=(n, dim), chunks=(8192, dim), dtype="float32", overwrite=True)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        arr[a:b] = c[rng.integers(0, centres, b - a)] + rng.standard_normal((b - a, dim), dtype=np.float32)


def worker(method: str, array: Path, result: Path, block_cells: int, n_jobs: int, seed: int) -> None:
    """One backend's graph of ``array``; its summary goes to ``result`` as JSON."""
    import numpy as np
    import psutil
    import zarr

    from scgnn_scale import knn
    from scgnn_scale.cell_graph import knn_graph
    from scgnn_scale.config import GraphConfig

    t = time.perf_counter()
    tiny = np.random.default_rng(1).normal(size=(300, 128)).astype(np.float32)
    knn.knn_pynndescent(tiny, 10, n_jobs=n_jobs)
    jit_seconds = time.perf_counter() - t
    rss_after_warmup = psutil.Process().memory_info().rss
    cfg = GraphConfig(method=method, block_cells=block_cells, n_jobs=n_jobs)
    t = time.perf_counter()
    stored = zarr.open_array(str(array), mode="r")
    x = stored[:] if method == "pynndescent" else stored
    graph, info = knn_graph(x, cfg, device="cpu", seed=seed, scratch_dir=array.parent)
    row = {"method": method, "seconds": round(time.perf_counter() - t, 2), **info,
           "edges": int(graph.nnz // 2), "jit_seconds": round(jit_seconds, 2),
           "rss_after_warmup_mib": round(rss_after_warmup / 2**20, 1),
           "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    result.write_text(json.dumps(row))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--centres", type=int, default=50)
    p.add_argument("--spread", type=float, default=2.0, help="std of the blob centres (noise std is 1)")
    p.add_argument("--methods", nargs="+", default=["pynndescent", "blocks"], choices=["pynndescent", "blocks"])
    p.add_argument("--block-cells", type=int, default=250_000, help="graph.block_cells of 'blocks'")
    p.add_argument("--n-jobs", type=int, default=0, help="pynndescent threads (0: min(8, cores))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON output file (default: stdout only)")
    p.add_argument("--worker", choices=["pynndescent", "blocks"], help=argparse.SUPPRESS)
    p.add_argument("--array", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.array, args.result, args.block_cells, args.n_jobs, args.seed)
        return 0

    workdir = OUT / f"knn_blocks_{args.n}x{args.dim}"
    array = workdir / "embedding.zarr"
    if not array.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        write_blobs(array, args.n, args.dim, args.centres, args.spread, args.seed)
    result = {"conditions": {"n": args.n, "dim": args.dim, "centres": args.centres, "spread": args.spread,
                             "block_cells": args.block_cells, "cpu_count": os.cpu_count(),
                             "load_average": [round(v, 2) for v in os.getloadavg()],
                             "machine": platform.processor() or platform.machine()},
              "runs": []}
    for method in args.methods:
        summary = workdir / f"{method}.json"
        measured = run_measured([sys.executable, __file__, "--worker", method, "--array", str(array),
                                 "--result", str(summary), "--block-cells", str(args.block_cells),
                                 "--n-jobs", str(args.n_jobs), "--seed", str(args.seed)])
        row = {**json.loads(summary.read_text()), "process_seconds": measured["seconds"],
               "cpu_seconds": measured["cpu_seconds"], "peak_rss_mib": measured["peak_rss_mb"],
               "load_average_after": [round(v, 2) for v in os.getloadavg()]}
        result["runs"].append(row)
        print(json.dumps(row), file=sys.stderr)
    shutil.rmtree(workdir)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
