"""CSV / TSV inputs (optionally gzipped): first row = column names, first column = row names.

Parsed once in row chunks by pandas and spooled by block of cells (needed for genes x cells, where one row
holds one gene of every cell). See :func:`resolve_orientation` for the orientation rule.
"""

from __future__ import annotations

import csv
import logging
import re
from functools import cached_property

import numpy as np
import pandas as pd

from ..errors import InputError
from .base import InputReader, read_errors, unique_names
from .hdf5 import HDF5_MAGIC
from .location import Location
from .registry import Format
from .spool import Spool

log = logging.getLogger("scgnn_scale")

ORIENTATIONS = ("auto", "genes-x-cells", "cells-x-genes")
_CSV_CHUNK_VALUES = 4_000_000
_ORIENTATION_SAMPLE_ROWS = 1000


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


class DelimitedReader(InputReader):
    """CSV/TSV (optionally .gz): first row column names, first column row names; parsed once, spooled."""

    format = "csv"

    def __init__(self, loc: Location, *, orientation: str, **opts):
        super().__init__(loc.text, **opts)
        self.loc = loc
        base = loc.name.lower().removesuffix(".gz")
        self.format = "tsv" if base.endswith((".tsv", ".tab")) else "csv"
        with loc.open_text() as fh:
            first = fh.readline()
            if not first.strip():
                raise InputError(f"{self.name}: empty matrix (the file is empty)")
            lines = []
            for line in fh:
                if line.strip():
                    lines.append(line)
                if len(lines) >= _ORIENTATION_SAMPLE_ROWS:
                    break
            if base.endswith((".tsv", ".tab")):
                self.sep = "\t"
            elif base.endswith(".csv"):
                self.sep = ","
            else:  # a header of one name (R's layout, one column) shows no tab: the first row does
                self.sep = "\t" if "\t" in first or (lines and "\t" in lines[0]) else ","
            header = next(csv.reader([first], delimiter=self.sep))
            sample = [next(csv.reader([line], delimiter=self.sep)) for line in lines]
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
        self._spool: Spool | None = None

    @cached_property
    def _parsed(self) -> pd.Index:
        """Parse the file once: spool every non-zero by block of cells, collect the row names."""
        spool = Spool(self.block_rows, self.tmp_dir)
        self._closers.append(spool.close)
        n_cols = len(self.columns)
        chunk_rows = max(1, _CSV_CHUNK_VALUES // max(n_cols, 1))
        names, offset = [], 0
        with read_errors(self.name, "cannot parse the table"), self.loc.open_text() as fh:
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
        rows = pd.DataFrame(index=unique_names(row_names, rows_what, self.name))
        cols = pd.DataFrame(index=unique_names(self.columns, cols_what, self.name))
        if self.orientation_assumed:
            log.warning("%s: its row and column names do not show which are cells and which are genes; read as "
                        "genes x cells (rows = genes, the original scGNN's CSV layout): %d cells x %d genes. "
                        "If its rows are cells, pass --orientation cells-x-genes (--orientation genes-x-cells "
                        "confirms this reading and silences this warning)", self.name, len(cols), len(rows))
        return (rows, cols) if self.rows_are_cells else (cols, rows)

    def _blocks(self):
        yield from self._spool.blocks(self.n_obs, self.n_vars)


def is_delimited(loc: Location) -> bool:
    """A file named ``.csv``/``.tsv``/``.txt``/``.tab``, optionally ``.gz``, that is not an HDF5 file (an h5ad or
    a 10x .h5 saved under such a name is read as what it is)."""
    if loc.isdir() or not loc.name.lower().removesuffix(".gz").endswith((".csv", ".tsv", ".txt", ".tab")):
        return False
    try:
        return loc.head(8) != HDF5_MAGIC
    except OSError:
        return True  # unreadable: the CSV reader names the problem


def open_delimited(loc: Location, *, orientation: str, **opts) -> DelimitedReader:
    return DelimitedReader(loc, orientation=orientation, **opts)


DELIMITED = Format(name="delimited", expected=".csv/.tsv/.txt/.tab, optionally .gz", detect=is_delimited,
                   open=open_delimited)
