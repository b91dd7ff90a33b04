"""The same run embedded and on a real Dask cluster (a scheduler and two worker processes on 127.0.0.1).

    python bench/bench_cluster.py [--input PATH] [--cells 2000] [--genes 1000] [--types 6] [--dir DIR]
                                  [-- RUN OPTIONS]

Without ``--input`` the built-in example is simulated into DIR (default bench/out/cluster). Runs

    scgnn-scale run INPUT --out DIR/embedded --label-key label --quiet [RUN OPTIONS]
    scgnn-scale run INPUT --out DIR/cluster  --label-key label --quiet --scheduler tcp://127.0.0.1:PORT ...

one after the other (the cluster: ``dask scheduler`` and two ``dask worker --nthreads 1`` processes, started
here and stopped after), and prints one JSON object: each stage's seconds from each manifest and their
ratio, each invocation's wall time, and whether the two runs agree (ARI of the clusters, the largest
difference of the imputation). On one 2-core machine the workers share the cores with the client: this
measures what sending the work to worker processes costs, not what more machines would gain.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_cluster(log) -> tuple[str, list[subprocess.Popen]]:
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "dask"]
    procs = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]
    for i in range(2):
        procs.append(subprocess.Popen([*dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-nanny",
                                       "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    with Client(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
    return address, procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _run(inp: str, out: Path, extra: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scgnn_scale.cli", "run", inp, "--out", str(out), "--label-key", "label",
                    "--quiet", *extra], check=True)
    return round(time.perf_counter() - t0, 2)


def _stage_seconds(run_dir: Path) -> dict[str, float]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {name: float(info["seconds"]) for name, info in manifest["stages"].items()}


def main(argv: list[str]) -> None:
    extra = argv[argv.index("--") + 1:] if "--" in argv else ["--iterate-max-iterations", "3"]
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input")
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--types", type=int, default=6)
    p.add_argument("--dir", default=str(ROOT / "bench" / "out" / "cluster"))
    args = p.parse_args(argv)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    inp = args.input
    if inp is None:
        inp = str(work / f"atlas_{args.cells}x{args.genes}.h5ad")
        from scgnn_scale.simulate import drawn_by_default_model

        if not drawn_by_default_model(inp):
            subprocess.run([sys.executable, "-m", "scgnn_scale.cli", "simulate", "--cells", str(args.cells), "--genes",
                            str(args.genes), "--types", str(args.types), "--overwrite", inp], check=True,
                           stdout=sys.stderr)
    embedded, cluster = work / "embedded", work / "cluster"
    for d in (embedded, cluster):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    wall = {"embedded": _run(inp, embedded, extra)}
    with open(work / "dask.log", "wb") as log:
        address, procs = _start_cluster(log)
        try:
            wall["cluster"] = _run(inp, cluster, [*extra, "--scheduler", address])
        finally:
            _stop(procs)

    from sklearn.metrics import adjusted_rand_score

    import scgnn_scale

    a, b = scgnn_scale.read_run(embedded), scgnn_scale.read_run(cluster)
    diff = max(float(np.abs(a.layers["imputed"][i:i + 4096].compute() - b.layers["imputed"][i:i + 4096].compute()).max())
               for i in range(0, a.n_obs, 4096))
    sa, sb = _stage_seconds(embedded), _stage_seconds(cluster)
    print(json.dumps({
        "input": inp, "run_options": extra,
        "stages": {s: {"embedded_s": sa[s], "cluster_s": sb[s], "ratio": round(sb[s] / max(sa[s], 1e-9), 2)}
                   for s in sa if s in sb},
        "stages_total_s": {"embedded": round(sum(sa.values()), 2), "cluster": round(sum(sb.values()), 2)},
        "stages_ratio": round(sum(sb.values()) / sum(sa.values()), 2),
        "wall_s": wall, "wall_ratio": round(wall["cluster"] / wall["embedded"], 2),
        "same": {"cluster_ari": adjusted_rand_score(a.obs["scgnn_cluster"], b.obs["scgnn_cluster"]),
                 "imputed_max_abs_diff": diff},
    }, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
