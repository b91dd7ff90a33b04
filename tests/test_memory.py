"""--memory-limit: parsing, the caps it puts on what is held in memory, and a clear error for bad values."""

import dataclasses

import numpy as np
import pytest
from test_feature import planted_store, small_config

from scgnn_scale import memory, train
from scgnn_scale.cli import main
from scgnn_scale.config import RuntimeConfig
from scgnn_scale.errors import InputError
from scgnn_scale.memory import MemoryPlan, parse_size
from scgnn_scale.testing import stage_context


@pytest.mark.parametrize("text, expected", [("4GiB", 4 << 30), ("4 GB", 4 * 10**9), ("512MiB", 512 << 20),
                                             ("1.5g", 1_500_000_000), ("4294967296", 4 << 30), ("2gib", 2 << 30)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["four GiB", "4 apples", "", "-1GiB", "GiB"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(InputError, match="not a size"):
        parse_size(text)


def test_plan_caps_only_when_a_limit_is_set():
    free = MemoryPlan.from_config(RuntimeConfig())
    assert free.loader_mb(2048) == 2048 and free.scatter_mb(256) == 256
    assert free.dask_worker_limit(2, processes=False) is None
    plan = MemoryPlan.from_config(RuntimeConfig(memory_limit="4GiB"))
    assert plan.loader_mb(2048) == pytest.approx(1024)  # 25% of 4 GiB
    assert plan.loader_mb(100) == 100  # a smaller configured budget still applies
    assert plan.loader_mb(2048, parts=4) == pytest.approx(256)
    assert plan.scatter_mb(1024) == pytest.approx(0.1 * 4096)
    assert plan.dask_worker_limit(4, processes=True) == (4 << 30) // 8
    assert plan.dask_worker_limit(4, processes=False) == 4 << 30  # threads watch the one shared process
    with pytest.raises(InputError, match="at least 1 GiB"):
        MemoryPlan.from_config(RuntimeConfig(memory_limit="512MiB"))


def test_feature_loader_streams_when_the_limit_is_too_small_to_hold_x(tmp_path, monkeypatch):
    config = small_config(memory_budget_mb=100)  # X (300 x 200 float32 + states) fits 100 MB: held in memory
    store, _, _ = planted_store(tmp_path, config)
    runs = {}
    for name, limit in (("free", ""), ("limited", "1GiB")):
        cfg = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, memory_limit=limit))
        # make 1 GiB too small for this X: the loaders' share becomes 1e-6 of the limit (~1 KB)
        monkeypatch.setattr(memory, "LOADER_SHARE", 1e-6 if limit else memory.LOADER_SHARE)
        ctx = stage_context(store, "iterate", cfg)
        with store.staging("iterate") as st:
            info = train.train_feature(ctx, st, x_key="X", trs_key="layers/ltmg", steps=8, model_in=None,
                                         model_out=None, embedding_key=f"work/emb_{name}", recon_key=None)
        runs[name] = (info["loader"], store.open_array(f"work/emb_{name}")[:])
    assert runs["free"][0] == "memory" and runs["limited"][0] == "stream"
    np.testing.assert_array_equal(runs["free"][1], runs["limited"][1])  # same batches, same result


def test_bad_memory_limit_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", str(tmp_path / "missing.h5ad"), "--out", str(out), "--memory-limit", "lots"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--memory-limit 'lots'" in lines[0] and "Traceback" not in err
    assert not out.exists()
