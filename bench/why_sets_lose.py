"""Where the first pass's clusters lose to scanpy's default: the embedding, the graph or the resolution.

    python bench/why_sets_lose.py --tags f32_512_A,f32_512_B [--sets goolam,baron_pancreas_toy]

Needs scanpy (the ``bench`` extra). Reads the runs that ``bench/bench_small.py --tag TAG --until cluster``
recorded (bench/out/small/TAG.jsonl, or under ``--runs-dir``: one run directory per set and seed) and crosses,
for each run, two embeddings with four ways of clustering them:

embeddings
    ``ours``: the run's feature-autoencoder embedding (``obsm/X_scgnn_feature``, what the graph stage
    searches); ``pca``: scanpy's default on the input's counts (normalize_total, log1p, 2,000 highly variable
    genes, 50 principal components, the run's seed).
clusterings
    ``graph 0.3``: the graph stage's cell graph of that embedding (``graph.k`` 10, 'std' pruning) and Leiden at
    0.3 (``cluster.resolution``), then the small-cluster merge, as the cluster stage does (with ``ours`` this
    is the run's own clustering: the merge uses the run's GAE embedding ``obsm/X_scgnn``; with ``pca`` the
    PCA); ``graph 1.0``: the same graph, Leiden at scanpy's resolution 1.0; ``graph, labelled count``: the
    same graph, Leiden at the resolution that gives as many clusters as the labels have
    (:func:`scgnn_scale.clustering.communities_with_count`): what the count alone costs; ``scanpy``: scanpy's
    kNN (15 neighbours, UMAP connectivities) and Leiden 1.0 (igraph, 2 iterations), as its default pipeline.

``pca`` + ``scanpy`` is scanpy's default pipeline; ``ours`` + ``graph 0.3`` is scgnn-scale's first pass. ARI
against ``obs['label']``, mean and SD over the run seeds. One JSON line per set and cell goes to
bench/out/small/why_<tags>.jsonl; a markdown table is printed.
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
from graph_variants import cluster as leiden_clusters  # noqa: E402

from scgnn_scale.cell_graph import knn_graph  # noqa: E402
from scgnn_scale.clustering import communities_with_count, merge_small_clusters  # noqa: E402
from scgnn_scale.config import ClusterConfig, GraphConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
EMBEDDINGS = ("ours", "pca")
CLUSTERINGS = ("graph 0.3", "graph 1.0", "graph, labelled count", "scanpy")


def runs_by_set(runs_dir: str, tags: str) -> dict[str, list[dict]]:
    """The JSON lines that ``bench/bench_small.py --tag T`` wrote for each of the comma-separated ``tags``, by set."""
    runs: dict[str, list[dict]] = {}
    for tag in tags.split(","):
        for line in (Path(runs_dir) / f"{tag}.jsonl").read_text().splitlines():
            row = json.loads(line)
            runs.setdefault(row["set"], []).append(row)
    return runs


def load_run(run_dir: str):
    import zarr
    from anndata.io import read_elem

    g = zarr.open_group(Path(run_dir) / "adata.zarr", mode="r")
    feature = np.asarray(g["obsm/X_scgnn_feature"][:], dtype=np.float32)
    z = np.asarray(g["obsm/X_scgnn"][:], dtype=np.float32)
    obs = read_elem(g["obs"])
    return feature, z, obs.index.to_numpy(), obs["label"].astype(str).to_numpy()


def scanpy_pca(name: str, cells, seed: int) -> np.ndarray:
    """scanpy's default embedding of the input's counts, rows in the run's cell order."""
    import anndata
    import scanpy as sc

    adata = anndata.read_h5ad(DATA / name / "counts.h5ad")
    adata = adata[adata.obs_names.get_indexer(cells)].copy()  # the run's cells (preprocess may drop some)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=min(2000, adata.n_vars))
    adata = adata[:, adata.var["highly_variable"]].copy()
    sc.pp.pca(adata, n_comps=min(50, adata.n_vars - 1, adata.n_obs - 1), random_state=seed)
    return np.asarray(adata.obsm["X_pca"], dtype=np.float32)


def scanpy_clusters(emb: np.ndarray, seed: int) -> np.ndarray:
    import anndata
    import scanpy as sc

    adata = anndata.AnnData(np.zeros((emb.shape[0], 1), np.float32))
    adata.obsm["X_emb"] = emb
    sc.pp.neighbors(adata, n_neighbors=15, use_rep="X_emb", random_state=seed, transformer="sklearn")
    sc.tl.leiden(adata, resolution=1.0, random_state=seed, flavor="igraph", n_iterations=2)
    return adata.obs["leiden"].to_numpy()


def our_graph(emb: np.ndarray, seed: int):
    """The graph stage's cell graph of an embedding (``graph.k`` 10, 'std' pruning)."""
    return knn_graph(emb, GraphConfig(), device="cpu", seed=seed)[0]


def cluster_cells(emb: np.ndarray, merge_in: np.ndarray, how: str, seed: int, n_labels: int,
                  graph=None) -> np.ndarray:
    """Clusters of ``emb`` by one of CLUSTERINGS; ``graph`` is :func:`our_graph` of ``emb`` when already built."""
    if how == "scanpy":
        return scanpy_clusters(emb, seed)
    cfg = ClusterConfig()
    graph = our_graph(emb, seed) if graph is None else graph
    if how == "graph, labelled count":
        labels, _ = communities_with_count(graph, "leiden", n_labels, embedding=merge_in, cfg=cfg, seed=seed)
        return merge_small_clusters(labels, merge_in, min_size=cfg.min_cluster_size, max_clusters=cfg.max_clusters)
    resolution = cfg.resolution if how == "graph 0.3" else 1.0
    return leiden_clusters(graph, merge_in, seed, replace(cfg, resolution=resolution))


def main() -> None:
    from sklearn.metrics import adjusted_rand_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", required=True, help="comma-separated bench_small tags whose runs are read")
    ap.add_argument("--sets", default="", help="comma-separated; default: every set of the tags")
    ap.add_argument("--runs-dir", default=str(HERE / "out" / "small"), help="where the tags' JSON lines are")
    args = ap.parse_args()
    runs = runs_by_set(args.runs_dir, args.tags)
    wanted = [s for s in args.sets.split(",") if s] or list(runs)
    out = HERE / "out" / "small" / f"why_{args.tags.replace(',', '_')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    table = []
    for name in wanted:
        scores = {(e, c): [] for e in EMBEDDINGS for c in CLUSTERINGS}
        for row in sorted(runs[name], key=lambda r: r["seed"]):
            seed = int(row["seed"])
            feature, z, cells, truth = load_run(row["run_dir"])
            n_labels = len(set(truth))
            pca = scanpy_pca(name, cells, seed)
            for emb_name, emb, merge_in in (("ours", feature, z), ("pca", pca, pca)):
                graph = our_graph(emb, seed)  # built once for the three clusterings on it
                for how in CLUSTERINGS:
                    pred = cluster_cells(emb, merge_in, how, seed, n_labels, graph=graph)
                    scores[(emb_name, how)].append(float(adjusted_rand_score(truth, pred)))
        for (emb_name, how), values in scores.items():
            line = {"set": name, "embedding": emb_name, "clustering": how, "seeds": len(values),
                    "ari_mean": round(statistics.mean(values), 4),
                    "ari_sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "ari": values}
            with out.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)
        table.append((name, scores))
    print("\n| set | embedding | " + " | ".join(CLUSTERINGS) + " |")
    print("|---|---|" + "---|" * len(CLUSTERINGS))
    for name, scores in table:
        for emb_name in EMBEDDINGS:
            cells_ = [f"{statistics.mean(scores[(emb_name, c)]):.3f} ± "
                      f"{statistics.stdev(scores[(emb_name, c)]) if len(scores[(emb_name, c)]) > 1 else 0:.3f}"
                      for c in CLUSTERINGS]
            print(f"| {name} | {emb_name} | " + " | ".join(cells_) + " |")


if __name__ == "__main__":
    main()
