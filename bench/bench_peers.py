"""scgnn-scale beside its peers on the gold sets of ../shared/data: clustering and the dropout imputation.

    python bench/bench_peers.py [--seeds 3] [--sets a,b] [--imputation-sets a,b] [--rates 0.1,0.3]
                                [--repeats 3] [--scvi-max-steps N] [--part quality|imputation|both]
                                [--methods scanpy,scvi,scgnn,louvaink] [--imputation-peers magic,scvi]
    python bench/bench_peers.py --tables-from LOG      # the tables of the JSON lines an invocation printed

Needs the bench extra (scanpy, scvi-tools, magic-impute): pip install -e ".[bench]".

**Quality** (every gold set, every seed 0..--seeds-1, the same seeds for every method): scanpy's default
pipeline (normalize_total, log1p, 2000 HVG, PCA 50, kNN 15, Leiden 1.0); scVI, on the sets whose X holds
raw counts (stats.json ``integer_valued``; pollen does not): the scvi-tools recipe (2000 HVG by the
seurat_v3 rule on the counts, ``scvi.model.SCVI`` with its defaults on the counts, its latent space,
kNN 15, Leiden 1.0); the original scGNN's clustering rule (LouvainK) through scgnn-scale
(``--cluster-method louvaink``, one pass); and scgnn-scale's defaults (one pass). Each set is scored
against every label level its obs has (``label``, and ``label_level2`` on zeisel15). Seconds: the
method's wall time per seed (scgnn-scale: its stages through cluster, from the manifest).

**Imputation** (every count set): ``scgnn-scale evaluate-imputation`` (the paper's protocol,
scgnn_scale/dropout.py: flip --rates of the non-zeros, --repeats maskings, config
bench/imputation_table.toml) scores scGNN, zeros and kNN smoothing; on the same maskings and the same
scored entries (kept cells and genes), MAGIC and scVI are fitted to the masked counts of the run's kept
cells x kept genes and scored on the same scale (log1p of counts): MAGIC with its documented recipe
(library-size normalisation to the median, sqrt, ``magic.MAGIC`` defaults, squared and scaled back to
each cell's library size); scVI's denoised expression ``get_normalized_expression(library_size="latent")``
(the negative binomial mean at the cell's observed library size, mean of 25 posterior samples). Scores:
median L1 (the paper's), RMSE and cosine over the flipped entries.

The peers hold their whole (small) matrix in memory, as these libraries do; scgnn-scale runs out of core
as always. Every invocation works in bench/out/peers_runs/<UTC time>_<commit>; prints JSON lines and two
markdown tables and writes bench/out/peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import scanpy_leiden  # noqa: E402
from measure import run_measured  # noqa: E402
from peer_scoring import (  # noqa: E402
    FlippedEntries,
    cluster_scores,
    gold_sets,
    holds_counts,
    label_levels,
    magic_counts,
    magic_input,
    mean_sd,
    split_half,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out"
TABLE_CONFIG = ROOT / "bench" / "imputation_table.toml"
CLI = str(Path(sys.executable).with_name("scgnn-scale"))  # the scgnn-scale of this interpreter's environment
METRICS = ("median_l1", "rmse", "cosine")


# -- clustering ------------------------------------------------------------------------------------
def _read(name: str):
    import anndata

    adata = anndata.read_h5ad(DATA / name / "counts.h5ad")
    return adata, {lvl: adata.obs[lvl].astype(str).to_numpy() for lvl in label_levels(adata.obs.columns)}


def scanpy_default(name: str, seed: int) -> tuple[np.ndarray, None]:
    adata, _ = _read(name)
    return scanpy_leiden(adata, seed), None


def scvi_epochs(n_cells: int, max_steps: int) -> int | None:
    """scVI's epochs: its own default (None), or fewer: enough for ``max_steps`` steps, rounded up to an epoch.

    scvi-tools' default is min(400, round(400 * 20000 / cells)) epochs of 90% of the cells in batches of 128.
    """
    if not max_steps:
        return None
    default = min(400, round(400 * 20000 / n_cells))
    batches = max(1, -(-int(np.ceil(0.9 * n_cells)) // 128))
    return max(1, min(default, -(-max_steps // batches)))


def scvi_clusters(name: str, seed: int, *, max_steps: int) -> tuple[np.ndarray, dict]:
    import scanpy as sc
    import scvi

    adata, _ = _read(name)
    scvi.settings.seed = seed
    span = seurat_v3_genes(adata)
    adata = adata[:, adata.var["highly_variable"]].copy()
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    model.train(max_epochs=scvi_epochs(adata.n_obs, max_steps), enable_progress_bar=False)
    adata.obsm["X_scVI"] = model.get_latent_representation()
    sc.pp.neighbors(adata, use_rep="X_scVI", n_neighbors=15, random_state=seed, transformer="sklearn")
    sc.tl.leiden(adata, resolution=1.0, random_state=seed, flavor="igraph", n_iterations=2)
    return adata.obs["leiden"].to_numpy(), {"epochs": int(model.history["elbo_train"].shape[0]), "hvg_span": span}


def seurat_v3_genes(adata) -> float:
    """scvi-tools' gene selection: 2000 genes by the seurat_v3 rule on the counts; returns the loess span used.

    The rule's loess fit fails on some sets (worm_neuron: 'reciprocal condition number 5.5e-15'); the
    workaround of scanpy's issue #2669 is a wider span, so 0.5 is tried after the default 0.3.
    """
    import scanpy as sc

    for span in (0.3, 0.5):
        try:
            sc.pp.highly_variable_genes(adata, n_top_genes=min(2000, adata.n_vars), flavor="seurat_v3", span=span)
            return span
        except ValueError as err:
            if "condition number" not in str(err) and "singularities" not in str(err):
                raise
    raise RuntimeError("seurat_v3 gene selection failed with spans 0.3 and 0.5")


def scgnn_clusters(name: str, seed: int, *, method: str, work: Path) -> tuple[np.ndarray, dict]:
    """One pass of scgnn-scale; the clusters of its kept cells, aligned to the input's cells (-1: dropped)."""
    from scgnn_scale.keys import KEYS
    from scgnn_scale.store import RunStore

    run_dir = work / f"{name}_s{seed}"  # LouvainK reuses the Leiden run's stages up to the GAE
    cmd = [CLI, "run", str(DATA / name / "counts.h5ad"), "--out", str(run_dir), "--label-key", "label",
           "--until", "cluster", "--cluster-method", method, "--seed", str(seed), "--quiet", "--overwrite",
           "--keep-work"]
    work.mkdir(parents=True, exist_ok=True)
    with open(work / f"{name}_s{seed}_{method}.log", "w") as log:  # the error, if the run fails
        measured = run_measured(cmd, stdout=subprocess.DEVNULL, stderr=log)
    store = RunStore.open(run_dir)  # obs and the kept cells only
    obs = store.read_elem("obs")
    kept = np.asarray(store.read_elem(KEYS.kept_cells), dtype=np.int64)
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    seconds = sum(stages[s]["seconds"] for s in ("ingest", "preprocess", "ltmg", "feature", "pca", "graph", "gae", "cluster")
                  if s in stages)
    n_input = int(json.loads((DATA / name / "stats.json").read_text())["n_cells"])
    pred = np.full(n_input, "-1", dtype=object)
    pred[kept] = obs["scgnn_cluster"].astype(str).to_numpy()
    return pred, {"seconds": seconds, "peak_rss_mb": measured["peak_rss_mb"]}


#: the quality part's methods, by the name --methods takes
QUALITY_METHODS = ("scanpy", "scvi", "scgnn", "louvaink")


def quality(names: list[str], seeds: int, max_steps: int, work: Path, commit: str,
            only: tuple[str, ...] = QUALITY_METHODS) -> list[dict]:
    import scanpy  # noqa: F401  (imported once here, so that no method's seconds count the import)
    import scvi  # noqa: F401

    rows = []
    for name in names:
        _, levels = _read(name)
        methods = [("scanpy", "scanpy default (Leiden 1.0)", partial(scanpy_default, name))]
        if holds_counts(DATA / name):
            methods.append(("scvi", "scVI (latent, Leiden 1.0)", partial(scvi_clusters, name, max_steps=max_steps)))
        # ours before LouvainK: its runs reuse the default run's stages up to the GAE
        methods += [("scgnn", "scgnn-scale default", partial(scgnn_clusters, name, method="leiden", work=work)),
                    ("louvaink", "scGNN rule: LouvainK (scgnn-scale)",
                     partial(scgnn_clusters, name, method="louvaink", work=work))]
        for _, label, fit in (m for m in methods if m[0] in only):
            per_seed = []
            for seed in range(seeds):
                t0 = time.perf_counter()
                pred, extra = fit(seed)
                wall = time.perf_counter() - t0
                kept = pred != "-1"  # cells scgnn-scale's preprocess dropped count as one extra cluster
                scores = {lvl: cluster_scores(truth, np.where(kept, pred, "dropped")) for lvl, truth in levels.items()}
                per_seed.append({"scores": scores, "clusters": int(len(set(pred[kept]))),
                                 "seconds": float((extra or {}).get("seconds", wall)), **(extra or {})})
            for lvl in levels:
                ari = [p["scores"][lvl]["ari"] for p in per_seed]
                nmi = [p["scores"][lvl]["nmi"] for p in per_seed]
                row = {"set": name, "half": split_half(name), "labels": lvl, "method": label, "seeds": seeds,
                       "ari": mean_sd(ari)[0], "ari_sd": mean_sd(ari)[1], "nmi": mean_sd(nmi)[0],
                       "nmi_sd": mean_sd(nmi)[1], "ari_per_seed": [round(a, 3) for a in ari],
                       "clusters": float(np.mean([p["clusters"] for p in per_seed])),
                       "seconds": float(np.mean([p["seconds"] for p in per_seed])), "commit": commit}
                if "epochs" in per_seed[0]:
                    row["scvi_epochs"] = per_seed[0]["epochs"]
                    row["hvg_span"] = per_seed[0]["hvg_span"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# -- imputation ------------------------------------------------------------------------------------------
def masked_counts(masked: Path, entries: FlippedEntries):
    """The masked counts of the run's kept cells x kept genes (CSR)."""
    import anndata

    x = anndata.read_h5ad(masked).X.tocsr()
    return x[entries.kept_cells][:, entries.kept_genes].astype(np.float32)


def magic_predict(counts, seed: int) -> np.ndarray:
    import magic

    transformed, libsize, scale = magic_input(counts)
    smoothed = magic.MAGIC(random_state=seed, n_jobs=1, verbose=0).fit_transform(transformed)
    return magic_counts(np.asarray(smoothed), libsize, scale)


def scvi_predict(counts, seed: int, max_steps: int) -> tuple[np.ndarray, int]:
    import anndata
    import scvi

    scvi.settings.seed = seed
    adata = anndata.AnnData(counts)
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    model.train(max_epochs=scvi_epochs(adata.n_obs, max_steps), enable_progress_bar=False)
    mean = model.get_normalized_expression(library_size="latent", n_samples=25, return_mean=True,
                                           return_numpy=True)
    return np.asarray(mean), int(model.history["elbo_train"].shape[0])


IMPUTATION_PEERS = ("magic", "scvi")


def imputation(names: list[str], rates: list[float], repeats: int, max_steps: int, work: Path,
               commit: str, peers: tuple[str, ...] = IMPUTATION_PEERS) -> list[dict]:
    rows = []
    for name in names:
        for rate in rates:
            out = work / "imputation" / f"{name}_rate{rate:g}"
            cmd = [CLI, "evaluate-imputation", str(DATA / name / "counts.h5ad"), "--out", str(out), "--rate",
                   str(rate), "--repeats", str(repeats), "--seed", "0", "--config", str(TABLE_CONFIG), "--quiet"]
            measured = run_measured(cmd, stdout=subprocess.DEVNULL)
            report = json.loads((out / "report.json").read_text())
            per = {m: [] for m in ("scgnn", "zeros", "knn", *peers)}
            seconds = {"scgnn": measured["seconds"] / repeats, **{m: [] for m in peers}}
            epochs = []
            for rep in report["repeats"]:
                i = rep["repeat"]
                entries = FlippedEntries.of_run(Path(rep["run"]), out / f"repeat_{i}" / "mask.h5",
                                                out / f"repeat_{i}" / "masked.h5ad")
                # the same entries and scale as the run's own scores, or the comparison is void
                zeros = entries.scores(np.zeros((len(entries.kept_cells), len(entries.kept_genes))))
                if len(entries.cells) != rep["n_scored"] or not np.isclose(zeros["rmse"], rep["zeros"]["rmse"]):
                    raise SystemExit(f"{out}: repeat {i}: the peers' entries differ from the run's scored entries")
                for m in ("scgnn", "zeros", "knn"):
                    per[m].append(rep[m])
                counts = masked_counts(out / f"repeat_{i}" / "masked.h5ad", entries)
                if "magic" in peers:
                    t0 = time.perf_counter()
                    per["magic"].append(entries.scores(magic_predict(counts, 0)))
                    seconds["magic"].append(time.perf_counter() - t0)
                if "scvi" in peers:
                    t0 = time.perf_counter()
                    predicted, n_epochs = scvi_predict(counts, 0, max_steps)
                    per["scvi"].append(entries.scores(predicted))
                    seconds["scvi"].append(time.perf_counter() - t0)
                    epochs.append(n_epochs)
            row = {"set": name, "half": split_half(name), "rate": rate, "repeats": repeats,
                   "n_scored": int(np.mean([r["n_scored"] for r in report["repeats"]])), "commit": commit,
                   "scvi_epochs": epochs[0] if epochs else None, "methods": {}}
            for m, scores in per.items():
                row["methods"][m] = {k: v for metric in METRICS
                                     for k, v in zip((metric, f"{metric}_sd"),
                                                     mean_sd([s[metric] for s in scores]), strict=True)}
                if m in seconds:
                    row["methods"][m]["seconds"] = float(np.mean(seconds[m]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# -- tables ------------------------------------------------------------------------------------------------
IMPUTATION_LABELS = (("scgnn", "scGNN (scgnn-scale)"), ("zeros", "no imputation"), ("knn", "kNN smoothing"),
                     ("magic", "MAGIC"), ("scvi", "scVI (denoised)"))


def quality_markdown(rows: list[dict]) -> str:
    lines = ["| set (half) | labels | method | ARI ± SD | NMI ± SD | clusters | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} ({r['half']}) | {r['labels']} | {r['method']} | {r['ari']:.3f} ± {r['ari_sd']:.3f} "
                     f"| {r['nmi']:.3f} ± {r['nmi_sd']:.3f} | {r['clusters']:.1f} | {r['seconds']:.1f} |")
    lines += ["", "| method | sets | mean ARI (labels level 1) | mean NMI | mean ARI, count sets only |",
              "|---|---|---|---|---|"]
    for meth in dict.fromkeys(r["method"] for r in rows):
        level1 = [r for r in rows if r["method"] == meth and r["labels"] == "label"]
        count_sets = [r for r in level1 if holds_counts(DATA / r["set"])]
        lines.append(f"| {meth} | {len(level1)} | {np.mean([r['ari'] for r in level1]):.3f} | "
                     f"{np.mean([r['nmi'] for r in level1]):.3f} | "
                     f"{np.mean([r['ari'] for r in count_sets]) if count_sets else float('nan'):.3f} |")
    return "\n".join(lines)


def imputation_markdown(rows: list[dict]) -> str:
    lines = ["| set (half) | rate | method | median L1 | RMSE | cosine | seconds per masking |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for key, label in IMPUTATION_LABELS:
            if key not in r["methods"]:  # a peer left out (--imputation-peers)
                continue
            m = r["methods"][key]
            cells = [f"{m[x]:.4f} ± {m[x + '_sd']:.4f}" for x in METRICS]
            sec = f"{m['seconds']:.1f}" if "seconds" in m else ""
            first = key == IMPUTATION_LABELS[0][0]
            lines.append(f"| {r['set'] + ' (' + r['half'] + ')' if first else ''} | {r['rate']:g} | {label} | "
                         + " | ".join(cells) + f" | {sec} |")
    return "\n".join(lines)


def print_tables_from(log: Path) -> None:
    if not log.is_file():
        raise SystemExit(f"{log}: no such file")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    quality_rows = [r for r in rows if "labels" in r]
    imputation_rows = [r for r in rows if "methods" in r]
    if not rows:
        raise SystemExit(f"{log}: holds no JSON line of bench_peers.py")
    if quality_rows:
        print(quality_markdown(quality_rows))
    if imputation_rows:
        print(imputation_markdown(imputation_rows))


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every clustering method (default 3)")
    ap.add_argument("--sets", default="", help="comma-separated gold sets of the quality part (default: all)")
    ap.add_argument("--imputation-sets", default="",
                    help="comma-separated count sets of the imputation part (default: every gold count set)")
    ap.add_argument("--rates", default="0.1,0.3", help="fractions of non-zeros flipped (default 0.1,0.3)")
    ap.add_argument("--repeats", type=int, default=3, help="maskings per set and rate (default 3, as the paper)")
    ap.add_argument("--scvi-max-steps", type=int, default=0,
                    help="cap scVI's training at about this many gradient steps, by fewer epochs (default 0: "
                         "scvi-tools' own default, min(400, 400 * 20000 / cells) epochs)")
    ap.add_argument("--tables-from", metavar="LOG",
                    help="print the tables of the JSON lines an earlier invocation printed (e.g. one stopped early)")
    ap.add_argument("--part", choices=("quality", "imputation", "both"), default="both")
    ap.add_argument("--methods", default=",".join(QUALITY_METHODS),
                    help=f"comma-separated methods of the quality part (default: all of {', '.join(QUALITY_METHODS)})")
    ap.add_argument("--imputation-peers", default=",".join(IMPUTATION_PEERS),
                    help="comma-separated peers of the imputation part, of magic and scvi (default both; scVI takes "
                         "5-15 minutes a masking on two cores, and its scores depend on the maskings only, not on "
                         "scgnn-scale's code)")
    args = ap.parse_args()
    if args.tables_from:
        print_tables_from(Path(args.tables_from))
        return
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: the gold data sets are absent")
    known = gold_sets(DATA)
    names = args.sets.split(",") if args.sets else known
    imp_names = (args.imputation_sets.split(",") if args.imputation_sets
                 else [n for n in known if holds_counts(DATA / n)])
    for n in {*names, *imp_names} - set(known):
        raise SystemExit(f"{DATA / n}: not a gold set (one of {', '.join(known)})")
    for n in imp_names:
        if not holds_counts(DATA / n):
            raise SystemExit(f"{DATA / n}: X does not hold counts (stats.json integer_valued); no imputation on it")
    peers = tuple(p for p in args.imputation_peers.split(",") if p)
    if set(peers) - set(IMPUTATION_PEERS):
        raise SystemExit(f"--imputation-peers {args.imputation_peers}: each one of {', '.join(IMPUTATION_PEERS)}")
    only = tuple(args.methods.split(","))
    if set(only) - set(QUALITY_METHODS):
        raise SystemExit(f"--methods {args.methods}: each one of {', '.join(QUALITY_METHODS)}")
    if not Path(CLI).is_file():
        raise SystemExit(f"{CLI}: scgnn-scale is not installed in this environment")
    commit = _commit()
    work = OUT / "peers_runs" / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}_{commit}"
    work.mkdir(parents=True)  # new: never a run directory of older code
    print(f"run directories: {work}", file=sys.stderr, flush=True)
    load = os.getloadavg()
    result = {"commit": commit, "date": time.strftime("%Y-%m-%d", time.gmtime()), "cpus": os.cpu_count(),
              "load_at_start": [round(x, 2) for x in load], "args": vars(args)}
    if args.part in ("quality", "both"):
        result["quality"] = quality(names, args.seeds, args.scvi_max_steps, work / "quality", commit, only)
    if args.part in ("imputation", "both"):
        rates = [float(r) for r in args.rates.split(",")]
        result["imputation"] = imputation(imp_names, rates, args.repeats, args.scvi_max_steps, work, commit, peers)
    result["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"peers_{args.part}.json").write_text(json.dumps(result, indent=1))
    if "quality" in result:
        print(quality_markdown(result["quality"]))
    if "imputation" in result:
        print(imputation_markdown(result["imputation"]))


if __name__ == "__main__":
    main()
