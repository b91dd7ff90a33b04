"""HDF5 inputs: an h5ad (AnnData through h5py), or a 10x ``.h5``; a file of either kind that has the AnnData
layout is read as an AnnData."""

from __future__ import annotations

from ..errors import InputError
from .anndata import AnnDataStoreReader
from .base import InputReader
from .location import Location
from .registry import Format
from .tenx import TenxH5Reader

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def open_hdf5(loc: Location, *, anndata_only: bool, **opts) -> InputReader:
    """An HDF5 file with the AnnData layout, or (unless ``anndata_only``) a 10x matrix; the file stays open
    until the reader is closed."""
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
        elif anndata_only:
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


def is_h5ad(loc: Location) -> bool:
    return not loc.isdir() and loc.name.lower().endswith(".h5ad")


def is_hdf5(loc: Location) -> bool:
    """Named ``.h5``/``.hdf5``/``.hdf``, or (whatever its name) starting with the HDF5 signature."""
    if loc.isdir():
        return False
    if loc.name.lower().endswith((".h5", ".hdf5", ".hdf")):
        return True
    try:
        magic = loc.head(8)
    except OSError:
        magic = b""
    return magic == HDF5_MAGIC


def open_h5ad(loc: Location, *, orientation: str, **opts) -> InputReader:
    """An h5ad (cells x genes by definition: ``orientation`` does not apply)."""
    return open_hdf5(loc, anndata_only=True, **opts)


def open_h5(loc: Location, *, orientation: str, **opts) -> InputReader:
    """A 10x ``.h5`` or an AnnData saved under another name (``orientation`` does not apply)."""
    return open_hdf5(loc, anndata_only=False, **opts)


H5AD = Format(name="h5ad", expected=".h5ad", detect=is_h5ad, open=open_h5ad)
TENX_H5 = Format(name="10x-h5", expected="a 10x .h5, or any HDF5 file with the AnnData layout", detect=is_hdf5,
                 open=open_h5)
