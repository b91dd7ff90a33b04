"""Synthetic atlases with planted cell types, written block by block in bounded memory.

The model (every draw seeded from ``seed``):

- gene base means ``mu_g ~ LogNormal(-1, 1.5)`` (median 0.37 counts) and per-gene NB dispersion
  ``r_g ~ Uniform(1, 5)`` (variance ``mu + mu^2 / r``);
- ``n_types`` cell types, each with its own expression programme: 8% of the genes up (fold
  ``LogNormal(log 4, 0.3)``) and 4% down (fold 1/4), drawn per type from the genes with a base mean
  above the median;
- type proportions: half uniform, half ``Dirichlet(2)``, so every type holds at least half its uniform share;
- per-cell library size ``LogNormal(0, 0.35)`` multiplying every mean;
- counts ``NB(mean = size_c * mu_g * fold_{t(c), g}, r_g)`` drawn as Gamma-Poisson, then each non-zero
  is set to zero with probability ``dropout * m0 / (m0 + mean)`` (``dropout_model`` 'expression', m0 = 1
  count): likely where little is expected, rare where much is, as in real data (Splatter's dropout is
  likewise a falling logistic of the mean). 'uniform' (the model before commit 1232111) drops every non-zero
  with probability ``dropout`` whatever its mean: a gene expected at hundreds of counts then reads 0 in a
  ``dropout`` share of every type's cells, a second structure inside each type that a million-cell
  graph resolves into communities of its own.

Cells are drawn in tiles of a fixed number of rows (about 2 million values: 1024 cells at 2000 genes),
each tile with its own seed (``SeedSequence(seed, spawn_key=(1, tile))``), so the atlas does not depend
on ``block_rows`` nor on ``workers`` (blocks of tiles drawn in parallel worker processes), and memory
stays at about one block per worker whatever ``n_cells`` (10 million included). X is written as CSR
(float32 data, int32 indices, int64 indptr) and ``obs`` column by column, all appended block by block;
the output is an AnnData store (``.zarr``: Zarr v3 directory; ``.h5ad``: HDF5) that
``anndata`` reads and ``scgnn-scale run`` accepts. ``obs['label']`` (categorical, ``type0`` ...) holds the
planted types.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError
from .progress import progress_bar

_TILE_VALUES = 1 << 21
ARRAY_CHUNK = 1 << 20  # entries per chunk of the 1-d arrays written
_PARALLEL_FROM_TILES = 64  # below this many tiles, starting worker processes costs more than it saves
DROPOUT_MODELS = ("expression", "uniform")  # the first is the default
DROPOUT_HALF_MEAN = 1.0  # expected count at which the 'expression' model's dropout is half of ``dropout``


def _tile_rows(n_genes: int) -> int:
    return int(max(1, min(1024, _TILE_VALUES // max(n_genes, 1))))


class _Programme:
    """What all tiles share: gene means, dispersions, type programmes and proportions."""

    def __init__(self, n_genes: int, n_types: int, seed: int):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
        base = rng.lognormal(mean=-1.0, sigma=1.5, size=n_genes)
        self.dispersion = rng.uniform(1.0, 5.0, size=n_genes)
        fold = np.ones((n_types, n_genes))
        # programmes act on the better-expressed half of the genes: a marker with a mean of 0.01 counts
        # would plant nothing
        pool = np.flatnonzero(base >= np.median(base))
        n_up = max(2, int(round(0.08 * n_genes)))
        n_down = max(1, n_up // 2)
        for t in range(n_types):
            chosen = rng.choice(pool, size=min(len(pool), n_up + n_down), replace=False)
            fold[t, chosen[:n_up]] = rng.lognormal(np.log(4.0), 0.3, size=len(chosen[:n_up]))
            fold[t, chosen[n_up:]] = 0.25
        self.type_means = base[None, :] * fold
        self.proportions = 0.5 / n_types + 0.5 * rng.dirichlet(np.full(n_types, 2.0))
        self.proportions /= self.proportions.sum()


def dropout_probability(mean: np.ndarray, dropout: float, model: str) -> np.ndarray | float:
    """Chance that a non-zero count whose NB mean is ``mean`` is set to zero."""
    if model == "uniform":
        return dropout
    return dropout * DROPOUT_HALF_MEAN / (DROPOUT_HALF_MEAN + mean)


def _simulate_tile(prog: _Programme, seed: int, tile: int, n_rows: int, dropout: float, model: str):
    """One tile of cells: (CSR counts float32, type codes)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, tile)))
    types = rng.choice(len(prog.proportions), size=n_rows, p=prog.proportions)
    size = rng.lognormal(0.0, 0.35, size=n_rows)
    mean = prog.type_means[types] * size[:, None]
    r = prog.dispersion[None, :]
    # Gamma-Poisson = NB; float32 standard gammas are the cheapest draw numpy offers
    gammas = rng.standard_gamma(np.broadcast_to(r, mean.shape), dtype=np.float32)
    counts = rng.poisson(gammas * (mean / r))
    rows, cols = np.nonzero(counts)
    values = counts[rows, cols]
    if dropout > 0:
        kept = rng.random(len(values)) >= dropout_probability(mean[rows, cols], dropout, model)
        rows, cols, values = rows[kept], cols[kept], values[kept]
    block = sp.csr_matrix((values.astype(np.float32), (rows, cols)), shape=counts.shape, dtype=np.float32)
    return block, types


def _simulate_block(prog: _Programme, seed: int, tiles: range, n_cells: int, tile: int, dropout: float,
                    model: str):
    """Tiles ``tiles`` stacked: (CSR counts float32, type codes)."""
    parts = [_simulate_tile(prog, seed, t, min(tile, n_cells - t * tile), dropout, model) for t in tiles]
    return sp.vstack([b for b, _ in parts], format="csr"), np.concatenate([c for _, c in parts])


class _Serial(Executor):
    """Runs each submitted call at once, in this process (one worker: no processes to start)."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class _Writer:
    """Appends CSR rows and obs entries to an AnnData layout (h5py file or zarr v3 group)."""

    def __init__(self, path: Path, is_h5: bool, n_genes: int, categories: list[str], code_dtype):
        self.path = path
        self.n_genes = n_genes
        self.categories = categories
        self.is_h5 = is_h5
        self.nnz = 0
        self.n_rows = 0
        self._queued: dict[int, tuple[Any, list[np.ndarray]]] = {}  # per array: entries not yet written
        if self.is_h5:
            import h5py

            self.root = h5py.File(path, "w")
        else:
            import zarr

            self.root = zarr.open_group(path, mode="w", zarr_format=3)
        self.root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        X = self.root.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [0, n_genes]})
        self.X = X
        self.data = self._array(X, "data", np.float32)
        self.indices = self._array(X, "indices", np.int32)
        self.indptr = self._array(X, "indptr", np.int64)
        self._append(self.indptr, np.zeros(1, dtype=np.int64))
        obs = self.root.create_group("obs")
        obs.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index",
                          "column-order": ["label"]})
        self.names = self._array(obs, "_index", str)
        self.names.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
        label = obs.create_group("label")
        label.attrs.update({"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False})
        self.codes = self._array(label, "codes", code_dtype)
        self.codes.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        self.label_group = label

    def _array(self, group, name: str, dtype):
        # cell names wait for a whole chunk as Python strings (~60 bytes each): smaller chunks
        chunk = min(ARRAY_CHUNK, 1 << 16) if dtype is str else ARRAY_CHUNK
        if self.is_h5:
            import h5py

            h5_dtype = h5py.string_dtype() if dtype is str else dtype
            return group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=h5_dtype, chunks=(chunk,),
                                        compression="gzip", compression_opts=1, shuffle=True)
        from .store import compressors

        # the store's codec at level 1 (bench_codec.py): this process writes every block while the workers draw
        codecs = None if dtype is str else compressors(1)
        kwargs = {"compressors": codecs} if codecs else {}
        # write_empty_chunks: no scan of every chunk for all-zeros before writing it (counts rarely are)
        return group.create_array(name, shape=(0,), dtype=dtype, chunks=(chunk,),
                                  config={"write_empty_chunks": True}, **kwargs)

    def _append(self, array, values) -> None:
        """Queue ``values`` for the end of ``array``; write the whole chunks queued so far.

        Writing only whole chunks means no chunk is ever read back, decoded, extended and encoded
        again: with one 1M-entry chunk of cell names that re-encoding grew with every block
        (quadratic in the cells). At 1M x 2,000 this process spent 47 s writing before, 14 s after.
        """
        queue = self._queued.setdefault(id(array), (array, []))[1]
        queue.append(values)
        queued = sum(len(v) for v in queue)
        chunk = int(array.chunks[0])
        if queued >= chunk:
            self._write_queued(array, queued // chunk * chunk)

    def _write_queued(self, array, count: int) -> None:
        """Write the first ``count`` queued entries of ``array`` at its end; keep the rest queued."""
        queue = self._queued[id(array)][1]
        values = np.concatenate(queue) if len(queue) > 1 else queue[0]
        old = array.shape[0]
        array.resize((old + count,))
        array[old:old + count] = values[:count]
        queue[:] = [values[count:]] if count < len(values) else []

    def _flush(self) -> None:
        for array, queue in self._queued.values():
            queued = sum(len(v) for v in queue)
            if queued:
                self._write_queued(array, queued)

    def append(self, block: sp.csr_matrix, types: np.ndarray) -> None:
        start = self.n_rows
        self._append(self.data, block.data)
        self._append(self.indices, block.indices.astype(np.int32))
        self._append(self.indptr, block.indptr[1:].astype(np.int64) + self.nnz)
        names = np.array([f"cell{i}" for i in range(start, start + block.shape[0])], dtype=object)
        self._append(self.names, names)
        self._append(self.codes, types.astype(self.codes.dtype))
        self.nnz += block.nnz
        self.n_rows += block.shape[0]

    def finish(self, var: pd.DataFrame, uns: dict) -> None:
        import anndata
        from anndata.io import write_elem

        anndata.settings.zarr_write_format = 3
        self._flush()
        self.X.attrs["shape"] = [self.n_rows, self.n_genes]
        write_elem(self.label_group, "categories", np.array(self.categories, dtype=object))
        write_elem(self.root, "var", var)
        for name in ("layers", "obsm", "obsp", "varm", "varp"):
            write_elem(self.root, name, {})
        write_elem(self.root, "uns", uns)
        if self.is_h5:
            self.root.close()


def recorded_parameters(path: str | os.PathLike) -> dict | None:
    """The parameters an atlas of :func:`simulate_atlas` records (``uns['simulate']``); None for a missing
    file, another file, or an atlas drawn before commit e2b0ffe (they record none)."""
    from anndata.io import read_elem

    path = Path(path)
    try:
        if path.suffix == ".h5ad":
            import h5py

            with h5py.File(path, "r") as f:
                return read_elem(f["uns/simulate"])
        import zarr

        return read_elem(zarr.open_group(path, mode="r")["uns/simulate"])
    except (FileNotFoundError, KeyError, OSError):
        return None


def drawn_by_default_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an atlas of today's default dropout model: the benchmarks that keep atlases
    under bench/out draw theirs again otherwise (an old file is never reused for a new model)."""
    parameters = recorded_parameters(path)
    return parameters is not None and parameters.get("dropout_model") == DROPOUT_MODELS[0]


def simulate_atlas(out: str | os.PathLike, *, n_cells: int = 3000, n_genes: int = 2000, n_types: int = 6,
                   dropout: float = 0.3, dropout_model: str = DROPOUT_MODELS[0], seed: int = 0,
                   block_rows: int = 16384, overwrite: bool = False, workers: int | None = None,
                   progress: bool = False) -> Path:
    """Write a synthetic atlas with planted cell types (model in the module docstring).

    Parameters
    ----------
    out
        Output path ending in ``.zarr`` (Zarr v3 AnnData store) or ``.h5ad``.
    n_cells, n_genes, n_types
        Size of the atlas and number of planted types (``obs['label']``: ``type0`` ...).
    dropout
        Probability that a non-zero count is set to zero, in [0, 1): with ``dropout_model`` 'expression',
        of a count whose mean is near 0, falling as ``dropout / (1 + mean)`` (half of it at a mean of 1);
        with 'uniform', of every count.
    dropout_model
        'expression' or 'uniform' (the atlases drawn before commit 1232111).
    seed
        The atlas is a function of the seed alone (not of ``block_rows``).
    block_rows
        Cells written per block (rounded up to whole tiles); memory grows with it, not with ``n_cells``.
    overwrite
        Replace an existing ``out``; without it an existing output is an :class:`InputError`.
    workers
        Processes drawing blocks (None: one per CPU core for atlases of 64 tiles and more, else 1).
        Memory grows with it: one block per worker is in flight.
    progress
        Show a progress bar (cells written, rate, ETA) on standard error.

    Returns
    -------
    Path
        ``out``. Written under a temporary name and renamed, so a killed run leaves no partial output.
    """
    out = Path(out)
    if out.suffix not in (".zarr", ".h5ad"):
        raise InputError(f"{out}: the output must end in .zarr (Zarr AnnData store) or .h5ad")
    for option, value, low in (("--cells", n_cells, 1), ("--genes", n_genes, 1), ("--types", n_types, 1),
                               ("--block-rows", block_rows, 1), ("--workers", workers or 1, 1)):
        if int(value) < low:
            raise InputError(f"simulate {option} {value}: must be at least {low}")
    if n_types > n_cells:
        raise InputError(f"simulate --types {n_types}: more types than cells ({n_cells})")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"simulate --dropout {dropout}: must be in [0, 1)")
    if dropout_model not in DROPOUT_MODELS:
        raise InputError(f"simulate --dropout-model {dropout_model!r}: not one of {', '.join(DROPOUT_MODELS)}")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # as `run` makes its --out
    except OSError as exc:
        raise InputError(f"{out}: cannot create the directory {out.parent}: {exc.strerror or exc}") from exc

    prog = _Programme(n_genes, n_types, seed)
    tile = _tile_rows(n_genes)
    tiles_per_block = max(1, -(-block_rows // tile))
    categories = [f"type{t}" for t in range(n_types)]
    code_dtype = np.int8 if n_types < 128 else np.int16 if n_types < 32768 else np.int32
    tmp = out.with_name(f".{out.name}.partial")
    _remove(tmp)
    writer = _Writer(tmp, out.suffix == ".h5ad", n_genes, categories, code_dtype)
    n_tiles = -(-n_cells // tile)
    if workers is None:
        workers = (os.cpu_count() or 1) if n_tiles >= _PARALLEL_FROM_TILES else 1
    bar = progress_bar(n_cells, "simulate", "cells", quiet=not progress)

    def write(drawn: Future) -> None:
        writer.append(*drawn.result())
        bar.update(writer.n_rows - bar.n)

    try:
        with _tile_executor(workers) as pool:
            blocks = [range(first, min(first + tiles_per_block, n_tiles))
                      for first in range(0, n_tiles, tiles_per_block)]
            # one block per worker in flight and one more: the pool draws while this process writes
            ahead = workers + 1 if workers > 1 else 1
            pending = []
            for block in blocks:
                pending.append(pool.submit(_simulate_block, prog, seed, block, n_cells, tile, dropout, dropout_model))
                if len(pending) >= ahead:
                    write(pending.pop(0))
            for future in pending:
                write(future)
        # how the atlas was drawn (recorded_parameters), so that a benchmark can tell one of another model
        parameters = {"n_cells": n_cells, "n_genes": n_genes, "n_types": n_types, "dropout": dropout,
                      "dropout_model": dropout_model, "seed": seed}
        writer.finish(pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(n_genes)])), {"simulate": parameters})
    except BaseException:
        if writer.is_h5:
            writer.root.close()
        _remove(tmp)
        raise
    finally:
        bar.close()
    _remove(out)
    os.replace(tmp, out)
    return out


def _tile_executor(workers: int) -> Executor:
    if workers <= 1:
        return _Serial()
    import multiprocessing

    # spawn, not fork: zarr keeps an event-loop thread, and forking a threaded process can deadlock
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
