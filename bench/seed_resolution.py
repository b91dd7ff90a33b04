"""How stable Leiden is at each resolution on each stored run's graph, and its ARI there.

    python bench/seed_resolution.py --tag base --resolutions 0.1,0.2,0.3,0.5,0.8 --restarts 10

For every run of ``bench/bench_small.py --tag TAG --until cluster`` (bench/out/small/TAG.jsonl) and every
resolution: ``R`` Leiden runs on the run's pruned graph (seeds run seed .. run seed + R - 1, as
``cluster.restarts``), each merged as the cluster stage does; their mean pairwise ARI (the stability),
the number of clusters and the ARI against the labels of each. One JSON line per run and resolution goes
to bench/out/small/resolution_TAG.jsonl, for choosing a rule offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import combinations
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_spread import OUT, load_run  # noqa: E402

from scgnn_scale.clustering import _igraph, communities, merge_small_clusters  # noqa: E402
from scgnn_scale.config import ClusterConfig  # noqa: E402


def main() -> None:
    from sklearn.metrics import adjusted_rand_score as ari

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", default="base")
    ap.add_argument("--sets", default="")
    ap.add_argument("--resolutions", default="0.1,0.2,0.3,0.5,0.8")
    ap.add_argument("--restarts", type=int, default=10)
    args = ap.parse_args()
    cfg = ClusterConfig()
    rows = [json.loads(line) for line in (OUT / f"{args.tag}.jsonl").read_text().splitlines() if line.strip()]
    sets = args.sets.split(",") if args.sets else list(dict.fromkeys(r["set"] for r in rows))
    for r in rows:
        if r["set"] not in sets:
            continue
        graph, z, truth = load_run(r["run_dir"])
        g = _igraph(graph)
        for res in (float(x) for x in args.resolutions.split(",")):
            t0 = time.process_time()
            parts = []
            for s in range(r["seed"], r["seed"] + args.restarts):
                m, _ = communities(graph, "leiden", resolution=res, seed=s, igraph_graph=g)
                parts.append(merge_small_clusters(m, z, min_size=cfg.min_cluster_size, max_clusters=cfg.max_clusters))
            pair = [ari(a, b) for a, b in combinations(parts, 2)]
            row = {"set": r["set"], "seed": r["seed"], "resolution": res, "stability": float(np.mean(pair)),
                   "clusters": [int(p.max()) + 1 for p in parts], "ari": [ari(truth, p) for p in parts],
                   "agreement": [float(np.mean([ari(p, q) for q in parts])) for p in parts],
                   "cpu_s": time.process_time() - t0}
            with open(OUT / f"resolution_{args.tag}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(r["set"], r["seed"], res, round(row["stability"], 3), row["clusters"][:3],
                  round(float(np.mean(row["ari"])), 3), flush=True)


if __name__ == "__main__":
    main()
