"""Simulated atlases: valid AnnData stores, planted types recoverable, deterministic, bounded memory."""

import tracemalloc

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from scgnn_scale import simulate
from scgnn_scale.cli import main
from scgnn_scale.errors import InputError
from scgnn_scale.simulate import simulate_atlas


def _read(path):
    return ad.read_h5ad(path) if str(path).endswith(".h5ad") else ad.read_zarr(path)


@pytest.mark.parametrize("suffix", [".zarr", ".h5ad"])
def test_writes_an_anndata_store(tmp_path, suffix):
    path = simulate_atlas(tmp_path / f"atlas{suffix}", n_cells=700, n_genes=120, n_types=3, seed=3, block_rows=256)
    adata = _read(path)
    assert adata.shape == (700, 120)
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    x = adata.X.toarray()
    assert np.all(x >= 0) and np.all(x == np.round(x))
    assert 0.05 < adata.X.nnz / x.size < 0.9  # sparse, but not empty
    assert adata.obs["label"].dtype == "category"
    assert set(adata.obs["label"].cat.categories) == {"type0", "type1", "type2"}
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    params = adata.uns["simulate"]  # how it was drawn
    assert params["n_types"] == 3 and params["seed"] == 3 and params["dropout_model"] == "expression"
    assert float(params["dropout"]) == pytest.approx(0.3)
    assert simulate.recorded_parameters(path) == params and simulate.drawn_by_default_model(path)
    if suffix == ".zarr":
        import zarr

        assert zarr.open_group(path, mode="r").metadata.zarr_format == 3


def test_planted_types_are_recoverable(tmp_path):
    path = simulate_atlas(tmp_path / "atlas.h5ad", n_cells=1500, n_genes=400, n_types=4, seed=11)
    adata = _read(path)
    embedding = PCA(20, random_state=0).fit_transform(np.log1p(adata.X.toarray()))
    clusters = KMeans(4, n_init=10, random_state=0).fit_predict(embedding)
    assert adjusted_rand_score(adata.obs["label"], clusters) > 0.9
    # every type is present in a reasonable share
    shares = adata.obs["label"].value_counts(normalize=True)
    assert len(shares) == 4 and shares.min() > 0.1


def test_library_size_and_dropout_vary(tmp_path):
    dense = _read(simulate_atlas(tmp_path / "a.h5ad", n_cells=800, n_genes=200, n_types=2, dropout=0.0,
                                 seed=5)).X.toarray()
    dropped = _read(simulate_atlas(tmp_path / "b.h5ad", n_cells=800, n_genes=200, n_types=2, dropout=0.5,
                                   dropout_model="uniform", seed=5)).X.toarray()
    totals = dense.sum(axis=1)
    assert totals.std() / totals.mean() > 0.2  # per-cell library size variation
    # the uniform model removes about half of the non-zeros, the large counts alike
    assert 0.4 < (dropped > 0).sum() / (dense > 0).sum() < 0.6
    large = dense >= 50
    assert large.sum() > 100 and 0.4 < (dropped[large] > 0).mean() < 0.6


def test_an_old_model_or_another_file_is_not_taken_for_a_current_atlas(tmp_path):
    uniform = simulate_atlas(tmp_path / "u.h5ad", n_cells=60, n_genes=20, n_types=2, dropout_model="uniform")
    assert simulate.recorded_parameters(uniform)["dropout_model"] == "uniform"
    assert not simulate.drawn_by_default_model(uniform)
    other = tmp_path / "other.h5ad"
    ad.AnnData(np.ones((3, 2), np.float32)).write_h5ad(other)  # an AnnData no simulator wrote
    assert simulate.recorded_parameters(other) is None and not simulate.drawn_by_default_model(other)
    assert not simulate.drawn_by_default_model(tmp_path / "missing.zarr")


def test_expression_dropout_spares_what_is_highly_expressed(tmp_path):
    # the counts are the same draws with or without dropout (dropout is drawn last), so what dropout
    # removed is what the dense atlas has and the dropped one does not
    dense = _read(simulate_atlas(tmp_path / "a.h5ad", n_cells=800, n_genes=200, n_types=2, dropout=0.0,
                                 seed=5)).X.toarray()
    dropped = _read(simulate_atlas(tmp_path / "b.h5ad", n_cells=800, n_genes=200, n_types=2, dropout=0.5,
                                   seed=5)).X.toarray()
    assert np.all(dropped[dropped > 0] == dense[dropped > 0]) and np.all(dropped[dense == 0] == 0)
    means = simulate._Programme(200, 2, 5).type_means  # each gene's NB mean in each type (before library size)
    removed = (dense > 0) & (dropped == 0)
    rare, common = means.max(axis=0) < 0.05, means.min(axis=0) > 5
    assert rare.sum() > 10 and common.sum() > 10
    # near the full rate (0.5 / (1 + mean)) where almost nothing is expected, almost none where much is
    assert removed[:, rare].sum() / (dense[:, rare] > 0).sum() > 0.4
    assert removed[:, common].sum() / (dense[:, common] > 0).sum() < 0.1  # at most 0.5 / (1 + 5)


def test_deterministic_and_independent_of_block_rows(tmp_path):
    a = _read(simulate_atlas(tmp_path / "a.zarr", n_cells=3000, n_genes=50, n_types=3, seed=1, block_rows=100))
    b = _read(simulate_atlas(tmp_path / "b.h5ad", n_cells=3000, n_genes=50, n_types=3, seed=1, block_rows=5000))
    c = _read(simulate_atlas(tmp_path / "c.h5ad", n_cells=3000, n_genes=50, n_types=3, seed=2))
    assert (a.X != b.X).nnz == 0
    assert list(a.obs["label"]) == list(b.obs["label"])
    assert (a.X != c.X).nnz > 0


@pytest.mark.parametrize("suffix", [".zarr", ".h5ad"])
def test_chunk_size_does_not_change_the_atlas(tmp_path, monkeypatch, suffix):
    """The writer queues entries until a whole chunk: blocks of 300 cells across chunks of 1,000
    entries (most writes carry a remainder over) give the atlas written as one chunk per array."""
    one_chunk = _read(simulate_atlas(tmp_path / f"a{suffix}", n_cells=2000, n_genes=40, n_types=3, seed=6,
                                     block_rows=300))
    monkeypatch.setattr(simulate, "ARRAY_CHUNK", 1000)
    path = simulate_atlas(tmp_path / f"b{suffix}", n_cells=2000, n_genes=40, n_types=3, seed=6, block_rows=300)
    small = _read(path)
    assert small.X.nnz > 10 * 1000  # many chunks
    assert (one_chunk.X != small.X).nnz == 0
    assert list(one_chunk.obs_names) == list(small.obs_names) == [f"cell{i}" for i in range(2000)]
    assert list(one_chunk.obs["label"]) == list(small.obs["label"])
    if suffix == ".zarr":
        import zarr

        assert zarr.open_array(path / "X" / "data", mode="r").chunks == (1000,)


def test_parallel_workers_write_the_same_atlas(tmp_path):
    serial = _read(simulate_atlas(tmp_path / "a.zarr", n_cells=5000, n_genes=40, n_types=3, seed=4,
                                  block_rows=300, workers=1))
    parallel = _read(simulate_atlas(tmp_path / "b.zarr", n_cells=5000, n_genes=40, n_types=3, seed=4,
                                    block_rows=300, workers=2))
    assert serial.shape == parallel.shape == (5000, 40)
    assert (serial.X != parallel.X).nnz == 0
    assert list(serial.obs["label"]) == list(parallel.obs["label"])


def test_existing_output_needs_overwrite(tmp_path):
    path = simulate_atlas(tmp_path / "a.h5ad", n_cells=50, n_genes=20, n_types=2)
    before = path.read_bytes()
    with pytest.raises(InputError, match="a.h5ad: already exists; pass --overwrite"):
        simulate_atlas(path, n_cells=60, n_genes=20, n_types=2)
    assert path.read_bytes() == before
    simulate_atlas(path, n_cells=60, n_genes=20, n_types=2, overwrite=True)
    assert _read(path).n_obs == 60
    assert not list(tmp_path.glob(".*partial"))


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match=r"must end in \.zarr"):
        simulate_atlas(tmp_path / "a.csv", n_cells=10, n_genes=5, n_types=2)
    with pytest.raises(InputError, match="--types"):
        simulate_atlas(tmp_path / "a.h5ad", n_cells=10, n_genes=5, n_types=0)
    with pytest.raises(InputError, match="--dropout"):
        simulate_atlas(tmp_path / "a.h5ad", n_cells=10, n_genes=5, n_types=2, dropout=1.0)
    with pytest.raises(InputError, match="dropout-model"):
        simulate_atlas(tmp_path / "a.h5ad", n_cells=10, n_genes=5, n_types=2, dropout_model="flat")


def test_memory_is_bounded_by_the_block(tmp_path, monkeypatch):
    """Peak Python-heap memory does not grow with the number of cells (numpy reports to tracemalloc).

    The writer holds at most one block and one chunk of each array; chunks are made small here, so
    that one chunk is far smaller than the atlases compared."""
    monkeypatch.setattr(simulate, "ARRAY_CHUNK", 1 << 12)

    def peak(n_cells, name):
        tracemalloc.start()
        simulate_atlas(tmp_path / name, n_cells=n_cells, n_genes=100, n_types=3, block_rows=1024)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    peak(1024, "warm-up.h5ad")  # first-use imports and caches are not the simulator's memory
    small, large = peak(4096, "small.h5ad"), peak(32768, "large.h5ad")
    dense_large = 32768 * 100 * 8
    assert large < 1.3 * small + 1e6
    assert large < dense_large / 4


def test_cli_simulate_shows_progress_unless_quiet(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("scgnn_scale.progress.interactive", lambda: True)  # as on a terminal
    assert main(["simulate", str(tmp_path / "a.h5ad"), "--cells", "300", "--genes", "50", "--types", "2"]) == 0
    err = capsys.readouterr().err
    assert "simulate" in err and "cells" in err
    assert main(["simulate", str(tmp_path / "b.h5ad"), "--cells", "300", "--genes", "50", "--types", "2",
                 "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_simulate_then_run(tmp_path, capsys):
    out = tmp_path / "example.h5ad"
    assert main(["simulate", str(out), "--cells", "400", "--genes", "150", "--types", "3"]) == 0
    assert main(["run", str(out), "--out", str(tmp_path / "run"), "--until", "preprocess", "--label-key",
                 "label", "--quiet", "--preprocess-n-top-genes", "100"]) == 0
    adata = ad.read_zarr(tmp_path / "run" / "adata.zarr")
    assert adata.n_vars == 100 and adata.n_obs > 390
    assert adata.obs["label"].nunique() == 3
