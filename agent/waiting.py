"""Waiting for progress, never for a fixed time."""
from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout_s: float, poll_s: float = 0.1) -> bool:
    """True as soon as `predicate()` is true; after `timeout_s`, whatever it says then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return bool(predicate())
