"""Whole-graph modularity optimisers at a low resolution on the planted graph of bench_cluster_parts.py.

    python bench/leiden_collapse.py --cells 20000,50000,200000

The planted graph (12 types, each cell joined to its two neighbours in 7 random cyclic orders of its type
and in one of all cells) has no locality inside a type: each type is a random expander. For each size it
prints one JSON line per optimiser: igraph's Leiden (modularity) at resolution 0.3 (the default of
``cluster.resolution``) and 1.0, igraph's multilevel Louvain at 0.3, leidenalg's RBConfiguration at 0.3,
and igraph's Leiden at 0.3 started from its partition at 1.0; clusters, ARI against the planted types,
the partition's modularity at resolution 0.3, and seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster_parts import make_synthetic  # noqa: E402

from scgnn_scale.clustering import _igraph  # noqa: E402
from scgnn_scale.store import RunStore  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "cluster_parts"


def optimisers(g):
    """(name, function of the graph giving a membership) for each optimiser compared."""
    import leidenalg

    def leiden(resolution, start=None):
        return g.community_leiden(objective_function="modularity", resolution=resolution, n_iterations=-1,
                                  initial_membership=start).membership

    return [
        ("igraph Leiden 0.3", lambda: leiden(0.3)),
        ("igraph Leiden 1.0", lambda: leiden(1.0)),
        ("igraph Louvain 0.3", lambda: g.community_multilevel(resolution=0.3).membership),
        ("leidenalg RBConfiguration 0.3", lambda: leidenalg.find_partition(
            g, leidenalg.RBConfigurationVertexPartition, resolution_parameter=0.3, seed=0,
            n_iterations=-1).membership),
        ("igraph Leiden 0.3 from Leiden 1.0", lambda: leiden(0.3, leiden(1.0))),
    ]


def main() -> None:
    from sklearn.metrics import adjusted_rand_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="20000,50000,200000")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for cells in (int(c) for c in args.cells.split(",")):
        root = OUT / f"planted_{cells}.zarr"
        make_synthetic(root, cells)
        g = _igraph(RunStore.read_elem_at(str(root / "graph")).tocsr())
        truth = np.load(root / "labels.npy")
        for name, fn in optimisers(g):
            random.seed(args.seed)  # igraph draws from the random module
            t0 = time.perf_counter()
            membership = np.asarray(fn())
            seconds = time.perf_counter() - t0
            q = g.modularity(membership.tolist(), resolution=0.3)
            print(json.dumps({"cells": cells, "optimiser": name, "clusters": int(np.unique(membership).size),
                              "ari": round(float(adjusted_rand_score(truth, membership)), 3),
                              "modularity_0.3": round(q, 5), "seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
