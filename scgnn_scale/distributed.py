"""The Dask client: an embedded LocalCluster sized to the machine, or an existing scheduler by address."""

from __future__ import annotations

import logging
import os
import threading
import time

from .errors import InputError, shown
from .memory import MemoryPlan

log = logging.getLogger("scgnn_scale")


class ClientHolder:
    """Starts the client on first use and closes what it started."""

    def __init__(self, runtime_config, memory: MemoryPlan):
        self.cfg = runtime_config
        self.memory = memory
        self._client = None
        self._cluster = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        #: set when the scheduler had no worker for ``runtime.worker_timeout`` seconds: why the run stops
        self.lost: str | None = None

    def get(self):
        if self._client is not None:
            return self._client
        from distributed import Client, LocalCluster

        # the scheduler's and workers' INFO chatter is not for our users
        for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker"):
            logging.getLogger(name).setLevel(logging.ERROR)

        if self.cfg.scheduler:
            try:
                self._client = Client(self.cfg.scheduler, timeout="20s")
            except (OSError, TimeoutError, ValueError) as exc:  # ValueError: an address Dask cannot parse
                raise InputError(f"--scheduler {shown(self.cfg.scheduler)}: cannot connect ({exc})") from None
            log.info("dask: connected to %s", self.cfg.scheduler)
            self._watchdog = threading.Thread(target=self._watch_workers, name="scgnn-worker-watchdog", daemon=True)
            self._watchdog.start()
        else:
            n = self.cfg.n_workers or os.cpu_count() or 1
            # threads by default: the work (numpy, zarr codecs, torch) releases the GIL, and worker processes
            # would re-import a user's script that lacks an `if __name__ == "__main__"` guard
            # an embedded cluster serves this process, not the network: its scheduler, workers and their
            # HTTP servers (dashboard, health, metrics) listen on loopback only, on free ports
            kwargs = {"n_workers": n, "threads_per_worker": 1, "processes": self.cfg.worker_processes,
                      "dashboard_address": self.cfg.dashboard or "127.0.0.1:0",
                      "worker_dashboard_address": "127.0.0.1:0", "silence_logs": logging.ERROR}
            if not self.cfg.dashboard:  # no dashboard unless asked for
                kwargs["scheduler_kwargs"] = {"dashboard": False}
            if self.cfg.worker_processes:  # threads talk in-process; processes over TCP
                kwargs["host"] = "127.0.0.1"
            limit = self.memory.dask_worker_limit(n, self.cfg.worker_processes)
            if limit is not None:
                kwargs["memory_limit"] = limit
            try:
                self._cluster = LocalCluster(**kwargs)
            except (RuntimeError, OSError, ValueError) as exc:
                if not self.cfg.dashboard:
                    raise
                # e.g. a host name that does not resolve, or a port in use or not allowed
                why = str(exc).splitlines()[0] if str(exc) else repr(exc)
                raise InputError(f"--runtime-dashboard {shown(self.cfg.dashboard)}: the embedded cluster cannot serve "
                                 f"its dashboard there ({why})") from None
            self._client = Client(self._cluster)
            log.info("dask: embedded LocalCluster with %d worker(s)%s", n,
                     f", dashboard at {self._client.dashboard_link}" if self.cfg.dashboard else "")
        return self._client

    def _watch_workers(self) -> None:
        """Stop the run when the scheduler has had no worker for ``runtime.worker_timeout`` seconds.

        A Dask client waits for workers forever; a run whose workers all died (or never came) would hang
        without a word. Closing the client wakes every wait on its futures; the pipeline then reports
        :attr:`lost` as the reason.
        """
        timeout = float(self.cfg.worker_timeout)
        empty_since = None
        while not self._stop.wait(1.0):
            try:
                n = len(self._client.scheduler_info().get("workers", {}))
            except Exception:  # a scheduler that went away has no workers either
                n = 0
            if n:
                empty_since = None
                continue
            empty_since = empty_since or time.monotonic()
            if time.monotonic() - empty_since >= timeout:
                self.lost = (f"--scheduler {self.cfg.scheduler}: no Dask worker for {timeout:g} s "
                             "(runtime.worker_timeout); start workers and rerun the same command to resume")
                log.error("%s", self.lost)
                self._client.close()
                return

    def close(self) -> None:
        self._stop.set()
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._client = self._cluster = None
