"""Which cell graph makes the first pass's clusters least seed-dependent: variants rebuilt from stored runs.

    python bench/graph_variants.py --tag pca_A --variants base,k15,k20,k10-none [--leiden-seeds 10]

Reads the runs that ``bench/bench_small.py --tag TAG --until cluster`` recorded (bench/out/small/TAG.jsonl:
one run directory per set and seed). From each run's published feature embedding
(``obsm/X_scgnn_feature``) and, where the run has one, its ``obsm/X_pca`` side by side
(:func:`scgnn_scale.cell_graph.searched_embedding`, what the graph stage searches), it builds the cell
graph again under each variant and clusters it as the cluster stage does
(:func:`scgnn_scale.clustering.cluster_embedding` with the default cluster options: ``cluster.restarts``
Leiden runs and their consensus, then the small-cluster merge in the GAE embedding ``obsm/X_scgnn``;
``--restarts 1`` for one Leiden run):

- ``base``: the graph stage's own graph (``graph.k`` 10, 'std' pruning, union): reproduces the run's ARI;
- ``kK``: the same with ``graph.k`` = K; ``kK-none``: and no pruning;
- ``snn``: the base graph's edges weighted by the Jaccard overlap of their ends' k-neighbourhoods (each
  with the cell itself), as PhenoGraph and Seurat weight theirs;
- ``pca_union``: the union of the base graph and the same graph of the 50 leading principal components
  of the published expression (``X``), which no seed of the run moves (for runs without ``X_pca``).

Per set and variant: ARI with the run's own seed (mean, SD over run seeds), and over Leiden seeds 0, 100,
..., the mean over all (run, Leiden seed) pairs and the SD on a fixed graph. One JSON line per set and
variant goes to bench/out/small/variants_TAG.jsonl; a markdown table is printed.
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
import scipy.sparse as sp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from seed_spread import sd  # noqa: E402  (this script's folder is on the path when it runs)

from scgnn_scale.cell_graph import knn_graph, searched_embedding  # noqa: E402
from scgnn_scale.clustering import cluster_embedding  # noqa: E402
from scgnn_scale.config import ClusterConfig, GraphConfig  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "small"


def load_run(run_dir: str):
    import zarr
    from anndata.io import read_elem

    g = zarr.open_group(Path(run_dir) / "adata.zarr", mode="r")
    feature = np.asarray(g["obsm/X_scgnn_feature"][:], dtype=np.float32)
    if "X_pca" in g["obsm"]:  # the graph stage searches both side by side
        with searched_embedding([feature, np.asarray(g["obsm/X_pca"][:])], streamed=False) as both:
            feature = both
    z = np.asarray(g["obsm/X_scgnn"][:], dtype=np.float32)
    x = read_elem(g["X"])
    truth = read_elem(g["obs"])["label"].astype(str).to_numpy()
    return feature, z, x, truth


def pca(x, n_components: int = 50, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD

    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    x = x - x.mean(axis=0)
    return TruncatedSVD(n_components=min(n_components, min(x.shape) - 1), random_state=seed).fit_transform(x)


def jaccard_weights(graph: sp.csr_matrix, knn_sets: sp.csr_matrix) -> sp.csr_matrix:
    """``graph``'s edges weighted by |N(i) & N(j)| / |N(i) | N(j)| of the 0/1 neighbourhood rows ``knn_sets``."""
    coo = sp.triu(graph, k=1).tocoo()
    a, b = knn_sets[coo.row], knn_sets[coo.col]
    shared = np.asarray(a.multiply(b).sum(axis=1)).ravel()
    size = np.asarray(knn_sets.sum(axis=1)).ravel()
    w = shared / (size[coo.row] + size[coo.col] - shared)
    w = np.maximum(w, 1e-3)  # an edge kept with no shared neighbour keeps a little weight
    upper = sp.coo_matrix((w, (coo.row, coo.col)), shape=graph.shape)
    return (upper + upper.T).tocsr()


def build(variant: str, feature, x, seed: int) -> sp.csr_matrix:
    gcfg = GraphConfig()
    if variant == "base":
        return knn_graph(feature, gcfg, device="cpu", seed=seed)[0]
    if variant.startswith("k"):
        k, _, prune = variant[1:].partition("-")
        return knn_graph(feature, replace(gcfg, k=int(k)), device="cpu", seed=seed, prune=prune or None)[0]
    if variant == "snn":
        graph = knn_graph(feature, gcfg, device="cpu", seed=seed)[0]
        full = knn_graph(feature, gcfg, device="cpu", seed=seed, prune="none")[0]
        return jaccard_weights(graph, (full + sp.identity(full.shape[0], format="csr")).astype(bool).astype(np.float32))
    if variant == "pca_union":
        graph = knn_graph(feature, gcfg, device="cpu", seed=seed)[0]
        other = knn_graph(pca(x).astype(np.float32), gcfg, device="cpu", seed=0)[0]
        union = graph.maximum(other)
        union.data[:] = 1.0
        return union.tocsr()
    raise SystemExit(f"unknown variant {variant!r}")


def cluster(graph: sp.csr_matrix, z: np.ndarray, seed: int, cfg: ClusterConfig) -> np.ndarray:
    return cluster_embedding(z, graph, cfg, device="cpu", seed=seed)[0]


def main() -> None:
    from sklearn.metrics import adjusted_rand_score as ari

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--sets", default="", help="comma-separated; default: every set of the tag")
    ap.add_argument("--variants", default="base,k15,k20,k10-none")
    ap.add_argument("--leiden-seeds", type=int, default=10)
    ap.add_argument("--resolution", type=float, default=ClusterConfig().resolution)
    ap.add_argument("--restarts", type=int, default=ClusterConfig().restarts)
    args = ap.parse_args()
    cfg = replace(ClusterConfig(), resolution=args.resolution, restarts=args.restarts)
    rows = [json.loads(line) for line in (OUT / f"{args.tag}.jsonl").read_text().splitlines() if line.strip()]
    sets = args.sets.split(",") if args.sets else list(dict.fromkeys(r["set"] for r in rows))
    print("| set | variant | run's ARI | own seed: mean ± SD | mean over run x Leiden seeds | SD over Leiden seeds, "
          "fixed graph | clusters | s per graph |")
    print("|---|---|---|---|---|---|---|---|")
    for name in sets:
        runs = sorted((r for r in rows if r["set"] == name), key=lambda r: r["seed"])
        loaded = [(r["seed"], r["first_pass_ari"], *load_run(r["run_dir"])) for r in runs]
        for variant in args.variants.split(","):
            own, means, within, counts, seconds = [], [], [], [], []
            for seed, _, feature, z, x, truth in loaded:
                t0 = time.process_time()
                graph = build(variant, feature, x, seed)
                labels = cluster(graph, z, seed, cfg)
                seconds.append(time.process_time() - t0)
                own.append(ari(truth, labels))
                counts.append(int(labels.max()) + 1)
                aris = [ari(truth, cluster(graph, z, 100 * s, cfg)) for s in range(args.leiden_seeds)]
                means.append(statistics.mean(aris))
                within.append(sd(aris))
            row = {"set": name, "variant": variant, "resolution": cfg.resolution, "restarts": cfg.restarts,
                   "runs_ari": [r[1] for r in loaded],
                   "own": own, "mean": statistics.mean(own), "sd": sd(own), "mean_all": statistics.mean(means),
                   "sd_leiden_fixed_graph": statistics.mean(within), "clusters": counts,
                   "seconds": statistics.mean(seconds)}
            with open(OUT / f"variants_{args.tag}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"| {name} | {variant} | {statistics.mean(row['runs_ari']):.3f} | {row['mean']:.3f} ± {row['sd']:.3f} | "
                  f"{row['mean_all']:.3f} | {row['sd_leiden_fixed_graph']:.3f} | {statistics.mean(counts):.1f} | "
                  f"{row['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
