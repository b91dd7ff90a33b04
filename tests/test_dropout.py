"""The dropout protocol: exact masking that leaves the input alone, scores against hand-computed values."""

import hashlib

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgnn_scale import dropout
from scgnn_scale.config import build_config
from scgnn_scale.errors import InputError


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def counts_h5ad(tmp_path, planted):
    counts, labels = planted
    adata = anndata.AnnData(X=sp.csr_matrix(counts[:120, :60]),
                            obs=pd.DataFrame({"label": pd.Categorical(labels[:120].astype(str))},
                                             index=[f"c{i}" for i in range(120)]),
                            var=pd.DataFrame(index=[f"g{j}" for j in range(60)]))
    path = tmp_path / "input.h5ad"
    adata.write_h5ad(path)
    return path, counts[:120, :60]


def test_scores_against_hand_computed_values():
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.5, 2.0, 1.0, 4.0])
    got = dropout.imputation_scores(truth, pred)
    # |d| = 0.5, 0, 2, 0 -> median 0.25; squared 0.25 + 4 -> mean 1.0625
    assert got["median_l1"] == pytest.approx(0.25)
    assert got["rmse"] == pytest.approx(np.sqrt(4.25 / 4))
    assert got["cosine"] == pytest.approx((1.5 + 4 + 3 + 16) / (np.sqrt(30) * np.sqrt(2.25 + 4 + 1 + 16)))
    zeros = dropout.imputation_scores(truth, np.zeros(4))
    assert zeros == {"median_l1": pytest.approx(2.5), "cosine": 0.0, "rmse": pytest.approx(np.sqrt(7.5))}
    assert np.isnan(dropout.imputation_scores([], [])["rmse"])


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_masking_flips_exactly_round_rate_nnz_and_leaves_input_unchanged(tmp_path, counts_h5ad, rate):
    path, counts = counts_h5ad
    before = _sha(path)
    config = build_config({"ingest": {"label_key": "label", "block_rows": 37}})
    ref = tmp_path / "ref.h5ad"
    info = dropout.write_reference(str(path), ref, config=config)
    nnz = int(np.count_nonzero(counts))
    assert info["nnz"] == nnz
    out = dropout.mask_nonzeros(ref, tmp_path / "m.h5ad", tmp_path / "m.h5", rate=rate, seed=(0, 1), block_rows=23)
    assert out["n_flipped"] == int(np.floor(rate * nnz + 0.5)) and out["nnz"] == nnz
    assert _sha(path) == before

    masked = anndata.read_h5ad(tmp_path / "m.h5ad")
    assert sp.issparse(masked.X) and masked.X.nnz == nnz - out["n_flipped"]
    assert list(masked.obs["label"].astype(str)) == list(anndata.read_h5ad(path).obs["label"].astype(str))
    rows, cols, values = dropout.read_mask(tmp_path / "m.h5")
    assert len(rows) == out["n_flipped"]
    assert np.all(np.diff(rows) >= 0)
    dense = masked.X.toarray()
    assert np.all(dense[rows, cols] == 0) and np.all(values > 0)
    np.testing.assert_array_equal(values, counts[rows, cols])
    dense[rows, cols] = values
    np.testing.assert_array_equal(dense, counts)  # masked + flipped entries = the input

    again = dropout.mask_nonzeros(ref, tmp_path / "a.h5ad", tmp_path / "a.h5", rate=rate, seed=(0, 1), block_rows=50)
    assert again["n_flipped"] == out["n_flipped"]
    other = dropout.read_mask(tmp_path / "a.h5")[0]
    assert len(other) == len(rows)
    dropout.mask_nonzeros(ref, tmp_path / "b.h5ad", tmp_path / "b.h5", rate=rate, seed=(0, 2), block_rows=23)
    b_rows, b_cols, _ = dropout.read_mask(tmp_path / "b.h5")
    assert set(zip(b_rows, b_cols, strict=True)) != set(zip(rows, cols, strict=True))


def test_mask_is_uniform_over_blocks(tmp_path):
    """Blocks of very different density get flipped entries in proportion to their non-zeros."""
    dense = np.zeros((400, 30), np.float32)
    dense[:200, :] = 1.0  # block 1: dense
    dense[200:, :3] = 1.0  # block 2: 10x sparser
    adata = anndata.AnnData(X=sp.csr_matrix(dense), obs=pd.DataFrame(index=[f"c{i}" for i in range(400)]),
                            var=pd.DataFrame(index=[f"g{j}" for j in range(30)]))
    adata.write_h5ad(tmp_path / "in.h5ad")
    dropout.write_reference(str(tmp_path / "in.h5ad"), tmp_path / "ref.h5ad")
    frac = []
    for s in range(5):
        dropout.mask_nonzeros(tmp_path / "ref.h5ad", tmp_path / "m.h5ad", tmp_path / "m.h5", rate=0.2, seed=s,
                              block_rows=200)
        rows = dropout.read_mask(tmp_path / "m.h5")[0]
        frac.append(np.mean(rows < 200))
    # expected share of the dense block: 6000 / 6600
    assert np.mean(frac) == pytest.approx(6000 / 6600, abs=0.02)


def test_values_and_knn_smoothing_at_entries_match_dense():
    rng = np.random.default_rng(0)
    x = rng.random((50, 8))
    a = (rng.random((50, 50)) < 0.1).astype(float)
    a = np.maximum(a, a.T)
    np.fill_diagonal(a, 0)
    a[7] = a[:, 7] = 0  # an isolated cell
    graph = sp.csr_matrix(a.astype(np.float32))
    graph.indptr = graph.indptr.astype(np.int64)
    cells = np.sort(rng.integers(0, 50, 200))
    genes = rng.integers(0, 8, 200)
    np.testing.assert_allclose(dropout.values_at(x, cells, genes, block_rows=7), x[cells, genes])
    deg = a.sum(1, keepdims=True)
    smooth = np.divide(a, deg, out=np.zeros_like(a), where=deg > 0) @ x
    got = dropout.knn_smoothed_at(x, graph, cells, genes, block_rows=9)
    np.testing.assert_allclose(got, smooth[cells, genes], atol=1e-12)
    assert np.all(got[cells == 7] == 0)


def test_bad_options(tmp_path, counts_h5ad):
    path, _ = counts_h5ad
    with pytest.raises(InputError, match="--rate"):
        dropout.evaluate_imputation(str(path), tmp_path / "e", rate=1.5)
    with pytest.raises(InputError, match="--repeats"):
        dropout.evaluate_imputation(str(path), tmp_path / "e", repeats=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(InputError, match="non-empty"):
        dropout.evaluate_imputation(str(path), tmp_path / "busy")


TINY = {
    "store": {"chunk_rows": 64, "chunk_genes": 32},
    "feature": {"hidden": 48, "latent": 16, "min_steps": 60, "iter_steps": 20, "batch_size": 64},
    "gae": {"epochs": 20},
    "iterate": {"max_iterations": 1, "cluster_steps": 10, "cluster_executor": "local"},
    "impute": {"steps": 60},
    "ltmg": {"max_iter": 20},
    "runtime": {"n_workers": 1, "device": "cpu"},
}


def test_evaluate_imputation_end_to_end(tmp_path, counts_h5ad):
    """Mask, run the whole pipeline, score: report shape, counts, baselines scored on the same entries."""
    import json

    path, counts = counts_h5ad
    config = build_config({**TINY, "ingest": {"label_key": "label"}})
    report = dropout.evaluate_imputation(str(path), tmp_path / "ev", rate=0.1, repeats=1, config=config, seed=3,
                                         quiet=True)
    assert json.loads((tmp_path / "ev" / "report.json").read_text()) == report
    (rep,) = report["repeats"]
    assert rep["n_flipped"] == int(np.floor(0.1 * np.count_nonzero(counts) + 0.5))
    assert 0 < rep["n_scored"] <= rep["n_flipped"]
    for method in dropout.METHODS:
        m = report["methods"][method]
        assert set(m) == {f"{k}{s}" for k in dropout.METRICS for s in ("", "_std")}
        assert m["median_l1"] >= 0 and m["rmse"] >= 0
    assert report["methods"]["zeros"]["cosine"] == 0.0
    # zeros baseline: the L1 of every scored entry is its true log1p value, all > 0
    assert report["methods"]["zeros"]["median_l1"] > 0
    assert report["methods"]["knn"]["median_l1"] < report["methods"]["zeros"]["median_l1"]
    # a second call resumes (same masks, finished runs) and gives the same report
    again = dropout.evaluate_imputation(str(path), tmp_path / "ev", rate=0.1, repeats=1, config=config, seed=3,
                                        quiet=True)
    assert again["methods"] == report["methods"]
    with pytest.raises(InputError, match="another input, rate"):
        dropout.evaluate_imputation(str(path), tmp_path / "ev", rate=0.3, repeats=1, config=config, seed=3)
