"""What every reader shares: :class:`InputReader`, the file-error translation and the name and block helpers."""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ENVIRONMENT_ERRNOS, InputError

try:  # anndata finds no reader for an element's encoding: a file not in the format it claims
    from anndata._io.specs.registry import IORegistryError
except ImportError:  # pragma: no cover - an anndata that moved it; its other errors are still caught
    IORegistryError = RuntimeError

# exceptions that mean "this file cannot be read as what it claims to be" (corrupt, truncated, malformed)
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, EOFError, zlib.error,
                UnicodeDecodeError, AttributeError, IORegistryError)


def source_name(source: Any) -> str:
    """How messages name an input: its path or URL, or 'input AnnData' for an in-memory object."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    if source is None:
        return "input"
    return f"input {type(source).__name__}"


@contextmanager
def read_errors(name: str, what: str):
    """Turn a library's exception about a bad file into an InputError that names the file."""
    try:
        yield
    except InputError:
        raise
    except OSError as exc:
        if exc.errno in ENVIRONMENT_ERRNOS:
            raise  # a full disk or a permission: the machine, not the file (the CLI names the path)
        _raise_unreadable(name, what, exc)
    except _READ_ERRORS as exc:
        _raise_unreadable(name, what, exc)


def _raise_unreadable(name: str, what: str, exc: BaseException):
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise InputError(f"{name}: {what} (corrupt, truncated or not in the expected format): "
                     f"{type(exc).__name__}: {detail[:300]}") from exc


def unique_names(values, what: str, name: str) -> pd.Index:
    """Names as strings, made unique with a warning like AnnData's ``obs_names_make_unique``."""
    index = pd.Index(values)
    if index.inferred_type != "string":  # numbers or bytes; a names column of str is kept as it is
        index = pd.Index([v.decode() if isinstance(v, bytes) else str(v) for v in index], dtype=object)
    if not index.is_unique:
        from anndata.utils import make_index_unique

        n_dup = int(index.duplicated().sum())
        warnings.warn(f"{name}: {n_dup} duplicated {what} name(s) (e.g. {index[index.duplicated()][0]!r}); "
                      f"made unique by appending '-1', '-2', ... as AnnData's {what}_names_make_unique",
                      UserWarning, stacklevel=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = make_index_unique(index)
    return index


def check_csr_ends(indptr_ds, indices_ds, data_ds, name: str) -> None:
    """The whole pointer's ends (CSR rows or CSC columns) against the stored arrays, once per file: the blocks
    check their own ranges, and a pointer that ends short of ``data`` would otherwise read only a prefix of it."""
    first, last = int(indptr_ds[0]), int(indptr_ds[-1])
    n_data, n_indices = int(data_ds.shape[0]), int(indices_ds.shape[0])  # h5py datasets or zarr arrays
    if last > min(n_data, n_indices):
        raise InputError(f"{name}: corrupt sparse matrix (indptr points past the end of "
                         f"{'data' if n_data < last else 'indices'})")
    if first != 0 or last != n_data or n_indices != n_data:
        raise InputError(f"{name}: corrupt sparse matrix (indptr runs from {first} to {last}; data holds "
                         f"{n_data} values, indices {n_indices})")


def checked_csr(data, indices, indptr, n_rows: int, n_cols: int, name: str) -> sp.csr_matrix:
    """A CSR block from raw arrays after checking the structure (a damaged file shows here)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    indptr = indptr - indptr[0]
    if len(indptr) != n_rows + 1 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(data) \
            or len(indices) != len(data):
        raise InputError(f"{name}: corrupt sparse matrix (indptr is not a valid row pointer)")
    indices = np.asarray(indices)
    if len(indices) and (indices.min() < 0 or indices.max() >= n_cols):
        raise InputError(f"{name}: corrupt sparse matrix (a column index is outside 0..{n_cols - 1})")
    block = sp.csr_matrix((np.asarray(data, dtype=np.float32), indices.astype(np.int32, copy=False), indptr),
                          shape=(n_rows, n_cols))
    return canonical(block)


def canonical(block: sp.csr_matrix) -> sp.csr_matrix:
    block.sum_duplicates()  # also sorts the indices
    block.eliminate_zeros()
    return block


def _beyond_float32_is_inf():
    """Values beyond float32's range become inf quietly while read (ingest then names the first one; numpy's
    overflow warning would be a second line on the user's terminal)."""
    return np.errstate(over="ignore")


def is_group(node) -> bool:
    return hasattr(node, "keys") and not hasattr(node, "dtype")


class InputReader:
    """Block-wise access to one input. Subclasses fill ``_load_names`` and ``_blocks``."""

    format = "unknown"

    def __init__(self, name: str, *, label_key: str, block_rows: int, tmp_dir: str | None = None):
        self.name = name
        self.label_key = label_key
        self.block_rows = block_rows
        self.tmp_dir = tmp_dir
        self._closers: list[Any] = []

    # names and shape -------------------------------------------------------------------------
    @cached_property
    def _names(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        with read_errors(self.name, "cannot read the cell and gene names"), _beyond_float32_is_inf():
            obs, var = self._load_names()
        return obs, var

    def _load_names(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        raise NotImplementedError

    @property
    def obs(self) -> pd.DataFrame:
        """Cells: index = unique cell names, plus the label column when ``label_key`` was given."""
        return self._names[0]

    @property
    def var(self) -> pd.DataFrame:
        """Genes: index = unique gene names (10x inputs add a ``gene_ids`` column)."""
        return self._names[1]

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var)

    def _missing_label(self, available) -> InputError:
        cols = ", ".join(map(str, available)) or "none"
        return InputError(f"{self.name}: has no obs column {self.label_key!r} for --label-key "
                          f"(obs columns: {cols})")

    # blocks --------------------------------------------------------------------------------------
    def iter_blocks(self) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """Yield ``(start, stop, block)``: cells ``start:stop`` as CSR float32, in order, covering all cells."""
        _ = self._names
        blocks = self._blocks()
        while True:
            with read_errors(self.name, "cannot read the matrix"), _beyond_float32_is_inf():
                try:
                    item = next(blocks)
                except StopIteration:
                    return
            yield item

    def _blocks(self) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        raise NotImplementedError

    def _row_ranges(self):
        for start in range(0, self.n_obs, self.block_rows):
            yield start, min(start + self.block_rows, self.n_obs)

    # lifetime --------------------------------------------------------------------------------------
    def close(self) -> None:
        closers = getattr(self, "_closers", [])
        while closers:
            closer = closers.pop()
            try:
                closer()
            except Exception:  # noqa: BLE001 - closing must never hide the real error
                pass

    def __enter__(self) -> InputReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()
