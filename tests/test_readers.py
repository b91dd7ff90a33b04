"""Every input format gives the same matrix, names and labels, block by block."""

import gzip
import os
import random
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgnn_scale.errors import InputError
from scgnn_scale.readers import open_input, resolve_orientation

N_CELLS, N_GENES, BLOCK = 23, 9, 5


@pytest.fixture
def counts():
    rng = np.random.default_rng(1)
    x = rng.poisson(0.8, (N_CELLS, N_GENES)).astype(np.float32)
    x[3] = 0  # an empty cell
    x[:, 4] = 0  # an empty gene
    x[5, 2] = 2.5  # not an integer: floats survive every format
    return x


CELLS = [f"c{i}" for i in range(N_CELLS)]
GENES = [f"g{j}" for j in range(N_GENES)]
LABELS = pd.Categorical(["t0", "t1", "t2"] * 7 + ["t0", "t1"])


def _adata(x, X=None):
    obs = pd.DataFrame({"label": LABELS}, index=CELLS)
    return ad.AnnData(X if X is not None else x, obs=obs, var=pd.DataFrame(index=GENES))


def read_all(source, **kw):
    """Dense matrix from the blocks, checking order and block sizes on the way."""
    kw.setdefault("block_rows", BLOCK)
    with open_input(source, **kw) as reader:
        out = np.zeros((reader.n_obs, reader.n_vars), dtype=np.float32)
        expected = 0
        for start, stop, block in reader.iter_blocks():
            assert start == expected and 0 < stop - start <= kw["block_rows"]
            assert sp.isspmatrix_csr(block) and block.dtype == np.float32
            assert block.has_sorted_indices
            out[start:stop] = block.toarray()
            expected = stop
        assert expected == reader.n_obs
        return out, reader.obs, reader.var, reader.format


# ---- writers of each format -----------------------------------------------------------------------


def write_mtx_dir(path, x, *, gz, features, shuffle=False, extra_feature=False):
    path.mkdir()
    genes_x_cells = sp.coo_matrix(x.T)
    rows, cols, vals = genes_x_cells.row, genes_x_cells.col, genes_x_cells.data
    n_genes = x.shape[1]
    feat_rows = [(f"ENSG{j:011d}", GENES[j], "Gene Expression") for j in range(n_genes)]
    if extra_feature:  # an antibody-capture feature that must be dropped
        feat_rows.append(("CD3_TotalSeqB", "CD3", "Antibody Capture"))
        rows = np.r_[rows, n_genes, n_genes]
        cols = np.r_[cols, 0, 1]
        vals = np.r_[vals, 7.0, 9.0]
        n_genes += 1
    order = np.arange(len(vals))
    if shuffle:
        random.Random(0).shuffle(order)
    lines = ["%%MatrixMarket matrix coordinate real general", "% written by the test",
             f"{n_genes} {x.shape[0]} {len(vals)}"]
    lines += [f"{rows[k] + 1} {cols[k] + 1} {vals[k]:g}" for k in order]
    text = "\n".join(lines) + "\n"
    if features:
        ftext = "\n".join("\t".join(r) for r in feat_rows) + "\n"
        fname = "features.tsv"
    else:
        ftext = "\n".join(f"{a}\t{b}" for a, b, _ in feat_rows) + "\n"
        fname = "genes.tsv"
    btext = "\n".join(CELLS) + "\n"
    for name, content in (("matrix.mtx", text), (fname, ftext), ("barcodes.tsv", btext)):
        if gz:
            with gzip.open(path / (name + ".gz"), "wt") as fh:
                fh.write(content)
        else:
            (path / name).write_text(content)
    return path


def write_10x_h5(path, x, *, legacy=False):
    csc = sp.csc_matrix(x.T)  # genes x cells; its columns are cells
    with h5py.File(path, "w") as f:
        g = f.create_group("GRCh38" if legacy else "matrix")
        g["data"] = csc.data.astype(np.int32 if np.all(csc.data == np.round(csc.data)) else np.float32)
        g["data"][...] = csc.data
        g["indices"] = csc.indices.astype(np.int64)
        g["indptr"] = csc.indptr.astype(np.int64)
        g["shape"] = np.array([x.shape[1], x.shape[0]], dtype=np.int32)
        g["barcodes"] = np.array(CELLS, dtype="S")
        ids = np.array([f"ENSG{j:011d}" for j in range(x.shape[1])], dtype="S")
        if legacy:
            g["genes"] = ids
            g["gene_names"] = np.array(GENES, dtype="S")
        else:
            feats = g.create_group("features")
            feats["id"] = ids
            feats["name"] = np.array(GENES, dtype="S")
            feats["feature_type"] = np.array(["Gene Expression"] * x.shape[1], dtype="S")
            feats["genome"] = np.array(["GRCh38"] * x.shape[1], dtype="S")
    return path


def write_table(path, x, *, rows_are_cells, sep, corner=""):
    df = pd.DataFrame(x, index=CELLS, columns=GENES) if rows_are_cells else \
        pd.DataFrame(x.T, index=GENES, columns=CELLS)
    df.index.name = corner or None
    df.to_csv(path, sep=sep, compression="infer", float_format="%g")
    return path


# ---- every format, same matrix ----------------------------------------------------------------------


def _check(result, x, *, label=False, gene_ids=False):
    dense, obs, var, _ = result
    np.testing.assert_array_equal(dense, x)
    assert list(obs.index) == CELLS
    assert list(var.index) == GENES
    if label:
        assert list(obs["label"].astype(str)) == list(LABELS.astype(str))
    if gene_ids:
        assert var["gene_ids"].iloc[0] == "ENSG00000000000"


@pytest.mark.parametrize("layout", ["dense", "csr", "csc"])
def test_h5ad(tmp_path, counts, layout):
    X = {"dense": counts, "csr": sp.csr_matrix(counts), "csc": sp.csc_matrix(counts)}[layout]
    _adata(counts, X).write_h5ad(tmp_path / "a.h5ad")
    result = read_all(str(tmp_path / "a.h5ad"), label_key="label")
    _check(result, counts, label=True)
    assert result[3] == "h5ad"


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_zarr(tmp_path, counts, zarr_format, layout):
    X = counts if layout == "dense" else sp.csr_matrix(counts)
    with ad.settings.override(zarr_write_format=zarr_format), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's note that v2 is no longer the default
        _adata(counts, X).write_zarr(tmp_path / "a.zarr")
    result = read_all(str(tmp_path / "a.zarr"), label_key="label")
    _check(result, counts, label=True)
    assert result[3] == f"zarr-v{zarr_format}"


@pytest.mark.parametrize("gz,features,shuffle", [(False, True, False), (True, True, True), (False, False, True),
                                                 (True, False, False)])
def test_mtx_directory(tmp_path, counts, gz, features, shuffle):
    d = write_mtx_dir(tmp_path / "tenx", counts, gz=gz, features=features, shuffle=shuffle)
    _check(read_all(str(d)), counts, gene_ids=True)
    # the matrix file itself is accepted too
    _check(read_all(str(d / ("matrix.mtx.gz" if gz else "matrix.mtx"))), counts)


def test_mtx_keeps_gene_expression_only(tmp_path, counts):
    d = write_mtx_dir(tmp_path / "tenx", counts, gz=True, features=True, extra_feature=True)
    _check(read_all(str(d)), counts)


@pytest.mark.parametrize("legacy", [False, True])
def test_10x_h5(tmp_path, counts, legacy):
    path = write_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5", counts, legacy=legacy)
    result = read_all(str(path))
    _check(result, counts, gene_ids=True)
    assert result[3] == "10x-h5"


@pytest.mark.parametrize("name,rows_are_cells,orientation", [
    ("m.csv", False, "genes-x-cells"),
    ("m.csv.gz", False, "auto"),
    ("m.tsv", True, "cells-x-genes"),
    ("m.tsv.gz", True, "cells-x-genes"),
    ("m.csv.gz", True, "cells-x-genes"),
    ("m.txt", False, "auto"),
])
def test_delimited(tmp_path, counts, name, rows_are_cells, orientation):
    sep = "\t" if ".tsv" in name or name.endswith(".txt") else ","
    path = write_table(tmp_path / name, counts, rows_are_cells=rows_are_cells, sep=sep)
    _check(read_all(str(path), orientation=orientation), counts)


def test_delimited_without_corner_cell(tmp_path, counts):
    """R's write.table: the header has one field fewer than the rows."""
    path = tmp_path / "r.txt"
    lines = ["\t".join(CELLS)] + [GENES[j] + "\t" + "\t".join(f"{v:g}" for v in counts[:, j])
                                  for j in range(N_GENES)]
    path.write_text("\n".join(lines) + "\n")
    _check(read_all(str(path)), counts)


def test_anndata_object(counts):
    for X in (counts, sp.csr_matrix(counts), sp.csc_matrix(counts)):
        adata = _adata(counts, X)
        result = read_all(adata, label_key="label")
        _check(result, counts, label=True)
        assert result[3] == "anndata"


def test_fsspec_urls(tmp_path, counts):
    import fsspec

    _adata(counts, sp.csr_matrix(counts)).write_h5ad(tmp_path / "a.h5ad")
    with open(tmp_path / "a.h5ad", "rb") as src, fsspec.open("memory://scgnn-test/a.h5ad", "wb") as dst:
        dst.write(src.read())
    _check(read_all("memory://scgnn-test/a.h5ad", label_key="label"), counts, label=True)
    path = write_table(tmp_path / "m.csv.gz", counts, rows_are_cells=False, sep=",")
    _check(read_all(f"file://{path}"), counts)
    with pytest.raises(InputError, match="memory://scgnn-test/missing.h5ad: input file not found"):
        open_input("memory://scgnn-test/missing.h5ad")


def test_blocks_never_exceed_block_rows(tmp_path, counts):
    """Spooled formats too: a block is at most block_rows cells, and they come in order."""
    path = write_table(tmp_path / "m.csv", counts, rows_are_cells=False, sep=",")
    for block_rows in (1, 4, 100):
        dense, *_ = read_all(str(path), block_rows=block_rows)
        np.testing.assert_array_equal(dense, counts)


# ---- names, labels, orientation ------------------------------------------------------------------------


def test_duplicated_names_made_unique_with_warning(tmp_path, counts):
    adata = _adata(counts)
    adata.obs_names = ["a"] * 3 + CELLS[3:]
    with pytest.warns(UserWarning, match="duplicated obs name"):
        _, obs, _, _ = read_all(adata)
    assert list(obs.index[:3]) == ["a", "a-1", "a-2"]
    assert obs.index.is_unique
    assert list(adata.obs_names[:3]) == ["a", "a", "a"]  # the user's object is untouched


def test_missing_label_key_names_the_file(tmp_path, counts):
    _adata(counts).write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(InputError, match=r"a\.h5ad: has no obs column 'cell_type'"):
        read_all(str(tmp_path / "a.h5ad"), label_key="cell_type")
    path = write_table(tmp_path / "m.csv", counts, rows_are_cells=False, sep=",")
    with pytest.raises(InputError, match=r"m\.csv: has no obs column 'label'"):
        read_all(str(path), label_key="label")


def test_orientation_rule():
    barcodes = ["AAACCTGAGAAACCAT-1", "AAACCTGAGAAACCGC-1"]
    ensembl = ["ENSG00000141510", "ENSG00000012048"]
    symbols = ["Gapdh", "Actb"]
    assert resolve_orientation("auto", barcodes, symbols, "f") == "genes-x-cells"
    assert resolve_orientation("auto", ensembl, ["x1", "x2"], "f") == "cells-x-genes"
    assert resolve_orientation("auto", symbols + ["MT-CO1"], barcodes, "f") == "cells-x-genes"
    assert resolve_orientation("auto", ["cell1", "cell2"], ["gene1", "gene2"], "f") == "genes-x-cells"
    assert resolve_orientation("auto", ["a", "b"], ["c", "d"], "f") == "genes-x-cells"  # the default
    assert resolve_orientation("cells-x-genes", ["a", "b"], ["c", "d"], "f") == "cells-x-genes"
    # conflicting evidence (both axes look like genes) is no evidence: the option stands
    assert resolve_orientation("cells-x-genes", ensembl, ensembl, "f") == "cells-x-genes"
    with pytest.raises(InputError, match="f: --orientation cells-x-genes contradicts the file"):
        resolve_orientation("cells-x-genes", barcodes, symbols, "f")
    with pytest.raises(InputError, match="--orientation genes-x-cells contradicts"):
        resolve_orientation("genes-x-cells", ensembl, barcodes, "f")


def test_auto_orientation_reads_cells_by_genes_from_names(tmp_path, counts):
    """Gene names in the header make 'auto' read rows as cells."""
    df = pd.DataFrame(counts, index=[f"cell{i}" for i in range(N_CELLS)], columns=[f"gene{j}" for j in range(N_GENES)])
    df.to_csv(tmp_path / "m.csv")
    dense, obs, var, _ = read_all(str(tmp_path / "m.csv"))
    np.testing.assert_array_equal(dense, counts)
    assert obs.index[0] == "cell0" and var.index[-1] == f"gene{N_GENES - 1}"


def test_row_names_stay_strings(tmp_path, counts):
    """Names that look like numbers ('001') are kept as written."""
    df = pd.DataFrame(counts.T, index=[f"{j:03d}" for j in range(N_GENES)], columns=CELLS)
    df.to_csv(tmp_path / "m.csv")
    _, _, var, _ = read_all(str(tmp_path / "m.csv"), orientation="genes-x-cells")
    assert var.index[1] == "001"


def test_spool_cleans_up(tmp_path, counts):
    path = write_table(tmp_path / "m.csv", counts, rows_are_cells=False, sep=",")
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    with open_input(str(path), block_rows=4, tmp_dir=str(spool_dir)) as reader:
        next(reader.iter_blocks())
        assert os.listdir(spool_dir)
    assert not os.listdir(spool_dir)


def test_blocks_can_be_read_twice(tmp_path, counts):
    path = write_table(tmp_path / "m.csv", counts, rows_are_cells=True, sep=",")
    with open_input(str(path), orientation="cells-x-genes", block_rows=4) as reader:
        first = sp.vstack([b for _, _, b in reader.iter_blocks()]).toarray()
        second = sp.vstack([b for _, _, b in reader.iter_blocks()]).toarray()
    np.testing.assert_array_equal(first, counts)
    np.testing.assert_array_equal(second, counts)
