"""What every stage receives: the store, the config, the runtime, a logger, progress bars and events."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import RunConfig
from .progress import progress_bar
from .runtime import Runtime
from .store import RunStore


@dataclass
class StageContext:
    store: RunStore
    config: RunConfig
    stage: str
    chain_hash: str
    runtime: Runtime
    input: Any = None  # the input path (str) or AnnData, for ingest
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("scgnn_scale"))
    #: ``on_event(name, info)`` is called at the points a stage announces with :meth:`event` (a training
    #: checkpoint saved, an iteration committed, ...): where tests inject a kill or observe a step
    on_event: Callable[[str, dict], None] | None = None

    @property
    def quiet(self) -> bool:
        return self.runtime.quiet

    def progress(self, total: int | None, desc: str, unit: str = "cells", **kw):
        """A progress bar with rate and ETA on a terminal or notebook, a log line a minute elsewhere."""
        return progress_bar(total, f"{self.stage}: {desc}", unit, quiet=self.runtime.quiet, **kw)

    def client(self):
        """The Dask client of this run (embedded LocalCluster or --scheduler), started lazily."""
        return self.runtime.client()

    def event(self, name: str, **info) -> None:
        if self.on_event is not None:
            self.on_event(name, info)

    def load_checkpoint(self) -> dict | None:
        return self.store.load_checkpoint(self.stage, self.chain_hash)

    def save_checkpoint(self, state: dict) -> None:
        self.store.save_checkpoint(self.stage, self.chain_hash, state)
