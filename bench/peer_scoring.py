"""The pure parts of bench/bench_peers.py: which sets and label levels, which entries, which scale, which scores.

No peer library is imported here (scvi-tools and magic-impute live in the ``bench`` extra only), so the
tests can check this code in any environment.

The imputation peers are scored exactly where and how ``scgnn-scale evaluate-imputation`` scores scGNN
(scgnn_scale/dropout.py, ``score_run``): the flipped entries whose cell and gene the run kept, on the
scale of the run's X (``log1p`` of the counts, library-normalised first when
``preprocess.normalize_total`` is on). A peer predicts counts for the kept cells x kept genes of the
masked input; :func:`to_run_scale` puts them on that scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# bench/ is on sys.path (as the bench scripts put it): the fixed split, and the sets whose labels are not gold
from gold_split import HALF_A, HALF_B, NOT_GOLD

from scgnn_scale.dropout import _positions, imputation_scores, library_sizes, read_mask

LABEL = "label"
LEVEL_PREFIX = "label_level"  # further label levels: obs['label_level2'] (zeisel15's 48 subclasses)


# -- sets and label levels -------------------------------------------------------------------------
def gold_sets(data: Path) -> list[str]:
    """Every set of ``data`` with a ``counts.h5ad`` whose labels are gold (not the vendor clustering)."""
    return sorted(p.name for p in Path(data).iterdir()
                  if (p / "counts.h5ad").is_file() and p.name not in NOT_GOLD)


def holds_counts(set_dir: Path) -> bool:
    """True when the set's X holds raw counts: ``stats.json`` says ``integer_valued`` (pollen does not)."""
    stats = Path(set_dir) / "stats.json"
    return stats.is_file() and bool(json.loads(stats.read_text()).get("integer_valued"))


def label_levels(columns) -> list[str]:
    """The label columns of an obs: ``label`` first, then ``label_level2``, ``label_level3``... in order."""
    columns = [str(c) for c in columns]
    if LABEL not in columns:
        return []
    deeper = [c for c in columns if c.startswith(LEVEL_PREFIX) and c[len(LEVEL_PREFIX):].isdigit()]
    return [LABEL, *sorted(deeper, key=lambda c: int(c[len(LEVEL_PREFIX):]))]


def split_half(name: str) -> str:
    """``A`` or ``B``: the half of bench/gold_split.py the set lies in (``-`` outside the split)."""
    return "A" if name in HALF_A else "B" if name in HALF_B else "-"


def cluster_scores(truth, predicted) -> dict[str, float]:
    """ARI and NMI of predicted clusters against one label level."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth, predicted = np.asarray(truth).astype(str), np.asarray(predicted).astype(str)
    return {"ari": float(adjusted_rand_score(truth, predicted)),
            "nmi": float(normalized_mutual_info_score(truth, predicted))}


def mean_sd(values) -> tuple[float, float]:
    """Mean and (population) SD over seeds or repeats, as bench_quality.py and dropout.py report them."""
    a = np.asarray(values, dtype=np.float64)
    return float(np.mean(a)), float(np.std(a))


# -- the flipped entries -----------------------------------------------------------------------------
class FlippedEntries:
    """The scored entries of one masking, as dropout.score_run selects them.

    Attributes: ``cells`` and ``genes`` (positions among the run's kept cells and genes, sorted by
    cell then gene), ``counts`` (the true counts), ``kept_cells`` and ``kept_genes`` (indices into the
    input), ``target`` (``preprocess.normalize_total``), ``libsize`` (each entry's cell's library size
    as preprocess computes it, or None when ``target`` is 0), ``n_flipped``.
    """

    def __init__(self, cells, genes, counts, kept_cells, kept_genes, target=0.0, libsize=None, n_flipped=None):
        self.cells = np.asarray(cells, dtype=np.int64)
        self.genes = np.asarray(genes, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.float64)
        self.kept_cells = np.asarray(kept_cells, dtype=np.int64)
        self.kept_genes = np.asarray(kept_genes, dtype=np.int64)
        self.target = float(target)
        self.libsize = None if libsize is None else np.asarray(libsize, dtype=np.float64)
        self.n_flipped = len(self.cells) if n_flipped is None else int(n_flipped)

    @property
    def truth(self) -> np.ndarray:
        return to_run_scale(self.counts, self.target, self.libsize)

    @classmethod
    def select(cls, rows, cols, values, kept_cells, kept_genes, n_input_cells: int, n_input_genes: int,
               target: float = 0.0, libsize_of=None) -> FlippedEntries:
        """Keep the flipped (row, col, value) whose cell and gene were kept; ``libsize_of(input cells)``."""
        kept_cells = np.asarray(kept_cells, dtype=np.int64)
        cell_pos = _positions(kept_cells, n_input_cells)[np.asarray(rows, dtype=np.int64)]
        gene_pos = _positions(np.asarray(kept_genes, dtype=np.int64), n_input_genes)[np.asarray(cols, dtype=np.int64)]
        scored = (cell_pos >= 0) & (gene_pos >= 0)
        cells, genes, counts = cell_pos[scored], gene_pos[scored], np.asarray(values, dtype=np.float64)[scored]
        order = np.lexsort((genes, cells))
        cells, genes, counts = cells[order], genes[order], counts[order]
        libsize = libsize_of(kept_cells[cells]) if target > 0 else None
        return cls(cells, genes, counts, kept_cells, kept_genes, target, libsize, n_flipped=len(rows))

    @classmethod
    def of_run(cls, run_dir: Path, mask: Path, masked: Path) -> FlippedEntries:
        """The entries ``scgnn-scale evaluate-imputation`` scored in ``run_dir`` (one repeat)."""
        import h5py

        from scgnn_scale.config import config_from_dict
        from scgnn_scale.keys import KEYS
        from scgnn_scale.store import RunStore

        store = RunStore.open(run_dir)
        rows, cols, values = read_mask(mask)
        with h5py.File(mask, "r") as f:
            n_cells, n_genes = int(f.attrs["n_cells"]), int(f.attrs["n_genes"])
        pcfg = config_from_dict(store.manifest["config"]).preprocess
        return cls.select(rows, cols, values, store.read_elem(KEYS.kept_cells), store.read_elem(KEYS.kept_genes),
                          n_cells, n_genes, target=pcfg.normalize_total,
                          libsize_of=lambda c: library_sizes(masked, c, min_cell_fraction=pcfg.min_cell_fraction))

    def predicted_at(self, predicted_counts) -> np.ndarray:
        """A peer's predicted counts (kept cells x kept genes, dense) at the entries, on the run's scale."""
        values = np.asarray(predicted_counts)[self.cells, self.genes]
        return to_run_scale(values, self.target, self.libsize)

    def scores(self, predicted_counts) -> dict[str, float]:
        """Median L1, cosine and RMSE of a peer over the entries (dropout.imputation_scores)."""
        return imputation_scores(self.truth, self.predicted_at(predicted_counts))


def to_run_scale(counts, target: float = 0.0, libsize=None) -> np.ndarray:
    """Counts on the scale of the run's X: ``log1p(count)``, or ``log1p(count * target / libsize)``."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    if target > 0:
        counts = counts * target / np.maximum(np.asarray(libsize, dtype=np.float64), 1e-12)
    return np.log1p(counts)


# -- MAGIC's scale -------------------------------------------------------------------------------------
def magic_input(counts) -> tuple[np.ndarray, np.ndarray, float]:
    """MAGIC's documented preprocessing: library-size normalise to the median library size, then sqrt.

    Returns the transformed dense matrix, each cell's library size and the median it was scaled to.
    """
    dense = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=np.float64)
    libsize = dense.sum(axis=1)
    scale = float(np.median(libsize[libsize > 0])) if np.any(libsize > 0) else 1.0
    return np.sqrt(dense * (scale / np.maximum(libsize, 1e-12))[:, None]), libsize, scale


def magic_counts(smoothed, libsize, scale: float) -> np.ndarray:
    """MAGIC's output (sqrt of normalised counts) back to counts of each cell's own library size."""
    smoothed = np.maximum(np.asarray(smoothed, dtype=np.float64), 0.0)
    return smoothed * smoothed * (np.asarray(libsize, dtype=np.float64) / scale)[:, None]
