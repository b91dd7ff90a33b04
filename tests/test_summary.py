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


def test_the_summary_writer_writes_anndatas_files_byte_for_byte(tmp_path):
    """The run summary's fast writer (zarr directly for dicts, strings and numbers) writes the same files as
    anndata's ``write_elem``, so every AnnData reader reads it as before."""
    import anndata
    import zarr
    from anndata.io import read_elem, write_elem

    from scgnn_scale.store import _write_small_elem

    anndata.settings.zarr_write_format = 3
    value = {"config": {"lr": 1e-3, "steps": 200, "name": "leiden", "on": True, "off": False, "empty": "",
                        "unicode": "Zeisel – 3,005 cells"},
             "numpy": {"f32": np.float32(0.25), "i64": np.int64(-3), "b": np.bool_(True), "f16": np.float16(1.5)},
             "lists": {"ints": [1, 2, 3], "words": ["a", "b"], "history": [{"step": 1, "loss": 0.5}]},
             "array": np.arange(6, dtype=np.float32).reshape(2, 3),
             "table": pd.DataFrame({"x": [1.0, 2.0], "y": ["u", "v"]}),
             "nested": {"deeper": {"deepest": 7}}}
    theirs = zarr.open_group(str(tmp_path / "theirs.zarr"), mode="w", zarr_format=3)
    write_elem(theirs, "element", value)
    _write_small_elem(tmp_path / "ours.zarr" / "element", value)

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    theirs_files, ours_files = files(tmp_path / "theirs.zarr" / "element"), files(tmp_path / "ours.zarr" / "element")
    assert len(theirs_files) > 30
    assert sorted(ours_files) == sorted(theirs_files)
    for name, content in theirs_files.items():
        assert ours_files[name] == content, name
    back = read_elem(zarr.open_group(str(tmp_path / "ours.zarr" / "element"), mode="r"))
    assert _frames_and_leaves(back) == _frames_and_leaves(read_elem(theirs["element"]))
