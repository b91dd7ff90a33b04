"""Compare two run directories result by result: does a code change leave every result unchanged?

    python bench/compare_runs.py RUN_A RUN_B [--rtol 1e-5] [--atol 1e-6] [--json OUT] [--block-rows N]
                                 [--no-work] [--tol ITEM=RTOL,ATOL ...]

RUN_A and RUN_B are run directories of ``scgnn-scale run`` (or their ``adata.zarr``). Typical use: run the same
command with the code before and after a change, each into its own directory, then compare them. Prints one JSON
object: ``identical`` (true when every item matches within the tolerances), ``exact`` (true when every item is
bitwise equal), ``reasons`` (one line per item that does not match), ``items`` (the details of every item) and
``notes`` (differences that are no result: config, versions, stage infos or work arrays present in one run
only). Exits 0 when identical, 1 when not, 2 when a run cannot be read.

Items, each present in either run (an item in one run only is a difference):

- ``obs_names``, ``var_names``: equal, in the same order.
- ``obs/scgnn_cluster``: the same label for every cell; else the ARI between the two labelings, the number of
  cells whose label differs and the cluster counts. Other obs columns (``obs/label``) must be equal, var columns
  and varm arrays (``var/ltmg_k``, ``varm/ltmg_means``) equal or, when numeric, close.
- ``X``, ``layers/*`` (``imputed``, ``ltmg``), ``obsm/*`` (``X_scgnn_feature``, ``X_scgnn``): compared block by
  block of rows (never a whole cells x genes matrix in memory): max abs difference, number of values that differ
  and that are not close (``|b - a| > atol + rtol * |a|``, A the reference), close everywhere.
- ``obsp/*`` (``scgnn_graph``), ``raw/X``: sparse, block by block of rows: the same sparsity pattern, max abs
  difference of the values; ``raw/var_names`` equal. ``raw`` only when a run has it.
- ``uns/metrics``: the final scores of ``uns['scgnn']['metrics']`` (cluster count and sizes, ARI, NMI,
  silhouette); ``uns/stage_metrics/<stage>`` each stage's scores (recon MSE, ARI, ...), ``uns/stages/<stage>`` the
  scalar results of each stage's info (losses, edge counts, K per gene, iterations, ...) and
  ``uns/history``, ``uns/stages/<stage>/loss_history`` the tables; numbers close, the rest equal. Times,
  throughputs, memory, thread counts, devices and the step a resumed training started from are left out (they
  change from run to run), and the run directory in paths is replaced by ``<run>``.
- ``work/*``: the arrays of ``work.zarr`` both runs kept (``--keep-work``: the intermediate reconstructions,
  the first pass), block by block; ``--no-work`` skips them.

``--tol ITEM=RTOL,ATOL`` sets other tolerances for an item and everything under it (``obsm/X_scgnn``; a value of a
mapping item is ``uns/metrics/silhouette``). Two runs of the same code and seed on one CPU machine are not all
bitwise equal: the graph autoencoder's embedding ``obsm/X_scgnn`` (and ``work/first_pass/X_scgnn``) moved by up
to 5e-3 between two runs of the built-in example and klein_subset, and the silhouette computed on it by about
1e-4 relative (clusters, graph, feature embedding, imputation and every other item bitwise equal); so compare
with, e.g., ``--tol obsm/X_scgnn=1e-2,1e-2 --tol work/first_pass/X_scgnn=1e-2,1e-2 --tol
uns/metrics/silhouette=1e-3,1e-4 --tol uns/stage_metrics/cluster/silhouette=1e-3,1e-4`` to tell that noise
from a change.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import zarr

#: keys of stage infos and metrics that measure the machine, not the result
VOLATILE = re.compile(r"seconds|_per_s$|peak_rss|rss_mb|threads|^device$|^loader$|wait_fraction|^timings$|"
                      r"^versions$|^wall|_time$|^time|^start_step$")
#: elements of adata.zarr compared as one mapping of columns / whole values (small), not by blocks of rows
GROUPS = ("layers", "obsm", "obsp", "varm")
#: values (elements) per block read from each run: about 32 MiB of float64 per run
BLOCK_VALUES = 4 << 20


class Report:
    def __init__(self, rtol: float, atol: float, block_rows: int, tols: dict[str, tuple[float, float]] | None = None):
        self.rtol, self.atol, self.block_rows = rtol, atol, block_rows
        self.tols = dict(tols or {})
        self.items: dict[str, dict] = {}
        self.reasons: list[str] = []
        self.notes: list[str] = []

    def tol(self, name: str) -> tuple[float, float]:
        """(rtol, atol) of an item or value: the ``--tol`` of its longest prefix, else the global ones."""
        best = ""
        for prefix in self.tols:
            if (name == prefix or name.startswith(prefix.rstrip("/") + "/")) and len(prefix) > len(best):
                best = prefix
        return self.tols[best] if best else (self.rtol, self.atol)

    def add(self, name: str, match: bool, reason: str = "", exact: bool | None = None, **details) -> None:
        self.items[name] = {"match": bool(match), "exact": bool(match if exact is None else exact), **details}
        if not match:
            self.reasons.append(f"{name}: {reason}" if reason else name)


# --- reading -------------------------------------------------------------------------------------------------


def open_adata(path: Path) -> zarr.Group:
    """``RUN/adata.zarr`` (or PATH itself when it is an AnnData zarr store), opened read-only."""
    for cand in (path / "adata.zarr", path):
        if (cand / "zarr.json").is_file() or (cand / ".zgroup").is_file():
            group = zarr.open_group(cand, mode="r")
            if "X" in group or "obs" in group:
                return group
    raise SystemExit(f"compare_runs: {path}: no run directory (no adata.zarr) and no AnnData zarr store")


def open_work(path: Path) -> Path | None:
    work = path / "work.zarr"
    return work if work.is_dir() else None


def read_elem(node) -> Any:
    from anndata.io import read_elem as _read_elem

    return _read_elem(node)


def encoding(node) -> str:
    return str(node.attrs.get("encoding-type", "")) if node is not None else ""


def child(group: zarr.Group | None, key: str):
    if group is None:
        return None
    try:
        return group[key]
    except KeyError:
        return None


class Rows:
    """Rows ``r0:r1`` of a dense zarr array (a numpy array) or of a CSR group (a scipy CSR matrix)."""

    def __init__(self, node):
        self.node = node
        if isinstance(node, zarr.Array):
            self.sparse = False
            self.shape = tuple(node.shape)
            self.dtype = node.dtype
            self.chunk_rows = int(node.chunks[0]) if node.ndim else 1
        else:
            self.sparse = True
            self.shape = tuple(int(s) for s in node.attrs["shape"])
            self.dtype = node["data"].dtype
            self.indptr = node["indptr"][:]
            self.chunk_rows = 1

    def __call__(self, r0: int, r1: int):
        if not self.sparse:
            return self.node[r0:r1]
        import scipy.sparse as sp

        a, b = int(self.indptr[r0]), int(self.indptr[r1])
        return sp.csr_matrix((self.node["data"][a:b], self.node["indices"][a:b], self.indptr[r0:r1 + 1] - a),
                             shape=(r1 - r0, self.shape[1]))


# --- comparing -----------------------------------------------------------------------------------------------


def _is_numeric(dtype) -> bool:
    return dtype is not None and (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_))


class Diff:
    """Differences of numeric values, accumulated over blocks."""

    def __init__(self, rtol: float, atol: float):
        self.rtol, self.atol = rtol, atol
        self.max_abs = 0.0
        self.n_values = self.n_differ = self.n_not_close = 0

    def add(self, a, b) -> None:
        a = np.asarray(a, dtype=np.float64).ravel()
        b = np.asarray(b, dtype=np.float64).ravel()
        with np.errstate(invalid="ignore"):
            d = np.abs(a - b)
        d[(a == b) | (np.isnan(a) & np.isnan(b))] = 0.0  # equal infinities and NaN in both are no difference
        d[np.isnan(d)] = np.inf
        close = np.isclose(b, a, rtol=self.rtol, atol=self.atol, equal_nan=True)
        self.max_abs = max(self.max_abs, float(d.max(initial=0.0)))
        self.n_values += a.size
        self.n_differ += int(np.count_nonzero(d))
        self.n_not_close += int(close.size - np.count_nonzero(close))

    def add_sparse(self, a, b) -> None:
        """Two CSR blocks of different sparsity patterns: absent entries are zeros."""
        d = abs(a - b)
        self.max_abs = max(self.max_abs, float(d.max()) if d.nnz else 0.0)
        union = abs(a).astype(bool) + abs(b).astype(bool)
        self.n_values += int(union.count_nonzero())
        self.n_differ += int(d.count_nonzero())
        self.n_not_close += int(((d - self.rtol * abs(a)) > self.atol).count_nonzero())

    def details(self) -> dict:
        return {"max_abs_diff": self.max_abs if math.isfinite(self.max_abs) else "inf", "n_values": self.n_values,
                "n_differ": self.n_differ, "n_not_close": self.n_not_close, "allclose": self.n_not_close == 0}

    def reason(self) -> str:
        return (f"max abs diff {self.max_abs:.3g}, {self.n_not_close:,} of {self.n_values:,} values not close "
                f"(rtol {self.rtol:g}, atol {self.atol:g})")


def _sorted_csr(m):
    m = m.tocsr()
    if not m.has_sorted_indices:
        m = m.copy()
        m.sort_indices()
    return m


def compare_rows(rep: Report, name: str, node_a, node_b) -> None:
    """A dense array (any number of dimensions, by blocks along the first) or a CSR matrix, by blocks of rows."""
    ra, rb = Rows(node_a), Rows(node_b)
    if ra.shape != rb.shape:
        rep.add(name, False, f"shape {ra.shape} vs {rb.shape}", shape_a=list(ra.shape), shape_b=list(rb.shape))
        return
    n = ra.shape[0] if ra.shape else 0
    row_values = max(1, int(np.prod(ra.shape[1:])) if len(ra.shape) > 1 else 1)
    if rep.block_rows:
        block = rep.block_rows
    elif ra.sparse and rb.sparse:  # about BLOCK_VALUES stored values per block
        block = max(1, BLOCK_VALUES * n // max(int(ra.indptr[-1]), int(rb.indptr[-1]), 1))
    elif ra.sparse or rb.sparse:  # the sparse side is made dense block by block
        block = max(1, BLOCK_VALUES // row_values)
    else:  # whole chunks of rows of A
        block = max(ra.chunk_rows, (BLOCK_VALUES // row_values) // ra.chunk_rows * ra.chunk_rows)
    numeric = _is_numeric(ra.dtype) and _is_numeric(rb.dtype)
    diff = Diff(*rep.tol(name))
    same_pattern = True
    n_unequal = 0  # non-numeric values
    if not ra.shape:  # a 0-d array
        a, b = node_a[()], node_b[()]
        if numeric:
            diff.add(a, b)
        else:
            n_unequal += int(a != b)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        a, b = ra(r0, r1), rb(r0, r1)
        if ra.sparse and rb.sparse:
            a, b = _sorted_csr(a), _sorted_csr(b)
            if np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices):
                diff.add(a.data, b.data)
            else:
                same_pattern = False
                diff.add_sparse(a.astype(np.float64), b.astype(np.float64))
        elif ra.sparse or rb.sparse:
            diff.add(a.toarray() if ra.sparse else a, b.toarray() if rb.sparse else b)
        elif numeric:
            diff.add(a, b)
        else:
            n_unequal += int(np.count_nonzero(np.asarray(a) != np.asarray(b)))
    details: dict[str, Any] = {"shape": list(ra.shape), "dtype_a": str(ra.dtype), "dtype_b": str(rb.dtype)}
    if ra.sparse or rb.sparse:
        details["sparse"] = True
        if ra.sparse and rb.sparse:
            details["nnz_a"], details["nnz_b"] = int(ra.indptr[-1]), int(rb.indptr[-1])
            details["same_pattern"] = same_pattern
    if numeric:
        details.update(diff.details())
        match = diff.n_not_close == 0 and same_pattern
        reason = ("sparsity pattern differs, " if not same_pattern else "") + diff.reason()
        exact = match and diff.n_differ == 0
    else:
        details["n_unequal"] = n_unequal
        match = exact = n_unequal == 0
        reason = f"{n_unequal:,} values differ"
    rep.add(name, match, reason, exact=exact, **details)


def _values_close(a, b, rtol: float, atol: float) -> tuple[bool, bool, float]:
    """(close, exactly equal, max abs diff) of two scalars or arrays; non-numbers must be equal."""
    if isinstance(a, bool | np.bool_) or isinstance(b, bool | np.bool_):
        return bool(a == b), bool(a == b), 0.0
    try:
        fa, fb = np.asarray(a), np.asarray(b)
    except Exception:  # noqa: BLE001
        return a == b, a == b, 0.0
    if fa.shape != fb.shape:
        return False, False, math.inf
    if _is_numeric(fa.dtype) and _is_numeric(fb.dtype):
        d = Diff(rtol, atol)
        d.add(fa, fb)
        return d.n_not_close == 0, d.n_differ == 0, d.max_abs
    eq = bool(np.array_equal(fa.astype(str), fb.astype(str)))
    return eq, eq, 0.0


def flatten(value: Any, prefix: str = "", run_dirs: tuple[str, ...] = ()) -> dict[str, Any]:
    """A nested mapping as ``{'a.b.c': leaf}`` without volatile keys; tables are left to :func:`compare_table`."""
    import pandas as pd

    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            if VOLATILE.search(str(k)):
                continue
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k), run_dirs))
    elif isinstance(value, pd.DataFrame):
        out[prefix] = value
    elif isinstance(value, str):
        for d in run_dirs:
            value = value.replace(d, "<run>")
        out[prefix] = value
    else:
        out[prefix] = value
    return out


def compare_table(rep: Report, name: str, a, b) -> None:
    """Two DataFrames: the same columns (volatile ones left out) and rows, numbers close, the rest equal."""
    cols_a = [c for c in a.columns if not VOLATILE.search(str(c))]
    cols_b = [c for c in b.columns if not VOLATILE.search(str(c))]
    if a.shape[0] != b.shape[0] or cols_a != cols_b:
        rep.add(name, False, f"shape/columns differ: {a.shape[0]} rows {cols_a} vs {b.shape[0]} rows {cols_b}")
        return
    bad, exact, max_abs = [], True, 0.0
    for c in cols_a:
        close, eq, d = _values_close(_column_values(a[c]), _column_values(b[c]), *rep.tol(f"{name}/{c}"))
        exact &= eq
        max_abs = max(max_abs, d)
        if not close:
            bad.append(str(c))
    rep.add(name, not bad, f"columns differ: {', '.join(bad)} (max abs diff {max_abs:.3g})", exact=exact and not bad,
            rows=int(a.shape[0]), max_abs_diff=max_abs if math.isfinite(max_abs) else "inf", differing_columns=bad)


def _column_values(col):
    import pandas as pd

    if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or pd.api.types.is_string_dtype(col):
        return col.astype(str).to_numpy()
    return col.to_numpy()


def compare_mapping(rep: Report, name: str, a: dict, b: dict, run_dirs: tuple[str, ...], *,
                    missing_is_difference: bool) -> None:
    """Leaves of two nested mappings; tables each as their own item ``name/<key>``."""
    import pandas as pd

    fa, fb = flatten(a, run_dirs=run_dirs), flatten(b, run_dirs=run_dirs)
    for k in sorted(set(fa) & set(fb)):
        if isinstance(fa[k], pd.DataFrame) and isinstance(fb[k], pd.DataFrame):
            compare_table(rep, f"{name}/{k.replace('.', '/')}", fa[k], fb[k])
    scalars = [k for k in fa if not isinstance(fa[k], pd.DataFrame)]
    scalars += [k for k in fb if not isinstance(fb[k], pd.DataFrame) and k not in fa]
    differing, values, exact, missing = [], {}, True, []
    for k in sorted(scalars):
        if k not in fa or k not in fb:
            missing.append(f"{k} only in {'A' if k in fa else 'B'}")
            continue
        close, eq, _ = _values_close(fa[k], fb[k], *rep.tol(f"{name}/{k}"))
        exact &= eq
        if not close:
            differing.append(k)
            values[k] = [_jsonable(fa[k]), _jsonable(fb[k])]
    if missing and not missing_is_difference:
        rep.notes.append(f"{name}: {'; '.join(missing)}")
        missing = []
    ok = not differing and not missing
    reason = "; ".join([f"{k} {values[k][0]} vs {values[k][1]}" for k in differing] + missing)
    rep.add(name, ok, reason, exact=ok and exact, n_values=len(scalars), differing=values,
            **({"missing": missing} if missing else {}))


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist() if v.size <= 20 else f"array{list(v.shape)}"
    if isinstance(v, np.generic):
        return v.item()
    return v if isinstance(v, int | float | str | bool | type(None) | list) else str(v)


def compare_clusters(rep: Report, name: str, a, b) -> None:
    a, b = np.asarray(a).astype(str), np.asarray(b).astype(str)
    if a.shape != b.shape:
        rep.add(name, False, f"{a.size} vs {b.size} cells")
        return
    n_diff = int(np.count_nonzero(a != b))
    details = {"n_cells": int(a.size), "n_clusters_a": int(np.unique(a).size), "n_clusters_b": int(np.unique(b).size),
               "n_cells_differ": n_diff}
    if n_diff:
        from sklearn.metrics import adjusted_rand_score

        details["ari"] = float(adjusted_rand_score(a, b))
        rep.add(name, False, f"{n_diff:,} of {a.size:,} cells have another label (ARI {details['ari']:.4f}, "
                f"{details['n_clusters_a']} vs {details['n_clusters_b']} clusters)", **details)
    else:
        details["ari"] = 1.0
        rep.add(name, True, **details)


def compare_names(rep: Report, name: str, a, b) -> None:
    a, b = np.asarray(a).astype(str), np.asarray(b).astype(str)
    if a.shape != b.shape:
        rep.add(name, False, f"{a.size} vs {b.size} names", n_a=int(a.size), n_b=int(b.size))
        return
    diff = np.flatnonzero(a != b)
    rep.add(name, diff.size == 0, f"{diff.size:,} names differ (first at {diff[:1].tolist()})", n=int(a.size),
            n_differ=int(diff.size))


def compare_frame(rep: Report, prefix: str, ga, gb, names_item: str, special: dict | None = None) -> None:
    """obs / var: the index as ``names_item``, each column as ``prefix/<column>``."""
    da, db = read_elem(ga), read_elem(gb)
    compare_names(rep, names_item, da.index, db.index)
    for col in sorted(set(da.columns) | set(db.columns), key=str):
        item = f"{prefix}/{col}"
        if col not in da.columns or col not in db.columns:
            rep.add(item, False, f"only in {'A' if col in da.columns else 'B'}")
        elif special and col in special:
            special[col](rep, item, da[col].to_numpy(), db[col].to_numpy())
        elif len(da) != len(db):
            rep.add(item, False, f"{len(da)} vs {len(db)} rows")
        else:
            close, eq, d = _values_close(_column_values(da[col]), _column_values(db[col]), *rep.tol(item))
            rep.add(item, close, f"values differ (max abs diff {d:.3g})", exact=eq,
                    max_abs_diff=d if math.isfinite(d) else "inf")


def compare_node(rep: Report, name: str, na, nb) -> None:
    """Any element of the store: by blocks of rows when an array or CSR matrix, else read whole."""
    if na is None or nb is None:
        rep.add(name, False, f"only in {'A' if na is not None else 'B'}")
        return
    def by_rows(node) -> bool:
        return isinstance(node, zarr.Array) or encoding(node) == "csr_matrix"

    if by_rows(na) and by_rows(nb):
        compare_rows(rep, name, na, nb)
        return
    va, vb = read_elem(na), read_elem(nb)
    import scipy.sparse as sp

    if sp.issparse(va) or sp.issparse(vb):
        va, vb = _sorted_csr(sp.csr_matrix(va)), _sorted_csr(sp.csr_matrix(vb))
        d = Diff(*rep.tol(name))
        same = va.shape == vb.shape and np.array_equal(va.indptr, vb.indptr) and np.array_equal(va.indices, vb.indices)
        if va.shape != vb.shape:
            rep.add(name, False, f"shape {va.shape} vs {vb.shape}")
            return
        if same:
            d.add(va.data, vb.data)
        else:
            d.add_sparse(va.astype(np.float64), vb.astype(np.float64))
        rep.add(name, same and d.n_not_close == 0, ("sparsity pattern differs, " if not same else "") + d.reason(),
                exact=same and d.n_differ == 0, same_pattern=same, **d.details())
        return
    close, eq, d = _values_close(va, vb, *rep.tol(name))
    rep.add(name, close, f"values differ (max abs diff {d:.3g})", exact=eq)


def _arrays(root: Path) -> dict[str, zarr.Array]:
    """Every array under a zarr v3 directory, by its path (found on disk: a group may lack its zarr.json)."""
    out = {}
    for meta in sorted(root.rglob("zarr.json")):
        try:
            if json.loads(meta.read_text()).get("node_type") != "array":
                continue
        except (OSError, ValueError):
            continue
        out[meta.parent.relative_to(root).as_posix()] = zarr.open_array(meta.parent, mode="r")
    return out


def compare_runs(run_a: Path, run_b: Path, *, rtol: float = 1e-5, atol: float = 1e-6, block_rows: int = 0,
                 work: bool = True, tols: dict[str, tuple[float, float]] | None = None) -> dict:
    rep = Report(rtol, atol, block_rows, tols)
    ga, gb = open_adata(run_a), open_adata(run_b)

    # names, obs (clusters first), var
    compare_frame(rep, "obs", ga["obs"], gb["obs"], "obs_names", special={"scgnn_cluster": compare_clusters})
    compare_frame(rep, "var", ga["var"], gb["var"], "var_names")

    # cells x genes and per-cell results, by blocks of rows
    compare_node(rep, "X", child(ga, "X"), child(gb, "X"))
    for group in GROUPS:
        sa, sb = child(ga, group), child(gb, group)
        keys_a = set(sa.keys()) if sa is not None else set()
        keys_b = set(sb.keys()) if sb is not None else set()
        for key in sorted(keys_a | keys_b):
            compare_node(rep, f"{group}/{key}", child(sa, key), child(sb, key))

    # raw (input counts of every gene), when a run has it
    raw_a, raw_b = child(ga, "raw"), child(gb, "raw")
    has_a, has_b = child(raw_a, "X") is not None, child(raw_b, "X") is not None
    if has_a or has_b:
        compare_node(rep, "raw/X", child(raw_a, "X"), child(raw_b, "X"))
        if has_a and has_b:
            compare_names(rep, "raw/var_names", read_elem(raw_a["var"]).index, read_elem(raw_b["var"]).index)

    # uns['scgnn']: final scores, each stage's scores and results, the tables
    ua, ub = child(ga, "uns/scgnn"), child(gb, "uns/scgnn")
    if ua is not None or ub is not None:
        if ua is None or ub is None:
            rep.add("uns/scgnn", False, f"only in {'A' if ua is not None else 'B'}")
        else:
            sa, sb = read_elem(ua), read_elem(ub)
            dirs = (str(run_a.resolve()), str(run_a)), (str(run_b.resolve()), str(run_b))
            run_dirs = tuple(sorted({d for pair in dirs for d in pair}, key=len, reverse=True))
            compare_mapping(rep, "uns/metrics", sa.get("metrics", {}), sb.get("metrics", {}), run_dirs,
                            missing_is_difference=True)
            for part, missing_counts in (("stage_metrics", True), ("stages", False)):
                pa, pb = sa.get(part, {}), sb.get(part, {})
                for stage in sorted(set(pa) | set(pb)):
                    if stage not in pa or stage not in pb:
                        where = f"only in {'A' if stage in pa else 'B'}"
                        if missing_counts:
                            rep.add(f"uns/{part}/{stage}", False, where)
                        else:
                            rep.notes.append(f"uns/{part}/{stage}: {where}")
                        continue
                    ia, ib = dict(pa[stage]), dict(pb[stage])
                    if part == "stages":  # the scores are the stage_metrics items
                        ia.pop("metrics", None), ib.pop("metrics", None)
                    compare_mapping(rep, f"uns/{part}/{stage}", ia, ib, run_dirs,
                                    missing_is_difference=missing_counts)
            if "history" in sa or "history" in sb:
                if "history" in sa and "history" in sb:
                    compare_table(rep, "uns/history", sa["history"], sb["history"])
                else:
                    rep.add("uns/history", False, f"only in {'A' if 'history' in sa else 'B'}")
            ca, cb = flatten(sa.get("config", {})), flatten(sb.get("config", {}))
            changed = [f"{k}: {ca.get(k, '<absent>')} vs {cb.get(k, '<absent>')}" for k in sorted(set(ca) | set(cb))
                       if k not in ca or k not in cb or not _values_close(ca[k], cb[k], 0.0, 0.0)[1]]
            if changed:
                rep.notes.append("config differs: " + "; ".join(changed))
            va, vb = sa.get("versions", {}), sb.get("versions", {})
            vchanged = [f"{k} {va.get(k)} vs {vb.get(k)}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
            if vchanged:
                rep.notes.append("versions differ: " + "; ".join(vchanged))

    # work.zarr (kept with --keep-work): arrays both runs have
    if work:
        wa, wb = open_work(run_a), open_work(run_b)
        if wa is not None and wb is not None:
            aa, ab = _arrays(wa), _arrays(wb)
            for key in sorted(set(aa) & set(ab)):
                compare_rows(rep, f"work/{key}", aa[key], ab[key])
            only = sorted(set(aa) ^ set(ab))
            if only:
                rep.notes.append("work arrays in one run only: " + ", ".join(
                    f"{k} ({'A' if k in aa else 'B'})" for k in only))
        elif wa is not None or wb is not None:
            rep.notes.append(f"work.zarr only in {'A' if wa is not None else 'B'}: not compared")

    return {"run_a": str(run_a), "run_b": str(run_b), "rtol": rtol, "atol": atol,
            "tol": {k: list(v) for k, v in rep.tols.items()},
            "identical": not rep.reasons,
            "exact": not rep.reasons and all(i["exact"] for i in rep.items.values()),
            "reasons": rep.reasons, "n_items": len(rep.items), "notes": rep.notes, "items": rep.items}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of numeric values (default 1e-5)")
    ap.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance of numeric values (default 1e-6)")
    ap.add_argument("--json", type=Path, help="also write the JSON report to this file")
    ap.add_argument("--block-rows", type=int, default=0,
                    help="rows read per block (default: whole chunks, about 4M values per block)")
    ap.add_argument("--no-work", action="store_true", help="skip the arrays of work.zarr")
    ap.add_argument("--tol", action="append", default=[], metavar="ITEM=RTOL,ATOL",
                    help="other tolerances for an item and everything under it (repeatable; the longest matching "
                         "prefix wins), e.g. obsm/X_scgnn=1e-2,1e-2 or uns/metrics/silhouette=1e-3,1e-4")
    args = ap.parse_args(argv)
    tols = {}
    for spec in args.tol:
        try:
            item, values = spec.split("=", 1)
            r, a = (float(x) for x in values.split(","))
        except ValueError:
            ap.error(f"--tol {spec}: expected ITEM=RTOL,ATOL")
        tols[item.strip().rstrip("/")] = (r, a)
    for p in (args.run_a, args.run_b):
        if not p.exists():
            print(f"compare_runs: {p}: not found", file=sys.stderr)
            return 2
    try:
        result = compare_runs(args.run_a, args.run_b, rtol=args.rtol, atol=args.atol, block_rows=args.block_rows,
                              work=not args.no_work, tols=tols)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1, default=_jsonable)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
