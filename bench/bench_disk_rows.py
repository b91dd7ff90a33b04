"""Peak RSS and CPU of one gather from the GAE's scratch file: 64 MB windows against the whole file mapped.

    python bench/bench_disk_rows.py [--cells 2000000] [--rows 130000]

Writes an N x 128 float32 scratch file of random rows under bench/out/disk_rows (through
``graph_autoencoder.DiskRows``), then in a fresh process per setting gathers the same sorted random rows 5
times (after one untimed gather, so the file is in the page cache) and prints one JSON line: peak RSS
(``ru_maxrss``), user + system CPU-s per gather, and whether the rows equal numpy's ``take``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out" / "disk_rows"

GATHER = """
import json, resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from scgnn_scale.graph_autoencoder import DiskRows
path, n, rows, setting = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
table = DiskRows(path, (n, 128), create=False)
ids = np.sort(np.random.default_rng(0).choice(n, rows, replace=False))

def whole(ids):  # the gather before 536da5c: the whole file mapped for each gather
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=(n, 128))
    out = mapped.take(ids, axis=0)
    del mapped
    return out

gather = whole if setting == "whole file" else table.take
first = gather(ids)
r0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(5):
    gather(ids)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"setting": setting, "cells": n, "rows": rows, "peak_rss_mb": round(r1.ru_maxrss / 1024),
                  "cpu_s_per_gather": round((r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / 5, 3),
                  "equal": bool(np.array_equal(first, whole(ids)))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=2_000_000)
    ap.add_argument("--rows", type=int, default=130_000)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import numpy as np

    from scgnn_scale.graph_autoencoder import DiskRows

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"table_{args.cells}.f32"
    if not path.exists() or path.stat().st_size != args.cells * 128 * 4:
        table = DiskRows(path, (args.cells, 128))
        rng = np.random.default_rng(0)
        for a in range(0, args.cells, 1 << 18):
            b = min(args.cells, a + (1 << 18))
            table.write(a, rng.standard_normal((b - a, 128), dtype=np.float32))
    for setting in ("whole file", "64 MB windows"):
        subprocess.run([sys.executable, "-c", GATHER, str(REPO), str(path), str(args.cells), str(args.rows), setting],
                       check=True)


if __name__ == "__main__":
    main()
