"""Reconstructions computed as they are read: the rows a stored reconstruction would hold, block by block."""

import pickle

import numpy as np
import pytest
import torch

from scgnn_scale import train
from scgnn_scale.config import build_config
from scgnn_scale.keys import ITERATED, KEYS, iterate_model
from scgnn_scale.loader import MinibatchLoader
from scgnn_scale.nn.autoencoder import DenseAutoencoder
from scgnn_scale.reconstruction import ClusterOutputs, DecodedRows
from scgnn_scale.stages import impute
from scgnn_scale.testing import stage_context, store_with_matrix

N, G, LATENT = 97, 30, 8


def _config(**impute_options):
    return build_config({"store": {"chunk_rows": 16, "chunk_genes": 16},
                         "feature": {"hidden": 12, "latent": LATENT},
                         "impute": impute_options, "runtime": {"n_workers": 1, "device": "cpu"}})


@pytest.fixture()
def saved(tmp_path):
    """A store with X, a saved autoencoder, its embedding and its reconstruction as write_outputs stores them."""
    rng = np.random.default_rng(0)
    store = store_with_matrix(tmp_path / "run", rng.poisson(2.0, (N, G)), config=_config())
    torch.manual_seed(0)
    model = DenseAutoencoder(G, 12, LATENT)
    path = train.save_model(store.model_path("feature_ae"), model)
    with store.staging("feature") as st:
        emb = st.create_matrix("work/first_pass/X_scgnn_feature", (N, LATENT), np.float32)
        recon = st.create_matrix(KEYS.recon, (N, G), np.float32)
        train.write_outputs(model, store.open_array(KEYS.x), embedding=emb, recon=recon)
    return store, path


def test_decoded_rows_are_the_stored_reconstruction(saved):
    store, path = saved
    rows = DecodedRows(path, store.path_of("work/first_pass/X_scgnn_feature"))
    stored = store.open_array(KEYS.recon)[:]
    assert rows.shape == (N, G) and rows.chunks == (16, G) and rows.dtype == np.float32
    np.testing.assert_allclose(rows[:], stored, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rows[5:40], stored[5:40], rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError):
        rows[np.array([1, 3])]  # only row slices: never an unnoticed whole read
    copy = pickle.loads(pickle.dumps(rows))  # travels to a rank or task as paths
    np.testing.assert_array_equal(copy[:], rows[:])
    # the loader serves it as it serves the stored array: the same batches
    a = MinibatchLoader([rows], 20, seed=1, memory_budget_mb=0)
    b = MinibatchLoader([store.open_array(KEYS.recon)], 20, seed=1, memory_budget_mb=0)
    for x, y in zip(a.epoch(0), b.epoch(0), strict=True):
        np.testing.assert_array_equal(x.row_index, y.row_index)
        np.testing.assert_allclose(x[0], y[0], rtol=1e-6, atol=1e-6)


def test_cluster_outputs_apply_each_cells_cluster_model(saved, tmp_path):
    store, path = saved
    rows = DecodedRows(path, store.path_of("work/first_pass/X_scgnn_feature"))
    labels = np.arange(N) % 3
    paths = []
    for c in range(3):
        torch.manual_seed(10 + c)
        paths.append(train.save_model(tmp_path / f"c{c}.pt", DenseAutoencoder(G, 12, LATENT)))
    out = ClusterOutputs(rows, labels, paths)
    full = out[:]
    source = rows[:]
    for c in range(3):
        model, _ = train.load_model(paths[c], "cpu")
        with torch.no_grad():
            expected = model(torch.from_numpy(source[labels == c]))[0].numpy()
        np.testing.assert_allclose(full[labels == c], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[30:50], full[30:50], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(out))[:], full)


def test_impute_computes_its_input_when_the_run_did_not_keep_it(saved):
    store, path = saved
    recon = store.open_array(KEYS.recon)[:]
    store.delete(KEYS.recon)
    key, x = impute.input_array(stage_context(store, "impute", _config()))
    assert key == KEYS.recon and isinstance(x, DecodedRows)
    np.testing.assert_allclose(x[:], recon, rtol=1e-6, atol=1e-6)
    # 'final': the last iteration's model (iteration 10, not 2: ordered by number) and work/iterated's embedding
    with store.staging("iterate") as st:
        st.create_matrix(ITERATED.feature_embedding, (N, LATENT), np.float32)[:] = store.open_array(
            "work/first_pass/X_scgnn_feature")[:]
    for t, seed in ((2, 5), (10, 6)):
        torch.manual_seed(seed)
        train.save_model(store.model_path(iterate_model(t)), DenseAutoencoder(G, 12, LATENT))
    key, x = impute.input_array(stage_context(store, "impute", _config(input="final")))
    assert key == KEYS.final_recon and x.model_path.endswith("iterate_feature_10.pt")
    # nothing to compute it from: one line naming what is missing
    path.unlink()
    from scgnn_scale.errors import InputError

    with pytest.raises(InputError, match="feature_ae.pt"):
        impute.input_array(stage_context(store, "impute", _config()))
