"""Store codec choice: encode/decode time and size of real store chunks under each candidate codec.

    python bench/bench_codec.py [--run bench/out/run_100000x2000] [--chunks 8]

``--run`` names a finished run directory (it needs ``layers/imputed``; the numbers in RESULTS.md came
from the 100k scaling run, kept then in bench/out/, not in the repository). Reads ``--chunks`` chunks
(2048 cells x 256 genes, the store's layout) of the run's X (log1p counts),
layers/ltmg (uint8 states) and layers/imputed (a dense float reconstruction, like work/recon and the
cluster autoencoders' outputs), encodes and decodes each with every candidate Blosc codec on one
thread, and prints one JSON line per (array, codec): milliseconds per chunk and the compressed
fraction. A 1M x 2000 float array is 3,900 such chunks, written several times per run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numcodecs
import numpy as np
import zarr

CANDIDATES = [("zstd", 3, 1), ("zstd", 1, 1), ("zstd", 1, 2), ("lz4", 5, 1), ("lz4", 1, 1)]
ARRAYS = ["X", "layers/ltmg", "layers/imputed"]


def measure(block: np.ndarray, cname: str, clevel: int, shuffle: int, repeats: int = 3) -> dict:
    codec = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle)
    enc = codec.encode(block)
    t0 = time.perf_counter()
    for _ in range(repeats):
        enc = codec.encode(block)
    t_enc = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        codec.decode(enc)
    t_dec = (time.perf_counter() - t0) / repeats
    return {"encode_ms": t_enc * 1e3, "decode_ms": t_dec * 1e3, "bytes": len(enc), "raw_bytes": block.nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path(__file__).resolve().parent / "out" / "run_100000x2000",
                    help="a finished run directory (default: the 100k scaling run)")
    ap.add_argument("--chunks", type=int, default=8, help="chunks per array (along the cells)")
    args = ap.parse_args()
    numcodecs.blosc.set_nthreads(1)
    for key in ARRAYS:
        arr = zarr.open_array(args.run / "adata.zarr" / key, mode="r")
        rows, cols = 2048, 256
        blocks = [np.ascontiguousarray(arr[i * rows:(i + 1) * rows, :cols]) for i in range(args.chunks)]
        for cname, clevel, shuffle in CANDIDATES:
            runs = [measure(b, cname, clevel, shuffle) for b in blocks]
            print(json.dumps({
                "array": key, "dtype": str(blocks[0].dtype), "codec": f"blosc {cname} {clevel} "
                + ("bitshuffle" if shuffle == 2 else "shuffle"),
                "encode_ms_per_chunk": round(float(np.mean([r["encode_ms"] for r in runs])), 2),
                "decode_ms_per_chunk": round(float(np.mean([r["decode_ms"] for r in runs])), 2),
                "compressed_fraction": round(sum(r["bytes"] for r in runs) / sum(r["raw_bytes"] for r in runs), 3),
            }), flush=True)


if __name__ == "__main__":
    main()
