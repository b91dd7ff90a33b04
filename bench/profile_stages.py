"""Where the time goes: each stage of a run sampled with py-spy, summarised per stage.

    python bench/profile_stages.py --cells 100000 [--genes 2000] [--stages feature,gae] [--rate 20]
    python bench/profile_stages.py --summarise bench/out/profile_100k/feature.txt
    python bench/profile_stages.py --attach PID --stage-log RUN.log --cells 1000000

Runs the simulated atlas of bench_scaling.py (made if missing) stage by stage, ``scgnn-scale run
--until STAGE`` under ``py-spy record --subprocesses`` (the earlier stages are reused from the same
run directory, so each profile holds one stage: its main thread, loader threads and Dask workers).
Samples are on-CPU stacks (py-spy without ``--idle``): a thread waiting on I/O or a lock is not
counted, so a stage's samples can exceed its wall seconds times one core. For each stage it prints
the wall seconds and the heaviest (scgnn-scale function -> leaf function) pairs by share of samples,
as JSON lines and a markdown table, and writes bench/out/profile_<N>/summary.json.
``--attach`` samples a run that is already going (e.g. bench_scaling.py's 1M run, too long to run
twice) in windows of ``--window`` seconds, ``py-spy --nonblocking`` so the run is never paused; each
window is filed under the stage the run's log (its stderr) last reported as started when the window
began, so a window that spans a stage's end is counted to that stage. Files go to
bench/out/profile_<N>/attach/ and are merged per stage when the run exits.
Needs py-spy (the bench extra) and permission to sample child processes.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
STAGES = ["ingest", "preprocess", "ltmg", "feature", "pca", "graph", "gae", "cluster", "iterate", "impute"]
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def _split(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    return (m["func"], m["file"]) if m else (frame, "")


def summarise(path: Path, top: int = 10) -> dict:
    """Heaviest (innermost scgnn-scale frame -> leaf frame) pairs of a py-spy raw (collapsed) file."""
    pairs: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_split(f) for f in stack.split(";")[1:]]  # the first frame names the process
        if not frames:
            continue
        n = int(count)
        total += n
        ours = [f"{func} ({file.split('scgnn_scale/')[-1]})" for func, file in frames if "scgnn_scale/" in file]
        leaf_func, leaf_file = frames[-1]
        leaf = f"{leaf_func} ({leaf_file.split('site-packages/')[-1]})"
        pairs[(ours[-1] if ours else "(outside scgnn-scale: imports, Dask, threads)", leaf)] += n
    return {"samples": total,
            "top": [{"in": a, "leaf": b, "share": round(c / max(total, 1), 4)} for (a, b), c in pairs.most_common(top)]}


def profile(cells: int, genes: int, stages: list[str], rate: int) -> list[dict]:
    data = OUT / f"atlas_{cells}x{genes}.zarr"
    from scgnn_scale.simulate import drawn_by_default_model

    if not drawn_by_default_model(data):
        subprocess.run(["scgnn-scale", "simulate", str(data), "--cells", str(cells), "--genes", str(genes),
                        "--types", "12", "--quiet", "--overwrite"], check=True)
    where = OUT / f"profile_{cells}"
    where.mkdir(parents=True, exist_ok=True)
    run_dir = where / "run"
    rows = []
    for stage in STAGES[: max(STAGES.index(s) for s in stages) + 1]:
        cmd = ["scgnn-scale", "run", str(data), "--out", str(run_dir), "--until", stage, "--overwrite", "--quiet"]
        if stage not in stages:  # an earlier stage the profiled ones need: run it unsampled
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            continue
        raw = where / f"{stage}.txt"
        t0 = time.perf_counter()
        subprocess.run(["py-spy", "record", "--subprocesses", "--rate", str(rate), "--format", "raw",
                        "-o", str(raw), "--", *cmd], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        rows.append({"stage": stage, "cells": cells, "wall_seconds": round(time.perf_counter() - t0, 1),
                     "stage_seconds": manifest["stages"][stage]["seconds"], **summarise(raw)})
        print(json.dumps(rows[-1]), flush=True)
    (where / "summary.json").write_text(json.dumps(rows, indent=1))
    return rows


_STARTED = re.compile(r"^(\w+): started", re.M)


def attach(pid: int, stage_log: Path, cells: int, rate: int, window: int) -> list[dict]:
    """Sample the running process ``pid`` window by window, filed by the stage its log names."""
    where = OUT / f"profile_{cells}" / "attach"
    where.mkdir(parents=True, exist_ok=True)
    seconds: collections.Counter = collections.Counter()
    i = 0
    while Path(f"/proc/{pid}").exists():
        started = _STARTED.findall(stage_log.read_text(errors="replace")) if stage_log.exists() else []
        stage = started[-1] if started else "start"
        t0 = time.perf_counter()
        subprocess.run(["py-spy", "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate",
                        str(rate), "--duration", str(window), "--format", "raw",
                        "-o", str(where / f"{i:05d}_{stage}.txt")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds[stage] += time.perf_counter() - t0
        i += 1
    rows = []
    for stage in [s for s in ["start", *STAGES] if seconds[s]]:
        merged = where.parent / f"{stage}.txt"
        merged.write_text("".join(f.read_text() for f in sorted(where.glob(f"*_{stage}.txt"))))
        rows.append({"stage": stage, "cells": cells, "sampled_seconds": round(seconds[stage], 1), **summarise(merged)})
        print(json.dumps(rows[-1]), flush=True)
    (where.parent / "summary.json").write_text(json.dumps(rows, indent=1))
    return rows


def markdown(rows: list[dict], top: int = 5) -> str:
    lines = ["| stage | seconds | share | in (scgnn-scale) | leaf |", "|---|---|---|---|---|"]
    for row in rows:
        for i, t in enumerate(row["top"][:top]):
            first = i == 0
            lines.append(f"| {row['stage'] if first else ''} | {row.get('stage_seconds', row.get('sampled_seconds', '')) if first else ''} | "
                         f"{t['share']:.1%} | {t['in']} | {t['leaf']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to sample (default: all)")
    ap.add_argument("--rate", type=int, default=20, help="samples per second (default 20)")
    ap.add_argument("--summarise", nargs="+", metavar="RAW", help="only summarise existing py-spy raw files")
    ap.add_argument("--attach", type=int, metavar="PID", help="sample this running 'scgnn-scale run' instead")
    ap.add_argument("--stage-log", type=Path, help="with --attach: the run's stderr log (names the stages)")
    ap.add_argument("--window", type=int, default=60, help="with --attach: seconds per sampling window")
    args = ap.parse_args()
    if args.attach:
        rows = attach(args.attach, args.stage_log or Path("/dev/null"), args.cells, args.rate, args.window)
    elif args.summarise:
        rows = [{"stage": Path(p).stem, **summarise(Path(p))} for p in args.summarise]
        for row in rows:
            print(json.dumps(row))
    else:
        stages = [s for s in args.stages.split(",") if s]
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            sys.exit(f"profile_stages.py: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
        rows = profile(args.cells, args.genes, stages, args.rate)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
