"""Follow a run going on in another process: print each stage as its manifest records it, until the
process ends or ``--wait`` seconds pass, then a table of the stages so far (used by gpu_bench.sh for a
run that outlasts one call).

    python bench/follow_run.py --pid PID --run RUN_DIR [--wait SECONDS] [--every SECONDS]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil

from scgnn_scale.pipeline import STAGE_NAMES


def recorded_stages(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "manifest.json").read_text()).get("stages", {})
    except (OSError, ValueError):  # not written yet, or being replaced
        return {}


def stage_table(stages: dict) -> str:
    """Markdown table: stage, seconds, the process's peak RSS so far, and the stage's headline numbers."""
    rows = ["| stage | seconds | peak RSS MiB | notes |", "|---|---|---|---|"]
    for name, entry in sorted(stages.items(), key=lambda item: STAGE_NAMES.index(item[0])):
        info = entry.get("info", {})
        notes = {k: info[k] for k in ("cells_per_s", "loader_wait_fraction", "recall", "method", "n_clusters")
                 if k in info}
        notes.update({k: round(v, 3) for k, v in (info.get("metrics") or {}).items() if k in ("ari", "nmi")})
        rows.append(f"| {name} | {entry.get('seconds', 0):.1f} | {info.get('peak_rss_mb', '')} | "
                    f"{', '.join(f'{k} {v}' for k, v in notes.items())} |")
    total = sum(e.get("seconds", 0) for e in stages.values())
    rows.append(f"| **total** | {total:.1f} | | |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pid", type=int, required=True, help="the process running the benchmark")
    ap.add_argument("--run", type=Path, required=True, help="its run directory (holds manifest.json)")
    ap.add_argument("--wait", type=float, default=300, help="seconds to follow it at most")
    ap.add_argument("--every", type=float, default=5, help="seconds between looks")
    args = ap.parse_args()
    t0, seen = time.monotonic(), set()
    while True:
        alive = psutil.pid_exists(args.pid) and psutil.Process(args.pid).status() != psutil.STATUS_ZOMBIE
        for name, entry in recorded_stages(args.run).items():
            if name not in seen:
                seen.add(name)
                info = entry.get("info", {})
                print(json.dumps({"stage": name, "seconds": entry.get("seconds"),
                                  "peak_rss_mb": info.get("peak_rss_mb"), "metrics": info.get("metrics")}),
                      flush=True)
        if not alive or time.monotonic() - t0 > args.wait:
            print(json.dumps({"finished": not alive, "followed_s": round(time.monotonic() - t0, 1)}))
            print(stage_table(recorded_stages(args.run)), flush=True)
            return
        time.sleep(args.every)


if __name__ == "__main__":
    main()
