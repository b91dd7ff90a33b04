"""Loader throughput (streamed vs in memory) and the autoencoder's training ceiling; prints JSON.

    python bench/bench_loader.py --cells 100000 --genes 2000            # the reference size
    python bench/bench_loader.py --cells 20000 --genes 1000 --steps 20  # quick

Builds a run store with a synthetic X (float32, ~85% zeros, log1p counts) and LTMG states
(uint8) in the store's chunking, block by block (never the whole matrix in memory), then measures:

- ``read_blocks``: plain chunk-aligned row-block reads of X (zarr), cells/s and MB/s decoded;
- ``read_blocks_tensorstore``: the same reads through tensorstore (when importable);
- ``loader_stream`` / ``loader_memory``: one epoch of :class:`MinibatchLoader` over [X, TRS]
  (block shuffle, shuffle buffer, prefetch), cells/s; the memory mode also its load time;
- ``train_compute_only``: Adam steps/s of the feature AE (loss + L1) on a batch already on the
  device: the ceiling the loader has to keep up with;
- ``train_streamed``: the same steps fed by the streamed loader (the stage's training loop), with
  the fraction of time spent waiting for data.
Every figure comes with its conditions (cores, torch threads, device, chunking, batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def build_store(root: Path, n: int, g: int, chunk_rows: int, chunk_genes: int, seed: int):
    from scgnn_scale.config import RunConfig, StoreConfig
    from scgnn_scale.store import RunStore

    config = RunConfig(store=StoreConfig(chunk_rows=chunk_rows, chunk_genes=chunk_genes))
    store = RunStore.create(root, identity={"bench": "loader"}, config=config)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with store.staging("preprocess") as st:
        x = st.create_matrix("X", (n, g), np.float32)
        trs = st.create_matrix("layers/ltmg", (n, g), np.uint8)
        for a in range(0, n, chunk_rows):
            b = min(a + chunk_rows, n)
            counts = rng.geometric(0.3, size=(b - a, g)).astype(np.float32)
            counts[rng.random((b - a, g)) < 0.85] = 0
            x[a:b] = np.log1p(counts)
            trs[a:b] = np.minimum(counts, 3).astype(np.uint8)
    return store, config, time.perf_counter() - t0


def _rate(cells: int, seconds: float) -> float:
    return round(cells / seconds, 1) if seconds > 0 else float("inf")


def bench_reads(store, n: int, g: int) -> dict:
    from scgnn_scale.loader import iter_row_blocks

    x = store.open_array("X")
    t0 = time.perf_counter()
    for _ in iter_row_blocks(x, prefetch=0):
        pass
    s = time.perf_counter() - t0
    out = {"read_blocks": {"cells_per_s": _rate(n, s), "mb_per_s": round(n * g * 4 / 2**20 / s, 1),
                           "seconds": round(s, 3)}}
    try:
        import tensorstore as ts
    except ImportError:
        return out
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": store.path_of("X")}}
    arr = ts.open(spec, read=True).result()
    rows = int(x.chunks[0])
    t0 = time.perf_counter()
    futures = []
    for a in range(0, n, rows):  # a few blocks in flight, as a prefetching loader would
        futures.append(arr[a:min(a + rows, n)].read())
        if len(futures) >= 4:
            futures.pop(0).result()
    for f in futures:
        f.result()
    s = time.perf_counter() - t0
    out["read_blocks_tensorstore"] = {"cells_per_s": _rate(n, s), "mb_per_s": round(n * g * 4 / 2**20 / s, 1),
                                      "seconds": round(s, 3)}
    return out


def bench_loader(store, n: int, batch_size: int, seed: int, memory_max_mb: float) -> dict:
    from scgnn_scale.loader import MinibatchLoader

    arrays = [store.open_array("X"), store.open_array("layers/ltmg")]
    out = {}
    modes = [("stream", 0), ("memory", 1e9)]
    held_mb = n * sum(int(a.shape[1]) * a.dtype.itemsize for a in arrays) / 2**20
    if held_mb > memory_max_mb:  # the in-memory epoch would hold X and its states whole
        modes = modes[:1]
        out["loader_memory"] = {"skipped": f"{held_mb:.0f} MiB in memory > --memory-max-mb {memory_max_mb:g}"}
    for mode, budget in modes:
        loader = MinibatchLoader(arrays, batch_size, seed=seed, memory_budget_mb=budget)
        t0 = time.perf_counter()
        if mode == "memory":
            loader._load_memory()
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        cells = sum(len(b.row_index) for b in loader.epoch(0))
        s = time.perf_counter() - t0
        out[f"loader_{mode}"] = {"cells_per_s": _rate(cells, s), "epoch_seconds": round(s, 3)}
        if mode == "memory":
            out[f"loader_{mode}"]["load_seconds"] = round(load, 3)
        del loader
    return out


def bench_training(store, config, n: int, g: int, batch_size: int, steps: int, device: str, seed: int) -> dict:
    import torch

    from scgnn_scale.train import cpu_threads

    dev = torch.device(device)
    with cpu_threads(dev):  # as the stages train: on CPU one core is left to the loader
        return _bench_training(store, config, n, g, batch_size, steps, dev, seed)


def _bench_training(store, config, n, g, batch_size, steps, dev, seed) -> dict:
    import torch

    from scgnn_scale.nn.autoencoder import DenseAutoencoder
    from scgnn_scale.nn.losses import l1_penalty, reconstruction_loss, reference_cells
    from scgnn_scale.train import TrainPlan, fit_autoencoder

    torch.manual_seed(seed)
    model = DenseAutoencoder(g).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch_size, g, device=dev)
    trs = torch.randint(0, 3, (batch_size, g), device=dev, dtype=torch.uint8)

    def step():
        recon, _ = model(x)
        loss = reconstruction_loss(x, recon, trs=trs, gamma=0.1, alpha=0.9, reference_cells=reference_cells(n))
        loss = loss + l1_penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up (allocator, kernels)
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    s = time.perf_counter() - t0
    out = {"train_compute_only": {"steps_per_s": round(steps / s, 2), "cells_per_s": _rate(steps * batch_size, s),
                                  "torch_threads": torch.get_num_threads()}}

    arrays = [store.open_array("X"), store.open_array("layers/ltmg")]
    plan = TrainPlan(steps=steps, batch_size=batch_size, gamma=0.1, alpha=0.9, l1=1.0, seed=seed, memory_budget_mb=0)
    info = fit_autoencoder(model, opt, arrays, plan)
    out["train_streamed"] = {k: info[k] for k in ("steps_per_s", "cells_per_s", "loader_wait_fraction", "loader")}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--chunk-rows", type=int, default=2048)
    p.add_argument("--chunk-genes", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="training steps timed")
    p.add_argument("--device", default="auto")
    p.add_argument("--dir", default="", help="where to build the store (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-max-mb", type=float, default=4096,
                   help="skip the in-memory loader epoch when X and its states take more (default 4096)")
    args = p.parse_args(argv)

    import torch

    from scgnn_scale.devices import resolve_device

    device = str(resolve_device(args.device))
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        store, config, build_s = build_store(Path(tmp) / "run", args.cells, args.genes, args.chunk_rows,
                                             args.chunk_genes, args.seed)
        result = {
            "conditions": {
                "cells": args.cells, "genes": args.genes, "batch_size": args.batch_size,
                "chunks": [args.chunk_rows, args.chunk_genes], "codec": f"blosc zstd level {config.store.compression_level}",
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
                "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                "platform": platform.platform(), "torch": torch.__version__,
                "store_mb_on_disk": round(sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
                                          / 2**20, 1),
                "build_seconds": round(build_s, 2),
            }
        }
        result.update(bench_reads(store, args.cells, args.genes))
        result.update(bench_loader(store, args.cells, args.batch_size, args.seed, args.memory_max_mb))
        result.update(bench_training(store, config, args.cells, args.genes, args.batch_size, args.steps, device,
                                     args.seed))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
