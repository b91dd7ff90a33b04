"""bench/peer_scoring.py (the pure parts of bench/bench_peers.py) against dense numpy references.

The scoring of the imputation peers must select the entries and the scale that
``scgnn-scale evaluate-imputation`` scores scGNN on; these tests need neither scvi-tools nor
magic-impute. The last test runs the peers themselves and skips without them.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def ps():
    sys.path.insert(0, str(BENCH))  # peer_scoring imports gold_split beside it, as the script does
    try:
        spec = importlib.util.spec_from_file_location("peer_scoring", BENCH / "peer_scoring.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def _masking(rng, n_cells=40, n_genes=30, rate=0.3):
    counts = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float64)
    rows, cols = np.nonzero(counts)
    pick = np.sort(rng.choice(len(rows), size=int(rate * len(rows)), replace=False))
    return counts, rows[pick], cols[pick], counts[rows[pick], cols[pick]]


def test_scores_match_a_dense_reference_over_the_flipped_entries(ps, rng):
    counts, rows, cols, values = _masking(rng)
    kept_cells = np.arange(counts.shape[0])
    kept_genes = np.arange(counts.shape[1])
    entries = ps.FlippedEntries.select(rows, cols, values, kept_cells, kept_genes, *counts.shape)
    predicted = counts * rng.uniform(0.5, 1.5, size=counts.shape)
    flipped = np.zeros(counts.shape, dtype=bool)
    flipped[rows, cols] = True
    x, y = np.log1p(counts[flipped]), np.log1p(predicted[flipped])  # the reference, by boolean mask
    got = entries.scores(predicted)
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((x - y) ** 2)), rel=1e-12)
    assert got["cosine"] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), rel=1e-12)
    assert got["median_l1"] == pytest.approx(np.median(np.abs(x - y)), rel=1e-12)
    # only the flipped entries count: changing an unflipped one changes nothing
    other = predicted.copy()
    other[~flipped] = 1e6
    assert entries.scores(other) == got
    # the truth itself scores perfectly, zeros have cosine 0
    assert entries.scores(counts)["rmse"] == 0.0
    assert entries.scores(np.zeros_like(counts))["cosine"] == 0.0


def test_entries_outside_the_kept_cells_and_genes_are_not_scored(ps, rng):
    counts, rows, cols, values = _masking(rng)
    kept_cells = np.arange(0, counts.shape[0], 2)  # every other cell
    kept_genes = np.arange(5, counts.shape[1])
    entries = ps.FlippedEntries.select(rows, cols, values, kept_cells, kept_genes, *counts.shape)
    inside = np.isin(rows, kept_cells) & np.isin(cols, kept_genes)
    assert len(entries.cells) == inside.sum() and entries.n_flipped == len(rows)
    sub = counts[np.ix_(kept_cells, kept_genes)]  # a peer's prediction covers kept cells x kept genes
    np.testing.assert_array_equal(sub[entries.cells, entries.genes], entries.counts)
    order = np.lexsort((entries.genes, entries.cells))
    np.testing.assert_array_equal(order, np.arange(len(order)))  # sorted by cell, then gene


def test_library_normalised_scale_when_normalize_total_is_on(ps, rng):
    counts, rows, cols, values = _masking(rng)
    libsize = rng.uniform(50, 150, size=counts.shape[0])
    entries = ps.FlippedEntries.select(rows, cols, values, np.arange(counts.shape[0]), np.arange(counts.shape[1]),
                                       *counts.shape, target=1e4, libsize_of=lambda c: libsize[c])
    np.testing.assert_allclose(entries.truth, np.log1p(values * 1e4 / libsize[rows]))
    assert not np.allclose(entries.truth, np.log1p(values))


def test_magic_scale_round_trips_to_counts(ps, rng):
    counts = sp.random(30, 20, density=0.4, random_state=1, format="csr") * 50
    counts = sp.csr_matrix(np.round(counts.toarray()))
    transformed, libsize, scale = ps.magic_input(counts)
    dense = counts.toarray()
    assert scale == pytest.approx(np.median(dense.sum(axis=1)[dense.sum(axis=1) > 0]))
    np.testing.assert_allclose(transformed ** 2 * libsize[:, None] / scale, dense, atol=1e-9)
    np.testing.assert_allclose(ps.magic_counts(transformed, libsize, scale), dense, atol=1e-9)
    assert ps.magic_counts(-transformed, libsize, scale).min() == 0.0  # negative smoothing is clipped


def test_sets_and_label_levels(ps, tmp_path):
    for name, integer in (("counts_set", True), ("lognorm_set", False), ("10x_pbmc4k_top2000", True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "counts.h5ad").write_bytes(b"")
        (tmp_path / name / "stats.json").write_text(json.dumps({"integer_valued": integer}))
    (tmp_path / "no_data").mkdir()
    assert ps.gold_sets(tmp_path) == ["counts_set", "lognorm_set"]  # vendor labels and empty folders left out
    assert ps.holds_counts(tmp_path / "counts_set") and not ps.holds_counts(tmp_path / "lognorm_set")
    assert not ps.holds_counts(tmp_path / "no_data")
    assert ps.label_levels(["batch", "label_level10", "label", "label_level2", "label_levelx"]) == [
        "label", "label_level2", "label_level10"]
    assert ps.label_levels(["batch"]) == []
    assert ps.split_half("zeisel15") == "B" and ps.split_half("goolam") == "A" and ps.split_half("x") == "-"


def test_zeisel15_has_both_label_levels(ps):
    from conftest import shared_dataset

    path = shared_dataset("zeisel15")
    import anndata

    obs = anndata.read_h5ad(path, backed="r").obs
    levels = ps.label_levels(obs.columns)
    assert levels == ["label", "label_level2"]
    assert obs["label"].nunique() == 7 and obs["label_level2"].nunique() == 48


def test_cluster_scores_and_mean_sd(ps):
    truth = np.array(["a"] * 5 + ["b"] * 5)
    assert ps.cluster_scores(truth, np.array([1] * 5 + [2] * 5)) == {"ari": 1.0, "nmi": 1.0}
    assert ps.cluster_scores(truth, np.array([1, 2] * 5))["ari"] < 0.1
    assert ps.mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, np.sqrt(2 / 3)))


def test_the_peers_predict_on_the_scale_scored(ps, rng):
    pytest.importorskip("magic", reason="magic-impute is in the bench extra only")
    pytest.importorskip("scvi", reason="scvi-tools is in the bench extra only")
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_peers", BENCH / "bench_peers.py")
        bp = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bp)
    finally:
        sys.path.remove(str(BENCH))
    from conftest import planted_counts

    counts = sp.csr_matrix(planted_counts(n_cells=120, n_genes=40)[0])
    dense = counts.toarray()
    for predicted in (bp.magic_predict(counts, 0), bp.scvi_predict(counts, 0, max_steps=3)[0]):
        assert predicted.shape == counts.shape and np.isfinite(predicted).all() and predicted.min() >= 0
        # predictions are counts of each cell's own library: their totals are of the same size
        ratio = predicted.sum(axis=1) / dense.sum(axis=1)
        assert 0.5 < np.median(ratio) < 2.0


def test_scvi_step_budget(ps):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_peers", BENCH / "bench_peers.py")
        bp = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bp)  # the peers are imported inside the functions that use them
    finally:
        sys.path.remove(str(BENCH))
    assert bp.scvi_epochs(3005, 0) is None  # scvi-tools' own default
    assert bp.scvi_epochs(124, 200) == 200  # one batch per epoch
    assert bp.scvi_epochs(3005, 200) == 10  # 22 batches of 128 per epoch (90% of the cells train), rounded up
    assert bp.scvi_epochs(124, 10_000) == 400  # never more than scvi-tools' default
    assert bp.scvi_epochs(100_000, 10**9) == 80  # its default: 400 * 20000 / cells
