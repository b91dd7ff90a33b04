"""Helpers for tests and benchmarks: a run store filled as if ingest and preprocess had run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .config import RunConfig
from .context import StageContext
from .keys import KEYS
from .runtime import Runtime
from .store import RunStore


def store_with_matrix(root: str | Path, counts: np.ndarray, *, labels=None, config: RunConfig | None = None,
                      log_transform: bool = True) -> RunStore:
    """A run store whose ``X`` is ``log1p(counts)`` (or ``counts``), with obs/var as preprocess writes them.

    For unit tests of later stages only: it skips ingest/preprocess and records nothing in the manifest.
    """
    config = config or RunConfig()
    store = RunStore.create(root, identity={"test": True}, config=config)
    counts = np.asarray(counts, dtype=np.float32)
    n, g = counts.shape
    with store.staging("preprocess") as st:
        x = st.create_matrix(KEYS.x, (n, g), np.float32)
        x[:] = np.log1p(counts) if log_transform else counts
        obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n)]))
        if labels is not None:
            obs["label"] = pd.Categorical(np.asarray(labels).astype(str))
        st.write_elem(KEYS.obs, obs)
        st.write_elem(KEYS.var, pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(g)])))
    return store


def stage_context(store: RunStore, stage: str, config: RunConfig | None = None, **kw) -> StageContext:
    """A context to call ``stages.<stage>.run(ctx)`` directly (quiet; close ``ctx.runtime`` when a Dask
    client was used)."""
    config = config or RunConfig()
    kw.setdefault("runtime", Runtime.from_config(config.runtime, quiet=True))
    return StageContext(store=store, config=config, stage=stage, chain_hash=f"test-{stage}", **kw)
