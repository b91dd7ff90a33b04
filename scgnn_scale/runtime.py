"""What a run runs on, resolved once: the torch device, the memory plan and the Dask client.

Built by the pipeline at the start of a run (or by :func:`scgnn_scale.testing.stage_context`) and
handed to every stage through its context, so ``--device`` and ``--memory-limit`` are parsed in
one place and "is it CUDA?" has one answer. Code below the stages takes the device as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .memory import MemoryPlan


@dataclass
class Runtime:
    config: Any  # config.RuntimeConfig
    device: Any  # torch.device
    memory: MemoryPlan
    quiet: bool = False
    _client_holder: Any = field(default=None, repr=False)
    _ranks: Any = field(default=None, repr=False)

    @classmethod
    def from_config(cls, runtime_config, *, quiet: bool = False) -> Runtime:
        """Resolve ``runtime.device`` and ``runtime.memory_limit`` (an error names a bad value)."""
        from .devices import resolve_device

        return cls(config=runtime_config, device=resolve_device(runtime_config.device),
                   memory=MemoryPlan.from_config(runtime_config), quiet=quiet)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def client(self):
        """The Dask client (embedded LocalCluster or ``--scheduler``), started on first use."""
        from .distributed import ClientHolder

        if self._client_holder is None:
            self._client_holder = ClientHolder(self.config, self.memory)
        return self._client_holder.get()

    def stop_idle_cluster(self) -> None:
        """Close the embedded LocalCluster of worker threads between stages; the next stage that needs it starts it again.

        Idle, its scheduler and workers still tick (heartbeats, memory monitors): 0.06 CPU-s a second on the
        2-core VM, against 0.05 CPU-s to start it. A ``--scheduler`` connection, worker processes (seconds to
        start) and a cluster serving ``--runtime-dashboard`` stay up until :meth:`close`.
        """
        cfg = self.config
        if self._client_holder is not None and not (cfg.scheduler or cfg.worker_processes or cfg.dashboard):
            self._client_holder.close()
            self._client_holder = None

    def lost_workers(self) -> str | None:
        """Why the Dask work stopped when ``--scheduler`` had no worker left (None otherwise)."""
        return self._client_holder.lost if self._client_holder is not None else None

    @property
    def data_parallel(self) -> bool:
        """Whether autoencoders train on several ranks (``runtime.gpus`` > 1, or launched by torchrun)."""
        from .data_parallel import launched_by_torchrun

        return self.config.gpus > 1 or launched_by_torchrun()

    def ranks(self):
        """The :class:`~scgnn_scale.data_parallel.RankGroup`, started on first use; None on one rank."""
        if self._ranks is None and self.data_parallel:
            from .data_parallel import RankGroup

            self._ranks = RankGroup(self.config.gpus, self.device)
        return self._ranks

    def fit_autoencoder(self, model, optimizer, arrays, plan, **options) -> dict:
        """:func:`scgnn_scale.train.fit_autoencoder` here, or on every rank when training is data-parallel."""
        group = self.ranks()
        if group is None:
            from .train import fit_autoencoder

            return fit_autoencoder(model, optimizer, arrays, plan, **options)
        return group.fit_autoencoder(model, optimizer, arrays, plan, **options)

    def close(self) -> None:
        """Stop what :meth:`client` and :meth:`ranks` started."""
        if self._client_holder is not None:
            self._client_holder.close()
            self._client_holder = None
        if self._ranks is not None:
            self._ranks.close()
            self._ranks = None
