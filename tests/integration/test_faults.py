"""Faults of the box itself, with real parts: a full disk (a real, small tmpfs) under the registry and the
sample store, and the process killed (SIGKILL) in the middle of promotions and accepts. Each checks that
nothing acknowledged is lost, nothing half-written is visible, the error says what happened, and the same
registry and store work again once the cause is gone.

Mounting needs root: sessions and CI run as root (../shared/docs/environment.md). A box without it fails
here, saying so, rather than skipping."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adtr_edge.lifecycle.registry import Registry, RegistryError
from adtr_edge.lifecycle.samples import SampleStore, StoreError, StoreLimits
from adtr_edge.model.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB filesystem (tmpfs): writes past it fail with ENOSPC, as on a full edge-box disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode:
        pytest.fail(f"mounting a small tmpfs needs root (as sessions and CI run): {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, name: str, leave: int = 0) -> Path:
    """Take the filesystem's free bytes but `leave`; the file returned gives them back when deleted."""
    filler = disk / name
    with open(filler, "wb") as fh:
        try:
            while shutil.disk_usage(disk).free > leave:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:  # full
            pass
    return filler


def _variant(model: Path, dst: Path, version: str) -> Path:
    shutil.copytree(model, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["model_version"] = version
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_a_full_disk_under_the_registry_leaves_no_half_version_and_no_lost_event(trained_model, small_disk,
                                                                               tmp_path):
    registry = Registry.create(small_disk / "registry", trained_model, by="test")  # ~5 MB of 16
    first = registry.current()
    second = _variant(trained_model, tmp_path / "v2", "v2-full-disk")
    some = _fill(small_disk, "some", leave=2 << 20)  # 2 MiB left: a new version runs out mid-copy
    with pytest.raises(RegistryError, match="could not be registered.*No space left.*unchanged"):
        registry.add_version(second, "test", copy=True)
    assert [v["version"] for v in registry.versions()] == [first]
    assert not [p.name for p in registry.versions_dir.iterdir() if p.name.startswith(".")]  # no staging left
    assert second.is_dir() and registry.pointers()["current"] == first

    rest = _fill(small_disk, "rest")  # now even a pointer file cannot be written
    with pytest.raises(OSError):
        registry.set_candidate(first, "test")
    assert registry.pointers() == {"current": first, "previous": None, "candidate": None}
    assert not list(registry.root.glob(".pointers.json.*.tmp"))
    before = len(registry.events())

    some.unlink()  # space again: the same registry works, and its log lost no complete event
    rest.unlink()
    registry.set_candidate(first, "test", reason="after the disk was freed")
    assert registry.pointers()["candidate"] == first
    events = registry.events()
    assert len(events) == before + 1 and events[-1]["reason"] == "after the disk was freed"
    assert registry.add_version(second, "test", copy=True) == "v2-full-disk"
    load_checkpoint(registry.version_dir("v2-full-disk"))  # whole, hash-checked
    registry.promote("v2-full-disk", "test")


def test_a_torn_event_line_does_not_swallow_the_next_event(trained_model, tmp_path):
    registry = Registry.create(tmp_path / "registry", trained_model, by="test")
    with open(registry.root / "events.jsonl", "a") as fh:
        fh.write('{"at": "2026-12-08", "event": "promo')  # a write cut off by a crash or a full disk
    registry.record("shadow", registry.current(), "test", reason="after the torn line")
    events = registry.events()
    assert events[-1]["reason"] == "after the torn line" and all("event" in e for e in events)


def test_a_full_disk_under_the_sample_store_refuses_clearly_and_keeps_every_acknowledged_sample(small_disk):
    store = SampleStore(small_disk / "store", StoreLimits(max_normals_per_camera=10_000,
                                                         max_bytes_per_camera=1 << 40))
    rng = random.Random(0)
    acknowledged: list[str] = []
    with pytest.raises(StoreError, match="nothing was stored"):
        for seq in range(1000):  # 256 KiB images until the 16 MiB disk is full
            acknowledged.append(store.add(rng.randbytes(256 * 1024), "operator", "test", ".png", "cam-1", seq).sha256)
    assert 20 < len(acknowledged) < 64
    _check_store(store, acknowledged)
    assert not list(store.blobs.rglob("*.tmp"))  # nothing half-written left behind

    store.remove(acknowledged.pop(0), "test")  # room again: the same store takes the next image
    store.remove(acknowledged.pop(0), "test")
    acknowledged.append(store.add(rng.randbytes(256 * 1024), "operator", "test", ".png", "cam-1", 5000).sha256)
    _check_store(store, acknowledged)


def _check_store(store: SampleStore, acknowledged: list[str]) -> None:
    """Every acknowledged sample has its row and its intact file; the index is sound."""
    import hashlib

    for sha in acknowledged:
        row = store.find(sha)
        assert row is not None, sha
        assert hashlib.sha256(store.blob_path(sha, row["ext"]).read_bytes()).hexdigest() == sha
    assert store.total() == len(acknowledged)
    db = sqlite3.connect(store.root / "index.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


CHILD = textwrap.dedent("""
    import random, sys
    from adtr_edge.lifecycle.registry import Registry
    from adtr_edge.lifecycle.samples import SampleStore
    registry, store = Registry(sys.argv[1]), SampleStore(sys.argv[2])
    versions, rng = sys.argv[3].split(","), random.Random(int(sys.argv[4]))
    i = versions.index(registry.current())
    print("READY", flush=True)
    while True:
        if rng.random() < 0.5:  # a promotion: the next version in the cycle
            i = (i + 1) % len(versions)
            registry.promote(versions[i], "child", verify=False)
            print("PROMOTED", versions[i], flush=True)
        else:  # an accept
            sha = store.add(rng.randbytes(2048), "operator", "child", ".png", "cam-1", rng.randrange(1 << 30)).sha256
            print("ACCEPTED", sha, flush=True)
""")


def test_killed_mid_promotion_or_accept_nothing_acknowledged_is_lost(trained_model, tmp_path):
    """SIGKILL (the OOM killer, a power cut) at random points of a process promoting and accepting: after each
    kill, the registry serves the last acknowledged version or the one whose promotion was under way, every
    acknowledged sample is there with its file, and the next process carries on with both."""
    registry = Registry.create(tmp_path / "registry", trained_model, by="test")
    versions = [registry.current()] + [registry.add_version(_variant(trained_model, tmp_path / f"v{i}", f"cycle-{i}"),
                                                           "test", copy=True) for i in (2, 3)]
    store_dir = tmp_path / "store"
    SampleStore(store_dir).close()
    accepted: list[str] = []
    rng = random.Random(1)
    for round_ in range(5):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(registry.root), str(store_dir), ",".join(versions),
                                  str(round_)], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        last = registry.current()
        for _ in range(rng.randrange(5, 60)):  # let it acknowledge a random number of operations, then kill
            kind, value = child.stdout.readline().split()
            if kind == "PROMOTED":
                last = value
            else:
                accepted.append(value)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        current = Registry(registry.root).current()
        assert current in (last, versions[(versions.index(last) + 1) % len(versions)]), (round_, last, current)
        load_checkpoint(registry.version_dir(current))  # the served version loads, hash-checked
        assert all("event" in e for e in registry.events())
        store = SampleStore(store_dir)
        missing = [sha for sha in accepted if store.find(sha) is None]
        assert not missing, f"round {round_}: {len(missing)} acknowledged samples lost"
        assert not [sha for sha in accepted if not store.blob_path(sha, ".png").is_file()]
        store.close()
    assert len(accepted) > 20
