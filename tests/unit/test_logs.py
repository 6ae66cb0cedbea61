"""Logging keeps working when the stream it was configured with is gone."""
from __future__ import annotations

import io
import json
import logging
import sys

import structlog

from adtr_edge.actors.logs import configure_logging


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


def test_an_exception_keeps_its_traceback_in_the_json_line(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info", json_output=True)
    try:
        raise ValueError("the disk said no")
    except ValueError:
        structlog.get_logger().exception("cannot save", camera_id="cam-1")
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["event"] == "cannot save" and line["camera_id"] == "cam-1" and "exc_info" not in line
    assert ("Traceback (most recent call last)" in line["exception"]
            and "ValueError: the disk said no" in line["exception"])


def test_library_loggers_come_out_as_json_lines_too(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    import ray  # noqa: F401 - Ray sets up its own handler on import; ours must win after configure
    configure_logging("info", json_output=True)
    logging.getLogger("waitress").warning("Task queue depth is %d", 4)
    logging.getLogger("ray").warning("worker died")
    logging.getLogger("some.library").info("plain stdlib")
    lines = [json.loads(line) for line in stream.getvalue().strip().splitlines()]  # every line is JSON
    assert [(d["event"], d["logger"], d["level"]) for d in lines] == [
        ("Task queue depth is 4", "waitress", "warning"), ("worker died", "ray", "warning"),
        ("plain stdlib", "some.library", "info")]
