"""What every stage receives: the store, the config, a logger, progress bars, Dask and torch access."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .config import RunConfig
from .progress import progress_bar
from .store import RunStore


@dataclass
class StageContext:
    store: RunStore
    config: RunConfig
    stage: str
    chain_hash: str
    input: Any = None  # the input path (str) or AnnData, for ingest
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("scgnn_scale"))
    quiet: bool = False
    _client_holder: Any = None  # distributed.ClientHolder shared by all stages of one invocation

    def progress(self, total: int | None, desc: str, unit: str = "cells", **kw):
        """A progress bar with rate and ETA on a terminal or notebook, a log line a minute elsewhere."""
        return progress_bar(total, f"{self.stage}: {desc}", unit, quiet=self.quiet, **kw)

    def client(self):
        """The Dask client of this invocation (embedded LocalCluster or --scheduler), started lazily."""
        from .distributed import ClientHolder

        if self._client_holder is None:
            self._client_holder = ClientHolder(self.config.runtime)
        return self._client_holder.get()

    def torch_device(self):
        from .devices import resolve_device

        return resolve_device(self.config.runtime.device)

    def load_checkpoint(self) -> dict | None:
        return self.store.load_checkpoint(self.stage, self.chain_hash)

    def save_checkpoint(self, state: dict) -> None:
        self.store.save_checkpoint(self.stage, self.chain_hash, state)
