"""Every bad input a user can cause, through the CLI: exit code 2, one line naming the file, no traceback,
the input untouched and nothing committed to the run directory (README, "Errors")."""

import gzip
import hashlib
import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgnn_scale.cli import main


def _counts(n=40, g=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.poisson(1.0, (n, g)).astype(np.float32) + np.eye(n, g, dtype=np.float32)


def _names(n, prefix):
    return [f"{prefix}{i}" for i in range(n)]


def write_h5ad(path, x, *, obs_names=None, var_names=None, sparse=True):
    adata = ad.AnnData(sp.csr_matrix(x) if sparse else x)
    adata.obs_names = obs_names or _names(x.shape[0], "c")
    adata.var_names = var_names or _names(x.shape[1], "g")
    adata.obs["label"] = pd.Categorical(np.arange(x.shape[0]) % 2)
    adata.write_h5ad(path)
    return path


def snapshot(path: Path):
    """Content hash of a file or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(path.rglob("*")) if p.is_file()}
    return None


def run_cli(capsys, inp, out, *extra):
    code = main(["run", str(inp), "--out", str(out), "--until", "preprocess", "--quiet", *extra])
    return code, capsys.readouterr().err


def assert_clean_failure(code, err, inp, out, before, *needles, ingest_ok=False):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("scgnn-scale: error: ")
    assert "Traceback" not in err
    assert str(inp) in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert snapshot(inp) == before, "the input was modified"
    if not ingest_ok:
        assert not (Path(out) / "work.zarr" / "input" / "zarr.json").exists(), "ingest committed output"
    assert not (Path(out) / "adata.zarr" / "X").exists(), "preprocess committed output"


def check(capsys, tmp_path, inp, *needles, extra=(), ingest_ok=False):
    before = snapshot(inp)
    out = tmp_path / f"run-{Path(inp).name}"
    code, err = run_cli(capsys, inp, out, *extra)
    assert_clean_failure(code, err, inp, out, before, *needles, ingest_ok=ingest_ok)
    return err


# ---- the cases ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path, capsys):
    inp = tmp_path / "nowhere" / "counts.h5ad"
    check(capsys, tmp_path, inp, "input file not found")


def test_unknown_format(tmp_path, capsys):
    inp = tmp_path / "counts.xyz"
    inp.write_text("hello\n")
    check(capsys, tmp_path, inp, "unknown input format")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a matrix\n")
    check(capsys, tmp_path, folder, "unknown input format")


def test_truncated_h5ad(tmp_path, capsys):
    inp = write_h5ad(tmp_path / "counts.h5ad", _counts())
    data = inp.read_bytes()
    inp.write_bytes(data[: len(data) // 2])
    check(capsys, tmp_path, inp, "HDF5")


def test_corrupt_h5ad(tmp_path, capsys):
    inp = write_h5ad(tmp_path / "counts.h5ad", _counts())
    data = bytearray(inp.read_bytes())
    data[:64] = b"\0" * 64  # the superblock: no longer an HDF5 file
    inp.write_bytes(bytes(data))
    check(capsys, tmp_path, inp, "not a readable HDF5 file")


def test_truncated_10x_h5(tmp_path, capsys):
    x = _counts()
    csc = sp.csc_matrix(x.T)
    inp = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(inp, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices, csc.indptr
        g["shape"] = np.array([x.shape[1], x.shape[0]])
        g["barcodes"] = np.array(_names(x.shape[0], "c"), dtype="S")
        feats = g.create_group("features")
        feats["id"] = feats["name"] = np.array(_names(x.shape[1], "g"), dtype="S")
    data = inp.read_bytes()
    inp.write_bytes(data[: int(len(data) * 0.6)])
    check(capsys, tmp_path, inp, "HDF5")


def _mtx_dir(path, x, *, gz):
    path.mkdir()
    coo = sp.coo_matrix(x.T)
    lines = ["%%MatrixMarket matrix coordinate integer general", f"{x.shape[1]} {x.shape[0]} {coo.nnz}"]
    lines += [f"{r + 1} {c + 1} {int(v)}" for r, c, v in zip(coo.row, coo.col, coo.data, strict=True)]
    files = {"matrix.mtx": "\n".join(lines) + "\n",
             "features.tsv": "\n".join(f"id{j}\tg{j}\tGene Expression" for j in range(x.shape[1])) + "\n",
             "barcodes.tsv": "\n".join(_names(x.shape[0], "c")) + "\n"}
    for name, text in files.items():
        if gz:
            (path / (name + ".gz")).write_bytes(gzip.compress(text.encode()))
        else:
            (path / name).write_text(text)
    return path


def test_truncated_mtx(tmp_path, capsys):
    inp = _mtx_dir(tmp_path / "tenx", _counts(), gz=False)
    text = (inp / "matrix.mtx").read_text().splitlines()
    (inp / "matrix.mtx").write_text("\n".join(text[: len(text) // 2]) + "\n")
    check(capsys, tmp_path, inp, "truncated Matrix Market file")


def test_truncated_mtx_gz(tmp_path, capsys):
    inp = _mtx_dir(tmp_path / "tenx", _counts(), gz=True)
    data = (inp / "matrix.mtx.gz").read_bytes()
    (inp / "matrix.mtx.gz").write_bytes(data[: len(data) // 2])
    check(capsys, tmp_path, inp, "matrix.mtx.gz")


def _zarr_store(path, x):
    adata = ad.AnnData(sp.csr_matrix(x))
    adata.obs_names = _names(x.shape[0], "c")
    adata.var_names = _names(x.shape[1], "g")
    with ad.settings.override(zarr_write_format=3):
        adata.write_zarr(path)
    return path


def test_corrupt_zarr_chunk(tmp_path, capsys):
    inp = _zarr_store(tmp_path / "counts.zarr", _counts())
    chunks = [p for p in (inp / "X" / "data").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks
    chunks[0].write_bytes(b"this is not a compressed chunk" * 4)
    check(capsys, tmp_path, inp, "cannot read the matrix")


def test_corrupt_zarr_metadata(tmp_path, capsys):
    inp = _zarr_store(tmp_path / "counts.zarr", _counts())
    (inp / "zarr.json").write_text("{ not json")
    check(capsys, tmp_path, inp, "not a readable Zarr store")


def test_negative_value(tmp_path, capsys):
    x = _counts()
    x[7, 3] = -2
    inp = write_h5ad(tmp_path / "counts.h5ad", x)
    check(capsys, tmp_path, inp, "negative value", "cell 'c7'", "gene 'g3'")


def test_nan_value(tmp_path, capsys):
    x = _counts()
    df = pd.DataFrame(x.T, index=_names(x.shape[1], "g"), columns=_names(x.shape[0], "c"))
    df.iloc[2, 5] = np.nan  # gene g2 of cell c5: an empty field in the CSV
    inp = tmp_path / "counts.csv"
    df.to_csv(inp)
    check(capsys, tmp_path, inp, "NaN", "cell 'c5'", "gene 'g2'")


def test_infinite_value(tmp_path, capsys):
    x = _counts()
    x[4, 1] = np.inf
    inp = write_h5ad(tmp_path / "counts.h5ad", x, sparse=False)
    check(capsys, tmp_path, inp, "infinite value", "cell 'c4'", "gene 'g1'")


def test_empty_matrix(tmp_path, capsys):
    inp = write_h5ad(tmp_path / "zeros.h5ad", np.zeros((30, 8), dtype=np.float32))
    check(capsys, tmp_path, inp, "empty matrix", "zero")
    inp = write_h5ad(tmp_path / "no_cells.h5ad", np.zeros((0, 8), dtype=np.float32))
    check(capsys, tmp_path, inp, "empty matrix (0 cells")


def test_nothing_left_after_filtering(tmp_path, capsys):
    inp = write_h5ad(tmp_path / "counts.h5ad", np.eye(300, 40, dtype=np.float32))  # each gene in 1 cell
    check(capsys, tmp_path, inp, "nothing left after filtering", ingest_ok=True)


def test_duplicated_names_made_unique(tmp_path, capsys):
    x = _counts()
    obs_names = ["dup"] * 3 + _names(x.shape[0] - 3, "c")
    var_names = ["g0", "g0"] + _names(x.shape[1] - 2, "x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own note about non-unique names
        inp = write_h5ad(tmp_path / "counts.h5ad", x, obs_names=obs_names, var_names=var_names)
    before = snapshot(inp)
    with pytest.warns(UserWarning, match="duplicated") as record:
        code, err = run_cli(capsys, inp, tmp_path / "run", "--preprocess-n-top-genes", "5000")
    assert code == 0, err
    messages = [str(w.message) for w in record]
    assert any("duplicated obs name" in m and str(inp) in m for m in messages)
    assert any("duplicated var name" in m for m in messages)
    adata = ad.read_zarr(tmp_path / "run" / "adata.zarr")
    assert list(adata.obs_names[:3]) == ["dup", "dup-1", "dup-2"]
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert snapshot(inp) == before


def test_csv_orientation_contradicts_option(tmp_path, capsys):
    x = _counts()
    barcodes = [f"AAACCTGAGAAAC{i:03d}".replace("0", "A").replace("1", "C").replace("2", "G")
                .replace("3", "T").replace("4", "AC").replace("5", "CG").replace("6", "GT")
                .replace("7", "TA").replace("8", "CA").replace("9", "GA") + "-1" for i in range(x.shape[0])]
    df = pd.DataFrame(x.T, index=_names(x.shape[1], "Gene"), columns=barcodes)  # genes x cells
    inp = tmp_path / "counts.csv"
    df.to_csv(inp)
    check(capsys, tmp_path, inp, "--orientation cells-x-genes contradicts the file", "cell names",
          extra=("--orientation", "cells-x-genes"))


def test_non_numeric_csv_cell(tmp_path, capsys):
    x = _counts()
    df = pd.DataFrame(x.T, index=_names(x.shape[1], "g"), columns=_names(x.shape[0], "c")).astype(object)
    df.iloc[6, 9] = "12a"
    inp = tmp_path / "counts.tsv.gz"
    df.to_csv(inp, sep="\t")
    check(capsys, tmp_path, inp, "non-numeric value '12a'", "row 'g6'", "column 'c9'")


def test_run_dir_holds_another_run(tmp_path, capsys):
    first = write_h5ad(tmp_path / "first.h5ad", _counts(seed=1))
    second = write_h5ad(tmp_path / "second.h5ad", _counts(seed=2))
    out = tmp_path / "run"
    code, err = run_cli(capsys, first, out)
    assert code == 0, err
    manifest = (out / "manifest.json").read_text()
    store_before = snapshot(out / "adata.zarr")
    before = snapshot(second)
    code, err = run_cli(capsys, second, out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert str(out) in lines[0] and "holds a run of another input" in lines[0]
    assert (out / "manifest.json").read_text() == manifest
    assert json.loads(manifest)["input"]["path"] == str(first.resolve())
    assert snapshot(out / "adata.zarr") == store_before
    assert snapshot(second) == before


def test_missing_label_key(tmp_path, capsys):
    inp = write_h5ad(tmp_path / "counts.h5ad", _counts())
    check(capsys, tmp_path, inp, "has no obs column 'cell_type'", extra=("--label-key", "cell_type"))
