"""The same run with RUN_DIR on local disk and on an S3 API server on 127.0.0.1 (moto's), in one invocation.

    python bench/bench_object_store.py [--input PATH] [--cells 2000] [--genes 1000] [--types 6] [--dir DIR]
                                       [--keep] [-- RUN OPTIONS]

Without ``--input`` the atlas is simulated first (``scgnn-scale simulate``, default the built-in example, 2000
cells x 1000 genes, 6 types) into DIR (default bench/out/object_store). Starts ``python -m moto.server`` on a free
loopback port (the dev extra brings it), uploads the input to ``s3://bench/INPUT``, then runs

    scgnn-scale run INPUT --out DIR/local --label-key label --iterate-max-iterations 3 --quiet [RUN OPTIONS]
    scgnn-scale run s3://bench/INPUT --out s3://bench/run --label-key label --iterate-max-iterations 3 --quiet ...

one after the other, and prints one JSON object: each stage's seconds (from each manifest) on disk and on S3
and their ratio, the wall time of each invocation (process start to exit), the run directory's size and object
count on S3, and whether the two runs agree (ARI of the clusters, the largest difference of the imputation).
The loopback server has no network latency but is a single Python process: real S3 is slower per request and
faster per byte in parallel; these ratios measure what the object-store code path costs, not a cloud.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(log_path: Path) -> tuple[subprocess.Popen, dict]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"moto's S3 server did not start (see {log_path})") from None
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    return proc, env


def _run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - t0, 2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else ["--iterate-max-iterations", "3"]
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input")
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--types", type=int, default=6)
    p.add_argument("--dir", default=str(ROOT / "bench" / "out" / "object_store"))
    p.add_argument("--keep", action="store_true", help="keep DIR/local afterwards")
    args = p.parse_args(argv)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "scgnn_scale.cli"]
    if args.input:
        inp = Path(args.input)
    else:
        inp = work / f"atlas_{args.cells}x{args.genes}.h5ad"
        from scgnn_scale.simulate import drawn_by_default_model

        if not drawn_by_default_model(inp):
            subprocess.run([*cli, "simulate", "--cells", str(args.cells), "--genes", str(args.genes), "--types",
                            str(args.types), "--overwrite", str(inp)], check=True, stdout=subprocess.DEVNULL)
    moto, s3_env = _start_moto(work / "moto.log")
    env = {**os.environ, **s3_env, "PYTHONPATH": str(ROOT)}
    os.environ.update(s3_env)
    try:
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        t0 = time.perf_counter()
        fs.put_file(str(inp), f"bench/{inp.name}")
        upload = round(time.perf_counter() - t0, 2)
        local = work / "local"
        shutil.rmtree(local, ignore_errors=True)
        common = ["--label-key", "label", "--quiet", *extra]
        wall = {"local": _run([*cli, "run", str(inp), "--out", str(local), *common], env),
                "s3": _run([*cli, "run", f"s3://bench/{inp.name}", "--out", "s3://bench/run", *common], env)}
        manifests = {"local": json.loads((local / "manifest.json").read_text()),
                     "s3": json.loads(fs.cat_file("bench/run/manifest.json"))}
        stages = {}
        for name, entry in manifests["local"]["stages"].items():
            a, b = entry["seconds"], manifests["s3"]["stages"][name]["seconds"]
            stages[name] = {"local_s": a, "s3_s": b, "ratio": round(b / a, 2) if a else None}
        objects = fs.find("bench/run", detail=True)

        from scgnn_scale import read_run
        from scgnn_scale.evaluate import clustering_metrics

        ra, rb = read_run(local), read_run("s3://bench/run")
        ari = clustering_metrics(ra.obs["scgnn_cluster"], rb.obs["scgnn_cluster"])["ari"]
        diff = float(np.abs(ra.layers["imputed"][:].compute() - rb.layers["imputed"][:].compute()).max())
        total = {k: round(sum(m["stages"][s]["seconds"] for s in m["stages"]), 2) for k, m in manifests.items()}
        report = {
            "input": str(inp), "shape": [int(ra.n_obs), int(ra.n_vars)], "run_options": common,
            "upload_input_s": upload, "stages": stages, "stages_total_s": total,
            "stages_ratio": round(total["s3"] / total["local"], 2),
            "wall_s": wall, "wall_ratio": round(wall["s3"] / wall["local"], 2),
            "s3_run_dir": {"objects": len(objects), "bytes": int(sum(i["size"] for i in objects.values()))},
            "same": {"cluster_ari": round(float(ari), 4), "imputed_max_abs_diff": diff},
        }
        print(json.dumps(report, indent=1))
        if not args.keep:
            shutil.rmtree(local, ignore_errors=True)
    finally:
        moto.terminate()
        moto.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
