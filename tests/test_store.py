from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import zarr

from scgnn_scale.config import RunConfig, build_config
from scgnn_scale.errors import InputError
from scgnn_scale.store import RunStore
from scgnn_scale.testing import store_with_matrix


def test_layout_opens_with_anndata(tmp_path, planted):
    counts, labels = planted
    store = store_with_matrix(tmp_path / "run", counts, labels=labels)
    with store.staging("cluster") as st:
        st.write_elem("obs/scgnn_cluster", pd.Categorical(labels.astype(str)))
        st.write_elem("obsm/X_scgnn", np.ones((counts.shape[0], 16), np.float32))
        arr = st.create_matrix("layers/ltmg", counts.shape, np.uint8)
        arr[:] = 1
    adata = anndata.read_zarr(store.adata_path)
    assert adata.shape == counts.shape
    assert list(adata.obs.columns) == ["label", "scgnn_cluster"]
    np.testing.assert_allclose(adata.X, np.log1p(counts), rtol=1e-6)
    assert adata.layers["ltmg"].dtype == np.uint8 and adata.obsm["X_scgnn"].shape == (counts.shape[0], 16)
    chunks = store.open_array("X").chunks
    assert chunks == (min(2048, counts.shape[0]), min(256, counts.shape[1]))


def test_failed_stage_leaves_store_unchanged(tmp_path, planted):
    counts, _ = planted
    store = store_with_matrix(tmp_path / "run", counts)
    with pytest.raises(RuntimeError):
        with store.staging("gae") as st:
            st.write_elem("obsm/X_scgnn", np.zeros((counts.shape[0], 16), np.float32))
            raise RuntimeError("killed")
    assert not store.has("obsm/X_scgnn")
    # the next attempt starts from a clean staging area
    with store.staging("gae") as st:
        st.write_elem("obsm/X_scgnn", np.ones((counts.shape[0], 16), np.float32))
    assert store.read_elem("obsm/X_scgnn").sum() == counts.shape[0] * 16


def test_move_replaces_the_target_and_can_be_repeated(tmp_path):
    store = RunStore.create(tmp_path / "run", identity={"a": 1}, config=RunConfig())
    with store.staging("t") as st:
        st.create_matrix("work/a", (4, 3), np.float32)[:] = 1.0
        st.create_matrix("work/b", (2, 2), np.float32)[:] = 2.0
    assert store.move("work/a", "work/b")
    np.testing.assert_array_equal(store.open_array("work/b")[:], np.ones((4, 3), np.float32))
    assert not store.has("work/a")
    assert not store.move("work/a", "work/b")  # already moved: nothing to do, the target stays
    np.testing.assert_array_equal(store.open_array("work/b")[:], np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="working elements"):
        store.move("work/b", "obsm/X_moved")  # AnnData elements are written through a stage's commit


def test_manifest_records_and_checkpoints(tmp_path):
    cfg = RunConfig()
    store = RunStore.create(tmp_path / "run", identity={"a": 1}, config=cfg)
    store.record_stage("ingest", "h1", 1.0, {"n_cells": 5})
    store.save_checkpoint("iterate", "h9", {"done": 2})
    again = RunStore.open(tmp_path / "run")
    assert again.stage_done("ingest", "h1") and not again.stage_done("ingest", "other")
    assert again.load_checkpoint("iterate", "h9") == {"done": 2}
    assert again.load_checkpoint("iterate", "changed") is None


def test_refuses_another_run_unless_overwrite(tmp_path):
    cfg = RunConfig()
    RunStore.create(tmp_path / "run", identity={"a": 1}, config=cfg)
    # a run that finished no stage holds nothing to lose: another input takes its place
    RunStore.create(tmp_path / "run", identity={"a": 3}, config=cfg)
    RunStore.open(tmp_path / "run").record_stage("ingest", "h", 0.0, {})
    with pytest.raises(InputError, match="holds a run of another input or config"):
        RunStore.create(tmp_path / "run", identity={"a": 2}, config=cfg)
    RunStore.create(tmp_path / "run", identity={"a": 2}, config=cfg, overwrite=True)
    with pytest.raises(InputError, match="another store layout"):
        RunStore.create(tmp_path / "run", identity={"a": 2}, config=build_config({"store": {"chunk_rows": 64}}))


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="not a scgnn-scale run"):
        RunStore.create(tmp_path / "mine", identity={}, config=RunConfig(), overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("work_codec", ["lz4", "zstd"])
def test_work_arrays_take_the_work_codec(tmp_path, planted, work_codec):
    counts, _ = planted
    config = build_config({"store": {"work_codec": work_codec}})
    store = store_with_matrix(tmp_path / "run", counts, config=config)
    with store.staging("feature") as st:
        recon = st.create_matrix("work/recon", counts.shape, np.float32)
        recon[:] = counts
        emb = st.create_matrix("obsm/X_scgnn_feature", (counts.shape[0], 4), np.float32)
    names = {key: str(arr.compressors[0].cname.value) for key, arr in (("work", recon), ("obsm", emb))}
    assert names == {"work": work_codec, "obsm": "zstd"}
    np.testing.assert_array_equal(store.open_array("work/recon")[:], counts.astype(np.float32))


def _first_pass_and_published(tmp_path):
    store = RunStore.create(tmp_path / "run", identity={"a": 1}, config=RunConfig())
    data = np.arange(40, dtype=np.float32).reshape(10, 4)
    with store.staging("feature") as st:
        st.create_matrix("work/first_pass/X_scgnn_feature", data.shape, np.float32)[:] = data
    with store.staging("publish") as st:
        st.copy_array("obsm/X_scgnn_feature", store.open_array("work/first_pass/X_scgnn_feature"))
    src, dst = (Path(store.path_of(k)) for k in ("work/first_pass/X_scgnn_feature", "obsm/X_scgnn_feature"))
    files = [p.relative_to(src) for p in src.rglob("*") if p.is_file()]
    return store, data, src, dst, files


def test_copied_array_shares_its_files_on_local_disk_and_keeps_them_when_the_source_changes(tmp_path):
    store, data, src, dst, files = _first_pass_and_published(tmp_path)
    assert len(files) > 1 and all((src / f).stat().st_ino == (dst / f).stat().st_ino for f in files)
    zarr.open_array(str(src), mode="r+")[:] = -1  # a write replaces the file: the copy keeps its bytes
    with store.staging("feature") as st:  # a redone stage stages a new array
        st.create_matrix("work/first_pass/X_scgnn_feature", data.shape, np.float32)[:] = -data
    store.delete("work/first_pass/X_scgnn_feature")
    np.testing.assert_array_equal(store.open_array("obsm/X_scgnn_feature")[:], data)
    assert store.check_integrity()[0] == []


def test_copied_array_is_streamed_where_links_cannot_be_made(tmp_path, monkeypatch):
    import os

    real_link = os.link

    def refuse_in_staging(a, b, **kw):  # zarr's own exclusive writes link too
        if "staging" in str(b) and not str(a).endswith(".partial"):
            raise OSError("links not allowed here")
        return real_link(a, b, **kw)

    monkeypatch.setattr("os.link", refuse_in_staging)
    store, data, src, dst, files = _first_pass_and_published(tmp_path)
    assert all((src / f).stat().st_ino != (dst / f).stat().st_ino for f in files if (dst / f).exists())
    np.testing.assert_array_equal(store.open_array("obsm/X_scgnn_feature")[:], data)
