"""KNN backends at scale: time and recall@10 against exact neighbours of a sample.

Data: Gaussian blobs in ``--dim`` dimensions (``--centres`` centres, unit noise, centre scale
``--spread``): the hard case for NN-descent, whose recall drops as the intrinsic dimension grows.
For each N, each method builds the k-NN graph of all N points; recall@k is measured on
``--sample`` random points whose exact neighbours are found by blocked brute force.

pynndescent's numba compilation (about a minute of CPU, not cached across processes for its
functions that take the distance as an argument) is measured separately on a tiny input first,
so the timings below are of the search itself.

Usage::

    NUMBA_CACHE_DIR=.numba_cache python bench/bench_knn.py --n 100000 1000000 --sample 50000 \
        --methods pynndescent torch --out bench/knn.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".numba_cache"))

import numpy as np  # noqa: E402


def blobs(n: int, dim: int, centres: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(0.0, spread, (centres, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for a in range(0, n, 100_000):  # bounded temporaries
        b = min(n, a + 100_000)
        out[a:b] = c[rng.integers(0, centres, b - a)] + rng.standard_normal((b - a, dim), dtype=np.float32)
    return out


def exact_neighbours_of(x: np.ndarray, rows: np.ndarray, k: int, device: str) -> np.ndarray:
    """Exact k-NN (self excluded) of ``x[rows]`` against all of ``x``, blocked, in torch."""
    import torch

    from scgnn_scale.knn import _refine

    dev = torch.device(device)
    xt = torch.from_numpy(x).to(dev)
    sq = (xt * xt).sum(1)
    extra = k + 8
    out = np.empty((rows.size, k), np.int64)
    qb = max(1, (256 << 20) // (4 * x.shape[0])) if dev.type == "cpu" else 8192  # 256 MiB blocks on a CPU
    with torch.no_grad():
        for a in range(0, rows.size, qb):
            r = torch.from_numpy(rows[a:a + qb]).to(dev)
            d2 = torch.addmm(sq[None, :], xt[r], xt.T, alpha=-2.0)
            d2 += sq[r, None]
            d2[torch.arange(r.numel(), device=dev), r] = float("inf")
            cand = torch.topk(d2, extra, dim=1, largest=False).indices
            out[a:a + qb] = _refine(xt, r, cand, k)[0].cpu().numpy()
    return out


def recall(approx: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = (approx[:, :, None] == truth[:, None, :]).any(-1).sum()
    return float(hits) / (truth.shape[0] * k)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="numbers of points")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--centres", type=int, default=50)
    p.add_argument("--spread", type=float, default=2.0, help="std of the blob centres (noise std is 1)")
    p.add_argument("--sample", type=int, default=50_000, help="points whose recall is measured")
    p.add_argument("--methods", nargs="+", default=["pynndescent", "torch"],
                   choices=["exact", "pynndescent", "torch"])
    p.add_argument("--nnd-neighbors", type=int, nargs="+", default=[30],
                   help="pynndescent graph degrees to try (each one a row)")
    p.add_argument("--n-jobs", type=int, default=0, help="pynndescent threads (0: min(8, cores))")
    p.add_argument("--device", default="auto", help="torch device of the 'torch' method and the exact reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON output file (default: stdout only)")
    args = p.parse_args(argv)

    import torch

    from scgnn_scale import knn

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    result = {"conditions": {"dim": args.dim, "k": args.k, "centres": args.centres, "spread": args.spread,
                             "sample": args.sample, "device": device, "cpu_count": os.cpu_count(),
                             "torch_threads": torch.get_num_threads(), "machine": platform.processor(),
                             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "runs": []}
    if "pynndescent" in args.methods:
        t = time.perf_counter()
        knn.knn_pynndescent(blobs(300, args.dim, 3, 1.0, 1), args.k, n_jobs=args.n_jobs or 0)
        result["conditions"]["pynndescent_jit_seconds"] = round(time.perf_counter() - t, 2)
        print(f"pynndescent JIT + tiny run: {result['conditions']['pynndescent_jit_seconds']} s", file=sys.stderr)
    for n in args.n:
        x = blobs(n, args.dim, args.centres, args.spread, args.seed)
        rows = np.sort(np.random.default_rng(args.seed + 1).choice(n, min(args.sample, n), replace=False))
        t = time.perf_counter()
        truth = exact_neighbours_of(x, rows, args.k, device)
        exact_seconds = time.perf_counter() - t
        print(f"N={n}: exact reference of {rows.size} points in {exact_seconds:.1f} s", file=sys.stderr)
        configs = []
        for m in args.methods:
            if m == "pynndescent":
                configs += [(m, {"n_neighbors": nn}) for nn in args.nnd_neighbors]
            else:
                configs.append((m, {}))
        for method, params in configs:
            t = time.perf_counter()
            if method == "exact":
                idx, _ = knn.knn_exact(x, args.k)
            elif method == "pynndescent":
                idx, _ = knn.knn_pynndescent(x, args.k, n_jobs=args.n_jobs, seed=args.seed, **params)
            else:
                idx, _ = knn.knn_torch(x, args.k, device=device)
            seconds = time.perf_counter() - t
            row = {"n": n, "method": method, **params, "seconds": round(seconds, 2),
                   "recall_at_k": round(recall(idx[rows], truth), 4), "recall_sample": int(rows.size),
                   "exact_reference_seconds": round(exact_seconds, 2),
                   "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
            result["runs"].append(row)
            print(json.dumps(row), file=sys.stderr)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
