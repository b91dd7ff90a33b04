"""Leiden on the whole graph against Leiden by parts (``cluster.partition``), on a run's graph and embedding.

    python bench/bench_cluster_parts.py RUN_DIR --micro-resolutions 3,10,30 --part-cells 250000

RUN_DIR is a run that has finished its ``cluster`` stage (``scgnn-scale run ... --until cluster``). Each
setting clusters the published GAE embedding and pruned graph (the first pass's, without iterations) with
the default cluster options in a fresh process (bench/measure.py samples its whole tree's RSS every
0.1 s): 'whole' reads the graph whole into igraph; 'parts' at each micro-resolution streams it
(scgnn_scale.leiden_parts). One JSON line per
setting: seconds, CPU seconds, peak RSS, the cluster count, ARI and NMI against obs['label'] when the
run has it, the whole graph's modularity of the clusters (at cluster.resolution, streamed) and the ARI
of each 'parts' partition against the 'whole' one.

    python bench/bench_cluster_parts.py --synthetic 10000000 --skip-whole

makes (once, under bench/out/cluster_parts) a planted graph of N cells instead of a run: 12 types, each
cell joined to its two neighbours in each of 7 random cyclic orders of its type's cells and in one of all
cells (degree 16, 1/8 of the edges across types, symmetric by construction, written block by block)
and a 16-d embedding (a blob per type).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run_measured  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

CLUSTER = """
import json, sys, time, numpy as np, zarr
from scgnn_scale import clustering, leiden_parts
from scgnn_scale.config import ClusterConfig
from scgnn_scale.store import RunStore
run, partition, micro, part_cells, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t0 = time.perf_counter()
if run.endswith(".zarr"):  # a synthetic graph and embedding
    z = zarr.open_array(run + "/embedding", mode="r")[:]
    location = run + "/graph"
else:  # the published graph embedding and graph of a run
    z = np.asarray(zarr.open_array(run + "/adata.zarr/obsm/X_scgnn", mode="r")[:], dtype=np.float32)
    location = run + "/adata.zarr/obsp/scgnn_graph"
cfg = ClusterConfig(partition=partition, micro_resolution=micro, part_cells=part_cells)
if partition == "parts":
    graph = leiden_parts.coarse_graph(location, z, part_cells=part_cells, micro_resolution=micro, seed=0)
else:
    graph = RunStore.read_elem_at(location).tocsr()
labels, info = clustering.cluster_embedding(z, graph, cfg, device="cpu", seed=0)
seconds = time.perf_counter() - t0
np.save(out, labels)
q = leiden_parts.modularity(leiden_parts.StoredGraph(location), labels, cfg.resolution)
print(json.dumps({"clustering_seconds": round(seconds, 1), "clusters": info["n_clusters"], "modularity": q,
                  **({"parts": graph.info} if partition == "parts" else {})}))
"""


def make_synthetic(root: Path, cells: int, types: int = 12, orders: int = 7, dim: int = 16,
                   block: int = 1 << 20) -> None:
    """The planted graph and embedding of the module's doc, in AnnData's CSR encoding."""
    import zarr

    if (root / "done").exists():
        return
    rng = np.random.default_rng(0)
    labels = rng.integers(types, size=cells).astype(np.int16)
    cycles = []  # (order, position of each cell in it) per cyclic order
    for _ in range(orders):
        order = np.argsort(labels + rng.random(cells), kind="stable").astype(np.int32)  # shuffled within type
        position = np.empty(cells, np.int32)
        position[order] = np.arange(cells, dtype=np.int32)
        cycles.append((order, position, True))
    order = rng.permutation(cells).astype(np.int32)
    position = np.empty(cells, np.int32)
    position[order] = np.arange(cells, dtype=np.int32)
    cycles.append((order, position, False))
    start = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=types))])
    degree = 2 * len(cycles)
    group = zarr.open_group(root, mode="w", zarr_format=3)
    graph = group.create_group("graph")
    graph.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [cells, cells]})
    indices = graph.create_array("indices", shape=(cells * degree,), chunks=(1 << 22,), dtype=np.int64)
    graph.create_array("data", shape=(cells * degree,), chunks=(1 << 22,), dtype=np.float32, fill_value=1.0)
    graph.create_array("indptr", data=np.arange(cells + 1, dtype=np.int64) * degree)  # int32 overflows at 134M cells
    emb = group.create_array("embedding", shape=(cells, dim), chunks=(1 << 16, dim), dtype=np.float32)
    centres = rng.normal(0, 10, (types, dim)).astype(np.float32)
    for a in range(0, cells, block):
        b = min(cells, a + block)
        rows = np.arange(a, b)
        cols = []
        for order, position, within in cycles:
            p = position[rows].astype(np.int64)
            lo, size = (start[labels[rows]], np.diff(start)[labels[rows]]) if within else (0, cells)
            for step in (-1, 1):
                cols.append(order[lo + (p - lo + step) % size])
        indices[a * degree:b * degree] = np.sort(np.stack(cols, axis=1), axis=1).ravel()
        emb[a:b] = centres[labels[rows]] + rng.normal(size=(b - a, dim)).astype(np.float32)
    np.save(root / "labels.npy", labels)
    (root / "done").write_text("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="run directory that has finished its gae stage")
    ap.add_argument("--synthetic", type=int, default=0, help="cells of a planted graph to use instead of a run")
    ap.add_argument("--micro-resolutions", default="10", help="comma-separated cluster.micro_resolution values")
    ap.add_argument("--part-cells", type=int, default=250_000)
    ap.add_argument("--skip-whole", action="store_true", help="only the 'parts' settings")
    args = ap.parse_args()
    import zarr
    from anndata.io import read_elem
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if args.synthetic:
        root = Path(__file__).resolve().parent / "out" / "cluster_parts" / f"planted_{args.synthetic}.zarr"
        make_synthetic(root, args.synthetic)
        args.run = str(root)
        truth = np.load(root / "labels.npy")
    else:
        obs = read_elem(zarr.open_group(Path(args.run) / "adata.zarr", mode="r")["obs"])
        truth = obs["label"].astype(str).to_numpy() if "label" in obs else None
    settings = ([] if args.skip_whole else [("whole", 0.0)]) + [
        ("parts", float(m)) for m in args.micro_resolutions.split(",")]
    whole = None
    with tempfile.TemporaryDirectory() as tmp:
        for partition, micro in settings:
            out = Path(tmp) / f"{partition}_{micro}.npy"
            report = Path(tmp) / "report.json"
            with open(report, "w") as stdout:
                measured = run_measured([sys.executable, "-c", CLUSTER, args.run, partition, str(micro),
                                         str(args.part_cells), str(out)], env=env, stdout=stdout)
            labels = np.load(out)
            row = {"cells": int(labels.size), "partition": partition, "commit": commit,
                   "load_1min": round(os.getloadavg()[0], 2),
                   **({"micro_resolution": micro, "part_cells": args.part_cells} if partition == "parts" else {}),
                   **{k: measured[k] for k in ("seconds", "cpu_seconds", "peak_rss_mb")},
                   **json.loads(report.read_text().strip().splitlines()[-1])}
            if truth is not None:
                row["ari"] = adjusted_rand_score(truth, labels)
                row["nmi"] = normalized_mutual_info_score(truth, labels)
            if partition == "whole":
                whole = labels
            elif whole is not None:
                row["ari_to_whole"] = adjusted_rand_score(whole, labels)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
