"""The original scGNN (github.com/juexinwang/scGNN) beside scgnn-scale on the same file, on this machine.

    python bench/bench_original.py --original DIR --python PY [--sets klein_subset] [--seeds 0,1,2]
                                   [--modes paper,demo] [--tag T]
    python bench/bench_original.py --summarise T

DIR is a checkout of the original's repository and PY the interpreter of an environment it runs in (its
requirements pin Python 3.7-era versions; on Python 3.11 it runs unchanged with numpy<1.24, networkx<3,
pandas<2, scikit-learn<1.4, scipy<1.12, matplotlib<3.8, umap-learn<0.5.5, numba<0.59, igraph<0.11,
setuptools<70, seaborn, munkres, tqdm and torch). Nothing of it is copied here: it runs as the user of
its README would run it.

For each gold set and seed:

- **the original**: the set's counts written as the CSV its README expects (genes x cells; not timed: our
  run reads the h5ad), then ``PreprocessingscGNN.py --filetype CSV --geneSelectnum 2000`` and ``scGNN.py
  --quickmode --nonsparseMode --no-cuda --seed S``, the two timed together. Its clustering is its default
  (LouvainK), its regularisation its default (``noregu``: LTMG needs R). Modes: ``paper`` (its other
  options at their defaults, the paper's: feature autoencoder 500 epochs, 10 EM iterations of 200) and
  ``demo`` (the README's demonstration: ``--EM-iteration 2 --Regu-epochs 50 --EM-epochs 20``).
- **scgnn-scale**: ``scgnn-scale run counts.h5ad --seed S`` with its defaults, ingest to impute
  (bench_small.run_one).

CPU seconds: user + system of the whole process tree (measure.run_measured). ARI of the final clusters
against ``obs['label']``. One JSON line per run is appended to bench/out/original/<tag>.jsonl;
``--summarise`` prints mean ± SD per (set, method) and the ratio of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_small import DATA, _commit, run_one  # noqa: E402
from measure import run_measured  # noqa: E402
from peer_scoring import cluster_scores  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "original"
MODES = {
    "paper": [],
    "demo": ["--EM-iteration", "2", "--Regu-epochs", "50", "--EM-epochs", "20"],
}


def write_original_input(name: str, work: Path) -> Path:
    """The set's counts as the CSV the original reads: genes in rows, cells in columns, names in the first."""
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    csv = work / "counts.csv"
    if not csv.exists():
        work.mkdir(parents=True, exist_ok=True)
        adata = anndata.read_h5ad(DATA / name / "counts.h5ad")  # a small gold set: whole, as the original reads it
        x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
        pd.DataFrame(x.T, index=adata.var_names, columns=adata.obs_names).to_csv(csv)
    return csv


def run_original(name: str, seed: int, mode: str, original: Path, python: str, tag: str) -> dict:
    import anndata
    import pandas as pd

    base = OUT / "runs" / f"{tag}_{name}_{mode}_s{seed}_{time.strftime('%H%M%S', time.gmtime())}"
    data_dir = base / "data"
    write_original_input(name, data_dir / name)
    out_dir = base / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocess = [python, "-W", "ignore", "PreprocessingscGNN.py", "--datasetName", "counts.csv",
                  "--datasetDir", f"{data_dir / name}/", "--LTMGDir", f"{data_dir / name}/", "--filetype", "CSV",
                  "--geneSelectnum", "2000"]
    method = [python, "-W", "ignore", "scGNN.py", "--datasetName", name, "--datasetDir", f"{data_dir}/",
              "--outputDir", f"{out_dir}/", "--quickmode", "--nonsparseMode", "--no-cuda", "--seed", str(seed),
              *MODES[mode]]
    row = {"set": name, "method": f"original ({mode})", "seed": seed, "tag": tag, "commit": _commit(),
           "date": time.strftime("%Y-%m-%d", time.gmtime())}
    with open(str(base) + ".log", "w") as log:
        try:
            first = run_measured(preprocess, cwd=original, stdout=log, stderr=subprocess.STDOUT)
            second = run_measured(method, cwd=original, stdout=log, stderr=subprocess.STDOUT)
        except RuntimeError as exc:  # the original failed: recorded, its log kept, the other runs go on
            return {**row, "failed": str(exc), "log": str(base) + ".log"}
    labels = pd.read_csv(out_dir / f"{name}_results.txt", index_col=0)["Celltype"]
    labels.index = labels.index.astype(str)  # cell names that look like numbers are read as numbers
    truth = anndata.read_h5ad(DATA / name / "counts.h5ad", backed="r").obs["label"].astype(str)
    truth = truth.loc[labels.index].to_numpy()  # the cells its preprocessing kept
    return {**row, "load_1min": os.getloadavg()[0],
            "cpu_seconds": round(first["cpu_seconds"] + second["cpu_seconds"], 2),
            "wall_seconds": round(first["seconds"] + second["seconds"], 2),
            "peak_rss_mb": max(first["peak_rss_mb"], second["peak_rss_mb"]),
            **cluster_scores(truth, labels.to_numpy()),
            "clusters": int(labels.nunique()), "cells_kept": int(len(labels)), "run_dir": str(base)}


def summarise(tag: str) -> None:
    rows = [json.loads(line) for line in (OUT / f"{tag}.jsonl").read_text().splitlines() if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "failed" in r:
            print(f"{r['set']} {r['method']} seed {r['seed']}: failed ({r['log']})")
            continue
        groups.setdefault((r["set"], r["method"]), []).append(r)

    def ms(values, digits):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"

    ours = {s: statistics.mean(r["cpu_seconds"] for r in rs) for (s, m), rs in groups.items() if m == "scgnn-scale"}
    print("| set | method | seeds | CPU-s, whole process tree | its CPU over scgnn-scale's | ARI | clusters |")
    print("|---|---|---|---|---|---|---|")
    for (name, method), rs in sorted(groups.items()):
        cpu = [r["cpu_seconds"] for r in rs]
        ratio = f"{statistics.mean(cpu) / ours[name]:.1f}x" if name in ours else "-"
        print(f"| {name} | {method} | {','.join(str(r['seed']) for r in rs)} | {ms(cpu, 1)} | {ratio} | "
              f"{ms([r['ari'] for r in rs], 3)} | {'/'.join(str(r['clusters']) for r in rs)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", type=Path, help="a checkout of github.com/juexinwang/scGNN")
    ap.add_argument("--python", help="the interpreter of the environment the original runs in")
    ap.add_argument("--sets", default="klein_subset")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default="paper,demo", help=f"the original's settings, of {', '.join(MODES)}")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--summarise", metavar="TAG")
    args = ap.parse_args()
    if args.summarise:
        summarise(args.summarise)
        return
    if not (args.original and (args.original / "scGNN.py").exists() and args.python):
        ap.error("--original must be a checkout of the original scGNN (holding scGNN.py), with --python")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.sets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows = [run_original(name, seed, mode, args.original.resolve(), args.python, args.tag)
                    for mode in args.modes.split(",")]
            ours = run_one(name, seed, args.tag, "", [])
            rows.append({**{k: ours[k] for k in ("set", "seed", "tag", "commit", "date", "load_1min", "cpu_seconds",
                                                 "wall_seconds", "peak_rss_mb", "ari", "nmi", "clusters", "run_dir")},
                         "method": "scgnn-scale"})
            with open(OUT / f"{args.tag}.jsonl", "a") as f:
                for row in rows:
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")
    summarise(args.tag)


if __name__ == "__main__":
    main()
