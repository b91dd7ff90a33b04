"""The float16 imputed layer against the float32 one on real data sets: largest errors and bytes on disk.

    python bench/bench_impute_dtype.py --out bench/out/impute_dtype klein_subset zeisel_subset [-- RUN OPTIONS]

For each data set under ../shared/data: the whole method with the float32 default, then the same run
directory copied and rerun with ``--overwrite --impute-dtype float16`` (only impute is redone: the
same training, the values written in half precision). Compares the two ``layers/imputed`` block by block:
the largest absolute difference, the largest relative one (``|a - b| / |a|`` over entries with
``|a| >= 1e-3``), the mean absolute one, the largest value, and the bytes of each layer on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def compare(run32: Path, run16: Path) -> dict:
    import zarr

    a = zarr.open_array(run32 / "adata.zarr" / "layers" / "imputed", mode="r")
    b = zarr.open_array(run16 / "adata.zarr" / "layers" / "imputed", mode="r")
    if b.dtype != np.float16 or a.dtype != np.float32:
        raise SystemExit(f"expected float32 and float16 layers, got {a.dtype} and {b.dtype}")
    max_abs = max_rel = vmax = 0.0
    abs_sum, n = 0.0, 0
    step = int(a.chunks[0])
    for r in range(0, a.shape[0], step):
        x = np.asarray(a[r:r + step], dtype=np.float64)
        y = np.asarray(b[r:r + step], dtype=np.float64)
        d = np.abs(x - y)
        max_abs = max(max_abs, float(d.max()))
        big = np.abs(x) >= 1e-3
        if big.any():
            max_rel = max(max_rel, float((d[big] / np.abs(x[big])).max()))
        abs_sum += float(d.sum())
        n += d.size
        vmax = max(vmax, float(np.abs(x).max()))
    return {"shape": list(a.shape), "max_abs_error": max_abs, "max_rel_error": max_rel,
            "mean_abs_error": abs_sum / n, "max_value": vmax,
            "bytes_float32": _bytes(run32 / "adata.zarr" / "layers" / "imputed"),
            "bytes_float16": _bytes(run16 / "adata.zarr" / "layers" / "imputed")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "impute_dtype")
    parser.add_argument("datasets", nargs="+", help="names under ../shared/data; options for every run after --")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1:]
    results = {}
    for name in args.datasets:
        source = DATA / name / "counts.h5ad"
        if not source.is_file():
            raise SystemExit(f"{source}: not found")
        run32, run16 = args.out / f"{name}_float32", args.out / f"{name}_float16"
        base = [sys.executable, "-m", "scgnn_scale.cli", "run", str(source), "--quiet", *extra]
        subprocess.run([*base, "--out", str(run32)], check=True)
        shutil.rmtree(run16, ignore_errors=True)
        shutil.copytree(run32, run16)
        subprocess.run([*base, "--out", str(run16), "--overwrite", "--impute-dtype", "float16"], check=True)
        results[name] = compare(run32, run16)
        print(json.dumps({name: results[name]}), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
