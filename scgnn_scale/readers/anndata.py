"""AnnData inputs: an in-memory object, and a store on disk (h5ad through h5py, or a Zarr store v2/v3).

Dense ``X`` is sliced by rows; CSR ``X`` is read by ``indptr`` ranges; CSC ``X`` is read column range by
column range and re-sorted through the spool. (h5ad files are opened with the other HDF5 inputs, in
``hdf5.py``.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from .base import InputReader, canonical, check_csr_ends, checked_csr, is_group, source_name, unique_names
from .location import Location
from .registry import Format
from .spool import SPOOL_BUFFER_ENTRIES, Spool
from .tenx import MATRIX_FILES

#: the metadata files that make a directory a Zarr store (v3, then v2)
ZARR_METADATA = ("zarr.json", ".zgroup", ".zattrs")


def check_counts_dtype(name: str, dtype) -> None:
    """X must hold numbers (booleans, integers or floats): complex values or text are an InputError, not a cast."""
    if dtype is None or np.dtype(dtype).kind in "biuf":
        return
    what = {"c": "complex", "S": "byte-string", "U": "string", "O": "object", "V": "compound", "M": "date",
            "m": "time-delta"}.get(np.dtype(dtype).kind, str(np.dtype(dtype)))
    raise InputError(f"{name}: X holds {what} values ({np.dtype(dtype)}); expected counts (integers or floats)")


class AnnDataObjectReader(InputReader):
    """An in-memory (or backed) :class:`anndata.AnnData`; ``X`` sliced by rows."""

    format = "anndata"

    def __init__(self, adata, **opts):
        super().__init__(source_name(adata), **opts)
        if adata.X is None:
            raise InputError(f"{self.name}: the AnnData has no X matrix")
        check_counts_dtype(self.name, getattr(adata.X, "dtype", None))
        self.adata = adata

    def _load_names(self):
        obs = pd.DataFrame(index=unique_names(self.adata.obs_names, "obs", self.name))
        if self.label_key:
            if self.label_key not in self.adata.obs.columns:
                raise self._missing_label(self.adata.obs.columns)
            obs[self.label_key] = self.adata.obs[self.label_key].values
        var = pd.DataFrame(index=unique_names(self.adata.var_names, "var", self.name))
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
            yield start, stop, canonical(block)


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
        if is_group(X):
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
        check_counts_dtype(name, getattr(X["data"] if self.sparse and "data" in X else X, "dtype", None))
        self._spool: Spool | None = None

    def _frame_index(self, key: str):
        from anndata.io import read_elem

        group = self.root[key]
        if not is_group(group):
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
        obs = pd.DataFrame(index=unique_names(obs_names, "obs", self.name))
        if self.label_key:
            if self.label_key not in obs_group:
                raise self._missing_label(list(obs_group.attrs.get("column-order", [])))
            values = read_elem(obs_group[self.label_key])
            obs[self.label_key] = values.values if isinstance(values, pd.Series) else values
        var = pd.DataFrame(index=unique_names(var_names, "var", self.name))
        return obs, var

    def _blocks(self):
        n_obs, n_vars = self.shape
        if self.sparse == "csr_matrix":
            indptr_ds, indices_ds, data_ds = self.X["indptr"], self.X["indices"], self.X["data"]
            check_csr_ends(indptr_ds, indices_ds, data_ds, self.name)
            for start, stop in self._row_ranges():
                indptr = np.asarray(indptr_ds[start:stop + 1], dtype=np.int64)
                lo, hi = int(indptr[0]), int(indptr[-1])
                yield start, stop, checked_csr(data_ds[lo:hi], indices_ds[lo:hi], indptr, stop - start,
                                                n_vars, self.name)
        elif self.sparse == "csc_matrix":
            yield from self._csc_blocks()
        else:
            for start, stop in self._row_ranges():
                block = np.asarray(self.X[start:stop], dtype=np.float32)
                yield start, stop, canonical(sp.csr_matrix(block))

    def _csc_blocks(self):
        """CSC X: read column ranges once, spool by block of cells, then yield the blocks."""
        n_obs, n_vars = self.shape
        indptr = np.asarray(self.X["indptr"][:], dtype=np.int64)  # n_vars + 1: small
        if len(indptr) != n_vars + 1 or np.any(np.diff(indptr) < 0):
            raise InputError(f"{self.name}: corrupt sparse matrix (indptr is not a valid column pointer)")
        check_csr_ends(indptr, self.X["indices"], self.X["data"], self.name)
        spool = self._open_spool()
        col = 0
        while col < n_vars:
            # as many columns as fit one spool buffer
            end = int(np.searchsorted(indptr, indptr[col] + SPOOL_BUFFER_ENTRIES, side="right")) - 1
            end = min(max(end, col + 1), n_vars)
            lo, hi = int(indptr[col]), int(indptr[end])
            rows = np.asarray(self.X["indices"][lo:hi], dtype=np.int64)
            if len(rows) and (rows.min() < 0 or rows.max() >= n_obs):
                raise InputError(f"{self.name}: corrupt sparse matrix (a row index is outside 0..{n_obs - 1})")
            values = np.asarray(self.X["data"][lo:hi], dtype=np.float32)
            cols = np.repeat(np.arange(col, end, dtype=np.int64), np.diff(indptr[col:end + 1]))
            spool.add(rows, cols, values)
            col = end
        yield from spool.blocks(n_obs, n_vars)

    def _open_spool(self) -> Spool:
        spool = Spool(self.block_rows, self.tmp_dir)
        self._closers.append(spool.close)
        return spool


def open_zarr(loc: Location, *, orientation: str, **opts) -> AnnDataStoreReader:
    """An AnnData Zarr store (cells x genes by definition: ``orientation`` does not apply)."""
    import zarr

    try:
        root = zarr.open_group(loc.text if loc.is_url else loc.fspath, mode="r")
    except Exception as exc:  # zarr raises many types for a damaged store; all mean the same to a user
        raise InputError(f"{loc.text}: not a readable Zarr store (corrupt, truncated or not a Zarr group): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    fmt = f"zarr-v{root.metadata.zarr_format}"
    return AnnDataStoreReader(root, fmt, loc.text, **opts)


def is_zarr(loc: Location) -> bool:
    """A directory with Zarr metadata, or anything named ``.zarr`` (a damaged store: the zarr reader says
    what is wrong) that is not a 10x directory."""
    if loc.holds(*ZARR_METADATA):
        return True
    return loc.name.lower().endswith(".zarr") and not loc.holds(*MATRIX_FILES)


ANNDATA_ZARR = Format(name="anndata-zarr", expected="an AnnData .zarr store", detect=is_zarr, open=open_zarr)
