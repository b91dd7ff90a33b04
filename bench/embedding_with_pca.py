"""The cell graph searched in our embedding and scanpy's PCA side by side, against ours alone.

    python bench/embedding_with_pca.py --tags f32_512_A,f32_512_B [--runs-dir DIR] [--pca-of counts|X|X_normalised]
                                      [--leiden-seeds L]

Needs scanpy (the ``bench`` extra). Reads the runs that ``bench/bench_small.py --tag TAG --until cluster``
recorded (one run directory per set and seed). For each run: the feature autoencoder's embedding
(``obsm/X_scgnn_feature``) and scanpy's default PCA of the input's counts (normalize_total, log1p, 2,000 HVG,
50 components, the run's seed; :func:`why_sets_lose.scanpy_pca`; with ``--pca-of X``, 50 principal components of
the run's own ``X`` instead: log1p of the counts of its 2,000 genes, not normalised; with ``--pca-of
X_normalised``, of those genes' counts normalised to 10,000 per cell and log1p'd), each centred and scaled to a mean squared
norm of 1 per cell, are put side by side (178 columns: both weigh the same in a distance), and that is
clustered as the cluster stage clusters ours (our cell graph, k = 10 with 'std' pruning, Leiden at 0.3 with
the run's seed, the small-cluster merge in the same side-by-side embedding). ARI against ``obs['label']``,
mean ± SD over the run seeds, beside the run's own; means per half of bench/gold_split.py. With
``--leiden-seeds L`` also the mean over the runs x Leiden seeds 0, 100, ..., 100 (L-1) on each run's graphs
(ours and the side-by-side one): the less noisy estimator of "Clusters from seed to seed". The prototype of
what the package's ``pca`` stage now does out of core (with scanpy's in-memory PCA here). One JSON line per set goes to
bench/out/small/with_pca_<tags>[_<pca-of>].jsonl; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gold_split import HALF_A, HALF_B  # noqa: E402
from graph_variants import pca  # noqa: E402
from why_sets_lose import cluster_cells, load_run, our_graph, runs_by_set, scanpy_pca  # noqa: E402

from scgnn_scale.cell_graph import searched_embedding  # noqa: E402

HERE = Path(__file__).resolve().parent


def beside(*parts: np.ndarray) -> np.ndarray:
    """The parts side by side, each unit-scaled, as the graph stage searches them (in memory)."""
    with searched_embedding(list(parts), streamed=False) as whole:
        return whole


def run_x_pca(run_dir: str, seed: int, normalised: bool = False) -> np.ndarray:
    """50 principal components of the run's own X (log1p of counts), or of its counts normalised to 10,000 per
    cell and log1p'd again."""
    import scipy.sparse as sp
    import zarr
    from anndata.io import read_elem

    x = read_elem(zarr.open_group(Path(run_dir) / "adata.zarr", mode="r")["X"])
    if normalised:
        counts = np.expm1(x.toarray() if sp.issparse(x) else np.asarray(x, dtype=np.float64))
        library = counts.sum(axis=1, keepdims=True)
        x = np.log1p(counts / np.where(library > 0, library, 1.0) * 1e4)
    return pca(x, 50, seed).astype(np.float32)


def main() -> None:
    from sklearn.metrics import adjusted_rand_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", required=True, help="comma-separated bench_small tags whose runs are read")
    ap.add_argument("--runs-dir", default=str(HERE / "out" / "small"), help="where the tags' JSON lines are")
    ap.add_argument("--pca-of", choices=("counts", "X", "X_normalised"), default="counts",
                    help="scanpy's PCA of the normalised counts (default), a PCA of the run's X, or of X's genes "
                    "normalised per cell")
    ap.add_argument("--leiden-seeds", type=int, default=0, help="also average over this many Leiden seeds")
    args = ap.parse_args()
    runs = runs_by_set(args.runs_dir, args.tags)
    suffix = "" if args.pca_of == "counts" else f"_{args.pca_of}"
    out = HERE / "out" / "small" / f"with_pca_{args.tags.replace(',', '_')}{suffix}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    scores = {}
    for name in [s for s in (*HALF_A, *HALF_B) if s in runs]:
        own, both, draws_own, draws_both = [], [], [], []
        for row in sorted(runs[name], key=lambda r: r["seed"]):
            seed = int(row["seed"])
            feature, z, cells, truth = load_run(row["run_dir"])
            other = (scanpy_pca(name, cells, seed) if args.pca_of == "counts"
                     else run_x_pca(row["run_dir"], seed, normalised=args.pca_of == "X_normalised"))
            side_by_side = beside(feature, other)
            graph_both = our_graph(side_by_side, seed)
            labels = cluster_cells(side_by_side, side_by_side, "graph 0.3", seed, 0, graph=graph_both)
            both.append(float(adjusted_rand_score(truth, labels)))
            own.append(float(row["ari"]))
            graph_own = our_graph(feature, seed) if args.leiden_seeds else None
            for leiden_seed in range(0, 100 * args.leiden_seeds, 100):
                mine = cluster_cells(feature, z, "graph 0.3", leiden_seed, 0, graph=graph_own)
                draws_own.append(float(adjusted_rand_score(truth, mine)))
                theirs = cluster_cells(side_by_side, side_by_side, "graph 0.3", leiden_seed, 0, graph=graph_both)
                draws_both.append(float(adjusted_rand_score(truth, theirs)))
        scores[name] = (own, both, draws_own, draws_both)
        line = {"set": name, "seeds": len(own), "pca_of": args.pca_of, "ours": own, "ours_and_pca": both,
                "leiden_seeds": args.leiden_seeds, "draws_ours": draws_own, "draws_ours_and_pca": draws_both}
        with out.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)

    def cell(values):
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"

    columns = (0, 1, 2, 3) if args.leiden_seeds else (0, 1)
    print("\n| set | ours (the run) | ours and the PCA side by side |"
          + (" ours, mean over runs x Leiden seeds | side by side, the same |" if args.leiden_seeds else ""))
    print("|---|---|---|" + ("---|---|" if args.leiden_seeds else ""))
    for name, values in scores.items():
        print(f"| {name} | " + " | ".join(cell(values[i]) for i in columns) + " |")
    for label, half in (("HALF_A", HALF_A), ("HALF_B", HALF_B)):
        names = [s for s in half if s in scores]
        if names:
            means = [statistics.mean(statistics.mean(scores[s][i]) for s in names) for i in columns]
            print(f"| **mean, {label}** | " + " | ".join(f"**{m:.4f}**" for m in means) + " |")


if __name__ == "__main__":
    main()
