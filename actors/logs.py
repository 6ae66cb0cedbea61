"""structlog set-up: readable lines in a terminal, one JSON object per line otherwise."""
from __future__ import annotations

import logging
import sys
import threading

import structlog


class StderrLogger:
    """Writes each line to the process's stderr *of the moment*. structlog's PrintLogger keeps the stream it
    was given, and a stream captured at configure time can be closed later (pytest's capture of a test
    that ran the CLI in-process: every later log line then raised "I/O operation on closed file")."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = err = critical = exception = fatal = failure = msg


def _stderr_logger(*_args) -> StderrLogger:
    return StderrLogger()


def configure_logging(level: str = "info", json_output: bool | None = None) -> None:
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
