"""Run a command and report wall seconds, CPU seconds and the peak resident memory of its whole process tree.

Used by the bench scripts: ``python bench/measure.py -- scgnn-scale run ...`` prints JSON.
The tree (the command, Dask workers, their children) is sampled every 0.1 s with psutil. CPU seconds
(user + system) are the kernel's count for the command and every descendant it waited for
(``RUSAGE_CHILDREN`` before and after), so processes that end between two samples are counted too.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time

import psutil


def run_measured(cmd: list[str], **popen_kw) -> dict:
    """Run ``cmd``; return {seconds, cpu_seconds, peak_rss_mb, returncode}. Raises if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen_kw)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
            except psutil.Error:
                pass
            done.wait(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rc = proc.wait()
    done.set()
    thread.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {"seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(cpu, 2),
              "peak_rss_mb": round(peak / 2**20, 1), "returncode": rc}
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {rc}")
    return result


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    print(json.dumps(run_measured(args)))
