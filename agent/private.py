"""Secrets on disk: files only their owner can read."""
from __future__ import annotations

import os
from pathlib import Path


def create_private(path: Path, text: str) -> bool:
    """Write `text` to `path` with mode 0600 when nothing is there yet; True when it wrote. O_EXCL: never over
    an existing file, even one another process created between a check and the open."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return True
