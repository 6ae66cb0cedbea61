"""Small shared parts: the private-file writer and waiting for progress."""
from __future__ import annotations

import stat
import time

from adtr_edge.agent.private import create_private
from adtr_edge.agent.waiting import wait_until


def test_a_secret_file_is_created_private_and_never_overwritten(tmp_path):
    path = tmp_path / "deep" / "token"
    assert create_private(path, "first\n") is True
    assert path.read_text() == "first\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert create_private(path, "second\n") is False  # O_EXCL: an existing secret stays as it is
    assert path.read_text() == "first\n"


def test_wait_until_returns_at_the_first_true_and_false_after_its_time():
    started = time.monotonic()
    calls = iter([False, False, True])
    assert wait_until(lambda: next(calls), timeout_s=60, poll_s=0.01)
    assert time.monotonic() - started < 30  # it did not wait out the timeout (a generous bound: a busy box)
    assert wait_until(lambda: False, timeout_s=0.05, poll_s=0.01) is False
