"""Disk of a run directory per stage: the peak while each stage ran, and what each stage leaves behind.

    python bench/bench_disk.py --run-dir RUN --json out.json -- scgnn-scale run atlas.h5ad --out RUN

Runs the command and samples the size of the run directory (the bytes of its files, as
``du --apparent-size`` counts them) every ``--interval`` seconds, with the peak resident memory of its
process tree. Each sample is filed under the stage the run's log (``RUN/run.log``) last reported as
started (``<stage>: started``); when a stage reports done, the
directory is measured once more (what it left). Prints and writes JSON: per stage its peak bytes, the
bytes after it, its seconds; the whole run's peak; and the bytes per cell and gene of each
(``--cells``/``--genes`` given), the base of a projection to other sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

_STARTED = re.compile(r"\b(\w+): started$")
_DONE = re.compile(r"\b(\w+): (?:done in|already done)")


def dir_bytes(root: Path, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes of the files under ``root``, a file with several hard links once, as ``du`` counts them (files
    vanishing while it walks are skipped). A ``seen`` shared between calls counts a linked file under the
    first root that holds it only, as ``du`` does for several arguments."""
    total = 0
    seen = set() if seen is None else seen
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for e in entries:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            st = e.stat(follow_symlinks=False)
                            if st.st_nlink > 1:
                                if (st.st_dev, st.st_ino) in seen:
                                    continue
                                seen.add((st.st_dev, st.st_ino))
                            total += st.st_size
                    except OSError:
                        pass
        except OSError:
            pass
    return total


def tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], run_dir: Path, interval: float = 1.0) -> dict:
    """Run ``cmd``, sampling ``run_dir``; the per-stage disk record (see the module docstring)."""
    stages: dict[str, dict] = {}
    log = run_dir / "run.log"  # a rerun appends to it: follow this invocation's lines only
    state = {"stage": "start", "log_offset": log.stat().st_size if log.is_file() else 0}
    peak = {"bytes": 0, "stage": None, "rss": 0}
    t_start = time.perf_counter()

    def note(stage: str, size: int) -> None:
        rec = stages.setdefault(stage, {"peak_bytes": 0, "started_s": round(time.perf_counter() - t_start, 1)})
        rec["peak_bytes"] = max(rec["peak_bytes"], size)
        if size > peak["bytes"]:
            peak.update(bytes=size, stage=stage)

    def follow_log() -> None:
        """The stage boundaries the run logged since the last look (``RUN/run.log``)."""
        if not log.is_file():
            return
        with open(log, errors="replace") as f:
            f.seek(state["log_offset"])
            text = f.read()
        complete = text[: text.rfind("\n") + 1]
        state["log_offset"] += len(complete.encode())
        for line in complete.splitlines():
            started, finished = _STARTED.search(line), _DONE.search(line)
            if started:
                state["stage"] = started[1]
                note(started[1], dir_bytes(run_dir))
            elif finished and finished[1] in stages:
                size = dir_bytes(run_dir)
                note(finished[1], size)
                rec = stages[finished[1]]
                rec["after_bytes"] = size
                rec["seconds"] = round(time.perf_counter() - t_start - rec["started_s"], 1)
                state["stage"] = f"after {finished[1]}"

    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        follow_log()
        note(state["stage"], dir_bytes(run_dir))
        peak["rss"] = max(peak["rss"], tree_rss(root))
        time.sleep(interval)
    follow_log()
    final = dir_bytes(run_dir)
    note("end", final)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {"stages": stages, "peak_bytes": peak["bytes"], "peak_stage": peak["stage"], "final_bytes": final,
            "seconds": round(time.perf_counter() - t_start, 1), "peak_rss_mb": round(peak["rss"] / 2**20, 1)}


def per_entry(record: dict, cells: int, genes: int) -> dict:
    """Bytes per cell x gene of the peaks, for a projection to other sizes (disk grows with cells x genes)."""
    entries = cells * genes
    out = {"peak_bytes_per_entry": round(record["peak_bytes"] / entries, 3),
           "final_bytes_per_entry": round(record["final_bytes"] / entries, 3)}
    for rec in record["stages"].values():
        rec["peak_bytes_per_entry"] = round(rec["peak_bytes"] / entries, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="the run directory the command writes")
    parser.add_argument("--json", type=Path, help="also write the record here")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--cells", type=int, help="cells of the input (bytes per cell x gene)")
    parser.add_argument("--genes", type=int, help="genes of the input")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command after --")
    record = measure(cmd, args.run_dir, args.interval)
    record["cmd"] = cmd
    if args.cells and args.genes:
        record.update(per_entry(record, args.cells, args.genes))
    text = json.dumps(record, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
