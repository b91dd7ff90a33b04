"""The bad-input catalogue: one test per case of what a user can hand ``scgnn-scale run`` (input files of every
format, options, run directories, the environment). Every case ends with exit code 2 and exactly one line on
stderr, ``scgnn-scale: error: ...``, that names the file or the option and the problem: no traceback, no other
warning, the input unchanged and nothing in the run directory overwritten or committed (README, "Errors").

Cases already in test_bad_input.py, test_option_checks.py, test_config.py, test_newcomer_inputs.py,
test_environment_errors.py and test_run_lock.py are not repeated here; tests/test_fuzz.py generates many more.
"""

import gzip
import json
import os
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from test_bad_input import snapshot

from scgnn_scale.cli import main

X = np.array([[1, 0, 3], [0, 5, 6], [7, 8, 0], [2, 1, 1]], dtype=np.float32)  # 4 cells x 3 genes
CELLS = ["c0", "c1", "c2", "c3"]
GENES = ["g0", "g1", "g2"]


def _out_state(out: Path):
    """Every file of a run directory but its lock (whose text names the last process that held it)."""
    state = snapshot(out)
    if isinstance(state, dict):
        state.pop(".lock", None)
    return state


def refuse(capsys, inp, *needles, out=None, extra=(), until="ingest", names=None) -> str:
    """Run ``scgnn-scale run INP`` and check that it is refused as the module docstring says; the error line."""
    inp = Path(inp)
    out = Path(out) if out is not None else inp.parent / "run"
    before_input, before_out = snapshot(inp), _out_state(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=".*autosharding.*")  # the package silences it for its users
        code = main(["run", str(inp), "--out", str(out), "--until", until, "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("scgnn-scale: error: "), line
    for needle in (*(names or (str(inp),)), *needles):
        assert needle in line, f"{needle!r} not in {line!r}"
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    assert snapshot(inp) == before_input, "the input was modified"
    if before_out is not None:
        assert _out_state(out) == before_out, "the run directory was changed"
    else:
        manifest = out / "manifest.json"
        assert not manifest.is_file() or not json.loads(manifest.read_text())["stages"], "a stage was committed"
        assert not (out / "work.zarr" / "input" / "zarr.json").exists(), "ingest committed output"
    return line


def refuse_option(capsys, tmp_path, option, *args, needles=()) -> str:
    """A valid input with one bad option: refused naming ``option``, before any work (no run directory)."""
    inp = write_csv(tmp_path / "good.csv")
    line = refuse(capsys, inp, *needles, extra=args, names=(option,))
    assert not (tmp_path / "run").exists(), "the run directory was created before the options were checked"
    return line


# ---- writers ------------------------------------------------------------------------------------------------


def write_csv(path, text=None):
    """``X`` as genes x cells (the original scGNN's CSV layout), or ``text`` as it is."""
    path = Path(path)
    if text is None:
        text = "," + ",".join(CELLS) + "\n" + "".join(
            g + "," + ",".join(f"{v:g}" for v in X[:, j]) + "\n" for j, g in enumerate(GENES))
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_mtx(path, *, banner="%%MatrixMarket matrix coordinate integer general", size=None, entries=None,
              features=None, barcodes=None, skip=()):
    """A 10x directory of ``X``; each part can be replaced (``None``: the right one) or left out (``skip``)."""
    path = Path(path)
    path.mkdir()
    coo = sp.coo_matrix(X.T)
    if entries is None:
        entries = [f"{r + 1} {c + 1} {int(v)}" for r, c, v in zip(coo.row, coo.col, coo.data, strict=True)]
    if size is None:
        size = f"{X.shape[1]} {X.shape[0]} {len(entries)}"
    files = {"matrix.mtx": "\n".join([banner, size, *entries]) + "\n",
             "features.tsv": "".join(f"id{j}\t{g}\tGene Expression\n" for j, g in enumerate(features or GENES)),
             "barcodes.tsv": "".join(f"{c}\n" for c in (barcodes if barcodes is not None else CELLS))}
    for name, text in files.items():
        if name not in skip:
            (path / name).write_text(text)
    return path


def write_h5ad(path, *, X_value=None, layout="csr", edit=None):
    """``X`` as an h5ad (dense, csr or csc), then ``edit(h5py.File)`` applied to it."""
    matrix = {"dense": X, "csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X)}[layout]
    adata = ad.AnnData(matrix, obs=pd.DataFrame(index=CELLS), var=pd.DataFrame(index=GENES))
    adata.write_h5ad(path)
    if X_value is not None or edit is not None:
        with h5py.File(path, "r+") as f:
            if X_value is not None:
                del f["X"]
                f["X"] = X_value
            if edit is not None:
                edit(f)
    return Path(path)


def _replace(group, key, value):
    attrs = dict(group[key].attrs)
    del group[key]
    group[key] = value
    group[key].attrs.update(attrs)


# ---- CSV / TSV ----------------------------------------------------------------------------------------------


def test_csv_empty_file(tmp_path, capsys):
    refuse(capsys, write_csv(tmp_path / "counts.csv", ""), "empty matrix (the file is empty)")


def test_csv_header_only(tmp_path, capsys):
    refuse(capsys, write_csv(tmp_path / "counts.csv", ",c0,c1\n"), "a header but no data rows")


def test_csv_header_wider_than_the_rows(tmp_path, capsys):
    inp = write_csv(tmp_path / "counts.csv", ",c0,c1,c2\ng0,1,2\ng1,3,4\n")
    refuse(capsys, inp, "the header has 4 fields but the first data row has 3")


def test_csv_row_with_an_extra_field(tmp_path, capsys):
    inp = write_csv(tmp_path / "counts.csv", ",c0,c1\ng0,1,2\ng1,3,4,5\ng2,1,1\n")
    refuse(capsys, inp, "cannot parse the table", "Expected 3 fields in line 3, saw 4")


def test_csv_row_with_a_missing_field(tmp_path, capsys):
    inp = write_csv(tmp_path / "counts.csv", ",c0,c1\ng0,1,2\ng1,3\ng2,1,1\n")
    refuse(capsys, inp, "NaN (missing) value", "cell 'c1'", "gene 'g1'")


def test_csv_infinite_value(tmp_path, capsys):
    inp = write_csv(tmp_path / "counts.csv", ",c0,c1\ng0,1,inf\ng1,3,4\n")
    refuse(capsys, inp, "infinite value inf", "cell 'c1'", "gene 'g0'")


def test_csv_value_beyond_float32(tmp_path, capsys):
    inp = write_csv(tmp_path / "counts.csv", ",c0,c1\ng0,1,2\ng1,1e39,4\n")
    refuse(capsys, inp, "beyond float32's range", "cell 'c0'", "gene 'g1'")


def test_tsv_negative_value(tmp_path, capsys):
    inp = write_csv(tmp_path / "counts.tsv", "\tc0\tc1\ng0\t1\t2\ng1\t-2\t4\n")
    refuse(capsys, inp, "negative value -2", "cell 'c0'", "gene 'g1'")


def test_csv_boolean_value(tmp_path, capsys):
    inp = write_csv(tmp_path / "counts.csv", ",c0,c1\ng0,1,TRUE\ng1,3,4\n")
    refuse(capsys, inp, "non-numeric value 'TRUE'", "row 'g0'", "column 'c1'")


def test_csv_not_utf8(tmp_path, capsys):
    inp = write_csv(tmp_path / "counts.csv", ",c0,c\xe9\ng0,1,2\n".encode("latin-1"))
    refuse(capsys, inp, "cannot read the input", "UnicodeDecodeError")


def test_csv_separated_by_semicolons(tmp_path, capsys):
    inp = write_csv(tmp_path / "counts.csv", ";c0;c1\ng0;1;2\ng1;3;4\n")
    refuse(capsys, inp, "empty matrix (no data columns)")


def test_csv_gz_that_is_not_gzipped(tmp_path, capsys):
    inp = tmp_path / "counts.csv.gz"
    inp.write_text(",c0,c1\ng0,1,2\n")
    refuse(capsys, inp, "Not a gzipped file")


def test_csv_gz_truncated(tmp_path, capsys):
    rows = "".join(f"g{j},{j % 7},{j % 5}\n" for j in range(20000))
    inp = write_csv(tmp_path / "counts.csv.gz", ",c0,c1\n" + rows)
    inp.write_bytes(inp.read_bytes()[:-200])
    refuse(capsys, inp, "cannot parse the table", "EOFError")


def test_csv_all_zeros(tmp_path, capsys):
    inp = write_csv(tmp_path / "counts.csv", ",c0,c1\ng0,0,0\ng1,0,0\ng2,0,0\n")
    refuse(capsys, inp, "empty matrix (all 2 x 3 values are zero)")


# ---- 10x Matrix Market directories -----------------------------------------------------------------------------


def test_mtx_bad_banner(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", banner="%MatrixMarket matrix coordinate integer general")
    refuse(capsys, inp, "matrix.mtx: not a Matrix Market file")


def test_mtx_dense_array_format(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", banner="%%MatrixMarket matrix array integer general")
    refuse(capsys, inp, "Matrix Market 'array integer general' is not supported")


def test_mtx_bad_size_line(tmp_path, capsys):
    refuse(capsys, write_mtx(tmp_path / "tenx", size="3 x 10"), "bad Matrix Market size line '3 x 10'")


def test_mtx_without_size_line(tmp_path, capsys):
    inp = tmp_path / "tenx"
    write_mtx(inp)
    (inp / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n% only comments\n")
    refuse(capsys, inp, "truncated Matrix Market file (no size line)")


def test_mtx_entry_beyond_the_size_line(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", entries=["1 1 4", "3 5 2"])
    refuse(capsys, inp, "entry 2 (3, 5) is outside the 3 x 4 matrix")


def test_mtx_zero_based_entry(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", entries=["0 1 4", "1 1 2"])
    refuse(capsys, inp, "entry 1 (0, 1) is outside the 3 x 4 matrix")


def test_mtx_more_entries_than_the_header_says(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", size="3 4 2", entries=["1 1 4", "2 2 2", "3 3 1"])
    refuse(capsys, inp, "3 entries, the header says 2")


def test_mtx_fewer_barcodes_than_cells(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", barcodes=CELLS[:3])
    refuse(capsys, inp, "3 features and 3 barcodes for a 3 x 4 matrix.mtx")


def test_mtx_more_features_than_genes(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", features=GENES + ["g3"])
    refuse(capsys, inp, "4 features and 4 barcodes for a 3 x 4 matrix.mtx")


def test_mtx_without_barcodes(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", skip=("barcodes.tsv",))
    refuse(capsys, inp, "a 10x directory needs barcodes.tsv[.gz]")


def test_mtx_without_features(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", skip=("features.tsv",))
    refuse(capsys, inp, "a 10x directory needs features.tsv[.gz] or genes.tsv[.gz]")


def test_mtx_non_numeric_value(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", banner="%%MatrixMarket matrix coordinate real general",
                    entries=["1 1 4", "2 2 a lot"])
    refuse(capsys, inp, "matrix.mtx: cannot read the matrix")


def test_mtx_negative_value(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", entries=["1 1 4", "2 3 -7"])
    refuse(capsys, inp, "negative value -7", "cell 'c2'", "gene 'g1'")


def test_mtx_empty_barcodes_file(tmp_path, capsys):
    inp = write_mtx(tmp_path / "tenx", barcodes=[])
    refuse(capsys, inp, "barcodes.tsv: cannot read the table")


# ---- h5ad, 10x HDF5 and Zarr --------------------------------------------------------------------------------


def test_h5ad_without_X(tmp_path, capsys):
    inp = write_h5ad(tmp_path / "counts.h5ad", edit=lambda f: f.__delitem__("X"))
    refuse(capsys, inp, "the AnnData has no X matrix")


def test_h5ad_X_of_strings(tmp_path, capsys):
    inp = write_h5ad(tmp_path / "counts.h5ad", X_value=np.full(X.shape, b"12", dtype="S2"))
    refuse(capsys, inp, "X holds byte-string values", "expected counts")


def test_h5ad_X_of_complex_numbers(tmp_path, capsys):
    inp = write_h5ad(tmp_path / "counts.h5ad", X_value=X.astype(np.complex64))
    refuse(capsys, inp, "X holds complex values (complex64)")


def test_h5ad_X_one_dimensional(tmp_path, capsys):
    inp = write_h5ad(tmp_path / "counts.h5ad", X_value=X.ravel())
    refuse(capsys, inp, "X is not a 2-d matrix (shape (12,))")


def test_h5ad_fewer_cell_names_than_rows(tmp_path, capsys):
    inp = write_h5ad(tmp_path / "counts.h5ad", edit=lambda f: _replace(
        f["obs"], "_index", np.array(["a", "b"], dtype=h5py.string_dtype())))
    refuse(capsys, inp, "obs/var have 2 x 3 names but X is 4 x 3")


def test_h5ad_csc_data_shorter_than_its_column_pointer(tmp_path, capsys):
    # found by tests/test_fuzz.py: a CSC X whose data array lacks its last entry was read without a word
    inp = write_h5ad(tmp_path / "counts.h5ad", layout="csc",
                     edit=lambda f: _replace(f["X"], "data", f["X"]["data"][:-1]))
    refuse(capsys, inp, "corrupt sparse matrix (indptr points past the end of data)")


def test_h5ad_unknown_sparse_encoding(tmp_path, capsys):
    inp = write_h5ad(tmp_path / "counts.h5ad", edit=lambda f: f["X"].attrs.__setitem__("encoding-type", "coo_matrix"))
    refuse(capsys, inp, "X has encoding 'coo_matrix'")


def test_h5ad_csr_column_index_beyond_the_genes(tmp_path, capsys):
    def edit(f):
        indices = f["X"]["indices"][...]
        indices[0] = 7
        _replace(f["X"], "indices", indices)

    refuse(capsys, write_h5ad(tmp_path / "counts.h5ad", edit=edit), "a column index is outside 0..2")


def test_h5ad_csr_row_pointer_not_increasing(tmp_path, capsys):
    def edit(f):
        indptr = f["X"]["indptr"][...]
        indptr[2] = 100
        _replace(f["X"], "indptr", indptr)

    refuse(capsys, write_h5ad(tmp_path / "counts.h5ad", edit=edit), "indptr is not a valid row pointer")


def test_h5ad_csc_row_index_beyond_the_cells(tmp_path, capsys):
    def edit(f):
        indices = f["X"]["indices"][...]
        indices[-1] = 9
        _replace(f["X"], "indices", indices)

    inp = write_h5ad(tmp_path / "counts.h5ad", layout="csc", edit=edit)
    refuse(capsys, inp, "a row index is outside 0..3")


def test_h5ad_legacy_obs_layout(tmp_path, capsys):
    def edit(f):
        del f["obs"]
        f["obs"] = np.zeros(4, dtype=[("index", "S8")])

    refuse(capsys, write_h5ad(tmp_path / "counts.h5ad", edit=edit), "obs uses the legacy AnnData (< 0.7) layout")


def test_h5ad_that_is_a_text_file(tmp_path, capsys):
    inp = tmp_path / "counts.h5ad"
    inp.write_text(",c0,c1\ng0,1,2\n")
    refuse(capsys, inp, "not a readable HDF5 file", "file signature not found")


def test_h5ad_nan_in_sparse_X(tmp_path, capsys):
    def edit(f):
        data = f["X"]["data"][...]
        data[3] = np.nan
        f["X"]["data"][...] = data

    refuse(capsys, write_h5ad(tmp_path / "counts.h5ad", edit=edit), "NaN (missing) value", "cell 'c1'",
           "gene 'g2'")


def test_hdf5_neither_anndata_nor_10x(tmp_path, capsys):
    inp = tmp_path / "counts.h5"
    with h5py.File(inp, "w") as f:
        f["something"] = np.arange(3)
    refuse(capsys, inp, "an HDF5 file that is neither an AnnData nor a 10x matrix")


def test_10x_h5_fewer_barcodes_than_cells(tmp_path, capsys):
    inp = tmp_path / "filtered_feature_bc_matrix.h5"
    csc = sp.csc_matrix(X.T)
    with h5py.File(inp, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices, csc.indptr
        g["shape"] = np.array([X.shape[1], X.shape[0]])
        g["barcodes"] = np.array(CELLS[:2], dtype="S")
        g.create_group("features")["id"] = np.array(GENES, dtype="S")
        g["features"]["name"] = np.array(GENES, dtype="S")
    refuse(capsys, inp, "2 barcodes and 3 features for a 3 x 4 matrix")


def test_zarr_directory_without_metadata(tmp_path, capsys):
    inp = tmp_path / "counts.zarr"
    inp.mkdir()
    (inp / "notes.txt").write_text("not a store\n")
    refuse(capsys, inp, "not a readable Zarr store")


def test_zarr_without_X(tmp_path, capsys):
    import zarr

    inp = tmp_path / "counts.zarr"
    with ad.settings.override(zarr_write_format=3), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's note that consolidated metadata is not in the v3 specification
        ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=CELLS), var=pd.DataFrame(index=GENES)).write_zarr(inp)
        del zarr.open_group(inp, mode="r+")["X"]
        zarr.consolidate_metadata(inp)
    refuse(capsys, inp, "the AnnData has no X matrix")


# ---- options --------------------------------------------------------------------------------------------------


def test_option_nan(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "feature.lr", "--feature-lr", "nan", needles=("is not a finite number",))


def test_option_infinite(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "cluster.resolution", "--cluster-resolution", "1e400",
                  needles=("is not a finite number",))


def test_option_integer_beyond_int64(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "ingest.block_rows", "--ingest-block-rows", "9" * 30, needles=("too large",))


def test_option_fanouts_with_one_value(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "gae.fanouts", "--gae-fanouts", "10", needles=("two positive fan-outs",))


def test_option_scheduler_of_an_unknown_scheme(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "runtime.scheduler", "--scheduler", "http://10.0.0.5:8786",
                  needles=("unknown address scheme 'http'",))


def test_option_scheduler_without_a_port(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "runtime.scheduler", "--scheduler", "tcp://10.0.0.5",
                  needles=("not a scheduler address",))


def test_option_dashboard_not_an_address(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "runtime.dashboard", "--runtime-dashboard", "localhost:http",
                  needles=("not an address to listen on",))


def test_option_device_this_package_does_not_run_on(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "--device mps", "--device", "mps", needles=("not a device this package runs on",))


def test_option_cuda_device_that_is_not_there(tmp_path, capsys):
    import torch

    why = "numbered from 0" if torch.cuda.is_available() else "no CUDA device is visible"
    refuse_option(capsys, tmp_path, "--device cuda:99", "--device", "cuda:99", needles=(why,))


def test_option_memory_limit_not_a_size(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "--memory-limit 'plenty'", "--memory-limit", "plenty", needles=("not a size",))


def test_option_memory_limit_below_1gib(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "--memory-limit '512MiB'", "--memory-limit", "512MiB",
                  needles=("at least 1 GiB",))


def test_option_k_min_above_k_max(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "ltmg.k_min 4 and ltmg.k_max 3", "--ltmg-k-min", "4", "--ltmg-k-max", "3",
                  needles=("k_max must be at least k_min",))


def test_option_compression_level_above_9(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "store.compression_level", "--store-compression-level", "12",
                  needles=("out of range (must be at least 0 and at most 9)",))


def test_option_mantissa_bits_above_float32s(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "impute.mantissa_bits", "--impute-mantissa-bits", "24",
                  needles=("out of range (must be at least 1 and at most 23)",))


def test_option_unknown_orientation(tmp_path, capsys):
    refuse_option(capsys, tmp_path, "ingest.orientation", "--orientation", "sideways",
                  needles=("'sideways' is not one of auto, genes-x-cells, cells-x-genes",))


def test_toml_option_outside_a_section(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("k = 15\n")
    refuse_option(capsys, tmp_path, str(toml), "--config", str(toml), needles=("must sit in [section] tables",))


def test_toml_true_for_an_integer(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("[graph]\nk = true\n")
    refuse_option(capsys, tmp_path, "graph.k", "--config", str(toml), needles=("True is not a valid int",))


def test_toml_list_for_a_text_option(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('[runtime]\ndevice = ["cpu"]\n')
    refuse_option(capsys, tmp_path, "runtime.device", "--config", str(toml), needles=("is not a valid str",))


def test_toml_not_utf8(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_bytes(b"[graph]\n# \xe9\nk = 5\n")
    refuse_option(capsys, tmp_path, str(toml), "--config", str(toml), needles=("not a valid TOML file",))


# ---- run directories ------------------------------------------------------------------------------------------


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("my notes\n")
    refuse(capsys, write_csv(tmp_path / "counts.csv"), "--out exists and is not a directory", out=out,
           names=(str(out),))
    assert out.read_text() == "my notes\n"


def test_out_is_a_directory_of_other_files(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "figure.png").write_bytes(b"\x89PNG")
    refuse(capsys, write_csv(tmp_path / "counts.csv"), "is a non-empty directory that is not a scgnn-scale run",
           out=out, names=(str(out),))


def test_out_with_a_corrupt_manifest(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text('{"format": 3, "stages": {')
    refuse(capsys, write_csv(tmp_path / "counts.csv"), "corrupt manifest", out=out, names=(str(out),))


def test_out_of_another_store_format(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": 999, "stages": {}}))
    refuse(capsys, write_csv(tmp_path / "counts.csv"), "run store format 999 is not supported", out=out,
           names=(str(out),))


def test_out_holding_a_run_with_other_options(tmp_path, capsys):
    inp = write_csv(tmp_path / "counts.csv")
    out = tmp_path / "run"
    assert main(["run", str(inp), "--out", str(out), "--until", "ingest", "--quiet", "--ingest-block-rows", "64"]) == 0
    capsys.readouterr()
    refuse(capsys, inp, "holds a run of other options (ingest.block_rows 64 -> 2)", "--overwrite keeps no stage",
           out=out, extra=("--ingest-block-rows", "2"), names=(str(out),))


def test_out_under_proc(tmp_path, capsys):
    out = Path("/proc/scgnn-scale-run")
    refuse(capsys, write_csv(tmp_path / "counts.csv"), "cannot create the run directory", out=out,
           names=(str(out),))


# ---- the environment ----------------------------------------------------------------------------------------


def test_tmp_dir_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    refuse(capsys, write_csv(tmp_path / "counts.csv"), "cannot create the temporary files", "--ingest-tmp-dir",
           extra=("--ingest-tmp-dir", str(missing)), names=(str(missing),))


def test_tmp_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "scratch"
    blocker.write_text("x")
    refuse(capsys, write_csv(tmp_path / "counts.csv"), "cannot create the temporary files",
           extra=("--ingest-tmp-dir", str(blocker)), names=(str(blocker),))


def test_input_is_a_dangling_symlink(tmp_path, capsys):
    inp = tmp_path / "counts.h5ad"
    inp.symlink_to(tmp_path / "moved-away.h5ad")
    refuse(capsys, inp, "input file not found")


def test_input_is_a_directory_named_like_a_csv(tmp_path, capsys):
    inp = tmp_path / "counts.csv"
    inp.mkdir()
    refuse(capsys, inp, "unknown input format: a directory that no registered format reads")


def test_input_is_a_device_file(tmp_path, capsys):
    refuse(capsys, Path(os.devnull), "unknown input format", out=tmp_path / "run")


# ---- read by content, not refused -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["counts.txt", "counts.csv"])
def test_an_h5ad_under_a_text_name_is_read_as_an_h5ad(tmp_path, capsys, name):
    """Not a bad input: an HDF5 file named like a table is read by its content (the first bytes)."""
    inp = write_h5ad(tmp_path / name)
    assert main(["run", str(inp), "--out", str(tmp_path / "run"), "--until", "ingest", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["ingest"]["info"]["format"] == "h5ad"
    assert (manifest["stages"]["ingest"]["info"]["n_cells"], manifest["stages"]["ingest"]["info"]["n_genes"]) == (4, 3)


def test_a_tab_separated_txt_of_one_column_in_r_layout(tmp_path):
    """Not a bad input: R's write.table of one cell (a header of one name, so no tab in it) is split on the tabs of
    its rows."""
    inp = write_csv(tmp_path / "counts.txt", "c0\ng0\t5\ng1\t0\ng2\t2\n")
    out = tmp_path / "run"
    assert main(["run", str(inp), "--out", str(out), "--until", "ingest", "--quiet",
                 "--orientation", "genes-x-cells"]) == 0
    info = json.loads((out / "manifest.json").read_text())["stages"]["ingest"]["info"]
    assert (info["n_cells"], info["n_genes"], info["nnz"]) == (1, 3, 2)


def test_a_dashboard_host_that_does_not_resolve_is_one_line():
    """Not through ``run`` (the cluster starts with the first stage that uses Dask): the embedded cluster that
    cannot serve its dashboard at a syntactically valid address is an InputError naming the option."""
    from scgnn_scale.config import RuntimeConfig
    from scgnn_scale.distributed import ClientHolder
    from scgnn_scale.errors import InputError
    from scgnn_scale.memory import MemoryPlan

    holder = ClientHolder(RuntimeConfig(dashboard="no-such-host.invalid:8787", n_workers=1), MemoryPlan())
    with pytest.raises(InputError, match=r"--runtime-dashboard no-such-host\.invalid:8787: the embedded cluster "
                                         "cannot serve its dashboard there"):
        holder.get()
    holder.close()


def test_an_in_memory_anndata_of_complex_values_is_refused():
    """The Python API's door (scgnn_scale.run / tl.scgnn on an AnnData) refuses what the files' door refuses."""
    from scgnn_scale.errors import InputError
    from scgnn_scale.readers import open_input

    with pytest.raises(InputError, match=r"input AnnData: X holds complex values \(complex64\)"):
        open_input(ad.AnnData(X.astype(np.complex64)))


def test_h5ad_csc_column_pointer_that_ends_short_of_its_data(tmp_path, capsys):
    # the CSC reader reads whole column ranges: a pointer ending before the stored values read a prefix
    def shorten(f):
        indptr = f["X"]["indptr"][:]
        indptr[-1] -= 1
        _replace(f["X"], "indptr", indptr)

    inp = write_h5ad(tmp_path / "counts.h5ad", layout="csc", edit=shorten)
    refuse(capsys, inp, "corrupt sparse matrix (indptr runs from 0 to")
