"""CPU of the whole method on small and medium sets, per stage, with the ARI of its clusters.

    python bench/bench_small.py --sets klein_subset,worm_neuron --seeds 0,1,2 --tag after
    python bench/bench_small.py --sets sim8000 --seeds 0 --tag before --config bench/old_schedule.toml

Each (set, seed) is one fresh ``scgnn-scale run`` end to end (impute included) in a new run
directory. A set is a name under ../shared/data, or ``simN`` (``scgnn-scale simulate --cells N``, made
once under bench/out). CPU seconds: of the whole process tree (:func:`measure.run_measured`); per stage,
the CPU of the run's process while the stage ran (the manifest's ``cpu_seconds``: Dask's embedded
workers are threads of that process). ARI and NMI of the final clusters against ``obs['label']``, and
the first pass's ARI (before the iteration). One JSON line per run is appended to
bench/out/small/<tag>.jsonl; ``--summarise TAG`` prints mean and SD per set as a markdown table.
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
from gold_split import HALF_A, HALF_B  # noqa: E402
from measure import run_measured  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
OUT = Path(__file__).resolve().parent / "out" / "small"
STAGES = ["ingest", "preprocess", "ltmg", "feature", "pca", "graph", "gae", "cluster", "iterate", "impute"]


def _cli() -> list[str]:
    return [sys.executable, "-m", "scgnn_scale.cli"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package, whatever is installed


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def input_of(name: str) -> Path:
    """The input file of a set: a gold set's counts.h5ad, or a simulated atlas made once."""
    if name.startswith("sim"):
        cells = int(name[3:])
        path = OUT / f"{name}.zarr"
        from scgnn_scale.simulate import drawn_by_default_model

        if not drawn_by_default_model(path):
            OUT.mkdir(parents=True, exist_ok=True)
            subprocess.run([*_cli(), "simulate", str(path), "--cells", str(cells), "--quiet", "--overwrite"], check=True,
                           env=_env())
        return path
    return DATA / name / "counts.h5ad"


def half_of(name: str) -> str:
    return "A" if name in HALF_A else "B" if name in HALF_B else "-"


def run_one(name: str, seed: int, tag: str, config: str, extra: list[str]) -> dict:
    import zarr
    from anndata.io import read_elem
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    run_dir = OUT / "runs" / f"{tag}_{name}_s{seed}_{time.strftime('%H%M%S', time.gmtime())}"
    cmd = [*_cli(), "run", str(input_of(name)), "--out", str(run_dir), "--label-key", "label", "--seed", str(seed),
           "--quiet", *(["--config", config] if config else []), *extra]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(str(run_dir) + ".log", "w") as log:
        measured = run_measured(cmd, stdout=subprocess.DEVNULL, stderr=log, env=_env())
    obs = read_elem(zarr.open_group(run_dir / "adata.zarr", mode="r")["obs"])
    truth, pred = obs["label"].astype(str).to_numpy(), obs["scgnn_cluster"].astype(str).to_numpy()
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    it = stages["iterate"]["info"] if "iterate" in stages else {}  # absent with --until cluster
    history = it.get("history", [])
    return {
        "set": name, "half": half_of(name), "seed": seed, "tag": tag, "commit": _commit(), "config": config,
        "extra": extra, "date": time.strftime("%Y-%m-%d", time.gmtime()), "load_1min": os.getloadavg()[0],
        "cpu_seconds": measured["cpu_seconds"], "wall_seconds": measured["seconds"],
        "peak_rss_mb": measured["peak_rss_mb"],
        "ari": adjusted_rand_score(truth, pred), "nmi": normalized_mutual_info_score(truth, pred),
        "clusters": int(len(set(pred))),
        "first_pass_ari": stages["cluster"]["info"].get("metrics", {}).get("ari"),
        "run_dir": str(run_dir), "cluster_info": {k: v for k, v in stages["cluster"]["info"].items()
                                                  if k not in ("sizes", "metrics")},
        "iterations": it.get("iterations"), "stopped": it.get("stopped"),
        "iteration_ari": [h.get("ari_to_label") for h in history],
        "stage_cpu": {s: stages[s]["info"].get("cpu_seconds") for s in STAGES if s in stages},
        "stage_seconds": {s: stages[s]["seconds"] for s in STAGES if s in stages},
        "steps": {"feature": stages["feature"]["info"].get("steps_run"),
                  "gae": stages["gae"]["info"].get("steps"),
                  "impute": stages["impute"]["info"].get("steps_run") if "impute" in stages else None},
    }


def summarise(tag: str) -> None:
    rows = [json.loads(line) for line in (OUT / f"{tag}.jsonl").read_text().splitlines() if line.strip()]
    by_set: dict[str, list[dict]] = {}
    for r in rows:
        by_set.setdefault(r["set"], []).append(r)

    def ms(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    print("| set | half | seeds | CPU-s whole run | " + " | ".join(STAGES) + " | iterations | ARI | first-pass ARI |")
    print("|---" * (len(STAGES) + 7) + "|")
    for name, rs in by_set.items():
        cpu = [r["cpu_seconds"] for r in rs]
        stage_cells = [f"{statistics.mean([r['stage_cpu'].get(s) or 0 for r in rs]):.1f}" for s in STAGES]
        its = "/".join(str(r["iterations"]) for r in rs)
        print(f"| {name} | {rs[0]['half']} | {len(rs)} | {statistics.mean(cpu):.1f} ± "
              f"{statistics.stdev(cpu) if len(cpu) > 1 else 0:.1f} | " + " | ".join(stage_cells)
              + f" | {its} | {ms([r['ari'] for r in rs])} | {ms([r['first_pass_ari'] for r in rs])} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="klein_subset")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--config", default="", help="TOML of options for every run (e.g. the old schedule)")
    ap.add_argument("--summarise", metavar="TAG")
    args, extra = ap.parse_known_args()
    if args.summarise:
        summarise(args.summarise)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.sets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = run_one(name, seed, args.tag, args.config, extra)
            with open(OUT / f"{args.tag}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("set", "seed", "cpu_seconds", "ari", "first_pass_ari",
                                                  "iterations", "stage_cpu")}), flush=True)


if __name__ == "__main__":
    main()
