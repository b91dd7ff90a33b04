"""``scgnn-scale verify``: check every file a run keeps against the record made when its stage finished."""

from __future__ import annotations

import time
from pathlib import Path

from .store import RunStore


def verify_run(run_dir: str | Path, *, full: bool = True, progress: bool = False) -> dict:
    """Check a run directory; returns ``{"damaged": [Damage...], "files", "arrays", "bytes_read", "seconds",
    "sealed"}`` (``sealed`` False for a run made before the record existed: nothing could be checked)."""
    from .progress import progress_bar

    store = RunStore.open(run_dir, check=False)
    record = store.integrity
    total = sum(entry[0] for entry in record.files.values())
    t0 = time.perf_counter()
    with progress_bar(total, "verify", "B", quiet=not progress, unit_scale=True) as bar:
        damaged, counts = record.check(full=full, progress=bar.update)
    record.mark_damaged(damaged)  # the next run's quick check then sees them and redoes their stages
    return {"damaged": damaged, **counts, "seconds": time.perf_counter() - t0, "sealed": record.present,
            "run_dir": str(store.root), "full": full}


def format_report(report: dict) -> str:
    if not report["sealed"]:
        return (f"{report['run_dir']}: no integrity record (integrity.json): the run was made by a version "
                "before it; nothing could be checked")
    how = "checksummed" if report["full"] else "checked (quick)"
    head = (f"{report['run_dir']}: {how} {report['files']} files of {report['arrays']} arrays "
            f"({report['bytes_read'] / 1e6:.1f} MB read) in {report['seconds']:.1f} s")
    if not report["damaged"]:
        return f"{head}: no damage"
    lines = [f"{head}: {len(report['damaged'])} damaged"]
    lines += [f"damaged: {d.line()}" for d in report["damaged"]]
    lines.append("rerun the same 'scgnn-scale run' command to redo the stages that made them")
    return "\n".join(lines)
