"""The spool: non-zeros that arrive in any order, regrouped on disk by block of cells (see the package doc)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from ..errors import InputError, shown
from .base import canonical

#: entries buffered in memory before they are written out (48 MB at 12 bytes an entry)
SPOOL_BUFFER_ENTRIES = 4_000_000
_SPOOL_DTYPE = np.dtype([("row", "<i4"), ("col", "<i4"), ("val", "<f4")])


class Spool:
    """Non-zeros in any order -> CSR blocks of ``block_rows`` cells, through one temp file per block."""

    def __init__(self, block_rows: int, tmp_dir: str | None = None):
        self.block_rows = block_rows
        try:
            self.dir = tempfile.mkdtemp(prefix="scgnn-spool-", dir=tmp_dir or None)
        except OSError as exc:
            where = shown(tmp_dir or tempfile.gettempdir())
            raise InputError(f"{where}: cannot create the temporary files of the input there (ingest.tmp_dir, "
                             f"--ingest-tmp-dir): {exc.strerror or exc}") from None
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
        if self._pending_entries >= SPOOL_BUFFER_ENTRIES:
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
            yield start, stop, canonical(block)  # files stay until close(): the blocks can be read again

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
