"""How many mantissa bits the imputed layer needs: bytes on disk and error per bit count, beside the seed's effect.

    python bench/bench_mantissa_bits.py RUN_SEED0 RUN_SEED1 [RUN_SEED0 RUN_SEED1 ...] [--bits 23,16,14,12,10]

Each pair is two finished runs of one data set with different ``--seed`` and ``--impute-mantissa-bits
23`` (unrounded float32). For each bit count, every chunk of the first run's ``layers/imputed`` is
rounded as the impute stage rounds it (:func:`scgnn_scale.bit_rounding.round_mantissa`) and encoded
with the store's codec; the script prints the bytes against the unrounded layer's and the rounding's
largest absolute and relative error. Beside them, what another seed changes: the median and the 1st
percentile of ``|a - b| / max(|a|, |b|)`` over the entries where either seed's value is at least 1e-3.
A rounding error far below the seed's change is one no result can see. The median L1 and RMSE of the
dropout protocol move by at most the largest absolute error, since each is 1-Lipschitz in every entry.
Prints one JSON object per pair.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _layer(run: Path):
    import zarr

    return zarr.open_array(run / "adata.zarr" / "layers" / "imputed", mode="r")


def _codec(level: int):
    """The store's chunk codec (store.compressors: Blosc zstd, byte shuffle) as a numcodecs codec."""
    import numcodecs

    return numcodecs.Blosc("zstd", level, numcodecs.Blosc.SHUFFLE)


def measure_pair(run0: Path, run1: Path, bits: list[int], level: int) -> dict:
    from scgnn_scale.bit_rounding import round_mantissa

    a, b = _layer(run0), _layer(run1)
    if a.dtype != np.float32 or tuple(a.shape) != tuple(b.shape):
        raise SystemExit(f"{run0}, {run1}: want two float32 layers of one shape, got {a.dtype} {a.shape}, {b.shape}")
    codec = _codec(level)
    rows, cols = int(a.chunks[0]), int(a.chunks[1])
    size = {k: 0 for k in bits}
    max_abs = {k: 0.0 for k in bits}
    max_rel = {k: 0.0 for k in bits}
    seed_rel = []
    for r in range(0, a.shape[0], rows):
        block_a = np.asarray(a[r:r + rows])
        block_b = np.asarray(b[r:r + rows])
        big = np.maximum(np.abs(block_a), np.abs(block_b)) >= 1e-3
        seed_rel.append(np.abs(block_a - block_b)[big] / np.maximum(np.abs(block_a), np.abs(block_b))[big])
        for c in range(0, a.shape[1], cols):
            chunk = np.ascontiguousarray(block_a[:, c:c + cols])
            nonzero = chunk != 0
            for k in bits:
                rounded = round_mantissa(chunk, k)
                size[k] += len(codec.encode(rounded))
                d = np.abs(rounded.astype(np.float64) - chunk)
                max_abs[k] = max(max_abs[k], float(d.max()))
                if nonzero.any():
                    max_rel[k] = max(max_rel[k], float((d[nonzero] / np.abs(chunk[nonzero])).max()))
    seed_rel = np.concatenate(seed_rel)
    full = size[max(bits)]
    return {
        "runs": [str(run0), str(run1)], "shape": list(a.shape),
        "seed_change": {"median_rel": float(np.median(seed_rel)), "p01_rel": float(np.percentile(seed_rel, 1)),
                        "entries": int(seed_rel.size)},
        "bits": {str(k): {"bytes": size[k], "fraction_of_unrounded": round(size[k] / full, 4),
                          "max_abs_error": max_abs[k], "max_rel_error": max_rel[k]} for k in bits},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pairs of run directories: seed 0, seed 1, ...")
    parser.add_argument("--bits", default="23,16,14,12,10", help="mantissa bit counts (23: unrounded)")
    parser.add_argument("--level", type=int, default=1, help="zstd level (the store's compression_level)")
    args = parser.parse_args(argv)
    if len(args.runs) % 2:
        raise SystemExit("give the run directories in pairs (seed 0, seed 1)")
    bits = sorted({int(k) for k in args.bits.split(",")} | {23}, reverse=True)
    for i in range(0, len(args.runs), 2):
        print(json.dumps(measure_pair(args.runs[i], args.runs[i + 1], bits, args.level)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
