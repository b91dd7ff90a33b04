"""10x Genomics inputs: the HDF5 matrix (Cell Ranger 3+ ``/matrix`` or legacy ``/<genome>``) and the Matrix
Market directory (``matrix.mtx[.gz]`` with ``features.tsv[.gz]``/``genes.tsv[.gz]`` and ``barcodes.tsv[.gz]``).

Only 'Gene Expression' features are kept when a file holds several feature types, as scanpy does.
"""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd

from ..errors import InputError
from .base import InputReader, check_csr_ends, checked_csr, is_group, read_errors, unique_names
from .location import Location
from .registry import Format
from .spool import Spool

_MTX_CHUNK_LINES = 2_000_000
#: the names a 10x directory's matrix may have
MATRIX_FILES = ("matrix.mtx", "matrix.mtx.gz")


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
            genomes = [k for k in handle if is_group(handle[k]) and "barcodes" in handle[k]]
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
        obs = pd.DataFrame(index=unique_names(barcodes, "obs", self.name))
        var = pd.DataFrame({"gene_ids": ids}, index=unique_names(names, "var", self.name))
        return obs, var

    def _blocks(self):
        n_cells, n_genes = self.file_shape
        indptr_ds, indices_ds, data_ds = self.group["indptr"], self.group["indices"], self.group["data"]
        check_csr_ends(indptr_ds, indices_ds, data_ds, self.name)
        for start, stop in self._row_ranges():
            indptr = np.asarray(indptr_ds[start:stop + 1], dtype=np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            block = checked_csr(data_ds[lo:hi], indices_ds[lo:hi], indptr, stop - start, n_genes, self.name)
            if self.keep_genes is not None:
                block = block[:, self.keep_genes]
            yield start, stop, block


class MtxReader(InputReader):
    """A 10x Matrix Market directory; ``matrix.mtx`` is genes x cells, parsed once and spooled by cells."""

    format = "10x-mtx"

    def __init__(self, loc: Location, **opts):
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
        with read_errors(where, "cannot read the Matrix Market header"), self.matrix.open_text() as fh:
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

    def _read_tsv(self, loc: Location) -> pd.DataFrame:
        with read_errors(loc.text, "cannot read the table"), loc.open_text() as fh:
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
        obs = pd.DataFrame(index=unique_names(barcodes[0].to_numpy(), "obs", self.name))
        var = pd.DataFrame({"gene_ids": ids}, index=unique_names(names, "var", self.name))
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
        spool = Spool(self.block_rows, self.tmp_dir)
        self._closers.append(spool.close)
        seen = 0
        with read_errors(where, "cannot read the matrix"), self.matrix.open_text() as fh:
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


def is_mtx(loc: Location) -> bool:
    """A 10x directory (it holds ``matrix.mtx[.gz]``), or a ``.mtx[.gz]`` file (read with its directory)."""
    if loc.isdir():
        return loc.holds(*MATRIX_FILES)
    return loc.name.lower().removesuffix(".gz").endswith(".mtx")


def open_mtx(loc: Location, *, orientation: str, **opts) -> MtxReader:
    """A 10x Matrix Market directory, or the directory of the ``matrix.mtx[.gz]`` given (genes x cells by
    definition: ``orientation`` does not apply)."""
    return MtxReader(loc, **opts)


TENX_MTX = Format(name="10x-mtx", detect=is_mtx, open=open_mtx,
                  expected="a 10x directory: matrix.mtx[.gz] with features.tsv[.gz] or genes.tsv[.gz] and "
                           "barcodes.tsv[.gz]")
