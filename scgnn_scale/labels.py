"""Reference labels: metadata that scores a run, never an input to it.

A label column changes no stage: it is read from the input's obs (``--label-key``) or from a file
(``evaluate --labels FILE``), matched to the run's cells by name, and written as an obs column of
the run so that ``read_run`` shows it beside the clusters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError


def read_label_file(path: str | Path, label_key: str = "") -> pd.Series:
    """Labels from a CSV/TSV file: the first column holds cell names, the labels are the column named
    ``label_key`` (or the second column when the header has no such name). Returns a Series by cell name."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: label file not found")
    sep = "\t" if path.name.removesuffix(".gz").endswith((".tsv", ".txt")) else ","
    try:
        table = pd.read_csv(path, sep=sep, index_col=0, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(f"{path}: not a readable {'TSV' if sep == chr(9) else 'CSV'} label file ({exc})") from None
    if table.shape[1] == 0:
        raise InputError(f"{path}: needs two columns, cell names and labels (found one)")
    column = label_key if label_key in table.columns else table.columns[0]
    if table.index.has_duplicates:
        dup = table.index[table.index.duplicated()][0]
        raise InputError(f"{path}: cell {dup!r} appears more than once")
    labels = table[column].replace("", np.nan)
    labels.name = label_key or str(column)
    return labels


def labels_from_input(source: Any, label_key: str, config) -> pd.Series:
    """The ``label_key`` column of the input's obs, by cell name (reads obs only, not the matrix)."""
    from .readers import open_input

    cfg = config.ingest
    with open_input(source, orientation=cfg.orientation, label_key=label_key, block_rows=cfg.block_rows,
                    tmp_dir=cfg.tmp_dir or None) as reader:
        obs = reader.obs
    return obs[label_key].rename(label_key)


def align_labels(labels: pd.Series, cell_names: pd.Index, where: str) -> pd.Series:
    """``labels`` in the order of the run's cells (missing cells NaN); refuses labels that match no cell."""
    found = cell_names.isin(labels.index)
    if not found.any():
        raise InputError(f"{where}: none of the run's {len(cell_names):,} cell names is in it "
                         f"(first run cells: {', '.join(map(str, cell_names[:3]))}; first labelled: "
                         f"{', '.join(map(str, labels.index[:3]))})")
    return labels.reindex(cell_names)


def attach_labels(store, labels: pd.Series, key: str) -> pd.DataFrame:
    """Write ``labels`` (aligned to the run's cells) as the obs column ``key`` of the run; the run's obs after."""
    with store.staging("labels") as staging:
        staging.write_elem(f"obs/{key}", pd.Categorical(labels))
    return store.read_elem("obs")
