"""Export: the h5ad equals the store; the CSV files have the published scGNN's names and shapes."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgnn_scale.config import build_config
from scgnn_scale.errors import InputError
from scgnn_scale.export import export_run
from scgnn_scale.testing import store_with_matrix


@pytest.fixture
def finished_run(tmp_path, planted):
    """A store holding every output a finished run has (written directly, small chunks)."""
    counts, labels = planted
    n, g = counts.shape
    config = build_config({"store": {"chunk_rows": 64, "chunk_genes": 48}})
    store = store_with_matrix(tmp_path / "myrun", counts, labels=labels, config=config)
    rng = np.random.default_rng(1)
    graph = sp.random(n, n, density=0.03, random_state=2, format="csr", dtype=np.float32)
    graph = ((graph + graph.T) > 0).astype(np.float32).tocsr()
    graph.indptr = graph.indptr.astype(np.int64)
    with store.staging("fake") as st:
        st.write_elem("obs/scgnn_cluster", pd.Categorical((labels % 3).astype(str), categories=["0", "1", "2"]))
        st.write_elem("obsm/X_scgnn", rng.normal(size=(n, 16)).astype(np.float32))
        emb = st.create_matrix("obsm/X_scgnn_feature", (n, 128), np.float32)
        emb[:] = rng.normal(size=(n, 128)).astype(np.float32)
        st.write_elem("obsp/scgnn_graph", graph)
        imp = st.create_matrix("layers/imputed", (n, g), np.float32)
        imp[:] = rng.random((n, g)).astype(np.float32)
        ltmg = st.create_matrix("layers/ltmg", (n, g), np.uint8)
        ltmg[:] = rng.integers(0, 3, (n, g)).astype(np.uint8)
        st.write_elem("varm/ltmg_means", rng.normal(size=(g, 5)))
    store.write_uns_summary({"history": pd.DataFrame({"iteration": [1, 2], "ari_to_previous": [0.5, 0.995]}),
                             "config": {"iterate": {"max_iterations": 10}}})
    return store


def test_h5ad_equals_store(finished_run, tmp_path):
    out = export_run(finished_run.root, tmp_path / "res.h5ad", fmt="h5ad", block_rows=50)
    got = anndata.read_h5ad(out)
    ref = anndata.read_zarr(finished_run.adata_path)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.X, ref.X)
    pd.testing.assert_frame_equal(got.obs, ref.obs)
    pd.testing.assert_frame_equal(got.var, ref.var)
    assert set(got.layers) == {"imputed", "ltmg"}
    for k in got.layers:
        np.testing.assert_array_equal(got.layers[k], ref.layers[k])
    assert set(got.obsm) == {"X_scgnn", "X_scgnn_feature"}
    for k in got.obsm:
        np.testing.assert_array_equal(got.obsm[k], ref.obsm[k])
    assert (got.obsp["scgnn_graph"] != ref.obsp["scgnn_graph"]).nnz == 0
    np.testing.assert_array_equal(got.varm["ltmg_means"], ref.varm["ltmg_means"])
    pd.testing.assert_frame_equal(got.uns["scgnn"]["history"], ref.uns["scgnn"]["history"])
    assert got.uns["scgnn"]["config"]["iterate"]["max_iterations"] == 10


def test_existing_output_needs_overwrite(finished_run, tmp_path):
    target = tmp_path / "res.h5ad"
    target.write_text("something else")
    with pytest.raises(InputError, match="already exists"):
        export_run(finished_run.root, target, fmt="h5ad")
    assert target.read_text() == "something else"
    export_run(finished_run.root, target, fmt="h5ad", overwrite=True)
    assert anndata.read_h5ad(target).shape == finished_run.open_array("X").shape
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        export_run(finished_run.root, tmp_path / "csv", fmt="csv")
    with pytest.raises(InputError, match="--format"):
        export_run(finished_run.root, tmp_path / "x", fmt="loom")


def test_csv_files_have_published_names_and_shapes(finished_run, tmp_path):
    out = export_run(finished_run.root, tmp_path / "csv", fmt="csv", block_rows=50)
    n, g = finished_run.open_array("X").shape
    names = sorted(p.name for p in out.iterdir())
    assert names == ["myrun_embedding.csv", "myrun_feature_embedding.csv", "myrun_graph.csv",
                     "myrun_recon.csv", "myrun_results.txt"]
    obs = finished_run.read_elem("obs")

    results = pd.read_csv(out / "myrun_results.txt", index_col=0)
    assert list(results.columns) == ["Celltype"] and results.shape == (n, 1)
    assert list(results.index) == list(obs.index)
    np.testing.assert_array_equal(results["Celltype"].to_numpy(), obs["scgnn_cluster"].astype(int).to_numpy())

    emb = pd.read_csv(out / "myrun_embedding.csv", index_col=0)
    assert emb.shape == (n, 16) and list(emb.columns) == [f"embedding{i}" for i in range(16)]
    np.testing.assert_allclose(emb.to_numpy(), finished_run.read_elem("obsm/X_scgnn"), rtol=1e-6)
    assert pd.read_csv(out / "myrun_feature_embedding.csv", index_col=0).shape == (n, 128)

    graph = pd.read_csv(out / "myrun_graph.csv")
    ref = finished_run.read_elem("obsp/scgnn_graph")
    assert list(graph.columns) == ["NodeA", "NodeB", "Weights"] and len(graph) == ref.nnz
    rebuilt = sp.csr_matrix((graph["Weights"], (graph["NodeA"], graph["NodeB"])), shape=(n, n))
    np.testing.assert_array_equal(rebuilt.toarray(), ref.toarray())

    recon = pd.read_csv(out / "myrun_recon.csv", index_col=0)
    assert recon.shape == (g, n)  # genes x cells, as the published tool writes it
    assert list(recon.columns) == list(obs.index)
    assert list(recon.index) == list(finished_run.read_elem("var").index)
    np.testing.assert_allclose(recon.to_numpy().T, finished_run.open_array("layers/imputed")[:], rtol=1e-5)


def test_csv_skips_what_the_run_lacks(tmp_path, planted):
    counts, _ = planted
    store = store_with_matrix(tmp_path / "early", counts[:30, :20])
    out = export_run(store.root, tmp_path / "csv", fmt="csv")
    assert list(out.iterdir()) == []
    with pytest.raises(InputError, match="not a scgnn-scale run"):
        export_run(tmp_path / "nothing", tmp_path / "x.h5ad")
