"""uns['scgnn'] does not depend on which invocation ran a stage (a run resumed after a kill, a rerun)."""

import json

import numpy as np
import pandas as pd

from scgnn_scale.store import RunStore
from scgnn_scale.summary import uns_summary
from scgnn_scale.testing import store_with_matrix

# what a stage returns, keys in the order it made them (not sorted): loss records, per-iteration history
FEATURE_INFO = {"steps": 3, "loss_last": np.float32(0.25), "shape": (40, 12),
                "loss_history": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]}
ITERATE_INFO = {"iterations": 2, "stopped": "max_iterations",
                "history": [{"iteration": 1, "ari_to_previous": 0.5, "n_clusters": 3},
                            {"iteration": 2, "ari_to_previous": 0.99, "n_clusters": 3}]}


def _frames_and_leaves(value, prefix=""):
    """Every leaf of a summary by its path; tables as their column names and values, arrays with their dtype."""
    out = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(_frames_and_leaves(v, f"{prefix}/{k}"))
    elif isinstance(value, pd.DataFrame):
        out[prefix] = (list(value.columns), value.to_json())
    elif isinstance(value, np.ndarray | np.generic):
        out[prefix] = (str(value.dtype), json.dumps(value.tolist()))
    else:
        out[prefix] = (type(value).__name__, json.dumps(value))
    return out


def test_summary_of_a_resumed_run_equals_the_summary_of_a_run_in_one_process(tmp_path):
    store = store_with_matrix(tmp_path / "run", np.ones((40, 12), dtype=np.float32))
    store.record_stage("feature", "h-feature", 1.0, dict(FEATURE_INFO))
    store.record_stage("iterate", "h-iterate", 1.0, dict(ITERATE_INFO))
    in_one_process = uns_summary(store, {})
    resumed = uns_summary(RunStore.open(store.root), {})  # the stages as a later invocation reads them
    a, b = _frames_and_leaves(in_one_process), _frames_and_leaves(resumed)
    a.pop("/versions", None), b.pop("/versions", None)
    assert a == b
    # the tables keep every column (sorted, as manifest.json stores the records)
    assert in_one_process["history"].columns.tolist() == ["ari_to_previous", "iteration", "n_clusters"]
    assert in_one_process["stages"]["feature"]["loss_history"].columns.tolist() == ["loss", "step"]
