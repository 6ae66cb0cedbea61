"""The console's audit log: one JSON line per action (who, when, what, on what, with what result).

Labels also land in the sample store's own event log and model moves in the registry's; this log holds
every console action, including logins, refusals and skips, and tells the review page which frames
were already handled.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

KEEP_IN_MEMORY = 1000
REVIEW_ACTIONS = ("accept_normal", "confirm_defect", "skip")


class AuditLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.recent: deque[dict[str, Any]] = deque(maxlen=KEEP_IN_MEMORY)
        self.reviewed: dict[str, dict[str, Any]] = {}  # "<camera>/<stem>" → the last review action on it
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        self._remember(json.loads(line))
                    except (json.JSONDecodeError, TypeError, AttributeError):
                        continue  # a torn last line after a crash

    def _remember(self, entry: dict[str, Any]) -> None:
        self.recent.append(entry)
        if entry.get("action") in REVIEW_ACTIONS and entry.get("ok") and entry.get("frame"):
            self.reviewed[entry["frame"]] = {k: entry.get(k) for k in ("action", "by", "at")}

    def record(self, by: str, role: str, action: str, ok: bool = True, frame: str | None = None,
               address: str | None = None, **detail: Any) -> dict[str, Any]:
        entry = {"at": time.time(), "by": by, "role": role, "action": action, "ok": ok, "frame": frame,
                 "address": address, **detail}
        line = json.dumps(entry, sort_keys=True, default=str)
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._remember(entry)
        return entry

    def tail(self, limit: int = 100, actions: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        with self.lock:
            entries = [e for e in self.recent if actions is None or e.get("action") in actions]
        return list(reversed(entries[-limit:]))

    def review_state(self, frame: str) -> dict[str, Any] | None:
        return self.reviewed.get(frame)
