"""structlog set-up: readable lines in a terminal, one JSON object per line otherwise.

Standard-library loggers (Ray's, waitress', Flask's) go through the same processors, so a JSON stream holds
only JSON lines; an exception's traceback is kept, as text in the line's `exception` key.
"""
from __future__ import annotations

import logging
import sys
import threading

import structlog

# Libraries that set up handlers of their own (Ray at import and at ray.init): their lines are routed
# through ours instead (`route_library_loggers`).
LIBRARY_LOGGERS = ("ray", "waitress", "werkzeug", "filelock", "urllib3")


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


class _StderrHandler(logging.Handler):
    """A standard-library handler that writes through StderrLogger (the current stderr, one lock)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            StderrLogger().msg(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller (logging's own rule)
            self.handleError(record)


def _shared_processors() -> list:
    return [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True)]


def configure_logging(level: str = "info", json_output: bool | None = None) -> None:
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    # In JSON, exc_info becomes the traceback's text (without this the line said `"exc_info": true`).
    tracebacks = [structlog.processors.format_exc_info] if json_output else []
    numeric = getattr(logging, level.upper())
    structlog.configure(
        processors=[*_shared_processors(), structlog.processors.StackInfoRenderer(), *tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tracebacks, renderer]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(numeric, logging.INFO))  # at --log-level debug, the libraries' debug lines stay out
    route_library_loggers()


def route_library_loggers() -> None:
    """Send the libraries' loggers to the root handler (ours); call again after a library reconfigures
    its own (ray.init does)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True


def node_id() -> str | None:
    """The Ray node this process runs on, for an actor's stats (None outside Ray: a class built in a test)."""
    import ray

    try:
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - where it runs is information, never a reason to fail
        return None
