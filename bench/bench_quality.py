"""Clustering quality on the gold-labelled data sets of ../shared/data, scgnn-scale vs the scanpy default.

    python bench/bench_quality.py [--sets klein_subset,goolam] [--seeds 3] [--full [--full-seeds 1] [--full-louvaink]]

For each set (every folder with a counts.h5ad, zeisel15 included), in the same run: the scanpy default
pipeline (normalize_total, log1p, 2000 HVG, PCA 50, kNN 15, Leiden 1.0; mean over seeds) and
scgnn-scale one pass (``--until cluster``) with the default cluster rule and with the paper's LouvainK;
with ``--full`` also the whole method (``--until impute``: iterations, then the imputation autoencoder)
with the default rule, and with ``--full-louvaink`` with
LouvainK too. The iterative rows score the final clusters; their seconds are the stages through
``iterate``, with ``impute_seconds`` and ``imputed`` (``layers/imputed`` written) beside them.
Every invocation works in a new directory, bench/out/quality_runs/<UTC time>_<commit>: a run directory
reuses each finished stage whose config matches, and the code version is not part of that match, so
runs left by older code would give older results. Within one invocation the variants of a set and seed
share one run directory (LouvainK reuses the Leiden run's stages up to the GAE).
Prints JSON lines (ARI/NMI means, their SD over seeds and each seed's ARI; ``ari_label_level2`` and
``nmi_label_level2`` beside them on a set with a second label level, zeisel15's 48 subclasses) and a markdown table;
writes bench/out/quality.json.
Needs the bench extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from measure import run_measured  # noqa: E402
from peer_scoring import label_levels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out"
NOT_GOLD = {"10x_pbmc4k_top2000"}  # vendor clustering, not gold labels (shared/data/README.md)


def scanpy_leiden(adata, seed: int) -> np.ndarray:
    """scanpy's default pipeline on counts (normalise, log1p, 2,000 HVGs, PCA 50, kNN 15, Leiden 1.0): the
    clusters of each cell. ``adata`` is changed in place."""
    import scanpy as sc

    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=min(2000, adata.n_vars))
    adata = adata[:, adata.var["highly_variable"]].copy()
    sc.pp.pca(adata, n_comps=min(50, adata.n_vars - 1, adata.n_obs - 1), random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=15, random_state=seed, transformer="sklearn")
    sc.tl.leiden(adata, resolution=1.0, random_state=seed, flavor="igraph", n_iterations=2)
    return adata.obs["leiden"].to_numpy()


def scanpy_baseline(name: str, seed: int) -> dict:
    import anndata
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    adata = anndata.read_h5ad(DATA / name / "counts.h5ad")
    labels = adata.obs["label"].astype(str).to_numpy()
    deeper = _deeper_levels(adata.obs, np.arange(adata.n_obs))
    pred = scanpy_leiden(adata, seed)
    return {"ari": adjusted_rand_score(labels, pred), "nmi": normalized_mutual_info_score(labels, pred),
            "clusters": int(len(set(pred))), **_level_scores(deeper, pred)}


def _deeper_levels(obs, cells) -> dict:
    """The further label levels of an input obs (zeisel15's ``label_level2``) at the given input cells."""
    return {c: obs[c].astype(str).to_numpy()[cells] for c in label_levels(obs.columns)[1:]}


def _level_scores(levels: dict, pred) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    out = {}
    for level, truth in levels.items():
        out[f"ari_{level}"] = adjusted_rand_score(truth, pred)
        out[f"nmi_{level}"] = normalized_mutual_info_score(truth, pred)
    return out


def scgnn_row(name: str, until: str, method: str, seed: int, work: Path) -> dict:
    import anndata
    import zarr
    from anndata.io import read_elem
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from scgnn_scale.keys import KEYS
    from scgnn_scale.store import RunStore

    # one run directory per set and seed: variants reuse the stages whose config chain matches
    # (--keep-work: a variant's iterate starts from the feature AE's reconstruction kept on disk)
    run_dir = work / f"{name}_s{seed}"
    cmd = ["scgnn-scale", "run", str(DATA / name / "counts.h5ad"), "--out", str(run_dir), "--label-key", "label",
           "--until", until, "--cluster-method", method, "--seed", str(seed), "--quiet", "--overwrite",
           "--keep-work"]
    work.mkdir(parents=True, exist_ok=True)
    with open(work / f"{name}_s{seed}_{until}_{method}.log", "w") as log:  # the error, if the run fails
        measured = run_measured(cmd, stdout=subprocess.DEVNULL, stderr=log)
    result = zarr.open_group(run_dir / "adata.zarr", mode="r")  # obs only: never the expression matrices
    obs = read_elem(result["obs"])
    truth, pred = obs["label"].astype(str).to_numpy(), obs["scgnn_cluster"].astype(str).to_numpy()
    # further label levels are not carried into the run: read them at the cells preprocess kept
    input_obs = anndata.read_h5ad(DATA / name / "counts.h5ad", backed="r").obs
    kept = np.asarray(RunStore.open(run_dir).read_elem(KEYS.kept_cells), dtype=np.int64)
    levels = _level_scores(_deeper_levels(input_obs, kept), pred)
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    order = ["ingest", "preprocess", "ltmg", "feature", "pca", "graph", "gae", "cluster", "iterate"]
    last = "iterate" if until == "impute" else until  # impute does not change the clusters
    seconds = sum(stages[s]["seconds"] for s in order[: order.index(last) + 1] if s in stages)
    whole = {}
    if until == "impute":
        whole = {"impute_seconds": stages["impute"]["seconds"], "imputed": "layers/imputed" in result}
    # seconds: the stages this result needs (from the manifest, whichever invocation ran them);
    # peak RSS: of this invocation, which may have reused earlier stages
    return {"ari": adjusted_rand_score(truth, pred), "nmi": normalized_mutual_info_score(truth, pred),
            "clusters": int(len(set(pred))), "seconds": seconds, "peak_rss_mb": measured["peak_rss_mb"], **whole,
            **levels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="", help="comma-separated set names (default: every set in ../shared/data)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also the whole method (--until impute)")
    ap.add_argument("--full-seeds", type=int, default=0,
                    help="with --full, run the whole method on the first N seeds only (default: all --seeds)")
    ap.add_argument("--full-louvaink", action="store_true",
                    help="with --full, also iterate with the paper's LouvainK (the slowest row)")
    ap.add_argument("--_scanpy", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._scanpy:
        print(json.dumps(scanpy_baseline(args._scanpy[0], int(args._scanpy[1]))))
        return
    names = args.sets.split(",") if args.sets else sorted(p.name for p in DATA.iterdir() if (p / "counts.h5ad").exists())
    OUT.mkdir(parents=True, exist_ok=True)
    commit = _commit()
    work = OUT / "quality_runs" / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}_{commit}"
    work.mkdir(parents=True)  # new: never a run directory of older code
    print(f"run directories: {work}", file=sys.stderr, flush=True)
    rows = []
    variants = [("cluster", "leiden"), ("impute", "leiden"), ("cluster", "louvaink"), ("impute", "louvaink")]
    if not args.full:
        variants = [v for v in variants if v[0] == "cluster"]
    elif not args.full_louvaink:
        variants = [v for v in variants if v != ("impute", "louvaink")]
    for name in names:
        per = []
        for seed in range(args.seeds):
            out = subprocess.run([sys.executable, __file__, "--_scanpy", name, str(seed)], capture_output=True,
                                 text=True, check=True)
            per.append(json.loads(out.stdout.strip().splitlines()[-1]))
        m = run_measured([sys.executable, __file__, "--_scanpy", name, "0"], stdout=subprocess.DEVNULL)
        rows.append({"set": name, "method": "scanpy default (Leiden 1.0)", "gold": name not in NOT_GOLD,
                     **_mean(per), **m, "commit": commit})
        print(json.dumps(rows[-1]), flush=True)
        for until, method in variants:
            seeds = args.full_seeds if until == "impute" and args.full_seeds else args.seeds
            per = [scgnn_row(name, until, method, seed, work) for seed in range(seeds)]
            label = f"scgnn-scale {'one pass' if until == 'cluster' else 'iterative'} ({method})"
            rows.append({"set": name, "method": label, "gold": name not in NOT_GOLD, **_mean(per),
                         "commit": commit})
            print(json.dumps(rows[-1]), flush=True)
    (OUT / "quality.json").write_text(json.dumps(rows, indent=1))
    print(_markdown(rows))


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _mean(per: list[dict]) -> dict:
    keys = per[0].keys()
    mean = {k: round(float(np.mean([p[k] for p in per])), 3) for k in keys if k != "returncode"}
    spread = {f"{k}_sd": round(float(np.std([p[k] for p in per])), 3) for k in ("ari", "nmi")}
    return {**mean, **spread, "seeds": len(per), "ari_per_seed": [round(float(p["ari"]), 3) for p in per]}


def _markdown(rows: list[dict]) -> str:
    lines = ["| set | method | seeds | ARI (SD) | NMI | clusters | seconds | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']}{'' if r['gold'] else ' (labels not gold)'} | {r['method']} | {r['seeds']} | "
                     f"{r['ari']:.3f} ({r['ari_sd']:.3f}) | {r['nmi']:.3f} | {r['clusters']:.1f} | "
                     f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
        for level in [k[len("ari_"):] for k in r if k.startswith("ari_label_level")]:
            lines.append(f"| {r['set']} ({level}) | {r['method']} | {r['seeds']} | {r[f'ari_{level}']:.3f} | "
                         f"{r[f'nmi_{level}']:.3f} | | | |")
    methods = sorted({r["method"] for r in rows})
    lines.append("")
    lines.append("| method | mean ARI over gold sets | mean NMI |")
    lines.append("|---|---|---|")
    for meth in methods:
        gold = [r for r in rows if r["method"] == meth and r["gold"]]
        if gold:
            lines.append(f"| {meth} | {np.mean([r['ari'] for r in gold]):.3f} | {np.mean([r['nmi'] for r in gold]):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
