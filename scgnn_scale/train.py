"""Training the dense autoencoders of every stage: one loop, one inference pass, one model file format.

The feature autoencoder (docs/METHOD.md step 3), the cluster autoencoders (step 7) and the imputation
autoencoder (step 9) differ only in their data, loss weights and schedule: a frozen
:class:`TrainPlan` says which, :func:`fit_autoencoder` trains, :func:`write_outputs` writes the
embedding and/or reconstruction in one streamed pass, :func:`save_model` / :func:`load_model` keep
the weights (the store says where: :meth:`~scgnn_scale.store.RunStore.model_path`). None of these
takes a stage context: a device, a progress callable and arrays are all they need, so a Dask task
runs them as the driver does. :func:`train_and_write` is the stage-facing composition (inputs
from the store, checkpoints, outputs staged).

Loss (see :mod:`scgnn_scale.nn.losses`): ``gamma * SE + alpha * TRS o SE`` summed per cell,
averaged over the minibatch and scaled to one full batch of the original (``min(N, 12,800)``
cells), plus ``l1 * sum|w|``. For a full batch of N <= 12,800 cells this is the published loss.

Schedule (:func:`training_steps`): ``max(min_steps, min(max_epochs * ceil(N / batch_size), max_steps))``
Adam steps. The original trains 500 full-batch epochs, i.e. 500 optimiser steps, on data sets of a
few thousand cells; with a loss whose scale does not depend on the batch, what fixes how far Adam
gets is the number of steps, so small data sets get a fixed count (``feature.min_steps``: 200 since the
graph is searched beside the PCA, which lost no ARI out of sample; 500 is the original's, on minibatches
of 512 cells). Large data sets need more steps to see their cells; they get ``max_epochs`` passes
(10 by default: about 1,960 steps at 100k cells), up to ``max_steps`` (2,000: about 1M cells seen,
reached at about 102k cells). Above that the number of steps stops growing: a 1M-cell atlas is not a
harder problem than a 100k one drawn from the same cell types (scvi-tools' default epoch count
likewise keeps the number of cells seen fixed above 20k cells). At 1M cells that is 1 pass, not 10.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .bit_rounding import FLOAT32_MANTISSA_BITS, round_mantissa
from .devices import training_precision
from .errors import InputError
from .loader import BackgroundWriter, MinibatchLoader, iter_row_blocks
from .paths import as_path
from .progress import progress_bar

_LOG_EVERY = 50  # steps between loss records

#: ``(total, desc, unit, **tqdm_options) -> bar``: what the loops report progress through
Progress = Callable[..., Any]


def silent_progress(total, desc, unit="it", **kw):
    """A progress callable that shows nothing (Dask tasks, tests)."""
    return progress_bar(total, desc, unit, quiet=True, **kw)


@dataclass(frozen=True)
class TrainPlan:
    """How one autoencoder trains: the loss weights, the schedule and the loader's options."""

    steps: int
    batch_size: int
    gamma: float
    alpha: float
    l1: float
    seed: int
    memory_budget_mb: float
    buffer_blocks: int = 4
    prefetch_blocks: int = 2
    checkpoint_seconds: float = 0.0
    #: stop once the mean loss of a window of 50 steps falls by less than this fraction of the previous
    #: window's (:class:`~scgnn_scale.convergence.LossPlateau`); ``steps`` is then a cap. 0: always ``steps``
    plateau_tol: float = 0.0
    plateau_min_steps: int = 0
    #: 'bfloat16': the forward pass under torch autocast (``feature.precision``); 'float32': plain
    precision: str = "float32"


def training_steps(n_cells: int, batch_size: int, min_steps: int, max_epochs: int, max_steps: int = 0) -> int:
    """Optimiser steps of a schedule: ``max(min_steps, min(max_epochs * ceil(n_cells / batch_size), max_steps))``.

    ``max_steps`` 0: no cap (the epoch rule alone above ``min_steps``).
    """
    per_epoch = math.ceil(n_cells / max(1, min(batch_size, n_cells)))
    by_epochs = max_epochs * per_epoch
    if max_steps > 0:
        by_epochs = min(by_epochs, max_steps)
    return int(max(min_steps, by_epochs))


# -- model files ---------------------------------------------------------------------------------
def save_model(path: str | Path, model, optimizer=None, **extra: Any) -> Path:
    """Save weights (and optimiser state) atomically."""
    import torch

    state = {"format": 1, "shape": model.shape_dict(), "model": model.state_dict(), **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return as_path(path)


def load_model(path: str | Path, device) -> tuple[Any, dict]:
    """Rebuild a :class:`DenseAutoencoder` saved by :func:`save_model` on ``device``; ``(model, saved state)``."""
    import torch

    from .nn.autoencoder import DenseAutoencoder

    path = as_path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    try:
        with path.open("rb") as fh:  # a local file or an fsspec one (a run on an object store)
            state = torch.load(fh, map_location="cpu", weights_only=True)
        model = DenseAutoencoder(**state["shape"])
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a scgnn-scale autoencoder ({exc})") from None
    return model.to(device), state


# -- the training loop ---------------------------------------------------------------------------
def _batches_from(loader: MinibatchLoader, step: int, per_epoch: int):
    """Batches from global step ``step`` on, across epochs, in the order of an uninterrupted run."""
    while True:
        epoch, skip = divmod(step, per_epoch)
        with contextlib.closing(loader.epoch(epoch)) as batches:
            for i, batch in enumerate(batches):
                if i >= skip:  # resuming inside an epoch: the skipped batches are read, not trained on
                    yield batch
                    step += 1


def _on_device(part, device):
    """A batch part (np.ndarray, or a pinned tensor from a CUDA loader) on ``device``; asynchronous when pinned."""
    import torch

    tensor = part if isinstance(part, torch.Tensor) else torch.from_numpy(part)
    return tensor.to(device, non_blocking=True)


def fit_autoencoder(model, optimizer, arrays: list, plan: TrainPlan, *, cell_weight: np.ndarray | None = None,
                    rows: np.ndarray | None = None, start_step: int = 0,
                    checkpoint: Callable[[int], None] | None = None, progress: Progress = silent_progress,
                    name: str = "autoencoder", n_reference: int | None = None) -> dict:
    """Train ``model`` for ``plan.steps`` Adam steps on minibatches of ``arrays`` (X, optionally its TRS).

    Parameters
    ----------
    model, optimizer
        A :class:`DenseAutoencoder` on its device and its optimiser.
    arrays
        ``[X]`` or ``[X, TRS]``, row aligned (zarr arrays; streamed or held per ``plan.memory_budget_mb``).
    plan
        Steps, batch size, loss weights, seed, loader options.
    cell_weight
        Optional ``(N,)`` per-cell weight on the plain squared error (the imputation regularisers).
    rows
        Train on these rows only (e.g. one cluster's cells of a reconstruction), streamed from the
        same arrays; N below is then their number.
    start_step
        Resume here (a checkpoint's step): batches follow the same order as an uninterrupted run.
    checkpoint
        ``checkpoint(step)`` is called about every ``plan.checkpoint_seconds`` (0: never).
    progress, name
        The progress callable and what it calls this training.
    n_reference
        Cells of the whole data set when ``rows`` is one data-parallel rank's share: the loss keeps the
        scale of the whole (default: N).

    Returns
    -------
    dict
        Loss records, throughput, loader mode.
    """
    import torch

    from .convergence import LossPlateau
    from .nn.losses import add_l1_gradient, reconstruction_loss, reference_cells

    device = next(model.parameters()).device
    steps = int(plan.steps)
    n = int(arrays[0].shape[0]) if rows is None else int(len(np.unique(rows)))
    if n == 0:
        raise ValueError("no rows to train on")
    batch_size = max(1, min(int(plan.batch_size), n))
    loader = MinibatchLoader(arrays, batch_size, seed=plan.seed, prefetch=plan.prefetch_blocks,
                             memory_budget_mb=plan.memory_budget_mb, buffer_blocks=plan.buffer_blocks, rows=rows,
                             pin_memory=device.type == "cuda")
    per_epoch = len(loader)
    n_ref = reference_cells(n_reference or n)
    weights = torch.from_numpy(np.asarray(cell_weight, dtype=np.float32)) if cell_weight is not None else None

    plateau, flat = LossPlateau(plan.plateau_tol, min_steps=plan.plateau_min_steps), False
    # the loss (float32 x against the bfloat16 reconstruction) is computed in float32 outside autocast
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=plan.precision == "bfloat16")
    model.train()
    history: list[dict] = []
    window: list = []
    wait = compute = 0.0
    last_checkpoint = time.perf_counter()
    t_start = time.perf_counter()
    step = int(start_step)
    bar = progress(steps, name, "steps", initial=step)
    try:
        with contextlib.closing(_batches_from(loader, step, per_epoch)) as stream:
            t0 = time.perf_counter()
            for batch in stream if step < steps else ():
                t1 = time.perf_counter()
                wait += t1 - t0
                x = _on_device(batch[0], device)
                trs = _on_device(batch[1], device) if len(batch) > 1 else None
                w = weights[torch.from_numpy(batch.row_index)].to(device) if weights is not None else None
                with autocast:
                    recon, _ = model(x)
                rec = reconstruction_loss(x, recon, trs=trs, gamma=plan.gamma, alpha=plan.alpha, cell_weight=w,
                                          reference_cells=n_ref)
                optimizer.zero_grad(set_to_none=True)
                rec.backward()
                loss = rec.detach() + plan.l1 * add_l1_gradient(model, plan.l1) if plan.l1 else rec
                optimizer.step()
                step += 1
                window.append(loss.detach())
                if step % _LOG_EVERY == 0 or step == steps:  # one device sync per record, not per step
                    history.append({"step": step, "loss": float(torch.stack(window).mean())})
                    elapsed = max(time.perf_counter() - t_start, 1e-9)
                    bar.set_postfix(loss=f"{history[-1]['loss']:.4g}",
                                    cells_s=f"{(step - start_step) * batch_size / elapsed:.0f}")
                    window = []
                    flat = step % _LOG_EVERY == 0 and plateau.update(step, history[-1]["loss"])
                bar.update(1)
                t0 = time.perf_counter()
                compute += t0 - t1
                if (checkpoint is not None and plan.checkpoint_seconds > 0
                        and t0 - last_checkpoint > plan.checkpoint_seconds):
                    checkpoint(step)
                    last_checkpoint = t0 = time.perf_counter()
                if step >= steps or flat:
                    break
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    done = step - int(start_step)
    if not np.all(np.isfinite([h["loss"] for h in history])):
        raise FloatingPointError(f"{name}: the autoencoder loss became non-finite; lower the learning rate")
    return {
        "steps": steps,
        "steps_run": int(done),
        "steps_total": int(step),
        "stopped_on_plateau": plateau.stopped_at is not None,
        "start_step": int(start_step),
        "batch_size": batch_size,
        "batches_per_epoch": per_epoch,
        "epochs_seen": round(step * batch_size / n, 3),
        "reference_cells": n_ref,
        "loader": loader.mode,
        "device": str(device),
        "precision": plan.precision,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "loss_history": history,
        "seconds_train": round(seconds, 3),
        "steps_per_s": round(done / seconds, 3) if seconds > 0 else None,
        "cells_per_s": round(done * batch_size / seconds, 1) if seconds > 0 else None,
        "loader_wait_fraction": round(wait / max(wait + compute, 1e-9), 4),
    }


def write_outputs(model, x, *, embedding=None, recon=None, progress: Progress = silent_progress,
                  name: str = "writing outputs", mantissa_bits: int = FLOAT32_MANTISSA_BITS) -> dict:
    """One streamed inference pass: embedding and/or reconstruction written block by block.

    Reads ``x`` in chunk-aligned row blocks (prefetched), runs the model, and writes each block
    to ``embedding`` / ``recon`` (zarr arrays of N rows) on a writer thread, so compression
    overlaps compute; the reconstruction is rounded to ``mantissa_bits`` there (23: unrounded).
    Returns the exact mean squared reconstruction error over all entries (of the unrounded values).
    """
    import torch

    device = next(model.parameters()).device
    model.eval()
    n, g = int(x.shape[0]), int(x.shape[1])
    out = recon if recon is not None else embedding
    block_rows = int(out.chunks[0]) if out is not None else int(x.chunks[0])
    sq_sum = 0.0
    t0 = time.perf_counter()
    bar = progress(n, name, "cells")
    with BackgroundWriter(depth=2) as writer, torch.inference_mode():
        try:
            for a, b, block in iter_row_blocks(x, block_rows, prefetch=2):
                xb = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(device)
                rb, zb = model(xb)
                sq_sum += float(((rb - xb) ** 2).sum(dtype=torch.float64))
                z_np = zb.float().cpu().numpy() if embedding is not None else None
                r_np = rb.float().cpu().numpy() if recon is not None else None
                writer.submit(_write_block, embedding, recon, a, b, z_np, r_np, mantissa_bits)
                bar.update(b - a)
        finally:
            bar.close()
    model.train()
    return {"recon_mse": sq_sum / max(n * g, 1), "seconds_infer": round(time.perf_counter() - t0, 3)}


def _write_block(embedding, recon, a, b, z_np, r_np, mantissa_bits):
    if embedding is not None:
        embedding[a:b] = z_np
    if recon is not None:
        if mantissa_bits < np.finfo(recon.dtype).nmant:  # float16 keeps 10 bits by itself: no double rounding
            r_np = round_mantissa(r_np, mantissa_bits)
        recon[a:b] = r_np.astype(recon.dtype, copy=False)


@contextlib.contextmanager
def cpu_threads(device, requested: int = 0):
    """Limit torch's intra-op threads while training on CPU, then restore them.

    The loader reads and decodes on background threads; torch's OpenMP threads spin while they
    wait for each other, so when they share every core with the loader a step can take several
    times longer (measured: 6.6 vs 43 steps/s on 2 busy cores). By default one core is left free.
    """
    import torch

    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(int(requested) if requested > 0 else max(1, min(before, cores - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the stage-facing composition ----------------------------------------------------------------
def _resume(ctx, model, optimizer) -> int:
    """Load this stage's checkpoint (same config chain) into model and optimiser; the step to resume at."""
    import torch

    state = ctx.load_checkpoint()
    if not state or not as_path(state.get("path", "")).is_file():
        return 0
    with as_path(state["path"]).open("rb") as fh:
        saved = torch.load(fh, map_location="cpu", weights_only=True)
    if saved.get("shape") != model.shape_dict():
        return 0
    model.load_state_dict(saved["model"])
    if "optimizer" in saved:
        optimizer.load_state_dict(saved["optimizer"])
    ctx.log.info("%s: resumed from checkpoint at step %d", ctx.stage, int(saved.get("step", 0)))
    return int(saved.get("step", 0))


def train_and_write(ctx, staging, *, x_key: str, trs_key: str | None, steps: int | None, model_in, model_out,
                    embedding_key: str | None, recon_key: str | None, gamma: float, alpha: float, l1: float,
                    min_steps: int, max_epochs: int, max_steps: int, cell_weight: np.ndarray | None = None,
                    seed: int | None = None, resume: bool = False, desc: str = "training",
                    recon_dtype=np.float32, recon_mantissa_bits: int = FLOAT32_MANTISSA_BITS, x_array=None,
                    trs_array=None, plateau_tol: float = 0.0) -> dict:
    """Build or load an autoencoder, train it on ``x_key`` (+ ``trs_key``), save it, write its outputs.

    The body the feature, iterate and impute stages share. Inputs staged in ``staging`` are read
    from there, others from the store; ``steps`` None takes :func:`training_steps` of the schedule;
    ``resume`` continues from this stage's checkpoint (saved every ``feature.checkpoint_minutes``;
    each save is announced as the context's event ``"checkpoint"``). ``x_array`` is read instead of
    ``x_key`` (which then only names it): a reconstruction computed as it is read
    (:mod:`scgnn_scale.reconstruction`); ``trs_array`` likewise instead of ``trs_key`` (the imputation's
    per-entry weights, :mod:`scgnn_scale.zero_weights`). ``plateau_tol`` > 0 stops before the schedule's last step once the
    loss has stopped falling (:class:`TrainPlan`). A resumed run starts watching for the plateau again at
    its checkpoint, so it may stop one window (50 steps) later than an uninterrupted run would.
    ``recon_mantissa_bits`` below 23 bit-rounds the reconstruction as it is written (:mod:`.bit_rounding`).
    """
    import torch

    from .nn.autoencoder import DenseAutoencoder
    from .nn.optim import adam

    fcfg = ctx.config.feature
    seed = ctx.config.runtime.seed if seed is None else int(seed)
    x = staging.open_array(x_key) if x_array is None else x_array
    n, g = int(x.shape[0]), int(x.shape[1])
    if n == 0 or g == 0:
        raise InputError(f"{ctx.store.root}: '{x_key}' is empty ({n} x {g}); nothing to train on")
    arrays = [x]
    if trs_key is not None:
        trs = staging.open_array(trs_key) if trs_array is None else trs_array
        if tuple(trs.shape) != (n, g):
            raise InputError(f"{ctx.store.root}: '{trs_key}' has shape {tuple(trs.shape)}, '{x_key}' has {(n, g)}")
        arrays.append(trs)
    if cell_weight is not None and len(cell_weight) != n:
        raise ValueError(f"cell_weight has {len(cell_weight)} entries for {n} cells")

    device = ctx.runtime.device
    torch.manual_seed(seed)
    if model_in is not None:
        model, saved = load_model(model_in, device)
        if model.n_genes != g:
            raise InputError(f"{model_in}: model has {model.n_genes} genes, '{x_key}' has {g}")
    else:
        model, saved = DenseAutoencoder(g, fcfg.hidden, fcfg.latent).to(device), {}
    optimizer = adam(model.parameters(), lr=fcfg.lr)
    if "optimizer" in saved:  # iterations continue the optimiser too, as the original's single Adam
        optimizer.load_state_dict(saved["optimizer"])
    total = (training_steps(n, fcfg.batch_size, min_steps, max_epochs, max_steps) if steps is None
             else int(steps))

    start, checkpoint = 0, None
    if resume and model_out is not None:
        ckpt_path = as_path(str(model_out) + ".ckpt")
        start = min(_resume(ctx, model, optimizer), total)

        def checkpoint(step: int) -> None:
            save_model(ckpt_path, model, optimizer, step=step)
            ctx.save_checkpoint({"step": step, "path": str(ckpt_path)})
            ctx.log.info("%s: checkpoint at step %d", ctx.stage, step)
            ctx.event("checkpoint", step=step)

    plan = TrainPlan(steps=total, batch_size=fcfg.batch_size, gamma=gamma, alpha=alpha, l1=l1, seed=seed,
                     memory_budget_mb=ctx.runtime.memory.loader_mb(fcfg.memory_budget_mb),
                     buffer_blocks=fcfg.buffer_blocks, prefetch_blocks=fcfg.prefetch_blocks,
                     checkpoint_seconds=60.0 * fcfg.checkpoint_minutes, plateau_tol=plateau_tol,
                     precision=training_precision(fcfg.precision, torch.device(device)))
    with cpu_threads(device, fcfg.torch_threads):
        info = ctx.runtime.fit_autoencoder(model, optimizer, arrays, plan, cell_weight=cell_weight, start_step=start,
                                           checkpoint=checkpoint, progress=ctx.progress, name=desc)
        info["torch_threads"] = torch.get_num_threads()
        if model_out is not None:
            save_model(model_out, model, optimizer, steps=total)
            info["model"] = str(model_out)
            if checkpoint is not None:
                as_path(str(model_out) + ".ckpt").unlink(missing_ok=True)

        emb_arr = staging.create_matrix(embedding_key, (n, model.latent), np.float32) if embedding_key else None
        recon_arr = staging.create_matrix(recon_key, (n, g), recon_dtype) if recon_key else None
        info.update(write_outputs(model, x, embedding=emb_arr, recon=recon_arr, progress=ctx.progress,
                                  mantissa_bits=recon_mantissa_bits))
    info.update({"n_cells": n, "n_genes": g, "ltmg": trs_key is not None, "seed": seed})
    ctx.log.info("%s: %d of %d steps (%s, %s) loss %.4g -> %.4g, recon MSE %.4g, %.0f cells/s, loader wait %.1f%%",
                 ctx.stage, info["steps_total"], info["steps"], info["loader"], info["device"], info["loss_first"] or float("nan"),
                 info["loss_last"] or float("nan"), info["recon_mse"], info["cells_per_s"] or 0,
                 100 * info["loader_wait_fraction"])
    return info


def train_feature(ctx, staging, *, x_key: str, trs_key: str | None, steps: int | None, model_in, model_out,
                  embedding_key: str | None, recon_key: str | None, seed: int | None = None, x_array=None) -> dict:
    """Train the feature autoencoder on ``x_key`` and write its embedding and reconstruction.

    Parameters
    ----------
    ctx
        Stage context (``config.feature``, seed, device, store).
    staging
        Where outputs are written (``ctx.store.staging(...)``); inputs staged there are read too.
    x_key, trs_key
        N x G float32 input (``X`` or an iteration's reconstruction) and its LTMG states (None: no
        LTMG term).
    steps
        Optimiser steps, or None for the schedule of the ``feature`` options.
    model_in
        Path of a saved model (and optimiser) to continue, or None for a fresh model seeded by
        ``seed``.
    model_out
        Where to save the trained model and optimiser (None: not saved).
    embedding_key, recon_key
        Output keys for the N x latent embedding and the N x G reconstruction (None: skipped).
    seed
        Seed of the weights and the minibatch order (default ``runtime.seed``).
    x_array
        Read instead of ``x_key`` (e.g. the cluster autoencoders' outputs, computed as they are read).

    Returns
    -------
    dict
        Steps, losses, reconstruction MSE over all cells, throughput, loader mode, device.
    """
    fcfg = ctx.config.feature
    return train_and_write(
        ctx, staging, x_key=x_key, trs_key=trs_key, steps=steps, model_in=model_in, model_out=model_out,
        embedding_key=embedding_key, recon_key=recon_key, gamma=fcfg.gamma, alpha=fcfg.alpha, l1=fcfg.l1,
        min_steps=fcfg.min_steps, max_epochs=fcfg.max_epochs, max_steps=fcfg.max_steps, seed=seed,
        resume=ctx.stage == "feature", desc="feature autoencoder", x_array=x_array, plateau_tol=fcfg.plateau_tol)
