"""Leiden's resolution chosen per run by an internal criterion, against the fixed default (0.3).

    python bench/resolution_criteria.py --tags f32_512_A,f32_512_B [--runs-dir DIR]

Reads the runs that ``bench/bench_small.py --tag TAG --until cluster`` recorded (one run directory per set
and seed). On each run's cell graph (rebuilt from its feature embedding as the graph stage does), Leiden runs
at each resolution of ``RESOLUTIONS`` with the run's seed, then the small-cluster merge, as the cluster stage
does. Each partition is scored by criteria that need no labels, on the feature embedding: silhouette
(3,000 cells at most), Calinski-Harabasz and Davies-Bouldin; and, for the record, silhouette on the GAE
embedding. A rule picks one resolution per run (the criterion's best, within a range); its ARI against
``obs['label']`` is averaged per set and over each half of bench/gold_split.py. "oracle" is the best ARI of
the resolutions tried, which no rule can pass. One JSON line per run goes to
bench/out/small/resolutions_<tags>.jsonl; a table of the rules is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gold_split import HALF_A, HALF_B  # noqa: E402
from graph_variants import cluster as leiden_clusters  # noqa: E402
from why_sets_lose import load_run, our_graph, runs_by_set  # noqa: E402

from scgnn_scale.config import ClusterConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
RESOLUTIONS = (0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5)


def score_resolutions(run_dir: str, seed: int) -> dict:
    from sklearn.metrics import (
        adjusted_rand_score,
        calinski_harabasz_score,
        davies_bouldin_score,
        silhouette_score,
    )

    cfg = ClusterConfig()
    feature, z, _, truth = load_run(run_dir)
    graph = our_graph(feature, seed)
    sample = np.random.default_rng(0).choice(len(truth), min(3000, len(truth)), replace=False)
    out = {}
    for res in RESOLUTIONS:
        labels = leiden_clusters(graph, z, seed, replace(cfg, resolution=res))
        k = int(np.unique(labels).size)
        several = k > 1 and np.unique(labels[sample]).size > 1
        out[str(res)] = {
            "ari": float(adjusted_rand_score(truth, labels)), "clusters": k,
            "silhouette": float(silhouette_score(feature[sample], labels[sample])) if several else -1.0,
            "silhouette_gae": float(silhouette_score(z[sample], labels[sample])) if several else -1.0,
            "calinski_harabasz": float(calinski_harabasz_score(feature, labels)) if k > 1 else 0.0,
            "davies_bouldin": float(davies_bouldin_score(feature, labels)) if k > 1 else float("inf"),
        }
    return out


def best_by(metric: str, allowed=RESOLUTIONS, lower_is_better: bool = False):
    """A rule: the resolution in ``allowed`` whose partition scores best by ``metric`` (ties: the lower one)."""
    sign = -1.0 if lower_is_better else 1.0

    def pick(scores: dict) -> str:
        keys = [k for k in scores if float(k) in allowed]
        return max(keys, key=lambda k: (sign * scores[k][metric], -float(k)))
    return pick


RULES = {
    "fixed 0.3 (the default)": lambda s: "0.3",
    "fixed 1.0": lambda s: "1.0",
    "best silhouette": best_by("silhouette"),
    "best silhouette, 0.2-0.5": best_by("silhouette", (0.2, 0.3, 0.5)),
    "best silhouette, 0.3-1.0": best_by("silhouette", (0.3, 0.5, 0.8, 1.0)),
    "best silhouette on the GAE embedding": best_by("silhouette_gae"),
    "best Calinski-Harabasz": best_by("calinski_harabasz"),
    "best Calinski-Harabasz, 0.1-0.3": best_by("calinski_harabasz", (0.1, 0.2, 0.3)),
    "best Calinski-Harabasz, 0.2-0.5": best_by("calinski_harabasz", (0.2, 0.3, 0.5)),
    "best Calinski-Harabasz, 0.3-1.0": best_by("calinski_harabasz", (0.3, 0.5, 0.8, 1.0)),
    "best Davies-Bouldin": best_by("davies_bouldin", lower_is_better=True),
    "oracle (best ARI)": best_by("ari"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", required=True, help="comma-separated bench_small tags whose runs are read")
    ap.add_argument("--runs-dir", default=str(HERE / "out" / "small"), help="where the tags' JSON lines are")
    args = ap.parse_args()
    out = HERE / "out" / "small" / f"resolutions_{args.tags.replace(',', '_')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for row in (r for rows in runs_by_set(args.runs_dir, args.tags).values() for r in rows):
        scores = score_resolutions(row["run_dir"], int(row["seed"]))
        runs.append({"set": row["set"], "seed": int(row["seed"]), "scores": scores})
        with out.open("a") as fh:
            fh.write(json.dumps(runs[-1]) + "\n")
        print(row["set"], row["seed"], {k: round(v["ari"], 3) for k, v in scores.items()}, flush=True)
    sets = [s for s in (*HALF_A, *HALF_B) if any(r["set"] == s for r in runs)]
    print("\n| rule | mean, HALF_A | mean, HALF_B | " + " | ".join(sets) + " |")
    print("|---|---|---|" + "---|" * len(sets))
    for name, rule in RULES.items():
        per = {s: [r["scores"][rule(r["scores"])]["ari"] for r in runs if r["set"] == s] for s in sets}
        means = {s: statistics.mean(v) for s, v in per.items()}
        half = [statistics.mean([means[s] for s in sets if s in h] or [float("nan")]) for h in (HALF_A, HALF_B)]
        cells = [f"{means[s]:.3f} ± {statistics.stdev(per[s]) if len(per[s]) > 1 else 0:.3f}" for s in sets]
        print(f"| {name} | {half[0]:.3f} | {half[1]:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
