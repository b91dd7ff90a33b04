"""Stage ``ingest``: the input, block by block, into ``work/input`` (CSR in the run store).

Writes ``work/input``: a group with the CSR arrays ``data`` (float32), ``indices`` (int32) and ``indptr``
(int64), ``attrs["shape"] = [n_cells, n_genes]``, and the elements ``obs`` (index: cell names, plus the
``--label-key`` column) and ``var`` (index: gene names). Every block is checked: a negative, NaN or
infinite value is an :class:`InputError` that names the file and the first bad cell and gene (in cell
order); so is an empty matrix. Memory: one block of ``ingest.block_rows`` cells plus one chunk of each
CSR array being filled (the arrays grow by resize, written in whole chunks).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import InputError
from ..keys import KEYS
from ..readers import open_input, source_name
from ..store import CSR_CHUNK
from ..store import compressors as store_compressors


class _Appender:
    """A 1-d zarr array that grows by whole chunks (no read-modify-write of a partial chunk)."""

    def __init__(self, group, name: str, dtype, compressors, chunk: int = CSR_CHUNK):
        self.array = group.create_array(name, shape=(0,), dtype=dtype, chunks=(chunk,), compressors=compressors,
                                        fill_value=0)
        self.chunk = chunk
        self.dtype = np.dtype(dtype)
        self.written = 0
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def append(self, values: np.ndarray) -> None:
        self._pending.append(np.asarray(values, dtype=self.dtype))
        self._pending_len += len(values)
        if self._pending_len >= self.chunk:
            self._write(final=False)

    def _write(self, final: bool) -> None:
        buf = np.concatenate(self._pending) if self._pending else np.empty(0, self.dtype)
        n = len(buf) if final else (len(buf) // self.chunk) * self.chunk
        if n:
            self.array.resize((self.written + n,))
            self.array[self.written:self.written + n] = buf[:n]
            self.written += n
        rest = buf[n:]
        self._pending, self._pending_len = ([rest] if len(rest) else []), len(rest)

    def close(self) -> int:
        self._write(final=True)
        return self.written


def check_block_values(block: sp.csr_matrix, start: int, obs_names, var_names, name: str) -> None:
    """Raise :class:`InputError` at the first negative, NaN or infinite value of a block (in cell order).

    Parameters
    ----------
    block
        Cells ``start:start + block.shape[0]``, CSR with sorted indices.
    obs_names, var_names
        Names used in the message.
    name
        The input, as the message names it.
    """
    data = block.data
    bad = ~np.isfinite(data) | (data < 0)
    if not bad.any():
        return
    k = int(np.argmax(bad))
    row = int(np.searchsorted(block.indptr, k, side="right")) - 1
    gene = int(block.indices[k])
    value = data[k]
    problem = "NaN (missing)" if np.isnan(value) else ("infinite" if np.isinf(value) else "negative")
    shown = f"{float(value):g}" + (" (or beyond float32's range, 3.4e38)" if np.isinf(value) else "")
    raise InputError(f"{name}: {problem} value {shown} at cell {obs_names[start + row]!r} (row {start + row}), "
                     f"gene {var_names[gene]!r} (column {gene}); counts must be finite and non-negative")


def run(ctx) -> dict:
    """Convert ``ctx.input`` into ``work/input`` (see the module docstring); returns the summary."""
    import anndata
    from anndata.io import write_elem

    cfg = ctx.config.ingest
    name = source_name(ctx.input)
    reader = open_input(ctx.input, orientation=cfg.orientation, label_key=cfg.label_key,
                        block_rows=cfg.block_rows, tmp_dir=cfg.tmp_dir or None)
    with reader:
        obs, var = reader.obs, reader.var
        n_cells, n_genes = len(obs), len(var)
        if n_cells == 0 or n_genes == 0:
            raise InputError(f"{name}: empty matrix ({n_cells} cells x {n_genes} genes)")
        obs_names, var_names = obs.index, var.index
        compressors = store_compressors(ctx.config.store.compression_level)
        with ctx.store.staging(ctx.stage) as st:
            group = st.create_group(KEYS.input)
            data = _Appender(group, "data", np.float32, compressors)
            indices = _Appender(group, "indices", np.int32, compressors)
            indptr = _Appender(group, "indptr", np.int64, compressors)
            indptr.append(np.zeros(1, dtype=np.int64))
            nnz = 0
            expected = 0
            with ctx.progress(n_cells, f"reading {reader.format}", "cells") as bar:
                for start, stop, block in reader.iter_blocks():
                    if start != expected or block.shape != (stop - start, n_genes):
                        raise AssertionError(f"reader {type(reader).__name__} yielded a misplaced block")
                    check_block_values(block, start, obs_names, var_names, name)
                    data.append(block.data)
                    indices.append(block.indices)
                    indptr.append(block.indptr[1:].astype(np.int64) + nnz)
                    nnz += int(block.nnz)
                    expected = stop
                    bar.update(stop - start)
            if expected != n_cells:
                raise InputError(f"{name}: the matrix holds {expected} cells but {n_cells} cell names")
            if nnz == 0:
                raise InputError(f"{name}: empty matrix (all {n_cells} x {n_genes} values are zero)")
            data.close()
            indices.close()
            indptr.close()
            group.attrs["shape"] = [n_cells, n_genes]
            anndata.settings.zarr_write_format = 3
            write_elem(group, "obs", obs)
            write_elem(group, "var", var)
    density = nnz / (n_cells * n_genes)
    ctx.log.info("ingest: %s (%s): %d cells x %d genes, %d non-zeros (%.2f%%)", name, reader.format, n_cells,
                 n_genes, nnz, 100 * density)
    return {"n_cells": n_cells, "n_genes": n_genes, "nnz": nnz, "format": reader.format,
            "density": round(density, 6), "label_key": cfg.label_key}
