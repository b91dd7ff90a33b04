"""Progress of long work: a live bar on a terminal or in a notebook, a log line a minute elsewhere.

A tqdm bar redraws itself with carriage returns and escape codes, which fill a log file or a CI
log with unreadable lines. Where nobody watches a terminal, :class:`LogProgress` writes one plain
line through the package logger every ``interval`` seconds instead (and so into ``run.log``).
"""

from __future__ import annotations

import logging
import sys
import time

LOG_INTERVAL_S = 60.0
CLOSE_LINE_AFTER_S = 5.0


def interactive() -> bool:
    """Whether a person watches the output: stderr is a terminal, or the code runs in a Jupyter kernel."""
    if sys.stderr.isatty():
        return True
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython() if hasattr(shell, "get_ipython") else None
    return type(ip).__name__ == "ZMQInteractiveShell"


class LogProgress:
    """The part of tqdm's interface the package uses (update, total, n, set_postfix, close), as log lines."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
                 interval: float = LOG_INTERVAL_S, logger: logging.Logger | None = None, **_ignored):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval = interval
        self.log = logger or logging.getLogger("scgnn_scale")
        self._start = self._last = time.monotonic()
        self._start_n = initial
        self._postfix = ""
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.log.info("%s", self._line(now))

    def _line(self, now: float) -> str:
        done = f"{self.n:,}/{self.total:,}" if self.total else f"{self.n:,}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
        rate_text = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
        return f"{self.desc}: {done} {self.unit}{pct}, {rate_text} {self.unit}/s{self._postfix}"

    def set_postfix(self, **kw) -> None:
        self._postfix = "".join(f", {k} {v}" for k, v in kw.items())

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        """A last line for work that took a while, so a log shows how long each part took."""
        now = time.monotonic()
        if not self._closed and self.interval != float("inf") and now - self._start >= CLOSE_LINE_AFTER_S:
            self.log.info("%s (done in %.1f s)", self._line(now), now - self._start)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, unit: str = "it", *, quiet: bool = False, **kw):
    """A tqdm bar when someone watches, :class:`LogProgress` otherwise; nothing visible with ``quiet``."""
    if quiet or not interactive():
        kw.pop("mininterval", None)
        kw.pop("unit_scale", None)
        bar = LogProgress(total=total, desc=desc, unit=unit, **kw)
        if quiet:
            bar.interval = float("inf")
        return bar
    from tqdm.auto import tqdm

    kw.setdefault("unit_scale", True)
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, **kw)
