"""Where the spread of the first pass's ARI over seeds comes from: the run's seed or Leiden's.

    python bench/seed_spread.py --tag base --leiden-seeds 10 --variants 1,5:0.5,10:0.5

Reads the runs that ``bench/bench_small.py --tag TAG --until cluster`` recorded (bench/out/small/TAG.jsonl:
one run directory per set and seed) and, on each run's published pruned graph (``obsp/scgnn_graph``) and
GAE embedding (``obsm/X_scgnn``), clusters again with :func:`scgnn_scale.clustering.cluster_embedding`
(the run's cluster options, ``cluster.restarts`` and ``cluster.consensus_threshold`` per variant):

- on a fixed graph, with Leiden seeds 0, 100, ..., 100 x (L-1): the spread that Leiden's seed alone makes;
- with the run's own seed (what the pipeline does): the spread over run seeds, and the spread over run
  seeds of the mean over Leiden seeds (what the graph alone makes, Leiden's part averaged away).

A variant is ``R[:threshold[:resolution[:rounds]]]`` (R = 1: one Leiden run, today's default). One JSON line per set and
variant goes to bench/out/small/spread_TAG.jsonl; a markdown table is printed.

``--runs-consensus M`` estimates instead what restarting the whole first pass (feature AE, graph, GAE)
M times would give, from the runs at hand: for every M-subset of a set's runs, each run's clusters
(today's single Leiden run with its own seed) vote on the union of the runs' graph edges (fraction of
the M that put both ends together), edges under the threshold are dropped and
:func:`scgnn_scale.clustering.consensus_communities` (10 restarts) clusters that weighted graph. The
subsets share runs, so the SD over them understates the SD over independent restarts. Beside it, the
"medoid" run of each subset: the run whose clusters agree best (mean ARI) with the subset's others.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scgnn_scale.clustering import cluster_embedding  # noqa: E402
from scgnn_scale.config import ClusterConfig  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "small"


def load_run(run_dir: str):
    import zarr
    from anndata.io import read_elem

    g = zarr.open_group(Path(run_dir) / "adata.zarr", mode="r")
    graph = read_elem(g["obsp/scgnn_graph"]).tocsr()
    z = np.asarray(g["obsm/X_scgnn"][:], dtype=np.float32)
    truth = read_elem(g["obs"])["label"].astype(str).to_numpy()
    return graph, z, truth


def runs_consensus(subset, own, cfg, threshold=0.5, leiden_restarts=10):
    """Labels of the consensus of the runs in ``subset`` ((seed, graph, z, truth) each) on their graphs' edges;
    ``own`` maps a run's seed to its own clusters."""
    import scipy.sparse as sp

    from scgnn_scale.clustering import consensus_communities, merge_small_clusters

    n = subset[0][1].shape[0]
    union = sum((sp.triu(g, k=1) != 0).astype(np.float32) for _, g, _, _ in subset).tocoo()
    rows, cols = union.row, union.col
    together = np.zeros(rows.size)
    for seed, _, _, _ in subset:
        together += own[seed][rows] == own[seed][cols]
    together /= len(subset)
    keep = together >= threshold
    w = sp.coo_matrix((together[keep], (rows[keep], cols[keep])), shape=(n, n))
    membership, info = consensus_communities((w + w.T).tocsr(), cfg.method, restarts=leiden_restarts,
                                             threshold=threshold, resolution=cfg.resolution, seed=subset[0][0],
                                             weighted=True)
    return merge_small_clusters(membership, subset[0][2], min_size=cfg.min_cluster_size,
                                max_clusters=cfg.max_clusters), info


def sd(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    from sklearn.metrics import adjusted_rand_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", default="base")
    ap.add_argument("--sets", default="", help="comma-separated; default: every set of the tag")
    ap.add_argument("--leiden-seeds", type=int, default=10)
    ap.add_argument("--variants", default="1", help="comma-separated R[:threshold[:resolution[:rounds]]]")
    ap.add_argument("--runs-consensus", type=int, default=0, metavar="M",
                    help="estimate the consensus of M whole first passes from every M-subset of the runs")
    args = ap.parse_args()
    rows = [json.loads(line) for line in (OUT / f"{args.tag}.jsonl").read_text().splitlines() if line.strip()]
    sets = args.sets.split(",") if args.sets else list(dict.fromkeys(r["set"] for r in rows))
    variants = []
    for v in args.variants.split(","):
        r, t, res, rounds = (v.split(":") + ["", "", ""])[:4]
        variants.append((int(r), float(t) if t else 0.5, float(res) if res else ClusterConfig().resolution,
                         int(rounds) if rounds else ClusterConfig().consensus_rounds))
    if not args.runs_consensus:
        print("| set | variant | mean ARI (run seeds) | SD over run seeds | mean over run x Leiden seeds | SD over Leiden "
              "seeds, fixed graph (mean of runs) | SD over run seeds of the mean over Leiden seeds | cluster CPU-s |")
        print("|---|---|---|---|---|---|---|---|")
    if args.runs_consensus:
        print("| set | runs per consensus | subsets | consensus: mean ARI | SD over subsets | medoid run: mean ARI | "
              "SD | single runs: mean, SD | s per consensus |")
        print("|---|---|---|---|---|---|---|---|---|")
    for name in sets:
        runs = sorted((r for r in rows if r["set"] == name), key=lambda r: r["seed"])
        loaded = [(r["seed"], *load_run(r["run_dir"])) for r in runs]
        if args.runs_consensus:
            from itertools import combinations

            from sklearn.metrics import adjusted_rand_score as ari

            single = [r["first_pass_ari"] for r in runs]
            aris, seconds, medoid = [], [], []
            by_seed = {r["seed"]: r["first_pass_ari"] for r in runs}
            # each run's own clusters (a single Leiden run with its seed), once per run
            single_run = replace(ClusterConfig(), restarts=1)  # one Leiden run, whatever the default's restarts
            own = {s: cluster_embedding(z, g, single_run, device="cpu", seed=s)[0] for s, g, z, _ in loaded}
            for subset in combinations(loaded, args.runs_consensus):
                t0 = time.process_time()
                labels, _ = runs_consensus(list(subset), own, ClusterConfig())
                seconds.append(time.process_time() - t0)
                aris.append(ari(subset[0][3], labels))
                # the medoid run: the one whose clusters agree best (mean ARI) with the subset's others
                agree = [np.mean([ari(own[a[0]], own[b[0]]) for b in subset]) for a in subset]
                medoid.append(by_seed[subset[int(np.argmax(agree))][0]])
            row = {"set": name, "runs_consensus": args.runs_consensus, "aris": aris, "mean": statistics.mean(aris),
                   "sd": sd(aris), "single": single, "seconds": statistics.mean(seconds), "medoid": medoid,
                   "medoid_mean": statistics.mean(medoid), "medoid_sd": sd(medoid)}
            with open(OUT / f"spread_{args.tag}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"| {name} | {args.runs_consensus} | {len(aris)} | {row['mean']:.3f} | {row['sd']:.3f} | "
                  f"{row['medoid_mean']:.3f} | {row['medoid_sd']:.3f} | {statistics.mean(single):.3f}, {sd(single):.3f} | {row['seconds']:.2f} |", flush=True)
            continue
        for restarts, threshold, resolution, rounds in variants:
            cfg = replace(ClusterConfig(), restarts=restarts, consensus_threshold=threshold, resolution=resolution,
                          consensus_rounds=rounds)
            own, within_sd, graph_means, per_run, seconds = [], [], [], [], []
            for seed, graph, z, truth in loaded:
                t0 = time.process_time()
                labels, _ = cluster_embedding(z, graph, cfg, device="cpu", seed=seed)
                seconds.append(time.process_time() - t0)
                own.append(adjusted_rand_score(truth, labels))
                aris = []
                for s in range(args.leiden_seeds):
                    labels, _ = cluster_embedding(z, graph, cfg, device="cpu", seed=100 * s)
                    aris.append(adjusted_rand_score(truth, labels))
                within_sd.append(sd(aris))
                graph_means.append(statistics.mean(aris))
                per_run.append({"seed": seed, "own": own[-1], "leiden": aris})
            row = {"set": name, "restarts": restarts, "threshold": threshold, "resolution": resolution, "rounds": rounds, "mean": statistics.mean(own),
                   "sd_runs": sd(own), "sd_leiden_fixed_graph": statistics.mean(within_sd),
                   "sd_runs_of_leiden_mean": sd(graph_means), "mean_all": statistics.mean(graph_means), "cluster_cpu_s": statistics.mean(seconds),
                   "runs": per_run}
            with open(OUT / f"spread_{args.tag}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"| {name} | R={restarts} t={threshold} res={resolution} rounds={rounds} | {row['mean']:.3f} | {row['sd_runs']:.3f} | "
                  f"{row['mean_all']:.3f} | "
                  f"{row['sd_leiden_fixed_graph']:.3f} | {row['sd_runs_of_leiden_mean']:.3f} | "
                  f"{row['cluster_cpu_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
