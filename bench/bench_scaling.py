"""End-to-end scaling: simulate N cells x G genes, run the whole method, per-stage seconds and peak RSS.

    python bench/bench_scaling.py --cells 10000,100000 [--genes 2000] [--until impute] [--resume] [--dir DIR]
                                  [-- RUN OPTIONS]

Each size runs from scratch (the run directory DIR/run_NxG, default bench/out, is deleted first, so the peak RSS
covers every stage; ``--resume`` continues it instead). Prints one JSON object per size (per-stage
seconds from the run's manifest, peak RSS of the whole process tree, store size on disk per element)
and the growth exponents of time between sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_disk import dir_bytes  # noqa: E402
from measure import run_measured  # noqa: E402

from scgnn_scale.simulate import drawn_by_default_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def one_size(n: int, genes: int, until: str, extra: list[str], resume: bool = False, out: Path = OUT) -> dict:
    data = out / f"atlas_{n}x{genes}.zarr"
    if not drawn_by_default_model(data):  # missing, or drawn by an earlier simulator model
        sim = run_measured(["scgnn-scale", "simulate", str(data), "--cells", str(n), "--genes", str(genes),
                            "--types", "12", "--quiet", "--overwrite"], stdout=subprocess.DEVNULL)
        print(f"simulate: {n} cells in {sim['seconds']:.1f} s, peak RSS {sim['peak_rss_mb']:.0f} MB", file=sys.stderr,
              flush=True)
    else:
        sim = None
    run_dir = out / f"run_{n}x{genes}"
    if run_dir.exists() and not resume:  # a from-scratch run: its peak RSS covers every stage
        shutil.rmtree(run_dir)
    measured = run_measured(["scgnn-scale", "run", str(data), "--out", str(run_dir), "--until", until,
                             "--label-key", "label", "--overwrite", "--quiet", *extra], stdout=subprocess.DEVNULL)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = {s: e["seconds"] for s, e in manifest["stages"].items()}
    metrics = {}
    for e in manifest["stages"].values():
        metrics.update(e.get("info", {}).get("metrics", {}))
    adata = run_dir / "adata.zarr"
    # a published embedding shares its files with work.zarr (hard links): counted under the first part that
    # holds them (obsm), so work.zarr shows what it holds besides and no file is counted twice among the parts
    seen: set[tuple[int, int]] = set()
    sizes = {p.relative_to(adata).as_posix(): dir_bytes(p, seen) for g in ("X", "layers", "obsm", "obsp")
             for p in ([adata / g] if g == "X" else sorted((adata / g).glob("*")))}
    sizes["work.zarr"] = dir_bytes(run_dir / "work.zarr", seen)
    sizes["run directory"] = dir_bytes(run_dir)
    return {"cells": n, "genes": genes, "simulate": sim, "total_seconds": measured["seconds"],
            "peak_rss_mb": measured["peak_rss_mb"], "stage_seconds": stages, "metrics": metrics,
            "store_bytes": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="10000,100000", help="comma-separated sizes")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--until", default="impute")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in DIR/run_NxG (default: delete it and start from scratch)")
    ap.add_argument("--dir", type=Path, default=OUT,
                    help="where the simulated atlases and run directories go (default: bench/out)")
    ap.add_argument("extra", nargs="*", help="more 'scgnn-scale run' options after --")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in [int(x) for x in args.cells.split(",")]:
        results.append(one_size(n, args.genes, args.until, args.extra, args.resume, args.dir))
        print(json.dumps(results[-1]), flush=True)
    for a, b in zip(results, results[1:], strict=False):
        ratio = math.log(b["cells"] / a["cells"])
        exps = {s: round(math.log(max(b["stage_seconds"][s], 1e-3) / max(a["stage_seconds"][s], 1e-3)) / ratio, 2)
                for s in b["stage_seconds"] if s in a["stage_seconds"]}
        exps["total"] = round(math.log(b["total_seconds"] / a["total_seconds"]) / ratio, 2)
        print(json.dumps({"exponents": f"{a['cells']}->{b['cells']}", **exps}), flush=True)


if __name__ == "__main__":
    main()
