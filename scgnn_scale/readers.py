"""Input formats through one door: :func:`open_input` returns a reader that yields cells x genes row blocks.

Every reader exposes ``n_obs``, ``n_vars``, ``obs`` (index: cell names, plus the ``label_key`` column),
``var`` (index: gene names) and ``iter_blocks()``, which yields ``(start, stop, block)`` with ``block`` a
``scipy.sparse.csr_matrix`` (float32) of cells ``start:stop`` in order. No reader holds the whole matrix.

Formats and how each is streamed
--------------------------------
- **h5ad** (local or fsspec URL) and **AnnData Zarr** stores (v2 or v3): dense ``X`` is sliced by rows;
  CSR ``X`` is read by ``indptr`` ranges; CSC ``X`` is read column range by column range and re-sorted
  through the spool (below).
- **10x Matrix Market directory**: ``matrix.mtx[.gz]`` (genes x cells) with ``features.tsv[.gz]`` or
  ``genes.tsv[.gz]`` and ``barcodes.tsv[.gz]``. The entries are parsed once, in chunks of 2 million
  lines, and spooled to disk by block of cells, so their order in the file does not matter.
- **10x HDF5** (``/matrix`` of Cell Ranger 3+, or the legacy ``/<genome>`` layout): the CSC genes x cells
  matrix is CSR cells x genes, so a block of cells is one ``indptr`` range.
- **CSV / TSV** (optionally gzipped; local or fsspec URL): first row = column names, first column = row
  names. Parsed once in row chunks by pandas and spooled by block of cells (needed for genes x cells,
  where one row holds one gene of every cell). See :func:`resolve_orientation` for the orientation rule.
- **AnnData object** in memory (Python API): its ``X`` (dense, sparse, backed or Dask) is sliced by rows.

When a 10x input holds several feature types (e.g. antibody capture), only 'Gene Expression' features
are kept, as scanpy does by default.

The spool
---------
(scanpy's ``read_10x_mtx``/``read_csv`` and ``pandas.read_csv`` load the whole matrix, so these formats
get their own chunked parse.)
Formats whose entries do not arrive cell by cell go through a spool: every non-zero is written as 12
bytes (row in its block int32, gene int32, value float32) to one temporary file per block of
``block_rows`` cells, buffered 4 million entries (48 MB) at a time. Memory stays bounded by the buffer
and one block; temporary disk use is 12 bytes per non-zero (in ``tmp_dir`` or the system temp
directory), removed when the reader is closed.

Names
-----
Duplicated cell or gene names are made unique with a warning, as ``AnnData.obs_names_make_unique``
does ('a', 'a' -> 'a', 'a-1').
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError, MissingDependencyError

log = logging.getLogger("scgnn_scale")

ORIENTATIONS = ("auto", "genes-x-cells", "cells-x-genes")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_SPOOL_BUFFER_ENTRIES = 4_000_000
_MTX_CHUNK_LINES = 2_000_000
_CSV_CHUNK_VALUES = 4_000_000
_ORIENTATION_SAMPLE_ROWS = 1000
_SPOOL_DTYPE = np.dtype([("row", "<i4"), ("col", "<i4"), ("val", "<f4")])

# exceptions that mean "this file cannot be read as what it claims to be" (corrupt, truncated, malformed)
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, EOFError, zlib.error,
                UnicodeDecodeError, AttributeError)


def source_name(source: Any) -> str:
    """How messages name an input: its path or URL, or 'input AnnData' for an in-memory object."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    if source is None:
        return "input"
    return f"input {type(source).__name__}"


# ---------------------------------------------------------------------------------------------------
# the door


def open_input(source: Any, *, orientation: str = "auto", label_key: str = "", block_rows: int = 8192,
               tmp_dir: str | None = None) -> InputReader:
    """Open an input for block-wise reading.

    Parameters
    ----------
    source
        A path or fsspec URL (h5ad, AnnData ``.zarr``, 10x directory or ``matrix.mtx[.gz]``, 10x ``.h5``,
        ``.csv``/``.tsv``/``.txt`` optionally ``.gz``) or an in-memory :class:`anndata.AnnData`.
    orientation
        For CSV/TSV only: 'genes-x-cells', 'cells-x-genes' or 'auto' (see :func:`resolve_orientation`).
    label_key
        An obs column to carry into ``reader.obs`` (empty: none). Missing -> :class:`InputError`.
    block_rows
        Cells per block yielded by ``iter_blocks``.
    tmp_dir
        Where spooled formats (CSV, mtx, CSC h5ad) keep their temporary files (default: system temp).

    Returns
    -------
    InputReader
        Use as a context manager, or call ``close()``.

    Raises
    ------
    InputError
        Missing file, unknown format, unreadable or corrupt file, missing label column, orientation
        that contradicts a CSV's names.
    """
    if orientation not in ORIENTATIONS:
        raise InputError(f"--orientation {orientation}: not one of {', '.join(ORIENTATIONS)}")
    if int(block_rows) < 1:
        raise InputError(f"block_rows {block_rows}: must be at least 1")
    opts = {"label_key": label_key or "", "block_rows": int(block_rows), "tmp_dir": tmp_dir}
    if not isinstance(source, str | os.PathLike):
        if hasattr(source, "obs") and hasattr(source, "X") and hasattr(source, "var"):
            return AnnDataObjectReader(source, **opts)
        raise InputError(f"{source_name(source)}: neither a path, a URL nor an AnnData")
    loc = _Location(str(source))
    name = loc.text
    if not loc.exists():
        where = " (no file at that URL, or its server cannot be reached)" if loc.is_url else ""
        raise InputError(f"{name}: input file not found{where}")
    kind = _detect_format(loc)
    with _read_errors(name, "cannot read the input"):
        if kind == "mtx":
            return MtxReader(loc, **opts)
        if kind == "delimited":
            return DelimitedReader(loc, orientation=orientation, **opts)
        if kind == "zarr":
            return _open_zarr(loc, **opts)
        return _open_hdf5(loc, kind, **opts)


def resolve_orientation(option: str, header: list[str], row_names: list[str], name: str) -> str:
    """Decide whether a CSV/TSV's rows are genes or cells.

    The rule (documented for users in ``--orientation``'s help and the README):

    - An axis *looks like cells* when at least half of its names hold a run of 10 or more of the letters
      A, C, G, T, N (a cell barcode, e.g. ``AAACCTGAGAAACCAT-1``) or read ``cell<number>``.
    - An axis *looks like genes* when at least half of its names are Ensembl gene ids (``ENSG00000141510``,
      ``ENSMUSG...``) or read ``gene<number>``, or when any name is a mitochondrial gene (``MT-``/``mt-``).
    - Evidence for cells x genes: the header looks like genes or the first column looks like cells;
      evidence for genes x cells: the header looks like cells or the first column looks like genes.
      Evidence for both (or neither) is no evidence.
    - 'auto' follows the evidence and falls back to genes x cells (the published scGNN's CSV layout); the
      reader then logs a warning with the resulting cell and gene counts.
      An explicit option that the evidence contradicts is an :class:`InputError`.

    The shape alone is never evidence: a million cells x 2000 genes and 20,000 genes x 3000 cells are
    both common. ``row_names`` is a sample (the first 1000 rows).
    """
    evidence, reasons = _orientation_evidence(header, row_names)
    if option == "auto":
        return evidence or "genes-x-cells"
    if evidence is not None and evidence != option:
        raise InputError(f"{name}: --orientation {option} contradicts the file: {' and '.join(reasons)}; "
                         f"pass --orientation {evidence} (or auto)")
    return option


def _orientation_evidence(header: list[str], row_names: list[str]) -> tuple[str | None, list[str]]:
    """The orientation the names show (None: no evidence) and the reasons, as :func:`resolve_orientation`."""
    cells_x_genes, genes_x_cells = [], []
    if _looks_like_genes(header) and not _looks_like_cells(header):
        cells_x_genes.append(f"its header holds gene names (e.g. {header[0]!r})")
    if _looks_like_cells(row_names) and not _looks_like_genes(row_names):
        cells_x_genes.append(f"its first column holds cell names (e.g. {row_names[0]!r})")
    if _looks_like_cells(header) and not _looks_like_genes(header):
        genes_x_cells.append(f"its header holds cell names (e.g. {header[0]!r})")
    if _looks_like_genes(row_names) and not _looks_like_cells(row_names):
        genes_x_cells.append(f"its first column holds gene names (e.g. {row_names[0]!r})")
    evidence = None
    if cells_x_genes and not genes_x_cells:
        evidence = "cells-x-genes"
    elif genes_x_cells and not cells_x_genes:
        evidence = "genes-x-cells"
    return evidence, (cells_x_genes if evidence == "cells-x-genes" else genes_x_cells if evidence else [])


_BARCODE = re.compile(r"[ACGTN]{10,}")
_CELL_WORD = re.compile(r"^cell[_.\-]?\d+$", re.IGNORECASE)
_ENSEMBL_GENE = re.compile(r"^ENS[A-Z]*G\d{6,}")
_GENE_WORD = re.compile(r"^gene[_.\-]?\d+$", re.IGNORECASE)
_MITO_GENE = re.compile(r"^(MT|mt|Mt)-[A-Za-z]")


def _fraction(names: list[str], *patterns: re.Pattern) -> float:
    if not names:
        return 0.0
    hits = sum(1 for n in names if any(p.search(n) for p in patterns))
    return hits / len(names)


def _looks_like_cells(names: list[str]) -> bool:
    return _fraction(names, _BARCODE, _CELL_WORD) >= 0.5


def _looks_like_genes(names: list[str]) -> bool:
    return _fraction(names, _ENSEMBL_GENE, _GENE_WORD) >= 0.5 or any(_MITO_GENE.match(n) for n in names)


# ---------------------------------------------------------------------------------------------------
# locations (local paths and fsspec URLs)


#: what fsspec's backend for a URL scheme needs (all in the 'remote' extra)
_REMOTE_PACKAGES = {"http": "aiohttp and requests", "https": "aiohttp and requests", "s3": "s3fs", "s3a": "s3fs",
                    "gs": "gcsfs", "gcs": "gcsfs"}


class _Location:
    """A local path or an fsspec URL, with the few operations the readers need."""

    def __init__(self, text: str):
        self.text = text.rstrip("/") if len(text) > 1 else text
        self.is_url = "://" in text
        if self.is_url:
            import fsspec

            scheme = self.text.split("://", 1)[0].rsplit("::", 1)[-1].lower()
            try:
                self.fs, self.fspath = fsspec.core.url_to_fs(self.text)
            except ImportError as exc:  # fsspec's backend for the scheme lacks its packages
                needs = _REMOTE_PACKAGES.get(scheme)
                if needs:
                    raise MissingDependencyError(f"{self.text}: reading {scheme}:// inputs needs {needs}; install "
                                                 "them with pip install 'scgnn-scale[remote]'") from None
                raise MissingDependencyError(f"{self.text}: reading {scheme}:// inputs needs a package that is "
                                             f"not installed ({str(exc).splitlines()[0] if str(exc) else exc!r})"
                                             ) from None
            except ValueError as exc:  # 'Protocol not known: ...'
                raise InputError(f"{self.text}: unknown URL scheme {scheme}:// (not a path, nor a URL that fsspec "
                                 "can read: file, http(s), s3, gs, ...)") from exc
        else:
            self.fs, self.fspath = None, self.text

    @property
    def name(self) -> str:
        return self.fspath.rstrip("/").rsplit("/", 1)[-1]

    def exists(self) -> bool:
        return self.fs.exists(self.fspath) if self.is_url else os.path.exists(self.fspath)

    def isdir(self) -> bool:
        return self.fs.isdir(self.fspath) if self.is_url else os.path.isdir(self.fspath)

    def listdir(self) -> list[str]:
        if self.is_url:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.fspath, detail=False)]
        return os.listdir(self.fspath)

    def child(self, name: str) -> _Location:
        return _Location(f"{self.text}/{name}")

    def parent(self) -> _Location:
        return _Location(self.text.rsplit("/", 1)[0] if "/" in self.text else ".")

    def open_binary(self):
        if self.is_url:
            return self.fs.open(self.fspath, "rb")
        return open(self.fspath, "rb")

    @contextmanager
    def open_text(self):
        """Text stream, transparently gunzipped when the name ends with .gz; closes every layer."""
        import gzip

        raw = self.open_binary()
        layers = [raw]
        try:
            stream = raw
            if self.text.lower().endswith(".gz"):
                stream = gzip.GzipFile(fileobj=raw, mode="rb")  # does not close raw itself
                layers.append(stream)
            text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
            layers.append(text)
            yield text
        finally:
            for layer in reversed(layers):
                layer.close()

    def head(self, n: int) -> bytes:
        with self.open_binary() as fh:
            return fh.read(n)


def _detect_format(loc: _Location) -> str:
    name = loc.name.lower()
    if loc.isdir():
        names = set(loc.listdir())
        if "zarr.json" in names or ".zgroup" in names or ".zattrs" in names:
            return "zarr"
        if "matrix.mtx" in names or "matrix.mtx.gz" in names:
            return "mtx"
        if name.endswith(".zarr"):
            return "zarr"  # a damaged store: the zarr reader says what is wrong
        raise InputError(f"{loc.text}: unknown input format: a directory that is neither an AnnData Zarr "
                         "store nor a 10x directory (matrix.mtx[.gz], features.tsv[.gz] or genes.tsv, "
                         "barcodes.tsv[.gz])")
    base = name[:-3] if name.endswith(".gz") else name
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith((".h5", ".hdf5", ".hdf")):
        return "h5"
    if base.endswith((".csv", ".tsv", ".txt", ".tab")):
        return "delimited"
    if base.endswith(".mtx"):
        return "mtx"
    if name.endswith(".zarr"):
        return "zarr"
    try:
        magic = loc.head(8)
    except OSError:
        magic = b""
    if magic == _HDF5_MAGIC:
        return "h5"
    raise InputError(f"{loc.text}: unknown input format (expected .h5ad, an AnnData .zarr store, a 10x "
                     "directory or .h5, or .csv/.tsv/.txt optionally .gz)")


@contextmanager
def _read_errors(name: str, what: str):
    """Turn a library's exception about a bad file into an InputError that names the file."""
    try:
        yield
    except InputError:
        raise
    except _READ_ERRORS as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{name}: {what} (corrupt, truncated or not in the expected format): "
                         f"{type(exc).__name__}: {detail[:300]}") from exc


def _unique_names(values, what: str, name: str) -> pd.Index:
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


def _checked_csr(data, indices, indptr, n_rows: int, n_cols: int, name: str) -> sp.csr_matrix:
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
    return _canonical(block)


def _canonical(block: sp.csr_matrix) -> sp.csr_matrix:
    block.sum_duplicates()  # also sorts the indices
    block.eliminate_zeros()
    return block


# ---------------------------------------------------------------------------------------------------
# readers


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
        with _read_errors(self.name, "cannot read the cell and gene names"):
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
            with _read_errors(self.name, "cannot read the matrix"):
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


class AnnDataObjectReader(InputReader):
    """An in-memory (or backed) :class:`anndata.AnnData`; ``X`` sliced by rows."""

    format = "anndata"

    def __init__(self, adata, **opts):
        super().__init__(source_name(adata), **opts)
        if adata.X is None:
            raise InputError(f"{self.name}: the AnnData has no X matrix")
        self.adata = adata

    def _load_names(self):
        obs = pd.DataFrame(index=_unique_names(self.adata.obs_names, "obs", self.name))
        if self.label_key:
            if self.label_key not in self.adata.obs.columns:
                raise self._missing_label(self.adata.obs.columns)
            obs[self.label_key] = self.adata.obs[self.label_key].values
        var = pd.DataFrame(index=_unique_names(self.adata.var_names, "var", self.name))
        return obs, var

    def _blocks(self):
        X = self.adata.X
        for start, stop in self._row_ranges():
            block = X[start:stop]
            if hasattr(block, "compute"):  # dask
                block = block.compute()
            if hasattr(block, "to_memory"):  # anndata backed sparse
                block = block.to_memory()
            block = sp.csr_matrix(block, dtype=np.float32) if sp.issparse(block) \
                else sp.csr_matrix(np.asarray(block, dtype=np.float32))
            yield start, stop, _canonical(block)


class AnnDataStoreReader(InputReader):
    """An AnnData on disk (h5ad through h5py, or a Zarr store): never loads X whole."""

    def __init__(self, root, fmt: str, name: str, **opts):
        super().__init__(name, **opts)
        self.root = root
        self.format = fmt
        if "X" not in root:
            raise InputError(f"{name}: the AnnData has no X matrix")
        X = root["X"]
        self.X = X
        if _is_group(X):
            enc = X.attrs.get("encoding-type", "")
            if enc not in ("csr_matrix", "csc_matrix"):
                raise InputError(f"{name}: X has encoding {enc!r}; expected a dense array, csr_matrix or "
                                 "csc_matrix")
            self.sparse = enc
            self.shape = tuple(int(s) for s in X.attrs["shape"])
        else:
            self.sparse = ""
            self.shape = tuple(int(s) for s in X.shape)
        if len(self.shape) != 2:
            raise InputError(f"{name}: X is not a 2-d matrix (shape {self.shape})")
        self._spool: _Spool | None = None

    def _frame_index(self, key: str):
        from anndata.io import read_elem

        group = self.root[key]
        if not _is_group(group):
            raise InputError(f"{self.name}: {key} uses the legacy AnnData (< 0.7) layout; re-save it "
                             "with a recent anndata")
        return group, read_elem(group[group.attrs["_index"]])

    def _load_names(self):
        from anndata.io import read_elem

        obs_group, obs_names = self._frame_index("obs")
        _, var_names = self._frame_index("var")
        if len(obs_names) != self.shape[0] or len(var_names) != self.shape[1]:
            raise InputError(f"{self.name}: obs/var have {len(obs_names)} x {len(var_names)} names but X is "
                             f"{self.shape[0]} x {self.shape[1]}")
        obs = pd.DataFrame(index=_unique_names(obs_names, "obs", self.name))
        if self.label_key:
            if self.label_key not in obs_group:
                raise self._missing_label(list(obs_group.attrs.get("column-order", [])))
            values = read_elem(obs_group[self.label_key])
            obs[self.label_key] = values.values if isinstance(values, pd.Series) else values
        var = pd.DataFrame(index=_unique_names(var_names, "var", self.name))
        return obs, var

    def _blocks(self):
        n_obs, n_vars = self.shape
        if self.sparse == "csr_matrix":
            indptr_ds, indices_ds, data_ds = self.X["indptr"], self.X["indices"], self.X["data"]
            for start, stop in self._row_ranges():
                indptr = np.asarray(indptr_ds[start:stop + 1], dtype=np.int64)
                lo, hi = int(indptr[0]), int(indptr[-1])
                yield start, stop, _checked_csr(data_ds[lo:hi], indices_ds[lo:hi], indptr, stop - start,
                                                n_vars, self.name)
        elif self.sparse == "csc_matrix":
            yield from self._csc_blocks()
        else:
            for start, stop in self._row_ranges():
                block = np.asarray(self.X[start:stop], dtype=np.float32)
                yield start, stop, _canonical(sp.csr_matrix(block))

    def _csc_blocks(self):
        """CSC X: read column ranges once, spool by block of cells, then yield the blocks."""
        n_obs, n_vars = self.shape
        indptr = np.asarray(self.X["indptr"][:], dtype=np.int64)  # n_vars + 1: small
        if len(indptr) != n_vars + 1 or np.any(np.diff(indptr) < 0):
            raise InputError(f"{self.name}: corrupt sparse matrix (indptr is not a valid column pointer)")
        spool = self._open_spool()
        col = 0
        while col < n_vars:
            # as many columns as fit one spool buffer
            end = int(np.searchsorted(indptr, indptr[col] + _SPOOL_BUFFER_ENTRIES, side="right")) - 1
            end = min(max(end, col + 1), n_vars)
            lo, hi = int(indptr[col]), int(indptr[end])
            rows = np.asarray(self.X["indices"][lo:hi], dtype=np.int64)
            if len(rows) and (rows.min() < 0 or rows.max() >= n_obs):
                raise InputError(f"{self.name}: corrupt sparse matrix (a row index is outside 0..{n_obs - 1})")
            cols = np.repeat(np.arange(col, end, dtype=np.int64), np.diff(indptr[col:end + 1]))
            spool.add(rows, cols, np.asarray(self.X["data"][lo:hi], dtype=np.float32))
            col = end
        yield from spool.blocks(n_obs, n_vars)

    def _open_spool(self) -> _Spool:
        spool = _Spool(self.block_rows, self.tmp_dir)
        self._closers.append(spool.close)
        return spool


def _is_group(node) -> bool:
    return hasattr(node, "keys") and not hasattr(node, "dtype")


def _open_zarr(loc: _Location, **opts) -> AnnDataStoreReader:
    import zarr

    try:
        root = zarr.open_group(loc.text if loc.is_url else loc.fspath, mode="r")
    except Exception as exc:  # zarr raises many types for a damaged store; all mean the same to a user
        raise InputError(f"{loc.text}: not a readable Zarr store (corrupt, truncated or not a Zarr group): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    fmt = f"zarr-v{root.metadata.zarr_format}"
    return AnnDataStoreReader(root, fmt, loc.text, **opts)


def _open_hdf5(loc: _Location, kind: str, **opts) -> InputReader:
    import h5py

    fileobj = None
    try:
        if loc.is_url:
            fileobj = loc.open_binary()
            handle = h5py.File(fileobj, "r")
        else:
            handle = h5py.File(loc.fspath, "r")
    except OSError as exc:
        if fileobj is not None:
            fileobj.close()
        raise InputError(f"{loc.text}: not a readable HDF5 file (truncated or corrupt): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    try:
        is_anndata = handle.attrs.get("encoding-type") == "anndata" or ("X" in handle and "obs" in handle)
        if is_anndata:
            reader: InputReader = AnnDataStoreReader(handle, "h5ad", loc.text, **opts)
        elif kind == "h5ad":
            raise InputError(f"{loc.text}: an HDF5 file without the AnnData layout (no X / obs)")
        else:
            reader = TenxH5Reader(handle, loc.text, **opts)
    except BaseException:
        handle.close()
        if fileobj is not None:
            fileobj.close()
        raise
    reader._closers.append(handle.close)
    if fileobj is not None:
        reader._closers.insert(0, fileobj.close)
    return reader


class TenxH5Reader(InputReader):
    """10x Genomics HDF5: CSC genes x cells under ``/matrix`` (or ``/<genome>`` in Cell Ranger 2)."""

    format = "10x-h5"

    def __init__(self, handle, name: str, **opts):
        super().__init__(name, **opts)
        if "matrix" in handle:
            self.group = handle["matrix"]
            feats = self.group["features"]
            self._gene_ids, self._gene_names = feats["id"], feats["name"]
            self._feature_types = feats["feature_type"] if "feature_type" in feats else None
        else:
            genomes = [k for k in handle if _is_group(handle[k]) and "barcodes" in handle[k]]
            if not genomes:
                raise InputError(f"{name}: an HDF5 file that is neither an AnnData nor a 10x matrix "
                                 "(no /matrix or /<genome> group)")
            self.group = handle[genomes[0]]
            self._gene_ids, self._gene_names = self.group["genes"], self.group["gene_names"]
            self._feature_types = None
        n_genes, n_cells = (int(s) for s in self.group["shape"][:])
        self.file_shape = (n_cells, n_genes)
        self.keep_genes: np.ndarray | None = None

    def _load_names(self):
        if self.label_key:
            raise self._missing_label([])
        barcodes = self.group["barcodes"].asstr()[:]
        names = self._gene_names.asstr()[:]
        ids = self._gene_ids.asstr()[:]
        if len(barcodes) != self.file_shape[0] or len(names) != self.file_shape[1]:
            raise InputError(f"{self.name}: {len(barcodes)} barcodes and {len(names)} features for a "
                             f"{self.file_shape[1]} x {self.file_shape[0]} matrix")
        if self._feature_types is not None:
            types = self._feature_types.asstr()[:]
            gex = types == "Gene Expression"
            if gex.any() and not gex.all():
                self.keep_genes = np.flatnonzero(gex)
                names, ids = names[gex], ids[gex]
        obs = pd.DataFrame(index=_unique_names(barcodes, "obs", self.name))
        var = pd.DataFrame({"gene_ids": ids}, index=_unique_names(names, "var", self.name))
        return obs, var

    def _blocks(self):
        n_cells, n_genes = self.file_shape
        indptr_ds, indices_ds, data_ds = self.group["indptr"], self.group["indices"], self.group["data"]
        for start, stop in self._row_ranges():
            indptr = np.asarray(indptr_ds[start:stop + 1], dtype=np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            block = _checked_csr(data_ds[lo:hi], indices_ds[lo:hi], indptr, stop - start, n_genes, self.name)
            if self.keep_genes is not None:
                block = block[:, self.keep_genes]
            yield start, stop, block


class MtxReader(InputReader):
    """A 10x Matrix Market directory; ``matrix.mtx`` is genes x cells, parsed once and spooled by cells."""

    format = "10x-mtx"

    def __init__(self, loc: _Location, **opts):
        if not loc.isdir():  # a path to matrix.mtx[.gz] itself
            loc = loc.parent()
        super().__init__(loc.text, **opts)
        self.loc = loc
        files = set(loc.listdir())

        def pick(*candidates):
            for c in candidates:
                if c in files:
                    return loc.child(c)
            return None

        self.matrix = pick("matrix.mtx.gz", "matrix.mtx")
        self.features = pick("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
        self.barcodes = pick("barcodes.tsv.gz", "barcodes.tsv")
        missing = [what for what, f in (("matrix.mtx[.gz]", self.matrix),
                                         ("features.tsv[.gz] or genes.tsv[.gz]", self.features),
                                         ("barcodes.tsv[.gz]", self.barcodes)) if f is None]
        if missing:
            raise InputError(f"{loc.text}: a 10x directory needs {', '.join(missing)}")
        self.header_lines, self.field, (self.n_genes_file, self.n_cells_file, self.nnz) = self._read_header()
        self.keep_genes: np.ndarray | None = None

    def _read_header(self):
        where = self.matrix.text
        with _read_errors(where, "cannot read the Matrix Market header"), self.matrix.open_text() as fh:
            banner = fh.readline()
            parts = banner.strip().lower().split()
            if len(parts) != 5 or parts[0] != "%%matrixmarket" or parts[1] != "matrix":
                raise InputError(f"{where}: not a Matrix Market file (first line {banner.strip()[:60]!r})")
            if parts[2] != "coordinate" or parts[3] not in ("real", "integer", "pattern") \
                    or parts[4] != "general":
                raise InputError(f"{where}: Matrix Market '{' '.join(parts[2:])}' is not supported "
                                 "(expected coordinate real/integer/pattern general)")
            n_lines = 1
            while True:
                line = fh.readline()
                n_lines += 1
                if not line:
                    raise InputError(f"{where}: truncated Matrix Market file (no size line)")
                if line.startswith("%") or not line.strip():
                    continue
                try:
                    dims = tuple(int(x) for x in line.split())
                except ValueError:
                    raise InputError(f"{where}: bad Matrix Market size line {line.strip()[:60]!r}") from None
                if len(dims) != 3:
                    raise InputError(f"{where}: bad Matrix Market size line {line.strip()[:60]!r}")
                return n_lines, parts[3], dims

    def _read_tsv(self, loc: _Location) -> pd.DataFrame:
        with _read_errors(loc.text, "cannot read the table"), loc.open_text() as fh:
            return pd.read_csv(fh, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)

    def _load_names(self):
        if self.label_key:
            raise self._missing_label([])
        feats = self._read_tsv(self.features)
        barcodes = self._read_tsv(self.barcodes)
        if len(feats) != self.n_genes_file or len(barcodes) != self.n_cells_file:
            raise InputError(f"{self.loc.text}: {len(feats)} features and {len(barcodes)} barcodes for a "
                             f"{self.n_genes_file} x {self.n_cells_file} matrix.mtx")
        ids = feats[0].to_numpy()
        names = feats[1].to_numpy() if feats.shape[1] > 1 else ids
        if feats.shape[1] > 2:
            gex = (feats[2] == "Gene Expression").to_numpy()
            if gex.any() and not gex.all():
                self.keep_genes = np.flatnonzero(gex)
                ids, names = ids[gex], names[gex]
        obs = pd.DataFrame(index=_unique_names(barcodes[0].to_numpy(), "obs", self.name))
        var = pd.DataFrame({"gene_ids": ids}, index=_unique_names(names, "var", self.name))
        return obs, var

    def _blocks(self):
        where = self.matrix.text
        n_genes, n_cells = self.n_genes_file, self.n_cells_file
        gene_map = None
        if self.keep_genes is not None:
            gene_map = np.full(n_genes, -1, dtype=np.int64)
            gene_map[self.keep_genes] = np.arange(len(self.keep_genes))
        columns = ["gene", "cell"] if self.field == "pattern" else ["gene", "cell", "value"]
        dtypes = {"gene": np.int64, "cell": np.int64, "value": np.float64}
        spool = _Spool(self.block_rows, self.tmp_dir)
        self._closers.append(spool.close)
        seen = 0
        with _read_errors(where, "cannot read the matrix"), self.matrix.open_text() as fh:
            chunks = pd.read_csv(fh, sep=r"\s+", header=None, names=columns, usecols=range(len(columns)),
                                 skiprows=self.header_lines, comment="%", chunksize=_MTX_CHUNK_LINES,
                                 dtype={c: dtypes[c] for c in columns}, engine="c")
            for chunk in chunks:
                genes = chunk["gene"].to_numpy() - 1
                cells = chunk["cell"].to_numpy() - 1
                bad = (genes < 0) | (genes >= n_genes) | (cells < 0) | (cells >= n_cells)
                if bad.any():
                    k = int(np.argmax(bad))
                    raise InputError(f"{where}: entry {seen + k + 1} ({genes[k] + 1}, {cells[k] + 1}) is "
                                     f"outside the {n_genes} x {n_cells} matrix")
                values = (np.ones(len(chunk), dtype=np.float32) if self.field == "pattern"
                          else chunk["value"].to_numpy(dtype=np.float32))
                if gene_map is not None:
                    genes = gene_map[genes]
                    keep = genes >= 0
                    cells, genes, values = cells[keep], genes[keep], values[keep]
                spool.add(cells, genes, values)
                seen += len(chunk)
        if seen != self.nnz:
            raise InputError(f"{where}: truncated Matrix Market file: {seen} entries, the header says {self.nnz}")
        yield from spool.blocks(n_cells, self.n_vars)


class DelimitedReader(InputReader):
    """CSV/TSV (optionally .gz): first row column names, first column row names; parsed once, spooled."""

    format = "csv"

    def __init__(self, loc: _Location, *, orientation: str, **opts):
        super().__init__(loc.text, **opts)
        self.loc = loc
        base = loc.name.lower().removesuffix(".gz")
        self.format = "tsv" if base.endswith((".tsv", ".tab")) else "csv"
        with loc.open_text() as fh:
            first = fh.readline()
            if not first.strip():
                raise InputError(f"{self.name}: empty matrix (the file is empty)")
            if base.endswith((".tsv", ".tab")):
                self.sep = "\t"
            elif base.endswith(".csv"):
                self.sep = ","
            else:
                self.sep = "\t" if "\t" in first else ","
            header = next(csv.reader([first], delimiter=self.sep))
            sample = []
            for line in fh:
                if line.strip():
                    sample.append(next(csv.reader([line], delimiter=self.sep)))
                if len(sample) >= _ORIENTATION_SAMPLE_ROWS:
                    break
        if not sample:
            raise InputError(f"{self.name}: empty matrix (a header but no data rows)")
        width = len(sample[0])
        if len(header) == width:
            columns = header[1:]  # a corner cell ('' or a label such as 'gene')
        elif len(header) == width - 1:
            columns = header  # R's write.table: no corner cell
        else:
            raise InputError(f"{self.name}: the header has {len(header)} fields but the first data row has "
                             f"{width}; expected row names in the first column and one name per column")
        if not columns:
            raise InputError(f"{self.name}: empty matrix (no data columns)")
        self.columns = [c.strip() for c in columns]
        row_names = [r[0].strip() for r in sample]
        self.orientation = resolve_orientation(orientation, self.columns, row_names, self.name)
        self.rows_are_cells = self.orientation == "cells-x-genes"
        # 'auto' without evidence: the default is a guess, said once the cell and gene counts are known
        self.orientation_assumed = orientation == "auto" and _orientation_evidence(self.columns, row_names)[0] is None
        self._row_names: list[np.ndarray] = []
        self._spool: _Spool | None = None

    @cached_property
    def _parsed(self) -> pd.Index:
        """Parse the file once: spool every non-zero by block of cells, collect the row names."""
        spool = _Spool(self.block_rows, self.tmp_dir)
        self._closers.append(spool.close)
        n_cols = len(self.columns)
        chunk_rows = max(1, _CSV_CHUNK_VALUES // max(n_cols, 1))
        names, offset = [], 0
        with _read_errors(self.name, "cannot parse the table"), self.loc.open_text() as fh:
            reader = pd.read_csv(fh, sep=self.sep, header=None, skiprows=1, index_col=0, chunksize=chunk_rows,
                                 dtype={0: str}, skip_blank_lines=True, engine="c")
            for chunk in reader:
                if chunk.shape[1] != n_cols:
                    raise InputError(f"{self.name}: rows have {chunk.shape[1]} values but there are {n_cols} "
                                     "column names")
                values = self._numeric(chunk, offset)
                r, c = np.nonzero(values)  # NaN counts as non-zero, so ingest reports it
                v = values[r, c]
                if self.rows_are_cells:
                    spool.add(r + offset, c, v)
                else:
                    spool.add(c, r + offset, v)
                names.append(chunk.index.to_numpy(dtype=object))
                offset += len(chunk)
        self._spool = spool
        return pd.Index(np.concatenate(names) if names else np.array([], dtype=object))

    def _numeric(self, chunk: pd.DataFrame, offset: int) -> np.ndarray:
        """The chunk as float32; the first non-numeric cell is an InputError naming row and column."""
        bad_cols = [j for j, dt in enumerate(chunk.dtypes)
                    if not pd.api.types.is_numeric_dtype(dt) or pd.api.types.is_bool_dtype(dt)]
        if bad_cols:
            first = None
            for j in bad_cols:
                col = chunk.iloc[:, j]
                coerced = pd.to_numeric(col, errors="coerce")
                bad = np.flatnonzero((coerced.isna() & col.notna()).to_numpy() | col.map(
                    lambda x: isinstance(x, bool | np.bool_)).to_numpy())
                if len(bad) and (first is None or (bad[0], j) < first[:2]):
                    first = (int(bad[0]), j, col.iloc[bad[0]])
            if first is not None:
                i, j, value = first
                row_name, col_name = chunk.index[i], self.columns[j]
                raise InputError(f"{self.name}: non-numeric value {str(value)[:40]!r} at row {row_name!r} "
                                 f"(data row {offset + i + 1}), column {col_name!r}")
            chunk = chunk.apply(pd.to_numeric, errors="coerce")
        return chunk.to_numpy(dtype=np.float32)

    def _load_names(self):
        if self.label_key:
            raise self._missing_label([])
        row_names = self._parsed
        if len(row_names) == 0:
            raise InputError(f"{self.name}: empty matrix (no data rows)")
        rows_what, cols_what = ("obs", "var") if self.rows_are_cells else ("var", "obs")
        rows = pd.DataFrame(index=_unique_names(row_names, rows_what, self.name))
        cols = pd.DataFrame(index=_unique_names(self.columns, cols_what, self.name))
        if self.orientation_assumed:
            log.warning("%s: its row and column names do not show which are cells and which are genes; read as "
                        "genes x cells (rows = genes, the original scGNN's CSV layout): %d cells x %d genes. "
                        "If its rows are cells, pass --orientation cells-x-genes (--orientation genes-x-cells "
                        "confirms this reading and silences this warning)", self.name, len(cols), len(rows))
        return (rows, cols) if self.rows_are_cells else (cols, rows)

    def _blocks(self):
        yield from self._spool.blocks(self.n_obs, self.n_vars)


# ---------------------------------------------------------------------------------------------------
# the spool


class _Spool:
    """Non-zeros in any order -> CSR blocks of ``block_rows`` cells, through one temp file per block."""

    def __init__(self, block_rows: int, tmp_dir: str | None = None):
        self.block_rows = block_rows
        self.dir = tempfile.mkdtemp(prefix="scgnn-spool-", dir=tmp_dir or None)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (bucket ids, records)
        self._pending_entries = 0
        self.n_entries = 0

    def add(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        if not len(rows):
            return
        rows = np.asarray(rows, dtype=np.int64)
        rec = np.empty(len(rows), dtype=_SPOOL_DTYPE)
        bucket = rows // self.block_rows
        rec["row"] = rows - bucket * self.block_rows
        rec["col"] = cols
        rec["val"] = vals
        self._pending.append((bucket, rec))
        self._pending_entries += len(rec)
        self.n_entries += len(rec)
        if self._pending_entries >= _SPOOL_BUFFER_ENTRIES:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        bucket = np.concatenate([b for b, _ in self._pending])
        rec = np.concatenate([r for _, r in self._pending])
        self._pending, self._pending_entries = [], 0
        order = np.argsort(bucket, kind="stable")
        bucket, rec = bucket[order], rec[order]
        starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        ends = np.r_[starts[1:], len(bucket)]
        for s, e in zip(starts, ends, strict=True):
            with open(os.path.join(self.dir, f"{int(bucket[s])}.bin"), "ab") as fh:
                rec[s:e].tofile(fh)

    def blocks(self, n_rows: int, n_cols: int) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        self.flush()
        for k, start in enumerate(range(0, n_rows, self.block_rows)):
            stop = min(start + self.block_rows, n_rows)
            path = os.path.join(self.dir, f"{k}.bin")
            rec = np.fromfile(path, dtype=_SPOOL_DTYPE) if os.path.exists(path) else np.empty(0, _SPOOL_DTYPE)
            block = sp.csr_matrix((rec["val"], (rec["row"], rec["col"])), shape=(stop - start, n_cols),
                                  dtype=np.float32)
            yield start, stop, _canonical(block)  # files stay until close(): the blocks can be read again

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

