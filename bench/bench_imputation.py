"""The paper's imputation benchmark on the count data sets of ../shared/data: scGNN vs zeros vs kNN smoothing.

    python bench/bench_imputation.py [--sets goolam,klein_subset] [--rate 0.1] [--repeats 3] [--config quick.toml]

For each set whose values are counts (``stats.json``: ``integer_valued``; pollen is log-normalised and
left out), runs ``scgnn-scale evaluate-imputation`` (flip ``--rate`` of the non-zeros to zero, run the
whole pipeline, score the flipped entries of kept cells and genes on the log1p scale of X) and reads its
``report.json``. Prints one JSON line per set and a markdown table (median L1, cosine similarity, RMSE;
mean +- std over repeats; lower L1/RMSE and higher cosine are better) with the [impute] options the
runs used (default: input = "recon", the feature AE's first reconstruction as the published reconOri,
200 steps; see scgnn_scale/stages/impute.py), and writes bench/out/imputation_rate<RATE>.json. Wall
seconds and peak RSS (the whole process tree) come from measure.py. The table in bench/RESULTS.md uses
``--config bench/imputation_table.toml`` (no clustering iterations; see that file).
Numbers depend on the machine only through time; name the machine, cores and chunking when quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out"
METHODS = (("scgnn", "scGNN"), ("zeros", "no imputation"), ("knn", "kNN smoothing"))


def count_sets() -> list[str]:
    names = []
    for d in sorted(DATA.iterdir()):
        stats = d / "stats.json"
        if (d / "counts.h5ad").exists() and stats.exists() and json.loads(stats.read_text()).get("integer_valued"):
            names.append(d.name)
    return names


def evaluate(name: str, rate: float, repeats: int, seed: int, config: str | None, reuse: bool) -> dict:
    tag = f"_{Path(config).stem}" if config else ""
    out = OUT / "imputation_runs" / f"{name}_rate{rate:g}_seed{seed}{tag}"
    # a run directory reuses each finished stage whose config matches, whatever code computed it:
    # from scratch unless asked, so the table is this code's
    if not reuse and out.exists():
        shutil.rmtree(out)
    cmd = ["scgnn-scale", "evaluate-imputation", str(DATA / name / "counts.h5ad"), "--out", str(out),
           "--rate", str(rate), "--repeats", str(repeats), "--seed", str(seed), "--quiet"]
    if config:
        cmd += ["--config", config]
    measured = run_measured(cmd, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    scored = [r["n_scored"] for r in report["repeats"]]
    manifest = json.loads((Path(report["repeats"][0]["run"]) / "manifest.json").read_text())
    return {"set": name, "rate": rate, "repeats": repeats, "methods": report["methods"],
            "impute_config": manifest["config"]["impute"],
            "iterate_max_iterations": manifest["config"]["iterate"]["max_iterations"],
            "n_flipped": [r["n_flipped"] for r in report["repeats"]], "n_scored": scored,
            "scgnn_beats_both_on_median_l1": report["methods"]["scgnn"]["median_l1"]
            < min(report["methods"]["zeros"]["median_l1"], report["methods"]["knn"]["median_l1"]),
            **measured}


def markdown(rows: list[dict]) -> str:
    configs = {json.dumps(row.get("impute_config", {}), sort_keys=True) for row in rows}
    lines = [f"[impute] options: {' / '.join(sorted(configs))}", "","| data set | rate | method | median L1 | cosine | RMSE | scored entries | seconds | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for key, label in METHODS:
            m = row["methods"][key]
            cells = [f"{m[x]:.4f} ± {m[x + '_std']:.4f}" for x in ("median_l1", "cosine", "rmse")]
            first = key == METHODS[0][0]
            lines.append(f"| {row['set'] if first else ''} | {row['rate']:g} | {label} | " + " | ".join(cells)
                         + f" | {sum(row['n_scored']) // len(row['n_scored']) if first else ''}"
                         + f" | {row['seconds'] if first else ''} | {row['peak_rss_mb'] if first else ''} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="", help="comma-separated set names (default: every count set)")
    ap.add_argument("--rate", type=float, default=0.1, help="fraction of non-zeros flipped (default 0.1)")
    ap.add_argument("--repeats", type=int, default=3, help="maskings per set (default 3, as the paper)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the maskings")
    ap.add_argument("--config", default=None, help="TOML config of the runs (e.g. fewer steps for a quick look)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the runs already in bench/out/imputation_runs (by default they are redone: "
                         "they may come from older code)")
    args = ap.parse_args()
    names = args.sets.split(",") if args.sets else count_sets()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        row = evaluate(name, args.rate, args.repeats, args.seed, args.config, args.reuse)
        print(json.dumps(row), flush=True)
        rows.append(row)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    (OUT / f"imputation_rate{args.rate:g}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
