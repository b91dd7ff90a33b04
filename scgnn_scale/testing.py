"""Helpers for tests and benchmarks: a run store filled as if ingest and preprocess had run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .config import RunConfig
from .context import StageContext
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
        x = st.create_matrix("X", (n, g), np.float32)
        x[:] = np.log1p(counts) if log_transform else counts
        obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n)]))
        if labels is not None:
            obs["label"] = pd.Categorical(np.asarray(labels).astype(str))
        st.write_elem("obs", obs)
        st.write_elem("var", pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(g)])))
    return store


def stage_context(store: RunStore, stage: str, config: RunConfig | None = None, **kw) -> StageContext:
    """A context to call ``stages.<stage>.run(ctx)`` directly."""
    return StageContext(store=store, config=config or RunConfig(), stage=stage, chain_hash=f"test-{stage}",
                        quiet=True, **kw)
