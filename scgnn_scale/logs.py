"""The package logger ``scgnn_scale``: what reaches a terminal, a notebook and ``RUN_DIR/run.log``.

Like scanpy and scvi-tools, the package prints its progress without the user configuring logging:
a handler on the package logger writes to the current ``sys.stderr`` (so a notebook shows it). It
stands back when the root logger has handlers of its own (``logging.basicConfig``, pytest), which
then get the records through propagation, so nothing is printed twice. :func:`set_verbosity`
chooses how much is printed; the run log always gets INFO and above.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "scgnn_scale"
logger = logging.getLogger(LOGGER_NAME)

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _ConsoleHandler(logging.StreamHandler):
    """Writes to the stderr of the moment (notebooks and test runners replace it) unless root has handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the root's handlers print it
        self.stream = sys.stderr
        super().emit(record)


def _console_handler() -> _ConsoleHandler:
    for h in logger.handlers:
        if isinstance(h, _ConsoleHandler):
            return h
    h = _ConsoleHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(message)s"))
    h.setLevel(logging.INFO)
    logger.addHandler(h)
    return h


def set_verbosity(level: str | int = "info") -> None:
    """Print messages of ``level`` and above ('debug', 'info', 'warning', 'error' or a logging level).

    The logger itself stays at INFO or below, so ``RUN_DIR/run.log`` keeps every stage's record.
    """
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"verbosity {level!r}: not one of {', '.join(LEVELS)}")
        level = LEVELS[level.lower()]
    _console_handler().setLevel(level)
    logger.setLevel(min(level, logging.INFO))


def verbosity() -> int:
    return _console_handler().level


_console_handler()
if logger.level == logging.NOTSET:
    logger.setLevel(logging.INFO)
