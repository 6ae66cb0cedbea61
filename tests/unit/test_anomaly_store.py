"""The anomaly output folder stays under its size cap, deleting the oldest files first."""
from __future__ import annotations

import os
import time

from adtr_edge.actors.scoring import AnomalyStore


def test_the_store_deletes_oldest_files_first_to_stay_under_its_cap(tmp_path):
    store = AnomalyStore(tmp_path, max_bytes=10_000)
    for i in range(8):
        store.write("cam", f"frame{i}", {".jpg": b"x" * 2000, ".json": b"{}"})
    names = sorted(p.name for p in (tmp_path / "cam").iterdir())
    assert store.total <= 10_000 and store.total == sum(p.stat().st_size for p in (tmp_path / "cam").iterdir())
    assert "frame7.jpg" in names and "frame0.jpg" not in names  # the newest stay
    assert store.deleted > 0


def test_a_restarted_store_counts_what_is_already_on_disk(tmp_path):
    (tmp_path / "cam").mkdir()
    for i in range(3):
        path = tmp_path / "cam" / f"old{i}.jpg"
        path.write_bytes(b"y" * 4000)
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
    store = AnomalyStore(tmp_path, max_bytes=10_000)
    assert store.total == 12_000  # found on disk; trimmed at the next write
    store.write("cam", "new", {".jpg": b"z" * 1000})
    left = sorted(p.name for p in (tmp_path / "cam").iterdir())
    assert left == ["new.jpg", "old1.jpg", "old2.jpg"]
