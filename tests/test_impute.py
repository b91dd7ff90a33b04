"""Imputation autoencoder: per-cell weights equal the dense N x N regularisers; masked entries get recovered;
started from the feature autoencoder when asked."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import planted_counts
from sklearn.neighbors import NearestNeighbors

from scgnn_scale.config import FeatureConfig, ImputeConfig, RunConfig, StoreConfig
from scgnn_scale.errors import InputError
from scgnn_scale.keys import KEYS
from scgnn_scale.nn.losses import imputation_cell_weights, reconstruction_loss
from scgnn_scale.stages import impute
from scgnn_scale.testing import stage_context, store_with_matrix


def _random_graph(n, rng, k=4):
    rows = np.repeat(np.arange(n), k)
    cols = rng.integers(0, n, n * k)
    keep = rows != cols
    a = sp.csr_matrix((rng.random(keep.sum()) + 0.5, (rows[keep], cols[keep])), shape=(n, n))
    return (a + a.T).tocsr()


def _same_cluster(clusters):
    return (clusters[:, None] == clusters[None, :]).astype(float)  # dense B, tests only


def test_cell_weights_equal_the_dense_matrix_regularisers(rng):
    n, g = 60, 7
    a = _random_graph(n, rng)
    clusters = rng.integers(0, 4, n)
    e = rng.random((n, g)) ** 2  # (X - Xhat)^2
    dense = 0.3 * (a.toarray() @ e).sum() + 0.1 * (_same_cluster(clusters) @ e).sum()
    sizes = np.bincount(clusters)[clusters]
    w = imputation_cell_weights(np.asarray(a.sum(axis=0)).ravel(), sizes, gamma1=0.3, gamma2=0.1)
    assert (w * e.sum(axis=1)).sum() == pytest.approx(dense, rel=1e-6)


def test_full_batch_loss_equals_the_paper_formula(rng):
    """Eq. 12 without L1: (gamma) sum E + alpha sum TRS o E + gamma1 sum A.E + gamma2 sum B.E, full batch."""
    n, g = 50, 6
    x, xhat = rng.random((n, g)), rng.random((n, g))
    trs = rng.integers(0, 3, (n, g)).astype(np.uint8)
    a = _random_graph(n, rng)
    clusters = rng.integers(0, 3, n)
    e = (x - xhat) ** 2
    dense = (0.1 * e.sum() + 0.9 * (trs * e).sum() + 0.3 * (a.toarray() @ e).sum()
             + 0.1 * (_same_cluster(clusters) @ e).sum())
    w = imputation_cell_weights(np.asarray(a.sum(axis=0)).ravel(), np.bincount(clusters)[clusters],
                                gamma1=0.3, gamma2=0.1)
    t = lambda v: torch.from_numpy(np.asarray(v, dtype=np.float32))  # noqa: E731
    got = reconstruction_loss(t(x), t(xhat), trs=torch.from_numpy(trs), gamma=0.1, alpha=0.9,
                              cell_weight=t(w), reference_cells=n)
    assert float(got) == pytest.approx(dense, rel=1e-5)


def test_cluster_weight_is_scale_free_beyond_the_original_batch():
    degree = np.full(400, 10.0)
    sizes = np.repeat([100.0, 300.0], [100, 300])
    small = imputation_cell_weights(degree, sizes, gamma1=0.3, gamma2=0.1, reference=1000)
    np.testing.assert_allclose(small, 0.3 * 10 + 0.1 * sizes)  # N <= reference: the original's weights
    big = imputation_cell_weights(degree, sizes, gamma1=0.3, gamma2=0.1, reference=100)
    np.testing.assert_allclose(big, 0.3 * 10 + 0.1 * sizes * 100 / 400)
    # ten times the cells in the same proportions: the same weights, not ten times the cluster term
    big10 = imputation_cell_weights(np.full(4000, 10.0), np.repeat([1000.0, 3000.0], [1000, 3000]),
                                    gamma1=0.3, gamma2=0.1, reference=100)
    np.testing.assert_allclose(big10[[0, -1]], big[[0, -1]], rtol=1e-6)


def _knn_graph(x, k=10):
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    _, idx = nn.kneighbors(x)
    rows = np.repeat(np.arange(len(x)), k)
    a = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, idx[:, 1:].ravel())), shape=(len(x),) * 2)
    a = a.maximum(a.T).tocsr().astype(np.float32)
    a.indptr = a.indptr.astype(np.int64)
    return a


def _masked_store(tmp_path, config):
    """Planted counts with 10% of the non-zero entries set to zero, a KNN graph and the planted clusters."""
    counts, labels = planted_counts(n_cells=300, n_genes=200, n_types=3, seed=1)
    rng = np.random.default_rng(5)
    nz = np.flatnonzero(counts)
    masked = rng.choice(nz, size=nz.size // 10, replace=False)
    observed = counts.copy().ravel()
    observed[masked] = 0
    observed = observed.reshape(counts.shape)
    store = store_with_matrix(tmp_path / "run", observed, labels=labels, config=config)
    with store.staging("cluster") as st:
        st.write_elem("obsp/scgnn_graph", _knn_graph(np.log1p(observed)))
        st.write_elem("obs/scgnn_cluster", pd.Categorical(labels.astype(str)))
    return store, counts, masked


def _config(batch_size=64, memory_budget_mb=0, **impute_options):
    return RunConfig(store=StoreConfig(chunk_rows=64, chunk_genes=64),
                     feature=FeatureConfig(batch_size=batch_size, memory_budget_mb=memory_budget_mb),
                     impute=ImputeConfig(**{"steps": 100, "max_epochs": 1, "zero_weight": "published",
                                            **impute_options}))


def test_imputation_recovers_masked_entries_better_than_zeros(tmp_path):
    config = _config(input="X")
    store, counts, masked = _masked_store(tmp_path, config)
    info = impute.run(stage_context(store, "impute", config))
    imputed = store.open_array("layers/imputed")[:]
    assert imputed.shape == counts.shape and imputed.dtype == np.float32 and np.isfinite(imputed).all()
    assert not info["ltmg"] and info["regularisers"]["n_clusters"] == 3
    assert info["regularisers"]["cluster_size_scale"] == 1.0
    assert (store.root / "models" / "impute_ae.pt").is_file()
    truth = np.log1p(counts).ravel()[masked]
    err_imputed = np.abs(imputed.ravel()[masked] - truth)
    err_zeros = np.abs(truth)
    assert np.median(err_imputed) < 0.6 * np.median(err_zeros)
    assert np.sqrt(np.mean(err_imputed**2)) < 0.7 * np.sqrt(np.mean(err_zeros**2))


def test_input_recon_trains_on_the_feature_reconstruction(tmp_path):
    full_batch = {"batch_size": 300, "memory_budget_mb": 100, "steps": 120}
    config = _config(input="recon", **full_batch)
    store, counts, masked = _masked_store(tmp_path, config)
    with pytest.raises(InputError, match="work/recon"):
        impute.run(stage_context(store, "impute", config))
    with store.staging("feature") as st:  # an oracle reconstruction: the true values
        st.create_matrix("work/recon", counts.shape, np.float32)[:] = np.log1p(counts)
    info = impute.run(stage_context(store, "impute", config))
    assert info["input"] == "work/recon"
    assert impute.run(stage_context(store, "impute", _config(**full_batch)))["input"] == "work/recon"  # the default
    truth = np.log1p(counts).ravel()[masked]
    from_recon = np.median(np.abs(store.open_array("layers/imputed")[:].ravel()[masked] - truth))
    impute.run(stage_context(store, "impute", _config(input="X", **full_batch)))
    from_x = np.median(np.abs(store.open_array("layers/imputed")[:].ravel()[masked] - truth))
    # on X the per-cell weights (~14 here) outweigh L1 and the AE learns the dropout zeros back
    assert from_recon < 0.75 * from_x, (from_recon, from_x)


@pytest.mark.parametrize(("zero_weight", "missing"), [("published", "scgnn_graph"), ("expected", "scgnn_cluster")])
def test_missing_graph_or_clusters_is_a_clear_error(tmp_path, zero_weight, missing):
    counts, _ = planted_counts(n_cells=40, n_genes=20, seed=0)
    store = store_with_matrix(tmp_path / "run", counts)
    config = RunConfig(impute=ImputeConfig(zero_weight=zero_weight))
    with pytest.raises(InputError, match=missing):
        impute.run(stage_context(store, "impute", config))


def test_defaults_follow_the_published_imputation():
    """The published rule's settings: reconOri (the feature AE's first reconstruction) as input and target,
    EM_epochs = 200 steps; the default weighs zeros by their chance instead (``zero_weight``, a departure)."""
    cfg = ImputeConfig()
    assert (cfg.input, cfg.steps, cfg.gamma1, cfg.gamma2, cfg.l1) == ("recon", 200, 0.3, 0.1, 1.0)
    assert cfg.zero_weight == "expected"


def test_input_final_reads_the_last_iteration_reconstruction(tmp_path):
    full_batch = {"batch_size": 300, "memory_budget_mb": 100, "steps": 120}
    store, counts, masked = _masked_store(tmp_path, _config(**full_batch))
    observed = store.open_array("X")[:]
    with store.staging("feature") as st:  # the first reconstruction: the masked X itself
        st.create_matrix("work/recon", counts.shape, np.float32)[:] = observed
    # no iteration ran (no work/recon_final): the last reconstruction is the feature stage's
    info = impute.run(stage_context(store, "impute", _config(input="final", **full_batch)))
    assert info["input"] == "work/recon"
    with store.staging("iterate") as st:  # an oracle last reconstruction: the true values
        st.create_matrix(KEYS.final_recon, counts.shape, np.float32)[:] = np.log1p(counts)
    info = impute.run(stage_context(store, "impute", _config(input="final", **full_batch)))
    assert info["input"] == KEYS.final_recon
    truth = np.log1p(counts).ravel()[masked]
    from_final = np.median(np.abs(store.open_array("layers/imputed")[:].ravel()[masked] - truth))
    impute.run(stage_context(store, "impute", _config(input="recon", **full_batch)))
    from_recon = np.median(np.abs(store.open_array("layers/imputed")[:].ravel()[masked] - truth))
    assert from_final < 0.75 * from_recon, (from_final, from_recon)


def test_defaults_beat_both_baselines_on_planted_dropouts(tmp_path):
    """The dropout protocol in miniature: feature AE, then impute with its defaults, scored on the flipped entries."""
    from scgnn_scale.dropout import knn_smoothed_at
    from scgnn_scale.stages import feature

    config = RunConfig(store=StoreConfig(chunk_rows=64, chunk_genes=64),
                       feature=FeatureConfig(batch_size=64, memory_budget_mb=0))  # impute: the defaults
    store, counts, masked = _masked_store(tmp_path, config)
    feature.run(stage_context(store, "feature", config))
    info = impute.run(stage_context(store, "impute", config))
    assert info["input"] == "X" and info["steps"] == 200 and info["zero_weight"]["rule"] == "expected"
    entries = np.sort(masked)
    cells, genes = np.unravel_index(entries, counts.shape)
    truth = np.log1p(counts.ravel()[entries])
    imputed = store.open_array("layers/imputed")[:][cells, genes]
    knn = knn_smoothed_at(store.open_array("X"), store.read_elem("obsp/scgnn_graph"), cells, genes)
    l1 = {name: np.median(np.abs(p - truth)) for name, p in (("scgnn", imputed), ("knn", knn), ("zeros", 0 * truth))}
    assert l1["scgnn"] < l1["knn"] < l1["zeros"], l1  # measured: 0.40 < 0.55 < 1.39 (the published rule: 0.49)


def _every_bit_then(tmp_path, **impute_options):
    """The layer with every float32 bit, then the same network's layer written with ``impute_options``:
    (store, the first layer, its bytes on disk, the second run's info)."""
    config_full = _config(input="X", mantissa_bits=23)
    store, _, _ = _masked_store(tmp_path, config_full)
    impute.run(stage_context(store, "impute", config_full))
    full = store.open_array("layers/imputed")[:]
    size_full = _disk_bytes(store.root / "adata.zarr/layers/imputed")
    config = _config(input="X", **impute_options)
    info = impute.run(stage_context(store, "impute", config))  # same seed and inputs: the same network
    return store, full, size_full, info


def test_float16_layer_holds_the_float32_values_to_its_precision(tmp_path):
    store, full, size32, _ = _every_bit_then(tmp_path, dtype="float16")
    half = store.open_array("layers/imputed")
    assert half.dtype == np.float16
    values = half[:].astype(np.float32)
    # float16 keeps 11 significant bits: |x - f16(x)| <= 2^-11 |x| (normal numbers), tiny absolute below
    assert np.all(np.abs(values - full) <= np.abs(full) * 2.0**-11 + 1e-7 + 1e-4 * np.abs(full).max())
    assert _disk_bytes(store.root / "adata.zarr/layers/imputed") < 0.75 * size32


def test_rounded_layer_keeps_its_mantissa_bits_and_takes_less_disk(tmp_path):
    store, full, size_full, info = _every_bit_then(tmp_path, mantissa_bits=12)
    rounded = store.open_array("layers/imputed")[:]
    assert rounded.dtype == np.float32 and info["mantissa_bits"] == 12
    assert not np.any(rounded.view(np.uint32) & np.uint32(2**11 - 1))  # the 11 dropped bits are zero
    assert np.all(np.abs(rounded - full) <= np.abs(full) * 2.0**-13)  # to the nearest of 12 bits
    assert np.array_equal(rounded == 0, full == 0)
    assert _disk_bytes(store.root / "adata.zarr/layers/imputed") < 0.9 * size_full


def _disk_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_imputation_started_from_the_feature_autoencoder_keeps_its_weights(tmp_path):
    """``impute.init = 'feature'``: the imputation AE starts from the feature AE's trained weights, so after a
    few small steps it is still near them; from fresh weights it is not."""
    from scgnn_scale.keys import FEATURE_MODEL, IMPUTE_MODEL
    from scgnn_scale.stages import feature
    from scgnn_scale.train import load_model

    counts, labels = planted_counts(n_cells=128, n_genes=40, n_types=2, seed=5)
    distance = {}
    for init in ("feature", "fresh"):
        config = RunConfig(store=StoreConfig(chunk_rows=64, chunk_genes=64),
                           feature=FeatureConfig(batch_size=64, memory_budget_mb=0, min_steps=100),
                           impute=ImputeConfig(init=init, steps=2, max_epochs=1))
        store = store_with_matrix(tmp_path / init, counts, labels=labels, config=config)
        feature.run(stage_context(store, "feature", config))
        with store.staging("cluster") as st:
            st.write_elem("obs/scgnn_cluster", pd.Categorical(labels.astype(str)))
        info = impute.run(stage_context(store, "impute", config))
        assert info["steps_total"] == 2
        first, _ = load_model(store.model_path(FEATURE_MODEL), "cpu")
        imputation, _ = load_model(store.model_path(IMPUTE_MODEL), "cpu")
        distance[init] = max(float(torch.max(torch.abs(a - b)))
                             for a, b in zip(first.state_dict().values(), imputation.state_dict().values(), strict=True))
    # two Adam steps of lr 1e-3 move a weight by about 2e-3 at most; the feature AE's 100 moved them further
    assert distance["feature"] < 5e-3 < 0.02 < distance["fresh"], distance
