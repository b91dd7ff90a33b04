"""Clustering metrics on known labellings and ``evaluate_run`` on a run store."""

import json
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from scgnn_scale.errors import InputError
from scgnn_scale.evaluate import clustering_metrics, evaluate_run
from scgnn_scale.testing import store_with_matrix


def ari_reference(a, b):
    """Hubert-Arabie ARI by counting pairs (O(n^2), small n only)."""
    pairs = list(combinations(range(len(a)), 2))
    same_a = np.array([a[i] == a[j] for i, j in pairs])
    same_b = np.array([b[i] == b[j] for i, j in pairs])
    n11 = np.sum(same_a & same_b)
    total = len(pairs)
    expected = same_a.sum() * same_b.sum() / total
    max_index = 0.5 * (same_a.sum() + same_b.sum())
    return (n11 - expected) / (max_index - expected)


def nmi_reference(a, b):
    """NMI with the arithmetic-mean normalisation, from the contingency table."""
    a, b = np.asarray(a), np.asarray(b)
    n = a.size
    ua, ub = np.unique(a), np.unique(b)
    c = np.array([[np.sum((a == x) & (b == y)) for y in ub] for x in ua]) / n
    pa, pb = c.sum(1), c.sum(0)
    nz = c > 0
    mi = np.sum(c[nz] * np.log(c[nz] / np.outer(pa, pb)[nz]))
    ha, hb = -np.sum(pa * np.log(pa)), -np.sum(pb * np.log(pb))
    return mi / (0.5 * (ha + hb))


def test_identical_partitions_up_to_renaming():
    truth = ["a", "a", "b", "b", "c", "c", "c"]
    pred = [5, 5, 1, 1, 9, 9, 9]
    m = clustering_metrics(truth, pred)
    assert m["ari"] == pytest.approx(1.0) and m["nmi"] == pytest.approx(1.0)
    assert m["n_clusters"] == 3 and m["n_labels"] == 3 and m["silhouette"] is None


def test_metrics_equal_reference_formulas(rng):
    truth = rng.integers(0, 4, 60)
    pred = np.where(rng.random(60) < 0.7, truth, rng.integers(0, 5, 60))
    m = clustering_metrics(truth, pred)
    assert m["ari"] == pytest.approx(ari_reference(truth, pred), rel=1e-9)
    assert m["nmi"] == pytest.approx(nmi_reference(truth, pred), rel=1e-9)


def test_independent_labelling_scores_near_zero(rng):
    m = clustering_metrics(rng.integers(0, 3, 3000), rng.integers(0, 3, 3000))
    assert abs(m["ari"]) < 0.01 and m["nmi"] < 0.01


def test_missing_reference_labels_are_left_out():
    truth = pd.Series(["a", "a", None, "b", "b", np.nan])
    pred = [0, 0, 1, 1, 1, 0]
    m = clustering_metrics(truth, pred)
    assert m["n_cells"] == 4 and m["ari"] == pytest.approx(1.0)


def test_silhouette_of_separated_blobs_on_a_sample(rng):
    labels = np.repeat([0, 1], 600)
    emb = np.where(labels[:, None] == 0, 0.0, 100.0) + rng.normal(size=(1200, 3))
    m = clustering_metrics(labels, labels, embedding=emb, silhouette_max_cells=500)
    assert m["silhouette"] > 0.95 and m["silhouette_cells"] == 500
    bad = clustering_metrics(labels, rng.integers(0, 2, 1200), embedding=emb, silhouette_max_cells=500)
    assert abs(bad["silhouette"]) < 0.05
    assert clustering_metrics(labels, labels, embedding=emb)["silhouette_cells"] == 1200  # default: 10k


def test_length_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="labels"):
        clustering_metrics([0, 1], [0, 1, 1])


def _run_with_clusters(tmp_path, labels, clusters):
    store = store_with_matrix(tmp_path / "run", np.ones((len(clusters), 2), np.float32), labels=labels)
    with store.staging("cluster") as st:
        st.write_elem("obs/scgnn_cluster", pd.Categorical(np.asarray(clusters).astype(str)))
    return store


def test_evaluate_run_writes_metrics_json(tmp_path):
    truth = np.repeat([0, 1, 2], 20)
    clusters = truth.copy()
    clusters[:3] = 1
    store = _run_with_clusters(tmp_path, truth, clusters)
    metrics = evaluate_run(store.root, label_key="label")
    assert metrics["ari"] == pytest.approx(ari_reference(truth, clusters))
    on_disk = json.loads((store.root / "metrics.json").read_text())
    assert on_disk == metrics
    assert not list(store.root.glob("metrics.json.tmp"))


def test_evaluate_run_missing_label_column(tmp_path):
    store = _run_with_clusters(tmp_path, None, [0, 1, 0, 1])
    with pytest.raises(InputError, match="no column 'celltype'"):
        evaluate_run(store.root, label_key="celltype")


def test_evaluate_run_without_clusters(tmp_path):
    store = store_with_matrix(tmp_path / "run", np.ones((4, 2), np.float32), labels=[0, 1, 0, 1])
    with pytest.raises(InputError, match="no clusters"):
        evaluate_run(store.root)


# -- the NumPy scores against scikit-learn's (a dev dependency; the package does not import it) --------

@pytest.mark.parametrize("case", ["random", "nested", "one_each", "all_one", "many_values", "strings"])
def test_partition_scores_equal_scikit_learn(rng, case):
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from scgnn_scale.partition_scores import adjusted_rand_index, normalized_mutual_information

    n = 500
    a = {"random": rng.integers(0, 6, n), "nested": np.repeat(np.arange(10), 50), "one_each": np.arange(n),
         "all_one": np.zeros(n, int), "many_values": rng.integers(0, 300, n),
         "strings": rng.choice(["T", "B", "NK"], n)}[case]
    b = {"nested": np.repeat(np.arange(5), 100), "all_one": np.zeros(n, int)}.get(
        case, np.where(rng.random(n) < 0.6, a, rng.permutation(a)))
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), rel=1e-12, abs=1e-12)
    assert normalized_mutual_information(a, b) == pytest.approx(normalized_mutual_info_score(a, b), rel=1e-12,
                                                                abs=1e-12)


def test_ari_of_many_cells_does_not_overflow(rng):
    from sklearn.metrics import adjusted_rand_score

    from scgnn_scale.partition_scores import adjusted_rand_index

    a = rng.integers(0, 2, 300_000)  # products of pair counts pass int64 here
    b = np.where(rng.random(a.size) < 0.9, a, 1 - a)
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), rel=1e-12)
    assert 0.6 < adjusted_rand_index(a, b) < 0.7


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silhouette_equals_scikit_learn_with_a_lone_cell(rng, dtype):
    from sklearn.metrics import silhouette_score

    from scgnn_scale.partition_scores import silhouette

    x = (rng.normal(size=(700, 8)) + np.repeat(np.eye(8)[:4] * 3, 175, axis=0)).astype(dtype)
    labels = np.repeat(np.arange(4), 175)
    labels[0] = 9  # a cluster of one cell: its width is 0
    labels[1:40] = rng.integers(0, 4, 39)
    assert silhouette(x, labels, block_rows=64) == pytest.approx(silhouette_score(x, labels), rel=1e-6)
    with pytest.raises(ValueError, match="clusters"):
        silhouette(x, np.zeros(700, int))
