"""Two data-parallel ranks against one process: steps per second and the model difference.

    python bench/bench_data_parallel.py [--cells 20000] [--genes 1000] [--steps 200] [--ranks 2] [--device cpu]

Trains the feature autoencoder (the package's own model, loss and loop) on a simulated matrix in a zarr
store, once in this process and once on ``--ranks`` ranks (gloo on CPU, NCCL on GPUs) with the same
global batch and seed; then once more each with full batches, where the two must agree up to the
order of float sums. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from scgnn_scale.data_parallel import RankGroup
from scgnn_scale.nn.autoencoder import DenseAutoencoder
from scgnn_scale.nn.optim import adam
from scgnn_scale.train import TrainPlan, fit_autoencoder


def _matrix(path: Path, cells: int, genes: int) -> zarr.Array:
    rng = np.random.default_rng(0)
    centers = rng.gamma(1.0, 1.0, size=(8, genes)).astype(np.float32)
    arr = zarr.create_array(path, shape=(cells, genes), chunks=(2048, genes), dtype=np.float32)
    for a in range(0, cells, 2048):
        b = min(cells, a + 2048)
        arr[a:b] = np.log1p(rng.poisson(centers[rng.integers(0, 8, b - a)])).astype(np.float32)
    return zarr.open_array(path, mode="r")


def _train(x, steps, batch, device, group=None):
    torch.manual_seed(0)
    model = DenseAutoencoder(int(x.shape[1]), 512, 128).to(device)
    opt = adam(model.parameters(), lr=1e-3)
    plan = TrainPlan(steps=steps, batch_size=batch, gamma=1.0, alpha=0.0, l1=0.0, seed=0, memory_budget_mb=512)
    t0 = time.perf_counter()
    info = (group.fit_autoencoder(model, opt, [x], plan) if group else fit_autoencoder(model, opt, [x], plan))
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        xb = torch.from_numpy(x[: min(4096, x.shape[0])]).to(device)
        mse = float(((model(xb)[0] - xb) ** 2).mean())
    flat = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
    return {"seconds": round(seconds, 2), "steps_per_s": round(steps / seconds, 2), "mse": mse,
            "loader": info["loader"]}, flat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=20000)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        x = _matrix(Path(tmp) / "x.zarr", args.cells, args.genes)
        small = _matrix(Path(tmp) / "small.zarr", 4096, args.genes)
        one, w_one = _train(x, args.steps, args.batch, device)
        full_one, f_one = _train(small, 50, 4096, device)
        group = RankGroup(args.ranks, device)
        try:
            many, w_many = _train(x, args.steps, args.batch, device, group)
            full_many, f_many = _train(small, 50, 4096, device, group)
        finally:
            group.close()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "commit": commit, "date": time.strftime("%Y-%m-%d"), "device": str(device), "torch": torch.__version__,
        "cells": args.cells, "genes": args.genes, "steps": args.steps, "global_batch": args.batch, "ranks": args.ranks,
        "one_process": one, "data_parallel": many,
        "speedup": round(many["steps_per_s"] / one["steps_per_s"], 3),
        "minibatch_weight_difference": float((w_one - w_many).norm() / w_one.norm()),
        "full_batch_weight_difference": float((f_one - f_many).norm() / f_one.norm()),
        "full_batch_mse": [full_one["mse"], full_many["mse"]],
    }, indent=1))


if __name__ == "__main__":
    main()
