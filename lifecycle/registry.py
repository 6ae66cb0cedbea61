"""Model registry: a folder of immutable model versions, atomic pointers and an append-only event log.

```
registry/
  registry.json          format marker
  versions/<version>/    a checkpoint (manifest.json + reconstructor.safetensors) and what came with it
                         (gate.json: the retrain's evaluation and gate; dataset.json: the samples it saw)
  pointers.json          {"current", "previous", "candidate"}: rewritten whole, by rename (atomic)
  events.jsonl           one JSON line per event: registered, rejected, shadow, promoted, rolled_back, retired
  store/                 the accepted-sample store (lifecycle.samples), beside the models it trains
```
A version folder is written under a temporary name and renamed into place, so a reader sees a whole
version or none; nothing writes into it afterwards. Pointer moves and event appends hold a file lock,
so the agent, a retrain job and the CLI can act on one registry at once. Plain Python: no Ray.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adtr_edge.model.checkpoint import MANIFEST_FILE, CheckpointError, load_checkpoint, read_manifest

FORMAT = "adtr-edge-registry/1"
MARKER = "registry.json"
POINTERS = ("current", "previous", "candidate")
EVENTS = ("registered", "candidate", "rejected", "shadow", "promoted", "rolled_back", "retired", "load_failed")


class RegistryError(CheckpointError):
    """A registry operation that cannot be done as asked; the message says why."""


def is_registry(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON written to a temp file, fsynced and renamed in: a crash leaves the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:  # e.g. a full disk: the old file stays, the half-written one goes
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _why(exc: OSError) -> str:
    """An OSError in a line: copytree's shutil.Error lists (src, dst, why) per file; its first reason."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        return str(exc.args[0][0][-1])
    return exc.strerror or str(exc)


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if not is_registry(self.root):
            raise RegistryError(f"{self.root} is not a model registry ({MARKER} is missing); "
                                "create one with `adtr-edge models init`")
        self.versions_dir = self.root / "versions"
        self.store_dir = self.root / "store"

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, root: str | Path, first_model: str | Path, by: str) -> Registry:
        """A new registry serving `first_model` (a trained model folder) as its current version."""
        root = Path(root).expanduser()
        if is_registry(root):
            raise RegistryError(f"{root} is already a model registry")
        if root.exists() and any(root.iterdir()):
            raise RegistryError(f"{root} exists and is not empty; pick a new folder for the registry")
        (root / "versions").mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / MARKER, {"format": FORMAT, "created_at": _now_iso()})
        registry = cls(root)
        write_json_atomic(registry.root / "pointers.json", dict.fromkeys(POINTERS))
        version = registry.add_version(first_model, by=by, copy=True)
        registry.promote(version, by=by, reason="first version of the registry")
        return registry

    # ------------------------------------------------------------------ reading
    def pointers(self) -> dict[str, str | None]:
        path = self.root / "pointers.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path} cannot be read: {exc}") from exc
        return {name: data.get(name) for name in POINTERS}

    def version_dir(self, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise RegistryError(f"not a version name: {version!r}")
        path = self.versions_dir / version
        if not (path / MANIFEST_FILE).is_file():
            raise RegistryError(f"version {version} is not in the registry {self.root}")
        return path

    def current(self) -> str:
        version = self.pointers()["current"]
        if not version:
            raise RegistryError(f"{self.root}: no current version (promote one)")
        return version

    def current_dir(self) -> Path:
        return self.version_dir(self.current())

    def versions(self) -> list[dict[str, Any]]:
        """One summary per version, oldest first: version, created, threshold, gate, pointers naming it."""
        pointers = self.pointers()
        out = []
        for path in sorted(p for p in self.versions_dir.iterdir()
                           if not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()):  # not staging
            manifest = read_manifest(path)
            gate = _read_json(path / "gate.json")
            out.append({
                "version": path.name, "created_at": manifest.get("created_at"),
                "registered_at": _read_json(path / "registered.json").get("at"),
                "threshold": manifest.get("threshold"), "parent": manifest.get("parent_model_version"),
                "data": {k: manifest.get("data", {}).get(k) for k in ("fingerprint", "counts")},
                "gate": {k: gate.get(k) for k in ("passed", "reasons", "mode")} if gate else None,
                "pointers": [name for name in POINTERS if pointers[name] == path.name],
            })
        out.sort(key=lambda v: (v["registered_at"] or "", v["version"]))
        return out

    def show(self, version: str) -> dict[str, Any]:
        path = self.version_dir(version)
        return {"version": version, "path": str(path), "manifest": read_manifest(path),
                "gate": _read_json(path / "gate.json") or None,
                "dataset": _read_json(path / "dataset.json").get("counts"),
                "pointers": [n for n, v in self.pointers().items() if v == version],
                "events": [e for e in self.events() if e.get("version") == version]}

    def events(self, limit: int = 0) -> list[dict[str, Any]]:
        path = self.root / "events.jsonl"
        if not path.is_file():
            return []
        lines = path.read_text().splitlines()
        out = []
        for line in lines[-limit:] if limit else lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line after a crash: skip it, keep the rest
                continue
        return out

    # ------------------------------------------------------------------ writing
    @contextmanager
    def locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def record(self, event: str, version: str | None, by: str, reason: str = "", **details: Any) -> dict[str, Any]:
        """Append one event (under the lock: lines never interleave)."""
        if event not in EVENTS:
            raise ValueError(f"unknown registry event {event!r}")
        entry = {"at": _now_iso(), "ts": time.time(), "event": event, "version": version, "by": by,
                 "reason": reason, **details}
        with self.locked():
            with open(self.root / "events.jsonl", "ab+") as fh:
                # A write cut off (a full disk, a crash) leaves a torn last line: start on a fresh line, or
                # this event would be glued to the fragment and both lost to the reader.
                size = fh.seek(0, os.SEEK_END)
                torn = size > 0 and fh.seek(size - 1) >= 0 and fh.read(1) != b"\n"
                fh.write((("\n" if torn else "") + json.dumps(entry, sort_keys=True) + "\n").encode())
                fh.flush()
                os.fsync(fh.fileno())
        return entry

    def add_version(self, model_dir: str | Path, by: str, copy: bool = False,
                    extra: dict[str, Any] | None = None) -> str:
        """Take a finished model folder in as an immutable version (renamed in; copied when `copy`).
        `extra`: JSON files to write beside it first ({"gate.json": {...}, "dataset.json": {...}})."""
        model_dir = Path(model_dir)
        version = str(read_manifest(model_dir)["model_version"])
        target = self.versions_dir / version
        if target.exists():
            raise RegistryError(f"version {version} is already in the registry")
        staging = self.versions_dir / f".incoming-{version}-{os.getpid()}"
        try:
            if copy:
                shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns("train_state.pt*"))
            else:
                model_dir.rename(staging)
            for name, data in {**(extra or {}), "registered.json": {"at": _now_iso(), "by": by}}.items():
                write_json_atomic(staging / name, data)
            staging.rename(target)
        except OSError as exc:  # e.g. a full disk mid-copy: no half version is left, the source is kept
            if copy:
                shutil.rmtree(staging, ignore_errors=True)
            elif staging.exists() and not model_dir.exists():
                staging.rename(model_dir)
            raise RegistryError(f"version {version} could not be registered in {self.versions_dir}: "
                                f"{_why(exc)}; the registry is unchanged") from exc
        _fsync_dir(self.versions_dir)
        self.record("registered", version, by, source=str(model_dir))
        return version

    def _move(self, by: str, event: str, version: str | None, reason: str, **changes: str | None) -> dict:
        with self.locked():
            pointers = self.pointers()
            pointers.update(changes)
            write_json_atomic(self.root / "pointers.json", pointers)
        self.record(event, version, by, reason, pointers=pointers)
        return pointers

    def promote(self, version: str, by: str, reason: str = "", verify: bool = True) -> dict[str, str | None]:
        """current → previous, `version` → current (and off candidate). `verify`: its weights must match
        their manifest hash first (a damaged version is refused before any pointer moves)."""
        path = self.version_dir(version)
        if verify:
            load_checkpoint(path)
        pointers = self.pointers()
        if pointers["current"] == version:
            raise RegistryError(f"{version} is already the current version")
        changes = {"current": version, "previous": pointers["current"]}
        if pointers["candidate"] == version:
            changes["candidate"] = None
        return self._move(by, "promoted", version, reason, **changes)

    def rollback(self, by: str, reason: str = "") -> dict[str, str | None]:
        """previous → current; the rolled-back version becomes previous (a second rollback undoes it)."""
        pointers = self.pointers()
        if not pointers["previous"]:
            raise RegistryError("nothing to roll back to: the registry has no previous version")
        load_checkpoint(self.version_dir(pointers["previous"]))
        return self._move(by, "rolled_back", pointers["previous"], reason,
                          current=pointers["previous"], previous=pointers["current"])

    def set_candidate(self, version: str | None, by: str, reason: str = "", event: str = "shadow") -> dict:
        if version is not None:
            self.version_dir(version)
        return self._move(by, event, version, reason, candidate=version)

    def reject(self, version: str, by: str, reason: str, **details: Any) -> None:
        """A version the gate (or a failed load) refused: it stays on disk for inspection, never served."""
        if self.pointers()["candidate"] == version:
            self._move(by, "rejected", version, reason, candidate=None)
        else:
            self.record("rejected", version, by, reason, **details)

    def retain(self, keep_last: int, by: str = "retention") -> list[str]:
        """Delete all but the newest `keep_last` versions, never one a pointer names."""
        named = {v for v in self.pointers().values() if v}
        versions = [v["version"] for v in self.versions()]
        doomed = [v for v in versions[: max(0, len(versions) - keep_last)] if v not in named]
        for version in doomed:
            trash = self.versions_dir / f".retired-{version}"
            (self.versions_dir / version).rename(trash)  # out of sight first, then delete
            shutil.rmtree(trash, ignore_errors=True)
            self.record("retired", version, by, f"retention keeps the last {keep_last} versions")
        return doomed


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def resolve_model(path: str | Path, version: str | None = None) -> tuple[Path, Registry | None]:
    """A registry (its `version`, or current) or a plain model folder → (model folder, registry or None)."""
    path = Path(path).expanduser()
    if is_registry(path):
        registry = Registry(path)
        return registry.version_dir(version or registry.current()), registry
    if version is not None and version != str(read_manifest(path).get("model_version")):
        raise RegistryError(f"{path} is a plain model folder holding {read_manifest(path).get('model_version')}, "
                            f"not version {version}")
    return path, None
