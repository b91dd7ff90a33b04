"""Peak memory of the graph autoencoder with its features in memory and in scratch files.

    python bench/bench_gae_memory.py --cells 1000000 --epochs 20

Makes (once, under bench/out/gae_memory) an N x 128 float32 embedding in a zarr array and a random
symmetric graph of mean degree about 2 x ``--out-degree`` (a cell graph's degree: 28 at 1M cells in
the runs of RESULTS.md; a random graph has no locality, so the scratch files' gathers touch the most
pages), then trains the GAE in minibatch mode in a fresh process for each setting: features in memory
(``gae.memory_budget_mb`` above their size) and on disk (``gae.memory_budget_mb 0``). Each line of JSON
gives the process's peak RSS (bench/measure.py, the process tree sampled every 0.1 s), wall and CPU
seconds, and the loss; the last line compares the two embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run_measured  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out" / "gae_memory"

TRAIN = """
import json, sys, time, numpy as np, torch, zarr
from scgnn_scale.config import GAEConfig
from scgnn_scale.graph_autoencoder import fit_gae, read_graph
torch.set_num_threads(1)
root, budget, epochs, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
graph = read_graph(root + "/graph")
x = zarr.open_array(root + "/embedding", mode="r")
out = zarr.create_array(out_path, shape=(graph.n, 16), chunks=(65536, 16), dtype=np.float32, overwrite=True)
cfg = GAEConfig(mode="minibatch", epochs=epochs, plateau_tol=0.0, memory_budget_mb=budget)
_, info = fit_gae(x, graph, cfg, device="cpu", seed=0, out=out)
print(json.dumps({k: info[k] for k in ("features_on_disk", "steps", "loss_last", "train_seconds")}))
"""


def make_inputs(root: Path, cells: int, out_degree: int, dim: int = 128) -> None:
    """The embedding (Gaussian blobs) and a random symmetric graph, written in blocks."""
    import scipy.sparse as sp
    import zarr
    from anndata.io import write_elem

    if (root / "done").exists():
        return
    rng = np.random.default_rng(0)
    group = zarr.open_group(root, mode="w", zarr_format=3)
    emb = group.create_array("embedding", shape=(cells, dim), chunks=(65536, dim), dtype=np.float32)
    centres = rng.normal(0, 20, size=(50, dim)).astype(np.float32)
    for a in range(0, cells, 65536):
        b = min(cells, a + 65536)
        emb[a:b] = centres[rng.integers(50, size=b - a)] + rng.normal(size=(b - a, dim)).astype(np.float32)
    src = np.repeat(np.arange(cells, dtype=np.int32), out_degree)
    dst = rng.integers(cells, size=cells * out_degree, dtype=np.int32)
    directed = sp.csr_matrix((np.ones(src.size, np.float32), (src, dst)), shape=(cells, cells))
    del src, dst
    graph = directed.maximum(directed.T).tocsr()
    graph.setdiag(0)
    graph.eliminate_zeros()
    graph.sort_indices()
    graph.data[:] = 1.0
    write_elem(group, "graph", graph)
    (root / "done").write_text("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--out-degree", type=int, default=14)
    ap.add_argument("--epochs", type=int, default=20, help="GAE epochs (4 steps of 4,096 targets each)")
    args = ap.parse_args()
    root = OUT / f"n{args.cells}_d{args.out_degree}"
    make_inputs(root, args.cells, args.out_degree)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    results = {}
    for label, budget in (("memory", 1 << 20), ("disk", 0)):
        out_path = str(root / f"z_{label}")
        report = root / f"report_{label}.json"
        with open(report, "w") as stdout:
            measured = run_measured([sys.executable, "-c", TRAIN, str(root), str(budget), str(args.epochs),
                                     out_path], env=env, stdout=stdout)
        row = {"cells": args.cells, "setting": label, "commit": commit, "load_1min": os.getloadavg()[0],
               **{k: measured[k] for k in ("seconds", "cpu_seconds", "peak_rss_mb")},
               **json.loads(report.read_text().strip().splitlines()[-1])}
        results[label] = out_path
        print(json.dumps(row), flush=True)
    import zarr

    a, b = zarr.open_array(results["memory"], mode="r")[:], zarr.open_array(results["disk"], mode="r")[:]
    print(json.dumps({"max_abs_difference": float(np.abs(a - b).max()), "max_abs": float(np.abs(a).max())}))


if __name__ == "__main__":
    main()
