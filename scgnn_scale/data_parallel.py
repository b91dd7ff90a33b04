"""Data-parallel training over several processes: one per GPU (NCCL), or CPU processes (gloo).

``--gpus N`` (``runtime.gpus``) makes the run's process rank 0 of N: it starts N - 1 more processes
(or, launched by ``torchrun``, joins the ranks torchrun started) and, for every autoencoder it
trains, sends each rank the same job. Every rank builds the same model, wraps it in
:class:`~torch.nn.parallel.DistributedDataParallel` and trains it with :func:`train.fit_autoencoder`
on its own share of the rows: contiguous runs of whole chunks, so each rank reads its own chunks
(rows interleaved instead when there are fewer than four chunks a rank). A rank's minibatch is the
global batch divided by N, and DDP averages the gradients, so a step sees as many cells as the
single-process step. The loss keeps the scale of the whole data set (``n_reference``). Rank 0 keeps
the trained model. The graph autoencoder trains the same way (each rank reads the graph and the
embedding, and samples its own targets: :func:`graph_autoencoder.fit_gae`); the cluster autoencoders
are dealt out to the ranks, largest first.

With ``--device cpu`` the ranks are CPU processes talking over gloo: that is how the multi-GPU path is
tested on a machine without GPUs (tests/test_data_parallel.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
from typing import Any

import numpy as np

log = logging.getLogger("scgnn_scale")

#: a rank gets whole chunks when every rank can have at least this many
MIN_CHUNKS_PER_RANK = 4


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (it sets these variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def rank_device(device, local_rank: int):
    """The torch device of a rank: ``cuda:local_rank`` on GPUs, the CPU otherwise."""
    import torch

    return torch.device(f"cuda:{local_rank}") if torch.device(device).type == "cuda" else torch.device("cpu")


def rank_rows(n: int, chunk_rows: int, rank: int, world: int, rows: np.ndarray | None = None) -> np.ndarray:
    """The rows rank ``rank`` of ``world`` trains on: a contiguous run of whole chunks (an even share of the
    chunks, at most one chunk more than another rank's), or every ``world``-th row when the chunks are too
    few to share out. ``rows``: only these rows take part (e.g. one cluster's)."""
    n_chunks = math.ceil(n / max(1, chunk_rows))
    if n_chunks >= MIN_CHUNKS_PER_RANK * world:
        first, last = (n_chunks * rank) // world, (n_chunks * (rank + 1)) // world
        mine = np.arange(first * chunk_rows, min(last * chunk_rows, n), dtype=np.int64)
        return mine if rows is None else np.intersect1d(mine, rows)
    pool = np.arange(n, dtype=np.int64) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    return pool[rank::world]


def _array_location(array):
    """Where a zarr array lives, for another process to open it; an array computed as it is read
    (:mod:`scgnn_scale.reconstruction`) travels as itself (it pickles as paths)."""
    if hasattr(array, "on"):
        return array
    root = getattr(array.store, "root", None)
    if root is None:
        raise ValueError(f"data-parallel training reads arrays from a local store, not {type(array.store).__name__}")
    return os.path.join(str(root), array.path)


@dataclasses.dataclass
class _FitJob:
    arrays: list  # zarr paths, or arrays computed as they are read
    plan: Any  # train.TrainPlan
    model_shape: dict
    model_state: dict
    optimizer_state: dict
    lr: float
    cell_weight: np.ndarray | None
    rows: np.ndarray | None
    start_step: int
    name: str


class RankGroup:
    """Rank 0's handle on the other ranks: starts them (or joins torchrun's), sends them work, stops them."""

    def __init__(self, world: int, device, *, torch_threads: int = 0):
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("a torch.distributed process group already runs in this process; one run at a time")
        self.world = int(world)
        self.device = device
        self._procs: list = []
        cuda = torch.device(device).type == "cuda"
        self.backend = "nccl" if cuda else "gloo"
        if launched_by_torchrun():
            if int(os.environ.get("RANK", "0")) != 0:
                raise RuntimeError("only rank 0 runs the pipeline; the other ranks serve (serve_rank)")
            if cuda:
                torch.cuda.set_device(0 if os.environ.get("LOCAL_RANK") is None else int(os.environ["LOCAL_RANK"]))
            dist.init_process_group(self.backend)  # torchrun's MASTER_ADDR/PORT, RANK, WORLD_SIZE
            self.world = dist.get_world_size()
        else:
            if cuda and torch.cuda.device_count() < self.world:
                from .errors import InputError

                raise InputError(f"--gpus {self.world}: torch sees {torch.cuda.device_count()} CUDA device(s)")
            port = _free_port()
            init = f"tcp://127.0.0.1:{port}"
            ctx = torch.multiprocessing.get_context("spawn")
            for rank in range(1, self.world):
                p = ctx.Process(target=_serve_spawned, args=(rank, self.world, init, self.backend,
                                                             str(torch.device(device).type), torch_threads),
                                daemon=True)
                p.start()
                self._procs.append(p)
            if cuda:
                torch.cuda.set_device(0)
            dist.init_process_group(self.backend, init_method=init, rank=0, world_size=self.world)
        log.info("data-parallel training on %d ranks (%s)", self.world, self.backend)

    # -- work ------------------------------------------------------------------------------------
    def fit_autoencoder(self, model, optimizer, arrays: list, plan, *, cell_weight=None, rows=None,
                        start_step: int = 0, checkpoint=None, progress=None, name: str = "autoencoder") -> dict:
        """:func:`train.fit_autoencoder` with every rank training ``model`` on its share; ``model`` and
        ``optimizer`` (rank 0's) end trained, as after the single-process call. The plateau stop is off:
        each rank sees its own losses, and ranks that stopped at different steps would wait on each other."""
        plan = dataclasses.replace(plan, plateau_tol=0.0)
        job = _FitJob(arrays=[_array_location(a) for a in arrays], plan=plan, model_shape=model.shape_dict(),
                      model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
                      optimizer_state=_cpu_state(optimizer.state_dict()), lr=optimizer.param_groups[0]["lr"],
                      cell_weight=None if cell_weight is None else np.asarray(cell_weight, np.float32),
                      rows=rows, start_step=int(start_step), name=name)
        _send(("fit", job))
        return _fit_on_rank(job, 0, self.world, model=model, optimizer=optimizer, arrays=arrays,
                            checkpoint=checkpoint, progress=progress)

    def fit_gae(self, embedding_path: str, graph_path: str, cfg, *, seed: int, progress=None):
        """:func:`graph_autoencoder.fit_gae` on every rank (each reads the embedding and graph itself);
        ``(z, info)`` of rank 0."""
        _send(("gae", (embedding_path, graph_path, cfg, seed)))
        return _gae_on_rank(embedding_path, graph_path, cfg, seed, 0, self.world, self.device, progress)

    def map_jobs(self, fn, jobs: list[dict], done, *, size=None) -> list[dict]:
        """``fn(job)`` for every job, dealt out to the ranks (largest first by ``size(job)``), each rank on its
        own device; results of all jobs on rank 0."""
        import torch.distributed as dist

        order = sorted(jobs, key=lambda j: -size(j)) if size else list(jobs)
        _send(("map", (fn, order)))
        mine = _map_on_rank(fn, order, 0, self.world, self.device, done)
        gathered: list = [None] * self.world
        dist.gather_object(mine, gathered, dst=0)
        for other in gathered[1:]:
            done(len(other))
        return [r for part in gathered for r in part]

    def close(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        with contextlib.suppress(Exception):
            _send(("stop", None))
        for p in self._procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_state(state: dict) -> dict:
    import torch

    def cpu(v):
        if isinstance(v, torch.Tensor):
            return v.detach().cpu()
        if isinstance(v, dict):
            return {k: cpu(x) for k, x in v.items()}
        if isinstance(v, list):
            return [cpu(x) for x in v]
        return v

    return cpu(state)


def _send(message) -> Any:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- what every rank does ------------------------------------------------------------------------
def _fit_on_rank(job: _FitJob, rank: int, world: int, *, model=None, optimizer=None, arrays=None,
                 checkpoint=None, progress=None, device=None) -> dict:
    import torch
    import zarr
    from torch.nn.parallel import DistributedDataParallel

    from .nn.autoencoder import DenseAutoencoder
    from .nn.optim import adam
    from .train import fit_autoencoder, silent_progress

    if arrays is None:
        arrays = [p.on(device) if hasattr(p, "on") else zarr.open_array(p, mode="r", zarr_format=3)
                  for p in job.arrays]
    if model is None:
        model = DenseAutoencoder(**job.model_shape)
        model.load_state_dict(job.model_state)
        model = model.to(device)
        optimizer = adam(model.parameters(), lr=job.lr)
        optimizer.load_state_dict(job.optimizer_state)
    device = next(model.parameters()).device
    n = int(arrays[0].shape[0])
    chunk_rows = int(arrays[0].chunks[0])
    share = rank_rows(n, chunk_rows, rank, world, job.rows)
    n_global = n if job.rows is None else len(np.unique(job.rows))
    plan = dataclasses.replace(job.plan, batch_size=max(1, math.ceil(job.plan.batch_size / world)),
                               seed=job.plan.seed + 7919 * rank)
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    info = fit_autoencoder(wrapped, optimizer, arrays, plan, cell_weight=job.cell_weight, rows=share,
                           start_step=job.start_step, checkpoint=checkpoint if rank == 0 else None,
                           progress=progress or silent_progress, name=job.name, n_reference=n_global)
    info.update({"ranks": world, "rank_rows": int(len(share)), "global_batch": plan.batch_size * world,
                 "backend": torch.distributed.get_backend()})
    return info


def _gae_on_rank(embedding_path, graph_path, cfg, seed, rank, world, device, progress=None):
    import torch

    from .graph_autoencoder import fit_gae, read_graph
    from .store import RunStore

    graph = read_graph(graph_path)
    x = np.asarray(RunStore.read_elem_at(embedding_path), dtype=np.float32)
    return fit_gae(x, graph, cfg, device=torch.device(device), seed=seed, progress=progress, rank=rank,
                   world=world)


def _map_on_rank(fn, jobs: list[dict], rank: int, world: int, device, done=None) -> list[dict]:
    results = []
    for job in jobs[rank::world]:
        config = job["config"]
        job = {**job, "config": dataclasses.replace(
            config, runtime=dataclasses.replace(config.runtime, device=str(device)))}
        results.append(fn(job))
        if done is not None:
            done(1)
    return results


def serve_rank(rank: int, world: int, device) -> None:
    """Ranks other than 0: do what rank 0 sends until it says stop."""
    while True:
        kind, payload = _send(None)
        if kind == "stop":
            return
        if kind == "fit":
            _fit_on_rank(payload, rank, world, device=device)
        elif kind == "gae":
            _gae_on_rank(*payload, rank, world, device)
        elif kind == "map":
            import torch.distributed as dist

            fn, jobs = payload
            dist.gather_object(_map_on_rank(fn, jobs, rank, world, device), None, dst=0)


def _serve_spawned(rank: int, world: int, init: str, backend: str, device_type: str, torch_threads: int) -> None:
    import torch
    import torch.distributed as dist

    device = rank_device(device_type, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks share the cores: one rank's OpenMP threads must not spin on another's
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(torch_threads if torch_threads > 0 else max(1, cores // world))
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        serve_rank(rank, world, device)
    finally:
        dist.destroy_process_group()


def serve_torchrun_rank(device_name: str) -> int:
    """A ``torchrun`` rank other than 0: join the group and serve rank 0 (``scgnn-scale run`` calls this)."""
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device_name if device_name != "auto" else
                         ("cuda" if torch.cuda.is_available() else "cpu"), local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        serve_rank(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()
    return 0
