"""Property-based tests (hypothesis) of the input readers and of the option parser.

Generated CSV/TSV tables, 10x Matrix Market directories, h5ad files, option values and TOML configs go
through ``scgnn-scale run INPUT --out RUN_DIR --until ingest`` in this process. Every one must end in a
result (exit 0; for a well-formed input, exactly the generated matrix in the run store) or the documented
error (exit 2 and one line ``scgnn-scale: error: ...`` naming the file or the option): never a traceback,
never a changed input, never a left-over temporary file, and never a run directory that refuses the
corrected command.

``SCGNN_FUZZ_SCALE=10 python -m pytest tests/test_fuzz.py`` tries ten times as many examples.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from scgnn_scale.cli import main
from scgnn_scale.config import BOUNDS, build_config, config_fields

SCALE = float(os.environ.get("SCGNN_FUZZ_SCALE", "1"))


#: examples per well-formed input kind and per kind of defect: every defect is tried (hypothesis' own choice
#: among many would favour the first and last)
WELL_FORMED_EXAMPLES, DEFECT_EXAMPLES, OPTION_EXAMPLES = 12, 2, 4


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ---- running the CLI and judging its outcome --------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``scgnn-scale ARGV`` in this process: (exit code, stderr). Any exception but SystemExit escapes.

    A Python warning would be printed on the user's stderr too: the package's own (duplicated names made
    unique) are allowed, any other (numpy's overflow, a library's deprecation) fails the example.
    The full garbage collection after each stage (memory.release_freed_memory) is skipped: in a test process
    holding hypothesis' data it takes most of an example's time, and it changes no outcome.
    """
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings(record=True) as caught, \
            mock.patch("scgnn_scale.pipeline.release_freed_memory", lambda **_: None):
        warnings.simplefilter("always")
        # what the package itself silences for its users (store.py), as an installed scgnn-scale does
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own usage error: exit 2 and its message
            code = exc.code
    foreign = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
               if "duplicated" not in str(w.message)]
    assert not foreign, f"warnings a user would see besides the outcome: {foreign}"
    return code, err.getvalue()


def digest(path: Path):
    """Content hash of a file, or of every file under a directory (None when absent)."""
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(path.rglob("*")) if p.is_file()}
    return None


def finished_stages(out: Path) -> dict:
    manifest = out / "manifest.json"
    return json.loads(manifest.read_text()).get("stages", {}) if manifest.is_file() else {}


def ingested_matrix(out: Path) -> np.ndarray:
    """The cells x genes matrix that ingest committed to ``RUN_DIR/work.zarr/input``."""
    group = zarr.open_group(out / "work.zarr" / "input", mode="r")
    n, g = group.attrs["shape"]
    return sp.csr_matrix((group["data"][:], group["indices"][:], group["indptr"][:]), shape=(n, g)).toarray()


@dataclass
class Case:
    """A generated input: where it is, what a run must give and how the error may name it."""

    path: Path
    expect: str  # 'ok' (and ``matrix``), 'error', or 'either'
    matrix: np.ndarray | None = None
    names: tuple[str, ...] = ()
    extra: list[str] = field(default_factory=list)
    note: str = ""


@pytest.fixture(scope="module")
def good_input(tmp_path_factory) -> Path:
    """A small valid CSV: the corrected input that must run in a directory a failed run left."""
    path = tmp_path_factory.mktemp("good") / "good.csv"
    pd.DataFrame(np.arange(1, 13, dtype=np.float32).reshape(3, 4), index=["r0", "r1", "r2"],
                 columns=["k0", "k1", "k2", "k3"]).to_csv(path)
    return path


def check_run(case: Case, work: Path, good_input: Path) -> None:
    """Run the case into ``work/run`` and check the outcome against every property of the module docstring."""
    out = work / "run"
    spool = work / "spool"
    spool.mkdir()
    before = digest(case.path)
    code, err = run_cli(["run", str(case.path), "--out", str(out), "--until", "ingest", "--quiet",
                         "--ingest-tmp-dir", str(spool), *case.extra])
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    assert digest(case.path) == before, "the input was modified"
    assert not os.listdir(spool), f"temporary files left behind: {os.listdir(spool)}"
    if code == 0:
        assert case.expect != "error", f"accepted a bad input ({case.note}); stderr: {err}"
        assert "ingest" in finished_stages(out)
        if case.expect == "ok":
            np.testing.assert_array_equal(ingested_matrix(out), case.matrix)
        return
    assert case.expect != "ok", f"refused a good input ({case.note}): {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("scgnn-scale: error: "), err
    names = case.names or (str(case.path),)
    assert any(n in lines[0] for n in names), f"the message does not name the input: {lines[0]}"
    # nothing committed, and the corrected command runs in the same directory without --overwrite
    assert not finished_stages(out), finished_stages(out)
    assert not (out / "work.zarr" / "input" / "zarr.json").exists()
    code, err = run_cli(["run", str(good_input), "--out", str(out), "--until", "ingest", "--quiet"])
    assert code == 0, f"the failed run blocks the corrected one: {err}"


#: examples live in memory where there is a tmpfs: a run fsyncs its manifest, which a shared disk makes slow
_EXAMPLE_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextlib.contextmanager
def example_dir():
    """A fresh directory per generated example (function-scoped fixtures would be shared between them)."""
    d = Path(tempfile.mkdtemp(prefix="scgnn-fuzz-", dir=_EXAMPLE_ROOT))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- small matrices ---------------------------------------------------------------------------------------


@st.composite
def counts(draw, max_rows=6, max_cols=6, min_nonzero=1) -> np.ndarray:
    """A small non-negative matrix of float32 counts (some fractional) with at least one non-zero."""
    n = draw(st.integers(1, max_rows))
    g = draw(st.integers(1, max_cols))
    flat = draw(st.lists(st.one_of(st.just(0.0), st.integers(0, 40).map(float),
                                   st.sampled_from([0.5, 2.25, 1e-3, 7.5e4, 1e30])),
                         min_size=n * g, max_size=n * g))
    x = np.array(flat, dtype=np.float32).reshape(n, g)
    if np.count_nonzero(x) < min_nonzero:
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, g - 1))] = 1.0
    return x


def fmt_value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


# ---- (a) CSV / TSV ---------------------------------------------------------------------------------------

#: letters of generated names: without c, g, m, t and upper-case A/C/G/T/N, so a name never reads as a cell
#: barcode, cell<n>, gene<n> or an MT- gene, and the orientation is the one the test passes
SAFE_NAME = st.text("bdfhjkpqrsvwxyz0123456789_.", min_size=1, max_size=6)
#: names that need quoting
QUOTED_NAME = st.text("bdfhjk ,;\"'\t#=", min_size=1, max_size=6).filter(lambda s: s.strip(" \t"))

BAD_VALUES = {
    "negative": ["-1", "-0.5", "-3e5"],
    "nan": ["", "NA", "nan", "NaN", "null", "N/A"],
    "infinite": ["inf", "-inf", "Infinity", "1e400", "-1e400"],
    "beyond_float32": ["1e39", "3.5e38", "1e300", "-1e39"],  # finite in the file, infinite as float32
    "text": ["abc", "0x1F", "True", "1.2.3", "1e", "--1", "٣", "1_000_000x"],
}


def csv_line(fields: list[str], sep: str, quote_all: bool) -> str:
    buf = io.StringIO()
    csv.writer(buf, delimiter=sep, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL,
               lineterminator="").writerow(fields)
    return buf.getvalue()


DELIMITED_DEFECTS = [None, *BAD_VALUES, "ragged_long", "ragged_short", "empty_file", "header_only", "blank_only",
                     "all_zero", "wrong_delimiter", "latin1", "empty_name", "na_name", "binary", "header_too_long"]


@st.composite
def delimited_cases(draw, root: Path, defect: str | None) -> Case:
    x = draw(counts())  # cells x genes
    n_cells, n_genes = x.shape
    orientation = draw(st.sampled_from(["genes-x-cells", "cells-x-genes", "auto"]))
    rows_are_cells = orientation == "cells-x-genes"
    table = x if rows_are_cells else x.T
    n_rows, n_cols = table.shape
    quote_all = draw(st.booleans())
    name_st = st.one_of(SAFE_NAME, QUOTED_NAME) if quote_all else SAFE_NAME
    if draw(st.booleans()):  # duplicated names (made unique with a warning)
        name_st = st.sampled_from(["dup", "dup", "x1"])
    row_names = draw(st.lists(name_st, min_size=n_rows, max_size=n_rows))
    col_names = draw(st.lists(name_st, min_size=n_cols, max_size=n_cols))
    ext = draw(st.sampled_from([".csv", ".tsv", ".txt", ".tab"]))
    sep = {".csv": ",", ".tsv": "\t", ".tab": "\t"}.get(ext) or draw(st.sampled_from([",", "\t"]))
    if ext == ".txt" and sep == "," and any("\t" in n for n in col_names + row_names):
        sep = "\t"  # a .txt is split on tabs as soon as its first line holds one
    corner = draw(st.sampled_from(["", "gene", None]))  # None: R's write.table, no corner cell
    cells = [[fmt_value(v) for v in row] for row in table]
    expect, note = "ok", "well-formed"
    if defect in BAD_VALUES:
        i, j = draw(st.integers(0, n_rows - 1)), draw(st.integers(0, n_cols - 1))
        cells[i][j] = draw(st.sampled_from(BAD_VALUES[defect]))
        expect, note = "error", f"{defect} value {cells[i][j]!r}"
    elif defect == "all_zero":
        cells = [["0"] * n_cols for _ in range(n_rows)]
        expect, note = "error", "all zero"
    elif defect == "empty_name":
        which = draw(st.sampled_from(["row", "col"]))
        (row_names if which == "row" else col_names)[0] = ""
        expect, note = "either", f"empty {which} name"
    elif defect == "na_name":
        row_names[draw(st.integers(0, n_rows - 1))] = draw(st.sampled_from(["NA", "nan", "null", "N/A", "None"]))
        expect, note = "either", "a row name pandas reads as missing"
    lines = []
    header = ([] if corner is None else [corner]) + col_names
    lines.append(csv_line(header, sep, quote_all))
    for name, row in zip(row_names, cells, strict=True):
        lines.append(csv_line([name, *row], sep, quote_all))
    if defect in ("ragged_long", "ragged_short"):
        k = draw(st.integers(1, n_rows))
        fields = next(csv.reader([lines[k]], delimiter=sep))
        fields = fields + ["1"] if defect == "ragged_long" else fields[:-1]
        lines[k] = csv_line(fields, sep, quote_all)
        # the first data row sets the width: header and rows may then read consistently in another way
        expect = "either" if k == 1 else "error"
        note = f"{defect} row {k}"
    if draw(st.booleans()) and len(lines) > 2:  # blank lines between rows are skipped
        lines.insert(draw(st.integers(2, len(lines))), "")
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join(lines) + (newline if draw(st.booleans()) else "")
    bom = draw(st.booleans())
    if defect == "empty_file":
        text, expect, note = "", "error", "empty file"
    elif defect == "header_only":
        text, expect, note = lines[0] + newline, "error", "header only"
    elif defect == "blank_only":
        text, expect, note = "\n \n\t\n", "error", "blank lines only"
    elif defect == "wrong_delimiter" and ext != ".txt" and n_cols > 1:
        text = text.replace(sep, ";" if sep == "," else "|")
        expect, note = "error", "another delimiter than the name says"
    elif defect == "header_too_long":
        lines[0] = csv_line(header + ["extra1", "extra2"], sep, quote_all)
        text = newline.join(lines) + newline
        expect, note = "error", "two more names than columns"
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode()
    if defect == "latin1":
        data = data.replace(b"\n", b"\xe9\xff\n", 1) if b"\n" in data else data + b"\xe9\xff"
        expect, note = "error", "not UTF-8"
    elif defect == "binary":
        data = draw(st.binary(min_size=1, max_size=200))
        expect, note = "either", "random bytes"
    gz = draw(st.booleans())
    path = root / f"counts{ext}{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(data) if gz else data)
    matrix = x if expect == "ok" else None
    block_rows = draw(st.integers(1, 4))
    return Case(path, expect, matrix, extra=["--orientation", orientation, "--ingest-block-rows", str(block_rows)],
                note=note)


@pytest.mark.parametrize("defect", DELIMITED_DEFECTS, ids=str)
def test_delimited_inputs(defect, good_input):
    @fuzz_settings(WELL_FORMED_EXAMPLES if defect is None else DEFECT_EXAMPLES)
    @given(data=st.data())
    def examples(data):
        with example_dir() as work:
            check_run(data.draw(delimited_cases(work, defect)), work, good_input)

    examples()


# ---- (b) 10x Matrix Market directories -------------------------------------------------------------------


MTX_DEFECTS = [
    None, "banner", "unsupported", "size_fields", "size_text", "more_genes", "fewer_genes", "more_cells",
    "fewer_cells", "nnz_more", "nnz_less", "index_zero", "index_beyond", "index_negative", "index_text", "value_nan",
    "value_negative", "value_text", "value_inf", "value_beyond_float32", "missing_value", "missing_features",
    "missing_barcodes", "missing_matrix", "empty_barcodes", "empty_features", "empty_matrix", "duplicate_entry",
    "other_feature_type", "truncated_gz", "extra_field", "blank_line"]


@st.composite
def mtx_cases(draw, root: Path, defect: str | None) -> Case:
    x = draw(counts())  # cells x genes
    n_cells, n_genes = x.shape
    field_type = draw(st.sampled_from(["integer", "real", "pattern"]))
    if field_type == "integer":
        x = np.round(x) + (np.round(x).sum() == 0)
        x[x > 1e9] = 7
    if field_type == "pattern":
        x = (x != 0).astype(np.float32)
    genes_x_cells = sp.coo_matrix(x.T)
    entries = [[r + 1, c + 1, v] for r, c, v in zip(genes_x_cells.row, genes_x_cells.col, genes_x_cells.data,
                                                    strict=True)]
    order = draw(st.permutations(range(len(entries))))
    entries = [entries[k] for k in order]
    dims = [n_genes, n_cells, len(entries)]
    banner = f"%%MatrixMarket matrix coordinate {field_type} general"
    comments = draw(st.lists(st.sampled_from(["% a comment", "%", "%metadata_json: {}"]), max_size=2))
    features_name = draw(st.sampled_from(["features.tsv", "genes.tsv"]))
    n_feature_cols = draw(st.integers(1, 3))
    features = [[f"id{j}", f"name{j}", "Gene Expression"][:n_feature_cols] for j in range(n_genes)]
    barcodes = [[f"bc{i}"] for i in range(n_cells)]
    expect, note = "ok", "well-formed"
    missing = None

    def value_text(v):
        return None if field_type == "pattern" else fmt_value(v) if field_type == "real" else str(int(v))

    lines_of = [[str(r), str(c)] + ([value_text(v)] if field_type != "pattern" else []) for r, c, v in entries]
    if defect == "banner":
        banner = draw(st.sampled_from(["%%MatrixMarket", "%MatrixMarket matrix coordinate real general",
                                       "MatrixMarket matrix coordinate real general", "", "1 2 3",
                                       "%%MatrixMarket tensor coordinate real general"]))
        expect, note = "error", "bad banner"
    elif defect == "unsupported":
        banner = draw(st.sampled_from(["%%MatrixMarket matrix array real general",
                                       "%%MatrixMarket matrix coordinate complex general",
                                       "%%MatrixMarket matrix coordinate real symmetric",
                                       "%%MatrixMarket matrix coordinate real skew-symmetric"]))
        expect, note = "error", "unsupported Matrix Market kind"
    elif defect == "size_fields":
        dims = dims[:draw(st.integers(0, 2))] + ([1, 2] if draw(st.booleans()) else [])
        expect, note = "error" if len(dims) != 3 else "either", "size line with another number of fields"
    elif defect == "size_text":
        dims = [n_genes, "x", len(entries)]
        expect, note = "error", "non-numeric size line"
    elif defect in ("more_genes", "fewer_genes", "more_cells", "fewer_cells"):
        k = 0 if "genes" in defect else 1
        if defect.startswith("more"):
            dims[k] += draw(st.integers(1, 3))
        else:
            assume(dims[k] > 1)
            dims[k] -= 1
        expect, note = "error", f"size line with {defect}"
    elif defect in ("nnz_more", "nnz_less"):
        if defect == "nnz_less":
            assume(dims[2] > 0)
        dims[2] += 1 if defect == "nnz_more" else -1
        expect, note = "error", defect
    elif defect and defect.startswith("index_"):
        k = draw(st.integers(0, len(lines_of) - 1))
        axis = draw(st.integers(0, 1))
        lines_of[k][axis] = {"index_zero": "0", "index_negative": "-2", "index_text": "one",
                             "index_beyond": str(dims[axis] + draw(st.integers(1, 5)))}[defect]
        expect, note = "error", defect
    elif defect in ("value_nan", "value_negative", "value_text", "value_inf", "value_beyond_float32",
                    "missing_value"):
        assume(field_type != "pattern")
        k = draw(st.integers(0, len(lines_of) - 1))
        if defect == "missing_value":
            lines_of[k] = lines_of[k][:2]
        else:
            lines_of[k][2] = draw(st.sampled_from({"value_nan": ["nan", "NaN"], "value_negative": ["-1", "-2.5"],
                                                   "value_text": ["abc", "1,5", "0x10"],
                                                   "value_inf": ["inf", "-inf", "1e400"],
                                                   "value_beyond_float32": ["1e39", "1e300"]}[defect]))
        expect, note = "error", defect
    elif defect == "duplicate_entry":  # entries of one cell and gene add up, as scipy's COO
        k = draw(st.integers(0, len(entries) - 1))
        lines_of.append(list(lines_of[k]))
        dims[2] += 1
        r, c = entries[k][0] - 1, entries[k][1] - 1
        x = x.copy()
        x[c, r] += x[c, r] if field_type != "pattern" else 1
        note = "an entry given twice"
    elif defect == "other_feature_type":  # only 'Gene Expression' features are kept
        assume(n_feature_cols == 3 and n_genes > 1)
        j = draw(st.integers(0, n_genes - 1))
        features[j][2] = "Antibody Capture"
        x = np.delete(x, j, axis=1)
        note = "an antibody feature"
        if not np.count_nonzero(x):
            expect = "error"
    elif defect == "extra_field":
        k = draw(st.integers(0, len(lines_of) - 1))
        lines_of[k].append("9")
        expect, note = "either", "an entry with an extra field"
    elif defect in ("missing_features", "missing_barcodes", "missing_matrix"):
        missing = defect.split("_")[1]
        expect, note = "error", defect
    matrix_lines = [banner, *comments, " ".join(map(str, dims))] + [" ".join(e) for e in lines_of]
    if defect == "blank_line":
        matrix_lines.insert(draw(st.integers(len(comments) + 2, len(matrix_lines))), "")
        expect, note = "either", "a blank line among the entries"
    files = {"matrix.mtx": "\n".join(matrix_lines) + "\n",
             features_name: "".join("\t".join(f) + "\n" for f in features),
             "barcodes.tsv": "".join(b[0] + "\n" for b in barcodes)}
    if defect == "empty_barcodes":
        files["barcodes.tsv"], expect, note = "", "error", defect
    elif defect == "empty_features":
        files[features_name], expect, note = "", "error", defect
    elif defect == "empty_matrix":
        files["matrix.mtx"], expect, note = "", "error", defect
    d = root / "tenx"
    d.mkdir()
    gz = draw(st.booleans())
    skipped = {"matrix": "matrix.mtx", "features": features_name, "barcodes": "barcodes.tsv"}.get(missing)
    for name, text in files.items():
        if name == skipped:
            continue
        if gz:
            data = gzip.compress(text.encode())
            if defect == "truncated_gz" and name == "matrix.mtx":
                data = data[: max(1, len(data) // 2)]
            (d / (name + ".gz")).write_bytes(data)
        else:
            (d / name).write_text(text)
    if defect == "truncated_gz":
        expect, note = ("error" if gz else "ok"), "truncated gzip"
    target = d
    if draw(st.booleans()) and missing != "matrix":  # the matrix file itself is accepted too
        target = d / ("matrix.mtx.gz" if gz else "matrix.mtx")
    return Case(target, expect, x if expect == "ok" else None, names=(str(d),),
                extra=["--ingest-block-rows", str(draw(st.integers(1, 4)))], note=note)


@pytest.mark.parametrize("defect", MTX_DEFECTS, ids=str)
def test_mtx_inputs(defect, good_input):
    @fuzz_settings(WELL_FORMED_EXAMPLES if defect is None else DEFECT_EXAMPLES)
    @given(data=st.data())
    def examples(data):
        with example_dir() as work:
            check_run(data.draw(mtx_cases(work, defect)), work, good_input)

    examples()


# ---- (c) h5ad --------------------------------------------------------------------------------------------


def _replace(group, key: str, value, attrs=None) -> None:
    old_attrs = dict(group[key].attrs) if key in group else {}
    del group[key]
    group[key] = value
    for k, v in (old_attrs if attrs is None else attrs).items():
        group[key].attrs[k] = v


H5AD_DEFECTS = [
    None, "truncated", "garbled", "empty_file", "text_file", "no_X", "X_strings", "X_bool", "X_complex", "X_1d",
    "X_3d", "X_int", "X_float16", "obs_longer", "obs_shorter", "var_longer", "no_obs", "no_index_attr", "legacy_obs",
    "nan", "negative", "inf", "beyond_float32", "indptr_decreasing", "indptr_short", "index_beyond", "data_short",
    "unknown_encoding", "shape_attr_wrong", "X_group_empty"]


@st.composite
def h5ad_cases(draw, root: Path, defect: str | None) -> Case:
    x = draw(counts())
    n, g = x.shape
    layout = draw(st.sampled_from(["dense", "csr", "csc"]))
    X = {"dense": x, "csr": sp.csr_matrix(x), "csc": sp.csc_matrix(x)}[layout]
    adata = ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    path = root / "counts.h5ad"
    adata.write_h5ad(path)
    expect, note = "ok", f"well-formed {layout}"
    if defect in ("truncated", "garbled", "empty_file", "text_file"):
        raw = bytearray(path.read_bytes())
        if defect == "truncated":
            raw = raw[: draw(st.integers(0, len(raw) - 1))]
        elif defect == "garbled":
            # bytes after the superblock: most land in data or padding, some in HDF5's own structures
            for _ in range(draw(st.integers(1, 8))):
                raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        elif defect == "empty_file":
            raw = bytearray()
        else:
            raw = bytearray(b"cell,gene\nc0,1\n")
        path.write_bytes(bytes(raw))
        expect, note = ("either" if defect == "garbled" else "error"), defect
        return Case(path, expect, None, note=note)
    with h5py.File(path, "r+") as f:
        if defect == "no_X":
            del f["X"]
            expect = "error"
        elif defect in ("X_strings", "X_bool", "X_complex", "X_1d", "X_3d", "X_int", "X_float16"):
            x = np.minimum(np.round(x), 1000)  # what integers and half floats hold exactly
            x.flat[0] = x.flat[0] or 1.0
            value = {"X_strings": np.array([["a"] * g] * n, dtype="S3"), "X_bool": x > 0,
                     "X_complex": x.astype(np.complex64), "X_1d": x.ravel(), "X_3d": x[None],
                     "X_int": x.astype(np.int64), "X_float16": x.astype(np.float16)}[defect]
            if defect in ("X_int", "X_float16", "X_bool"):
                # readable: counts as integers, half floats or 0/1
                expect = "ok"
                x = np.asarray(value, dtype=np.float32)
            else:
                expect = "either" if defect == "X_complex" else "error"
            _replace(f, "X", value, attrs={})
        elif defect in ("obs_longer", "obs_shorter", "var_longer"):
            key = "obs" if defect.startswith("obs") else "var"
            m = (n if key == "obs" else g) + (1 if defect.endswith("longer") else -1)
            _replace(f[key], "_index", np.array([f"z{i}" for i in range(max(m, 0))], dtype=h5py.string_dtype()),
                     attrs={"encoding-type": "string-array", "encoding-version": "0.2.0"})
            expect = "error"
        elif defect == "no_obs":
            del f["obs"]
            expect = "error"
        elif defect == "no_index_attr":
            del f["obs"].attrs["_index"]
            expect = "error"
        elif defect == "legacy_obs":
            del f["obs"]
            f["obs"] = np.zeros(n, dtype=[("index", "S8")])
            expect = "error"
        elif defect == "beyond_float32":  # float64 counts that float32 cannot hold
            target = f["X"] if layout == "dense" else f["X"]["data"]
            values = target[...].astype(np.float64)
            values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([1e39, 1e300]))
            _replace(target.parent, target.name.rsplit("/", 1)[-1], values)
            expect = "error"
        elif defect in ("nan", "negative", "inf"):
            bad = {"nan": np.nan, "negative": -1.0, "inf": np.inf}[defect]
            target = f["X"] if layout == "dense" else f["X"]["data"]
            values = target[...]
            values.flat[draw(st.integers(0, values.size - 1))] = bad
            target[...] = values
            expect = "error"
        elif defect in ("indptr_decreasing", "indptr_short", "index_beyond", "data_short", "unknown_encoding",
                        "shape_attr_wrong", "X_group_empty"):
            assume(layout != "dense")
            grp = f["X"]
            if defect == "indptr_decreasing":
                p = grp["indptr"][...]
                assume(p[-1] > 0)
                p[-1] = 0 if p[-2] > 0 else p[-1]
                p[1] = p[-2] + 5
                _replace(grp, "indptr", p)
            elif defect == "indptr_short":
                _replace(grp, "indptr", grp["indptr"][:-1])
            elif defect == "index_beyond":
                idx = grp["indices"][...]
                idx[draw(st.integers(0, len(idx) - 1))] = (g if layout == "csr" else n) + draw(st.integers(0, 9))
                _replace(grp, "indices", idx)
            elif defect == "data_short":
                _replace(grp, "data", grp["data"][:-1])
            elif defect == "unknown_encoding":
                grp.attrs["encoding-type"] = draw(st.sampled_from(["coo_matrix", "awkward-array", ""]))
            elif defect == "shape_attr_wrong":
                grp.attrs["shape"] = draw(st.sampled_from([[n + 1, g], [n, g + 2], [n], [0, 0], [n, g, 1]]))
            else:
                for key in list(grp):
                    del grp[key]
            expect = "error"
    return Case(path, expect, x if expect == "ok" else None, extra=["--ingest-block-rows", "2"],
                note=defect or note)


@pytest.mark.parametrize("defect", H5AD_DEFECTS, ids=str)
def test_h5ad_inputs(defect, good_input):
    @fuzz_settings(WELL_FORMED_EXAMPLES if defect is None else DEFECT_EXAMPLES)
    @given(data=st.data())
    def examples(data):
        with example_dir() as work:
            check_run(data.draw(h5ad_cases(work, defect)), work, good_input)

    examples()


# ---- (d) options --------------------------------------------------------------------------------------------

OPTIONS = [(section, f) for section, f in config_fields()]
ODD_TEXT = st.one_of(
    st.sampled_from(["", " ", "0", "-0", "-1", "1", "1.5", "-1.5", "1e400", "-1e400", "nan", "NaN", "inf", "-inf",
                     "Infinity", "1e3", "0x10", "1_000", "99999999999999999999", "-99999999999999999999",
                     "9" * 30, "true", "false", "yes", "None", "null", "[]", "{}", "auto", "cuda", "cpu", "cuda:99",
                     "meta", "mps", "tcp://", "tcp://host", "host:99999", "::::", "4GiB", "1KiB", "-4GiB",
                     "10,10", "10", "0,0", "-1,-1", "a,b", "10,10,10", "\x00", "é", "\n"]),
    st.integers(-(10**25), 10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12).filter(lambda s: not s.startswith(("/", "~")) and "\x00" not in s),
)


def _as_number(value):
    return isinstance(value, int | float) and not isinstance(value, bool)


def sane_config(config: dict) -> dict:
    """An accepted config holds finite numbers in their documented ranges only (NaN or infinity would reach the
    training silently)."""
    for section, values in config.items():
        for name, value in values.items():
            if _as_number(value):
                assert math.isfinite(value), f"{section}.{name} = {value!r} was accepted"
                low, high, low_allowed = BOUNDS.get(f"{section}.{name}", (-math.inf, None, True))
                assert value >= low if low_allowed else value > low, f"{section}.{name} = {value!r} was accepted"
                assert high is None or value <= high, f"{section}.{name} = {value!r} was accepted"
    return config


#: the sections whose options change what ingest does: tried through a real ingest; the others stop at the
#: input check (a missing input), which comes after every option was checked
INGEST_SECTIONS = ("ingest", "store")


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: f"{o[0]}.{o[1].name}")
def test_option_values(option, good_input):
    section, f = option
    flag = f"--{section}-{f.name.replace('_', '-')}"

    @fuzz_settings(OPTION_EXAMPLES)
    @given(value=ODD_TEXT, joined=st.booleans())
    def examples(value, joined):
        with example_dir() as work:
            out = work / "run"
            inp = good_input if section in INGEST_SECTIONS else work / "absent.csv"
            args = [f"{flag}={value}"] if joined else [flag, value]
            cwd = os.getcwd()
            os.chdir(work)  # a relative --ingest-tmp-dir lands here
            try:
                code, err = run_cli(["run", str(inp), "--out", str(out), "--until", "ingest", "--quiet", *args])
            finally:
                os.chdir(cwd)
            assert "Traceback" not in err, err
            assert code in (0, 2), (code, err)
            lines = [line for line in err.strip().splitlines() if line.strip()]
            if code == 2 and lines and lines[-1].startswith("scgnn-scale run: error:"):
                return  # argparse's usage and error (a value it takes for a flag)
            accepted = code == 0 or lines == [f"scgnn-scale: error: {inp}: input file not found"]
            if accepted:
                sane_config(build_config({section: {f.name: value}}).to_dict())
                if code == 0:
                    sane_config(json.loads((out / "manifest.json").read_text())["config"])
                return
            assert len(lines) == 1 and lines[0].startswith("scgnn-scale: error: "), err
            assert f"{section}.{f.name}" in lines[0] or any(
                a in lines[0] for a in (flag, "--device", "--memory-limit", "--label-key")), lines[0]
            assert not finished_stages(out)

    examples()


TOML_VALUES = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=8), st.lists(st.integers(0, 3), max_size=3), st.just({"sub": 1}),
    st.sampled_from(["1979-05-27", "07:32:00", "1979-05-27T07:32:00Z"]).map(lambda s: ("raw", s)),
)


def toml_value(v) -> str:
    if isinstance(v, tuple):
        return v[1]
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return "{ " + ", ".join(f"{k} = {val}" for k, val in v.items()) + " }"


@fuzz_settings(40)
@given(entries=st.lists(st.tuples(st.sampled_from(OPTIONS + [("graph", None), ("nosection", None)]), TOML_VALUES),
                        min_size=1, max_size=4),
       garbage=st.one_of(st.none(), st.binary(max_size=40)))
def test_config_files(entries, garbage, good_input):
    with example_dir() as work:
        toml = work / "run.toml"
        if garbage is not None:
            toml.write_bytes(garbage)
        else:
            by_section: dict[str, list[str]] = {}
            for (section, f), value in entries:
                name = f.name if f is not None else "not_an_option"
                by_section.setdefault(section, []).append(f"{name} = {toml_value(value)}")
            toml.write_text("".join(f"[{s}]\n" + "\n".join(dict.fromkeys(lines)) + "\n"
                                    for s, lines in by_section.items()))
        code, err = run_cli(["run", str(good_input), "--out", str(work / "run"), "--until", "ingest", "--quiet",
                             "--config", str(toml), "--ingest-tmp-dir", str(work)])
        assert "Traceback" not in err, err
        assert code in (0, 2), (code, err)
        if code == 0:
            config = sane_config(json.loads((work / "run" / "manifest.json").read_text())["config"])
            if garbage is None:  # nothing was converted silently into a value of another kind
                for (section, f), value in entries:
                    if f is None:
                        continue
                    kind = type(f.default)
                    assert not isinstance(value, list | dict | tuple), (section, f.name, value)
                    assert not isinstance(value, bool) or kind is bool, (section, f.name, value)
                    if _as_number(value) and kind in (int, float):
                        assert config[section][f.name] == value, (section, f.name, value)
            return
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("scgnn-scale: error: "), err
        assert not finished_stages(work / "run")
