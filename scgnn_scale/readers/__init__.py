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

Adding a format
---------------
A format is a :class:`Format` record: a ``detect(location) -> bool`` that recognises it from a
:class:`Location` (name, directory listing, first bytes) and an ``open(location, *, orientation,
label_key, block_rows, tmp_dir) -> InputReader`` that returns an :class:`InputReader` subclass (fill its
``_load_names`` and ``_blocks``). ``register(Format(name, expected, detect, open))`` adds it; formats are
tried in registration order, the first that detects the input opens it, and an input that none detects
is an :class:`InputError` that lists the registered formats. ``unregister(name)`` removes one.

Modules
-------
``registry`` (the :class:`Format` record and the registered formats), ``base`` (:class:`InputReader` and
the helpers every reader shares), ``location`` (local paths and fsspec URLs), ``spool`` (the spool), and one
module per family: ``anndata`` (in-memory AnnData, Zarr stores), ``hdf5`` (h5ad and 10x ``.h5`` files),
``tenx`` (the 10x readers, Matrix Market directories), ``delimited`` (CSV/TSV and the orientation rule).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import InputError
from .anndata import ANNDATA_ZARR, AnnDataObjectReader, AnnDataStoreReader
from .base import InputReader, read_errors, source_name
from .delimited import DELIMITED, ORIENTATIONS, DelimitedReader, resolve_orientation
from .hdf5 import H5AD, TENX_H5
from .location import Location
from .registry import Format, detect_format, register, registered_formats, unregister
from .tenx import TENX_MTX, MtxReader, TenxH5Reader

__all__ = ["ORIENTATIONS", "AnnDataObjectReader", "AnnDataStoreReader", "DelimitedReader", "Format", "InputReader",
           "Location", "MtxReader", "TenxH5Reader", "detect_format", "open_input", "register", "registered_formats",
           "resolve_orientation", "source_name", "unregister"]

# The order of detection. A Zarr store comes before a 10x directory (a store may hold anything); the
# name-based formats are disjoint among themselves; the 10x .h5 comes last because it also takes any file
# that starts with the HDF5 signature, whatever its name.
for _fmt in (ANNDATA_ZARR, TENX_MTX, H5AD, DELIMITED, TENX_H5):
    register(_fmt)
del _fmt


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
    loc = Location(str(source))
    name = loc.text
    if not loc.exists():
        where = " (no file at that URL, or its server cannot be reached)" if loc.is_url else ""
        raise InputError(f"{name}: input file not found{where}")
    fmt = detect_format(loc)
    with read_errors(name, "cannot read the input"):
        return fmt.open(loc, orientation=orientation, **opts)
