"""The paper's imputation benchmark: flip non-zero entries to zero, run scGNN, score the flipped entries.

Protocol (``evaluate_imputation``), for each repeat ``i``:

1. **Mask.** A copy of the input (``out/repeat_<i>/masked.h5ad``, CSR, written block by block) in
   which exactly ``round(rate * nnz)`` of the non-zero entries, drawn uniformly without replacement
   (seed ``(seed, i)``), are zero (removed from the sparse matrix). The flipped entries and their
   true values are kept in ``out/repeat_<i>/mask.h5`` (cell row, gene column, value). The input
   itself is only read. Sampling is streamed: the number of flipped entries in each block of cells
   is drawn jointly (a multivariate hypergeometric over the blocks' non-zero counts), then the
   positions inside each block, so the set is a uniform draw of that exact size.
2. **Run** the whole pipeline on the masked copy into ``out/repeat_<i>/run`` (same config for every
   repeat; a rerun resumes finished repeats and stages).
3. **Score** only the flipped entries whose cell and gene the run kept (preprocess filters cells and
   selects the top genes on the masked data; entries outside them have no imputed value). Both
   sides are on the scale of the run's ``X``: ``log1p`` of the counts (divided by the cell's library
   size and multiplied by ``preprocess.normalize_total`` when that option is on, the library size
   being the masked cell's, computed as preprocess does), so the true value of a flipped entry is
   ``log1p(count)`` and the imputed value is read from ``layers/imputed`` unchanged.
   Metrics over the vector of scored entries (the published ``benchmark_util.imputation_error`` and
   the paper's Methods): median ``|x - y|``, cosine similarity ``x.y / (|x| |y|)`` (0 when a vector is
   all zeros) and RMSE ``sqrt(mean (x - y)^2)``.

Baselines scored on the same entries in the same run: **zeros** (no imputation: the masked value,
0) and **knn** (kNN smoothing: the mean of the entry's gene over the cell's neighbours in the run's
final graph ``obsp/scgnn_graph``, on the masked ``X``).

The report (``out/report.json``) has the mean and standard deviation over repeats and every repeat's
numbers. Memory: one block of cells, plus O(number of flipped entries) for the scores (the median
needs them all) and O(flipped entries x k) for the kNN baseline in bounded batches.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_json
from .errors import InputError
from .keys import KEYS

log = logging.getLogger("scgnn_scale")

METHODS = ("scgnn", "zeros", "knn")
METRICS = ("median_l1", "cosine", "rmse")
_HYPERGEOMETRIC_LIMIT = 10**9  # numpy's limit on the population of a hypergeometric draw
_PAIR_BATCH = 1 << 24  # (entry, neighbour) pairs handled per pass of the kNN baseline


# -- scores --------------------------------------------------------------------------------------
def imputation_scores(truth, predicted) -> dict[str, float]:
    """Median L1 distance, cosine similarity and RMSE between true and imputed values of flipped entries.

    Parameters
    ----------
    truth, predicted
        1-d arrays of the same length (one value per scored entry, same transform on both sides).

    Returns
    -------
    dict
        ``median_l1`` (median of ``|x - y|``), ``cosine`` (``x.y / (|x| |y|)``, 0 when either vector
        is all zeros) and ``rmse`` (``sqrt(mean((x - y)^2))``); NaN for no entries.
    """
    x = np.asarray(truth, dtype=np.float64).ravel()
    y = np.asarray(predicted, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"truth has {x.size} values, predicted {y.size}")
    if x.size == 0:
        return {m: float("nan") for m in METRICS}
    diff = x - y
    norms = np.linalg.norm(x) * np.linalg.norm(y)
    return {
        "median_l1": float(np.median(np.abs(diff))),
        "cosine": float(x @ y / norms) if norms > 0 else 0.0,
        "rmse": float(np.sqrt(np.mean(diff * diff))),
    }


# -- h5ad writing --------------------------------------------------------------------------------
class _CsrH5adWriter:
    """An h5ad with a CSR ``X`` written block by block (datasets grow by resize)."""

    def __init__(self, path: Path, obs, var):
        import h5py
        from anndata.io import write_elem

        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = h5py.File(self.tmp, "w")
        self.file.attrs["encoding-type"] = "anndata"
        self.file.attrs["encoding-version"] = "0.1.0"
        write_elem(self.file, "obs", obs)
        write_elem(self.file, "var", var)
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            g = self.file.create_group(name)
            g.attrs["encoding-type"] = "dict"
            g.attrs["encoding-version"] = "0.1.0"
        x = self.file.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        x.attrs["shape"] = (len(obs), len(var))
        opts = {"maxshape": (None,), "chunks": (1 << 16,), "compression": "gzip", "compression_opts": 4}
        self.data = x.create_dataset("data", shape=(0,), dtype=np.float32, **opts)
        self.indices = x.create_dataset("indices", shape=(0,), dtype=np.int32, **opts)
        self.indptr = x.create_dataset("indptr", shape=(len(obs) + 1,), dtype=np.int64)
        self.indptr[0] = 0
        self.rows = 0
        self.nnz = 0

    def append(self, data: np.ndarray, indices: np.ndarray, row_counts: np.ndarray) -> None:
        k = len(data)
        if k:
            self.data.resize((self.nnz + k,))
            self.data[self.nnz:] = data
            self.indices.resize((self.nnz + k,))
            self.indices[self.nnz:] = indices
        ends = self.nnz + np.cumsum(row_counts, dtype=np.int64)
        self.indptr[self.rows + 1:self.rows + 1 + len(row_counts)] = ends
        self.rows += len(row_counts)
        self.nnz += k

    def close(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_reference(source: Any, path: str | Path, *, config=None) -> dict:
    """Copy any input ``run`` reads into a plain CSR h5ad (no explicit zeros), block by block.

    Parameters
    ----------
    source
        Input path/URL or AnnData (as :func:`scgnn_scale.pipeline.run` accepts).
    path
        The h5ad to write (written under a temporary name, then renamed).
    config
        Run config: ``ingest.orientation``, ``ingest.label_key``, ``ingest.block_rows``, ``ingest.tmp_dir``.

    Returns
    -------
    dict
        ``n_cells``, ``n_genes``, ``nnz``.
    """
    from .config import RunConfig
    from .readers import open_input

    cfg = (config or RunConfig()).ingest
    reader = open_input(source, orientation=cfg.orientation, label_key=cfg.label_key, block_rows=cfg.block_rows,
                        tmp_dir=cfg.tmp_dir or None)
    with reader:
        writer = _CsrH5adWriter(Path(path), reader.obs, reader.var)
        try:
            for _, _, block in reader.iter_blocks():
                block = block.tocsr()
                block.eliminate_zeros()
                writer.append(block.data.astype(np.float32), block.indices.astype(np.int32), np.diff(block.indptr))
            if writer.nnz == 0:
                raise InputError(f"{source}: empty matrix (no non-zero value to flip)")
        except BaseException:
            writer.abort()
            raise
        writer.close()
        return {"n_cells": len(reader.obs), "n_genes": len(reader.var), "nnz": int(writer.nnz)}


# -- masking -------------------------------------------------------------------------------------
def flipped_count(nnz: int, rate: float) -> int:
    """Entries to flip: ``rate * nnz`` rounded half up."""
    return int(np.floor(rate * nnz + 0.5))


def mask_nonzeros(reference: str | Path, masked: str | Path, mask: str | Path, *, rate: float, seed,
                  block_rows: int = 8192) -> dict:
    """Write a copy of ``reference`` with ``round(rate * nnz)`` random non-zeros set to zero.

    Parameters
    ----------
    reference
        A CSR h5ad without explicit zeros (:func:`write_reference`); only read.
    masked
        Output h5ad: the same cells, genes and obs/var, minus the flipped entries.
    mask
        Output HDF5 file with ``row`` (int64), ``col`` (int32), ``value`` (float32) of the flipped
        entries, sorted by row then column.
    rate
        Fraction of the non-zero entries to flip, in (0, 1).
    seed
        Seed (an int or a sequence of ints, e.g. ``(seed, repeat)``).
    block_rows
        Cells per streamed block.

    Returns
    -------
    dict
        ``nnz`` (non-zeros of the reference) and ``n_flipped``.
    """
    import h5py
    from anndata.io import read_elem

    rng = np.random.default_rng(seed)
    with h5py.File(reference, "r") as f:
        x = f["X"]
        if x.attrs.get("encoding-type") != "csr_matrix":
            raise InputError(f"{reference}: X is not a CSR matrix")
        indptr = np.asarray(x["indptr"][:], dtype=np.int64)
        n_cells = len(indptr) - 1
        nnz = int(indptr[-1])
        n_flip = flipped_count(nnz, rate)
        if nnz >= _HYPERGEOMETRIC_LIMIT:
            raise InputError(f"{reference}: {nnz} non-zeros; the dropout evaluation handles fewer than 10^9")
        starts = np.arange(0, n_cells, block_rows)
        block_nnz = indptr[np.minimum(starts + block_rows, n_cells)] - indptr[starts]
        per_block = (rng.multivariate_hypergeometric(block_nnz, n_flip, method="marginals")
                     if n_flip else np.zeros(len(starts), dtype=np.int64))
        writer = _CsrH5adWriter(Path(masked), read_elem(f["obs"]), read_elem(f["var"]))
        mask_tmp = Path(str(mask) + ".tmp")
        try:
            with h5py.File(mask_tmp, "w") as mf:
                opts = {"chunks": (min(1 << 16, n_flip),), "compression": "gzip"} if n_flip else {}
                rows_ds = mf.create_dataset("row", shape=(n_flip,), dtype=np.int64, **opts)
                cols_ds = mf.create_dataset("col", shape=(n_flip,), dtype=np.int32, **opts)
                vals_ds = mf.create_dataset("value", shape=(n_flip,), dtype=np.float32, **opts)
                mf.attrs.update({"rate": rate, "nnz": nnz, "n_cells": n_cells, "n_genes": int(x.attrs["shape"][1])})
                done = 0
                for a, k in zip(starts, per_block, strict=True):
                    b = min(int(a) + block_rows, n_cells)
                    lo, hi = int(indptr[a]), int(indptr[b])
                    data = np.asarray(x["data"][lo:hi], dtype=np.float32)
                    indices = np.asarray(x["indices"][lo:hi], dtype=np.int32)
                    rows = np.repeat(np.arange(a, b, dtype=np.int64), np.diff(indptr[a:b + 1]))
                    chosen = np.sort(rng.choice(hi - lo, size=int(k), replace=False)) if k else np.empty(0, np.int64)
                    keep = np.ones(hi - lo, dtype=bool)
                    keep[chosen] = False
                    writer.append(data[keep], indices[keep], np.bincount(rows[keep] - a, minlength=b - a))
                    rows_ds[done:done + k] = rows[chosen]
                    cols_ds[done:done + k] = indices[chosen]
                    vals_ds[done:done + k] = data[chosen]
                    done += int(k)
        except BaseException:
            writer.abort()
            mask_tmp.unlink(missing_ok=True)
            raise
    writer.close()
    os.replace(mask_tmp, mask)
    return {"nnz": nnz, "n_flipped": n_flip}


def read_mask(mask: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row, col, value)`` of the flipped entries written by :func:`mask_nonzeros`."""
    import h5py

    with h5py.File(mask, "r") as f:
        return np.asarray(f["row"][:]), np.asarray(f["col"][:]), np.asarray(f["value"][:])


# -- scoring one run -----------------------------------------------------------------------------
def _positions(kept: np.ndarray, size: int) -> np.ndarray:
    """Map input index -> position among the kept ones (-1 when dropped)."""
    pos = np.full(size, -1, dtype=np.int64)
    pos[np.asarray(kept, dtype=np.int64)] = np.arange(len(kept), dtype=np.int64)
    return pos


def values_at(array, cells: np.ndarray, genes: np.ndarray, *, block_rows: int | None = None) -> np.ndarray:
    """``array[cells[e], genes[e]]`` for every entry, reading the array in row blocks once.

    ``cells`` must be sorted (as the flipped entries are).
    """
    out = np.empty(len(cells), dtype=np.float64)
    if not len(cells):
        return out
    block_rows = int(block_rows or array.chunks[0])
    bounds = np.searchsorted(cells, np.arange(0, int(array.shape[0]) + block_rows, block_rows))
    for i, a in enumerate(range(0, int(array.shape[0]), block_rows)):
        lo, hi = bounds[i], bounds[i + 1]
        if lo == hi:
            continue
        block = np.asarray(array[a:a + block_rows])
        out[lo:hi] = block[cells[lo:hi] - a, genes[lo:hi]]
    return out


def knn_smoothed_at(x, graph, cells: np.ndarray, genes: np.ndarray, *, block_rows: int | None = None) -> np.ndarray:
    """kNN smoothing at the entries: mean of ``x[j, gene]`` over the graph neighbours ``j`` of ``cell``.

    Never builds the smoothed N x G matrix: each entry's neighbours are listed (bounded batches of
    (entry, neighbour) pairs), sorted by neighbour, and ``x`` is streamed once per batch. A cell
    without neighbours gets 0.
    """
    import scipy.sparse as sp

    from .convergence import row_normalize

    weights = row_normalize(sp.csr_matrix(graph))
    indptr, indices, data = weights.indptr, weights.indices, weights.data
    out = np.zeros(len(cells), dtype=np.float64)
    block_rows = int(block_rows or x.chunks[0])
    degree = np.diff(indptr)[cells]
    # entries per batch so that a batch's (entry, neighbour) pairs stay near _PAIR_BATCH
    cumulative = np.cumsum(degree)
    cuts = np.searchsorted(cumulative, np.arange(_PAIR_BATCH, int(cumulative[-1]) if len(cells) else 0, _PAIR_BATCH))
    batch_starts = [0, *np.unique(cuts).tolist(), len(cells)]
    for s, t in zip(batch_starts[:-1], batch_starts[1:], strict=True):
        if s == t:
            continue
        counts = degree[s:t]
        entry = np.repeat(np.arange(s, t, dtype=np.int64), counts)
        offsets = np.repeat(indptr[cells[s:t]], counts) + (np.arange(len(entry)) - np.repeat(
            np.cumsum(counts) - counts, counts))
        neighbour = indices[offsets].astype(np.int64)
        weight = data[offsets]
        order = np.argsort(neighbour, kind="stable")
        entry, neighbour, weight = entry[order], neighbour[order], weight[order]
        neighbour_values = values_at(x, neighbour, genes[entry], block_rows=block_rows)
        out += np.bincount(entry, weights=weight * neighbour_values, minlength=len(out))
    return out


def library_sizes(masked: str | Path, cells: np.ndarray, *, min_cell_fraction: float,
                  block_rows: int = 8192) -> np.ndarray:
    """Library sizes of input rows of a CSR h5ad as preprocess computes them for ``normalize_total``.

    The sum of each cell's counts over the genes preprocess keeps in its first step (non-zero in at
    least ``min_cell_fraction`` of the cells).
    """
    import h5py

    with h5py.File(masked, "r") as f:
        x = f["X"]
        indptr = np.asarray(x["indptr"][:], dtype=np.int64)
        n_cells, n_genes = len(indptr) - 1, int(x.attrs["shape"][1])
        gene_nnz = np.zeros(n_genes, dtype=np.int64)
        for a in range(0, n_cells, block_rows):
            b = min(a + block_rows, n_cells)
            data = np.asarray(x["data"][indptr[a]:indptr[b]])
            indices = np.asarray(x["indices"][indptr[a]:indptr[b]])
            gene_nnz += np.bincount(indices[data != 0], minlength=n_genes)
        expressed = gene_nnz >= min_cell_fraction * n_cells
        totals = np.zeros(n_cells, dtype=np.float64)
        for a in range(0, n_cells, block_rows):
            b = min(a + block_rows, n_cells)
            data = np.asarray(x["data"][indptr[a]:indptr[b]], dtype=np.float64)
            indices = np.asarray(x["indices"][indptr[a]:indptr[b]])
            rows = np.repeat(np.arange(b - a), np.diff(indptr[a:b + 1]))
            on = expressed[indices]
            totals[a:b] = np.bincount(rows[on], weights=data[on], minlength=b - a)
    return totals[cells]


def score_run(run_dir: str | Path, mask: str | Path, masked: str | Path | None = None) -> dict:
    """Score a finished run of a masked input against its flipped entries (scGNN, zeros, kNN).

    Parameters
    ----------
    run_dir
        Run directory of the masked input (must hold ``layers/imputed``).
    mask
        The flipped entries (:func:`mask_nonzeros`).
    masked
        The masked h5ad (for library sizes when ``preprocess.normalize_total`` is on).

    Returns
    -------
    dict
        ``n_flipped``, ``n_scored`` and, per method, the metrics of :func:`imputation_scores`.
    """
    from .config import config_from_dict
    from .store import RunStore

    store = RunStore.open(run_dir)
    if not store.has(KEYS.imputed):
        raise InputError(f"{run_dir}: the run has no layers/imputed; it has not finished")
    rows, cols, values = read_mask(mask)
    import h5py

    with h5py.File(mask, "r") as f:
        n_input_cells, n_input_genes = int(f.attrs["n_cells"]), int(f.attrs["n_genes"])
    kept_cells = np.asarray(store.read_elem(KEYS.kept_cells), dtype=np.int64)
    kept_genes = np.asarray(store.read_elem(KEYS.kept_genes), dtype=np.int64)
    cell_pos = _positions(kept_cells, n_input_cells)[rows]
    gene_pos = _positions(kept_genes, n_input_genes)[cols]
    scored = (cell_pos >= 0) & (gene_pos >= 0)
    cells, genes, counts = cell_pos[scored], gene_pos[scored], values[scored].astype(np.float64)
    order = np.lexsort((genes, cells))
    cells, genes, counts = cells[order], genes[order], counts[order]

    pcfg = config_from_dict(store.manifest["config"]).preprocess
    target = pcfg.normalize_total
    if target > 0:
        if masked is None:
            raise ValueError("score_run needs the masked input when preprocess.normalize_total is on")
        libsize = library_sizes(masked, kept_cells[cells], min_cell_fraction=pcfg.min_cell_fraction)
        counts = counts * target / np.maximum(libsize, 1e-12)
    truth = np.log1p(counts)
    imputed = values_at(store.open_array(KEYS.imputed), cells, genes)
    smoothed = knn_smoothed_at(store.open_array(KEYS.x), store.read_elem(KEYS.graph), cells, genes)
    result = {"n_flipped": int(len(rows)), "n_scored": int(len(cells))}
    for method, predicted in (("scgnn", imputed), ("zeros", np.zeros_like(truth)), ("knn", smoothed)):
        result[method] = imputation_scores(truth, predicted)
    return result


# -- the protocol --------------------------------------------------------------------------------
def _summary(per_repeat: list[dict]) -> dict:
    out = {}
    for method in METHODS:
        out[method] = {}
        for metric in METRICS:
            values = np.array([r[method][metric] for r in per_repeat], dtype=np.float64)
            out[method][metric] = float(np.mean(values))
            out[method][f"{metric}_std"] = float(np.std(values))
    return out


def evaluate_imputation(input: Any, out: str | Path, *, rate: float = 0.1, repeats: int = 3, config=None,
                        seed: int = 0, quiet: bool = False) -> dict:
    """The paper's dropout protocol: mask, run, score against zeros and kNN smoothing.

    Parameters
    ----------
    input
        Counts in any format ``scgnn-scale run`` reads (path, URL or AnnData).
    out
        Directory for the reference copy, the masked inputs, the runs and ``report.json``. A rerun
        with the same input, rate and seed resumes; another evaluation there is an error.
    rate
        Fraction of the non-zero entries set to zero (paper: 0.1 and 0.3).
    repeats
        Independent maskings (paper: 3).
    config
        :class:`~scgnn_scale.config.RunConfig` of the runs (default: the defaults).
    seed
        Seed of the maskings (repeat ``i`` uses ``(seed, i)``); the runs use ``config.runtime.seed``.
    quiet
        No progress bars.

    Returns
    -------
    dict
        The report: ``methods`` (mean and std over repeats of ``median_l1``, ``cosine``, ``rmse`` for
        ``scgnn``, ``zeros``, ``knn``), ``repeats`` (each repeat's numbers), settings.
    """
    from .config import RunConfig
    from .fingerprint import input_identity
    from .pipeline import run

    if not 0.0 < float(rate) < 1.0:
        raise InputError(f"--rate {rate}: must lie strictly between 0 and 1")
    if int(repeats) < 1:
        raise InputError(f"--repeats {repeats}: must be at least 1")
    config = config or RunConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"input": input_identity(input), "rate": float(rate), "seed": int(seed),
                "config": config.section_hash(*config.to_dict())}
    marker = out / "evaluation.json"
    if marker.is_file():
        if json.loads(marker.read_text()) != settings:
            raise InputError(f"{out}: holds an imputation evaluation of another input, rate, seed or config; "
                             "choose another --out")
    elif any(out.iterdir()):
        raise InputError(f"{out}: --out is a non-empty directory that is not an imputation evaluation")
    else:
        write_json(marker, settings)

    reference = out / "reference.h5ad"
    if not reference.is_file():
        info = write_reference(input, reference, config=config)
        log.info("evaluate-imputation: reference copy %d cells x %d genes, %d non-zeros",
                 info["n_cells"], info["n_genes"], info["nnz"])
    per_repeat = []
    for i in range(int(repeats)):
        rdir = out / f"repeat_{i}"
        rdir.mkdir(exist_ok=True)
        masked, mask = rdir / "masked.h5ad", rdir / "mask.h5"
        if not (masked.is_file() and mask.is_file()):
            info = mask_nonzeros(reference, masked, mask, rate=rate, seed=(int(seed), i),
                                 block_rows=config.ingest.block_rows)
            log.info("evaluate-imputation: repeat %d: %d of %d non-zeros flipped", i, info["n_flipped"], info["nnz"])
        store = run(str(masked), rdir / "run", config=config, quiet=quiet)
        scores = score_run(store.root, mask, masked)
        scores["repeat"] = i
        scores["run"] = str(store.root)
        scores["run_metrics"] = {k: v for s in store.manifest["stages"].values()
                                 for k, v in s.get("info", {}).get("metrics", {}).items()}
        per_repeat.append(scores)
        log.info("evaluate-imputation: repeat %d: median L1 scGNN %.4f, zeros %.4f, kNN %.4f", i,
                 scores["scgnn"]["median_l1"], scores["zeros"]["median_l1"], scores["knn"]["median_l1"])
    report = {
        "input": settings["input"], "rate": float(rate), "seed": int(seed), "repeats": per_repeat,
        "methods": _summary(per_repeat),
        "transform": "log1p of counts (library-normalised when preprocess.normalize_total > 0), the scale of X "
                     "and layers/imputed; only flipped entries of kept cells and genes are scored",
    }
    write_json(out / "report.json", report)
    return report
