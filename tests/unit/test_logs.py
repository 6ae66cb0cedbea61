"""Logging keeps working when the stream it was configured with is gone."""
from __future__ import annotations

import io
import sys

import structlog

from actors.logs import configure_logging


def test_log_lines_go_to_the_current_stderr_even_after_the_configured_one_closed(monkeypatch):
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("info", json_output=True)  # as the CLI does, in-process, under a captured stderr
    structlog.get_logger().info("one")
    first.close()  # pytest closes a test's capture; a CLI's redirected stderr can go too
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    structlog.get_logger().info("two", n=2)
    assert '"event": "two"' in second.getvalue() and '"n": 2' in second.getvalue()
