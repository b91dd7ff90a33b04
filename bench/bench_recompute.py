"""What computing a reconstruction as it is read costs against reading it stored.

    python bench/bench_recompute.py RUN_DIR [--repeats 2] [--threads 1]

``RUN_DIR`` holds ``work/recon`` (a run with ``--keep-work``, or one stopped before its end), the
first pass's embedding and ``models/feature_ae.pt``. Times, block by block as the loaders read them:
reading ``work/recon`` from the store; computing the same rows as ``decoder(embedding)``
(:class:`scgnn_scale.reconstruction.DecodedRows`); writing them once more into a scratch array in the
work codec (what storing costs on top, once). Prints JSON: seconds and cells/s of each, the largest
difference between the stored and the computed rows, and bytes of the stored array.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def _timed_pass(array, block_rows: int, sink=None) -> float:
    t0 = time.perf_counter()
    for a in range(0, array.shape[0], block_rows):
        block = array[a:a + block_rows]
        if sink is not None:
            sink[a:a + block_rows] = block
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import torch

    from scgnn_scale.keys import FIRST_PASS, KEYS
    from scgnn_scale.reconstruction import DecodedRows
    from scgnn_scale.store import RunStore, Staging

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the training loops leave one core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    store = RunStore.open(args.run_dir)
    if not store.has(KEYS.recon):
        raise SystemExit(f"{args.run_dir}: holds no work/recon (run with --keep-work)")
    stored = store.open_array(KEYS.recon)
    computed = DecodedRows(store.model_path("feature_ae"), store.path_of(FIRST_PASS.feature_embedding))
    block = int(stored.chunks[0])
    n = int(stored.shape[0])
    max_diff = 0.0
    for a in range(0, n, block):
        max_diff = max(max_diff, float(np.abs(stored[a:a + block] - computed[a:a + block]).max()))
    read = min(_timed_pass(stored, block) for _ in range(args.repeats))
    decode = min(_timed_pass(computed, block) for _ in range(args.repeats))
    scratch = Staging(store, "bench_recompute")  # never committed, removed below
    try:
        sink = scratch.create_matrix("work/bench_recompute", tuple(stored.shape), np.float32)
        write = _timed_pass(computed, block, sink=sink) - decode
    finally:
        shutil.rmtree(scratch.root, ignore_errors=True)
    path = Path(store.path_of(KEYS.recon))
    result = {
        "cells": n, "genes": int(stored.shape[1]), "torch_threads": args.threads,
        "read_stored_s": round(read, 2), "read_stored_cells_s": round(n / read),
        "compute_s": round(decode, 2), "compute_cells_s": round(n / decode),
        "write_once_s": round(write, 2),
        "max_abs_difference": max_diff,
        "stored_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
