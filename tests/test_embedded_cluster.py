"""The embedded Dask cluster serves this process only: everything it opens listens on loopback."""

import ipaddress

import psutil
import pytest

from scgnn_scale.config import RuntimeConfig
from scgnn_scale.runtime import Runtime


@pytest.mark.parametrize("processes", [False, True])
def test_embedded_cluster_listens_on_loopback_only(processes):
    runtime = Runtime.from_config(RuntimeConfig(n_workers=2, worker_processes=processes), quiet=True)
    try:
        assert runtime.client().submit(sum, [1, 2]).result() == 3
        me = psutil.Process()
        listening = {(c.laddr.ip, c.laddr.port) for p in [me, *me.children(recursive=True)]
                     for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    finally:
        runtime.close()
    assert listening  # the scheduler's or the workers' HTTP servers at least
    assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in listening), listening


def test_idle_cluster_of_threads_is_stopped_between_stages_and_started_again():
    runtime = Runtime.from_config(RuntimeConfig(n_workers=1), quiet=True)
    try:
        first = runtime.client()
        runtime.stop_idle_cluster()
        assert first.status == "closed"
        assert runtime.client().submit(sum, [1, 2]).result() == 3  # the next stage starts one again
    finally:
        runtime.close()


def test_cluster_of_worker_processes_stays_up_between_stages():
    runtime = Runtime.from_config(RuntimeConfig(n_workers=1, worker_processes=True), quiet=True)
    try:
        client = runtime.client()
        runtime.stop_idle_cluster()  # seconds to start again: kept
        assert client.status == "running" and runtime.client() is client
    finally:
        runtime.close()
