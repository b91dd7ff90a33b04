"""Follow a run going on in another process: print each stage as its manifest records it, until the
process ends or ``--wait`` seconds pass (used by gpu_bench.sh for a run that outlasts one call).

    python bench/follow_run.py --pid PID --run RUN_DIR [--wait SECONDS] [--every SECONDS]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil


def recorded_stages(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "manifest.json").read_text()).get("stages", {})
    except (OSError, ValueError):  # not written yet, or being replaced
        return {}


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
        if not alive:
            print(json.dumps({"finished": True, "followed_s": round(time.monotonic() - t0, 1)}), flush=True)
            return
        if time.monotonic() - t0 > args.wait:
            print(json.dumps({"finished": False, "followed_s": round(time.monotonic() - t0, 1),
                              "stages_done": sorted(seen)}), flush=True)
            return
        time.sleep(args.every)


if __name__ == "__main__":
    main()
