"""``--memory-limit``: one memory budget for the whole run, shared out among the parts that hold data.

What grows with a bigger budget is only what may be *held* instead of streamed: the autoencoders'
rows (``feature.memory_budget_mb``, ``iterate.cluster_memory_budget_mb``), the rows buffered while
``iterate`` lays clusters out (``iterate.scatter_buffer_mb``) and the Dask workers' memory. With a
limit set, each of those is capped at its share of the limit (the configured value still applies
when it is smaller). Results do not change: a loader serves the same batches from memory or from
the store, and the scatter buffer only sets how often rows are flushed.

Shares of the limit: loaders 25% (one loader runs at a time in the driver; a Dask worker training a
cluster AE gets the same cap divided among the workers), scatter buffer 10%, Dask workers 50%. The
rest is left for what is O(N) rather than O(N x G) (embeddings, the KNN graph, labels) and for the
interpreter and libraries (about 400 MB). Dask's own limit: worker *processes* get ``50% / n_workers``
each; worker *threads* (the default) live in the driver's process, whose memory they all watch, so
each gets the whole limit (Dask spills and pauses against the process's memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError

LOADER_SHARE = 0.25
SCATTER_SHARE = 0.10
DASK_SHARE = 0.50
#: below this nothing useful runs (the interpreter, torch and the libraries alone take ~400 MB)
MIN_LIMIT = 1 << 30

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of a size such as '4GiB', '4 GB', '512MiB', '4g' or '4294967296'."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise InputError(f"--memory-limit {text!r}: not a size (examples: 4GiB, 8GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class MemoryPlan:
    """The caps that follow from ``runtime.memory_limit`` (no caps when it is empty)."""

    limit_bytes: int | None = None

    @classmethod
    def from_config(cls, runtime_config) -> MemoryPlan:
        text = getattr(runtime_config, "memory_limit", "") or ""
        if not text.strip():
            return cls(None)
        limit = parse_size(text)
        if limit < MIN_LIMIT:
            raise InputError(f"--memory-limit {text!r}: at least 1 GiB is needed (the libraries alone take ~400 MB)")
        return cls(limit)

    def _cap_mb(self, requested_mb: float, share: float, parts: int = 1) -> float:
        if self.limit_bytes is None:
            return float(requested_mb)
        return min(float(requested_mb), self.limit_bytes * share / max(1, parts) / 2**20)

    def loader_mb(self, requested_mb: float, parts: int = 1) -> float:
        """Rows an autoencoder's loader may hold in memory (MiB); ``parts`` loaders running at once."""
        return self._cap_mb(requested_mb, LOADER_SHARE, parts)

    def scatter_mb(self, requested_mb: float) -> float:
        """Rows buffered while laying clusters out and putting them back (MiB)."""
        return self._cap_mb(requested_mb, SCATTER_SHARE)

    def dask_worker_limit(self, n_workers: int, processes: bool) -> int | None:
        """``memory_limit`` for each worker of the embedded LocalCluster, in bytes (None: Dask's default)."""
        if self.limit_bytes is None:
            return None
        if processes:
            return int(self.limit_bytes * DASK_SHARE / max(1, n_workers))
        return int(self.limit_bytes)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB): where it jumps, that step set the peak."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def release_freed_memory(*, freeze_survivors: bool = False) -> None:
    """Hand memory that Python and torch have freed back to the OS (glibc only; a no-op elsewhere).

    Worker threads that trained autoencoders leave their freed buffers in per-thread malloc arenas,
    which count in the RSS until trimmed: without this the 10k-cell run peaked at 2.4 GB.

    ``freeze_survivors`` (between stages): what outlives the collection (imported modules, the run's
    store and config: 600k objects once torch is imported, 0.4 CPU-s a collection) is moved out of
    the collector's sight, so later collections walk only what is new. A frozen object that becomes
    cyclic garbage waits for :func:`unfreeze_survivors` at the run's end; refcounting still frees the rest.
    """
    import ctypes
    import gc

    gc.collect()
    if freeze_survivors:
        gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def unfreeze_survivors() -> None:
    """Give what :func:`release_freed_memory` froze back to the collector (the run has ended; a caller's
    notebook goes on)."""
    import gc

    gc.unfreeze()
