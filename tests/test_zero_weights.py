"""Zeros weighted by their chance under the cluster's mean: weights against a dense formula, and on planted
counts dropouts of well-expressed genes recovered where the published loss pulls them down, true zeros kept."""

import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import planted_counts

from scgnn_scale.config import FeatureConfig, ImputeConfig, RunConfig, StoreConfig
from scgnn_scale.stages import feature, impute
from scgnn_scale.testing import stage_context, store_with_matrix
from scgnn_scale.zero_weights import EntryWeights, cluster_mean_expression


def _zarr(tmp_path, name, values, rows=16):
    a = zarr.create_array(tmp_path / name, shape=values.shape, chunks=(rows, values.shape[1]), dtype=values.dtype)
    a[:] = values
    return a


def test_cluster_means_and_weights_equal_the_dense_formula(tmp_path, rng):
    x = np.log1p(rng.poisson(rng.gamma(1.0, 2.0, (50, 12)))).astype(np.float32)
    states = rng.integers(0, 3, x.shape).astype(np.uint8)
    labels = rng.integers(0, 4, 50)
    means = cluster_mean_expression(_zarr(tmp_path, "x", x), labels, 4)
    dense_means = np.stack([np.expm1(x[labels == c].astype(np.float64)).mean(axis=0) for c in range(4)])
    np.testing.assert_allclose(means, dense_means, rtol=1e-10)

    w = EntryWeights(_zarr(tmp_path, "x2", x), _zarr(tmp_path, "s", states), labels, means, gamma=0.1, alpha=0.9)
    dense = np.where(x > 0, 0.1 + 0.9 * states, 0.1 * np.exp(-dense_means[labels]))
    np.testing.assert_allclose(w[5:37], dense[5:37], rtol=1e-6)
    assert w.shape == x.shape and w.chunks == (16, 12) and w.on("cpu") is w
    plain = EntryWeights(_zarr(tmp_path, "x3", x), None, labels, means, gamma=0.1, alpha=0.9)
    np.testing.assert_allclose(plain[0:50], np.where(x > 0, 0.1, 0.1 * np.exp(-dense_means[labels])), rtol=1e-6)
    with pytest.raises(TypeError):
        plain[[1, 2]]  # rows are read in slices only, never gathered whole
    with pytest.raises(ValueError, match="labels"):
        EntryWeights(_zarr(tmp_path, "x4", x), None, labels[:10], means, gamma=0.1, alpha=0.9)


def _store(tmp_path, counts, labels, masked, zero_weight):
    observed = counts.copy().ravel()
    observed[masked] = 0
    config = RunConfig(store=StoreConfig(chunk_rows=64, chunk_genes=64),
                       feature=FeatureConfig(batch_size=64, memory_budget_mb=0),
                       impute=ImputeConfig(zero_weight=zero_weight))
    store = store_with_matrix(tmp_path / zero_weight, observed.reshape(counts.shape), labels=labels, config=config)
    feature.run(stage_context(store, "feature", config))
    with store.staging("cluster") as st:
        import scipy.sparse as sp

        st.write_elem("obsp/scgnn_graph", sp.identity(len(labels), dtype=np.float32, format="csr"))
        st.write_elem("obs/scgnn_cluster", pd.Categorical(labels.astype(str)))
    info = impute.run(stage_context(store, "impute", config))
    return store.open_array("layers/imputed")[:], info


def test_dropouts_of_well_expressed_genes_are_filled_and_true_zeros_stay_low(tmp_path):
    counts, labels = planted_counts(n_cells=240, n_genes=120, n_types=3, seed=3)
    counts = counts * 40.0 + 40.0  # deep counts: every gene well expressed, as goolam's
    counts[labels == 0, :20] = 0.0  # but a block that type 0 does not express: true zeros
    rng = np.random.default_rng(4)
    nz = np.flatnonzero(counts)
    masked = rng.choice(nz, size=int(0.3 * nz.size), replace=False)  # 30% of the non-zeros flipped
    truth = np.log1p(counts.ravel()[masked])
    results = {w: _store(tmp_path, counts, labels, masked, w) for w in ("published", "expected")}
    l1 = {w: float(np.median(np.abs(imp.ravel()[masked] - truth))) for w, (imp, _) in results.items()}
    assert l1["expected"] < 0.5 * l1["published"], l1  # the published loss pulls the flipped entries down
    imputed, info = results["expected"]
    assert info["input"] == "X" and info["zero_weight"]["clusters"] == 3 and "regularisers" not in info
    true_zeros = imputed[labels == 0, :20]
    assert true_zeros.mean() < 0.1 * np.log1p(counts[labels != 0, :20]).mean()  # kept near zero
