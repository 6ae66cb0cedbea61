"""The accepted-sample store: what the model learns from on the line. Durable, bounded, audited.

Images are content-addressed files (`blobs/ab/<sha256><ext>`, so an exact duplicate costs nothing);
an SQLite index (synchronous FULL; WAL, or a rollback journal for shared storage: see JOURNAL_FILE)
says what each one is:

- origin `base`: the original training set; `auto`: frames the serving model scored confidently normal
  (sampled by the agent); `operator`: frames a person accepted as normal (e.g. a false alarm);
  `confirmed_defect`: frames a person confirmed as defective (kept apart: validation, the gate, ADTR+).
- split, fixed per image by its hash: normals 70 % train / 15 % val (threshold) / 15 % holdout (the
  gate); defects 50 % train (ADTR+) / 50 % holdout.

A blob is on disk (fsynced) before its row commits, so an acknowledged sample survives a crash. Per
camera, normals are capped by count and bytes (the oldest `auto` ones go first, then `operator`);
`base` is never evicted. Every change is an audit event (who, when, what). Plain Python, no Ray.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORIGINS = ("base", "auto", "operator", "confirmed_defect")
NORMAL_ORIGINS = ("base", "auto", "operator")
SPLITS = ("train", "val", "holdout")
# Which origin may replace which when the same image arrives again: explicit human labels replace
# each other (the latest wins) and replace `auto`; nothing replaces `base`; `auto` replaces nothing.
_RANK = {"auto": 0, "operator": 1, "confirmed_defect": 1, "base": 2}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    sha256 TEXT PRIMARY KEY, ext TEXT NOT NULL, bytes INTEGER NOT NULL,
    origin TEXT NOT NULL, label INTEGER NOT NULL, split TEXT NOT NULL,
    camera_id TEXT, seq INTEGER, source TEXT,
    added_at REAL NOT NULL, added_by TEXT NOT NULL,
    model_version TEXT, score REAL, normalized_score REAL,
    box TEXT, mask_sha256 TEXT, note TEXT
);
CREATE INDEX IF NOT EXISTS samples_camera ON samples (camera_id, origin, added_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, action TEXT NOT NULL, sha256 TEXT,
    origin TEXT, camera_id TEXT, by TEXT NOT NULL, detail TEXT
);
"""


class StoreError(RuntimeError):
    """A sample the store cannot take (unknown origin, empty image, …); the message says why."""


def split_for(sha256: str, label: int) -> str:
    """Fixed per image: the same bytes always land in the same split, whoever adds them, whenever."""
    bucket = int(sha256[:8], 16) % 100
    if label:
        return "train" if bucket < 50 else "holdout"
    return "train" if bucket < 70 else ("val" if bucket < 85 else "holdout")


@dataclass(frozen=True)
class StoreLimits:
    max_normals_per_camera: int = 5000
    max_bytes_per_camera: int = 2 << 30
    max_defects_per_camera: int = 2000


@dataclass
class AddResult:
    sha256: str
    added: bool  # a new row
    changed: bool = False  # an existing row relabelled (e.g. auto → operator)
    duplicate: bool = False  # already there with an equal or stronger label: nothing changed
    evicted: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "added": self.added, "changed": self.changed, "duplicate": self.duplicate,
                "evicted": len(self.evicted)}


@dataclass(frozen=True)
class StoredSample:
    sha256: str
    path: Path
    origin: str
    label: int
    split: str
    camera_id: str | None
    seq: int | None
    added_at: float
    box: list[int] | None = None
    mask_path: Path | None = None


@dataclass
class Snapshot:
    """The store's content at one instant: what a retrain trains, calibrates and gates on."""

    samples: list[StoredSample]
    fingerprint: str
    taken_at: float

    def select(self, label: int | None = None, split: str | None = None, origins=None) -> list[StoredSample]:
        return [s for s in self.samples if (label is None or s.label == label) and (split is None or s.split == split)
                and (origins is None or s.origin in origins)]

    def counts(self) -> dict[str, Any]:
        by_origin: dict[str, int] = {}
        by_split: dict[str, int] = {}
        for s in self.samples:
            by_origin[s.origin] = by_origin.get(s.origin, 0) + 1
            key = f"{'defect' if s.label else 'normal'}/{s.split}"
            by_split[key] = by_split.get(key, 0) + 1
        return {"total": len(self.samples), "by_origin": by_origin, "by_split": by_split}

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "taken_at": self.taken_at, "counts": self.counts(),
                "samples": [{"sha256": s.sha256, "origin": s.origin, "label": s.label, "split": s.split,
                             "camera_id": s.camera_id, "seq": s.seq, "file": s.path.name,
                             **({"box": s.box} if s.box else {}),
                             **({"mask": s.mask_path.name} if s.mask_path else {})} for s in self.samples]}


# The index's journal, fixed when the store is created (`models init --store-journal`): `wal` (the default)
# needs every process that opens the index on one host (WAL's shared memory); `delete` (a rollback journal)
# lets processes on several hosts open it through storage with working POSIX locks (NFSv4, CephFS): a
# registry on a volume shared by the agent's pod and the Ray head that runs the retrain job.
JOURNAL_FILE = "journal_mode"
JOURNAL_MODES = ("wal", "delete")


def set_journal_mode(root: str | Path, mode: str) -> None:
    """Choose the index's journal for a store not yet opened (see JOURNAL_FILE)."""
    if mode not in JOURNAL_MODES:
        raise StoreError(f"journal mode must be one of {JOURNAL_MODES}, not {mode!r}")
    root = Path(root).expanduser()
    if (root / "index.sqlite").exists():
        raise StoreError(f"{root}: the store exists already; its journal mode is fixed when it is created")
    root.mkdir(parents=True, exist_ok=True)
    (root / JOURNAL_FILE).write_text(mode + "\n")


class SampleStore:
    def __init__(self, root: str | Path, limits: StoreLimits = StoreLimits()):
        self.root = Path(root).expanduser()
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        marker = self.root / JOURNAL_FILE
        self.journal = marker.read_text().strip() if marker.is_file() else "wal"
        if self.journal not in JOURNAL_MODES:
            raise StoreError(f"{marker}: unknown journal mode {self.journal!r} (one of {JOURNAL_MODES})")
        self._local = threading.local()
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections must not cross threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / "index.sqlite", timeout=30.0, isolation_level=None)
            db.execute(f"PRAGMA journal_mode={self.journal.upper()}")
            db.execute("PRAGMA synchronous=FULL")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def blob_path(self, sha256: str, ext: str) -> Path:
        return self.blobs / sha256[:2] / f"{sha256}{ext}"

    def _write_blob(self, data: bytes, ext: str) -> tuple[str, bool]:
        """The image's file, written once (by content); (its sha256, whether this call created it)."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha, ext)
        if path.is_file():
            return sha, False
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(path)
        except OSError as exc:  # e.g. a full disk: nothing half-written stays, the store is unchanged
            tmp.unlink(missing_ok=True)
            raise StoreError(f"the image could not be written to {self.blobs}: {exc.strerror or exc}; "
                             "nothing was stored") from exc
        return sha, True

    def add(self, data: bytes, origin: str, by: str, ext: str = ".jpg", camera_id: str | None = None,
            seq: int | None = None, source: str | None = None, model_version: str | None = None,
            score: float | None = None, normalized_score: float | None = None, box: list[int] | None = None,
            mask: bytes | None = None, note: str | None = None) -> AddResult:
        """Store one image. Committed (durable) when this returns."""
        if origin not in ORIGINS:
            raise StoreError(f"unknown origin {origin!r}; one of {ORIGINS}")
        if not data:
            raise StoreError("an empty image cannot be stored")
        if not ext.startswith(".") or len(ext) > 8 or not ext[1:].isalnum():
            raise StoreError(f"bad file extension {ext!r}")
        label = int(origin == "confirmed_defect")
        created: list[tuple[str, Path]] = []  # the files this call wrote: they go again if nothing is stored
        try:
            sha, new = self._write_blob(data, ext)
            if new:
                created.append((sha, self.blob_path(sha, ext)))
            mask_sha = None
            if mask:
                mask_sha, new = self._write_blob(mask, ".png")
                if new:
                    created.append((mask_sha, self.blob_path(mask_sha, ".png")))
            return self._index(sha, ext, len(data), origin, label, by, camera_id, seq, source, model_version, score,
                               normalized_score, box, mask_sha, note)
        except (StoreError, sqlite3.OperationalError) as exc:  # e.g. a full disk: rolled back, its files go too
            for blob, path in created:
                if not self._referenced(blob):  # another writer's row keeps it
                    path.unlink(missing_ok=True)
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"the sample index in {self.root} could not be written: {exc}; nothing was "
                             "stored") from exc

    def _index(self, sha: str, ext: str, size: int, origin: str, label: int, by: str, camera_id: str | None,
               seq: int | None, source: str | None, model_version: str | None, score: float | None,
               normalized_score: float | None, box: list[int] | None, mask_sha: str | None,
               note: str | None) -> AddResult:
        """The add's one transaction (the image's file is written already)."""
        db = self._db()
        now = time.time()
        evicted: list[tuple[str, str]] = []  # (sha, ext) of the blobs to unlink once committed
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT origin FROM samples WHERE sha256 = ?", (sha,)).fetchone()
            if row is not None:
                old = row["origin"]
                stronger = _RANK[origin] > _RANK[old] or (_RANK[origin] == _RANK[old] == 1 and origin != old)
                if not stronger:
                    db.execute("COMMIT")
                    return AddResult(sha, added=False, duplicate=True)
                db.execute("UPDATE samples SET origin=?, label=?, split=?, added_at=?, added_by=?, box=?, "
                           "mask_sha256=?, note=? WHERE sha256=?",
                           (origin, label, split_for(sha, label), now, by, json.dumps(box) if box else None,
                            mask_sha, note, sha))
                self._event(db, "relabelled", sha, origin, camera_id, by, {"from": old})
                result = AddResult(sha, added=False, changed=True)
            else:
                db.execute(
                    "INSERT INTO samples (sha256, ext, bytes, origin, label, split, camera_id, seq, source, added_at, "
                    "added_by, model_version, score, normalized_score, box, mask_sha256, note) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (sha, ext, size, origin, label, split_for(sha, label), camera_id, seq, source, now, by,
                     model_version, score, normalized_score, json.dumps(box) if box else None, mask_sha, note))
                self._event(db, "added", sha, origin, camera_id, by, {"seq": seq, "source": source})
                result = AddResult(sha, added=True)
            if camera_id is not None and origin != "base":
                evicted = self._enforce_caps(db, camera_id, label)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a COMMIT that failed (a full disk) may have ended it already
                db.execute("ROLLBACK")
            raise
        for evicted_sha, evicted_ext in evicted:
            self.blob_path(evicted_sha, evicted_ext).unlink(missing_ok=True)
        result.evicted = [s for s, _ in evicted]
        return result

    def _referenced(self, sha: str | None) -> bool:
        return sha is not None and self._db().execute(
            "SELECT 1 FROM samples WHERE sha256=? OR mask_sha256=? LIMIT 1", (sha, sha)).fetchone() is not None

    def _enforce_caps(self, db: sqlite3.Connection, camera_id: str, label: int) -> list[tuple[str, str]]:
        """Inside the add's transaction: evict this camera's oldest samples past the caps."""
        origins: tuple[str, ...]
        max_bytes: int | None
        if label:
            origins, max_count, max_bytes = ("confirmed_defect",), self.limits.max_defects_per_camera, None
        else:
            origins, max_count, max_bytes = ("auto", "operator"), self.limits.max_normals_per_camera, \
                self.limits.max_bytes_per_camera
        marks = ",".join("?" * len(origins))
        count, total = db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM samples WHERE camera_id=? AND origin IN ({marks})",
            (camera_id, *origins)).fetchone()
        evicted: list[tuple[str, str]] = []
        if count <= max_count and (max_bytes is None or total <= max_bytes):
            return evicted
        # auto before operator, oldest first
        rows = db.execute(f"SELECT sha256, ext, bytes, origin FROM samples WHERE camera_id=? AND origin IN ({marks}) "
                          "ORDER BY CASE origin WHEN 'auto' THEN 0 ELSE 1 END, added_at", (camera_id, *origins))
        for row in rows.fetchall():
            if count <= max_count and (max_bytes is None or total <= max_bytes):
                break
            db.execute("DELETE FROM samples WHERE sha256=?", (row["sha256"],))
            self._event(db, "evicted", row["sha256"], row["origin"], camera_id, "store-cap",
                        {"count": count, "bytes": total})
            evicted.append((row["sha256"], row["ext"]))
            count -= 1
            total -= row["bytes"]
        return evicted

    @staticmethod
    def _event(db, action: str, sha: str | None, origin: str | None, camera_id: str | None, by: str,
               detail: dict[str, Any] | None = None) -> None:
        db.execute("INSERT INTO events (at, action, sha256, origin, camera_id, by, detail) VALUES (?,?,?,?,?,?,?)",
                   (time.time(), action, sha, origin, camera_id, by, json.dumps(detail or {})))

    def remove(self, sha256: str, by: str) -> bool:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT ext, origin, camera_id FROM samples WHERE sha256=?", (sha256,)).fetchone()
        if row is None:
            db.execute("COMMIT")
            return False
        db.execute("DELETE FROM samples WHERE sha256=?", (sha256,))
        self._event(db, "removed", sha256, row["origin"], row["camera_id"], by)
        db.execute("COMMIT")
        self.blob_path(sha256, row["ext"]).unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> Snapshot:
        """Every sample as of now, in one read transaction (writers may go on meanwhile)."""
        db = self._db()
        db.execute("BEGIN")
        try:
            rows = db.execute("SELECT * FROM samples ORDER BY sha256").fetchall()
        finally:
            db.execute("COMMIT")
        samples = [StoredSample(
            r["sha256"], self.blob_path(r["sha256"], r["ext"]), r["origin"], r["label"], r["split"], r["camera_id"],
            r["seq"], r["added_at"], json.loads(r["box"]) if r["box"] else None,
            self.blob_path(r["mask_sha256"], ".png") if r["mask_sha256"] else None) for r in rows]
        digest = hashlib.sha256("\n".join(f"{s.sha256}:{s.origin}:{s.label}:{s.split}" for s in samples).encode())
        return Snapshot(samples, digest.hexdigest(), time.time())

    def total(self) -> int:
        """How many samples the store holds (a cold start counts its recording with it)."""
        return int(self._db().execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def counts(self, since: float = 0.0) -> dict[str, Any]:
        """Samples by origin (and those added after `since`, for the retrain schedule), by camera."""
        db = self._db()
        by_origin = {r[0]: r[1] for r in db.execute("SELECT origin, COUNT(*) FROM samples GROUP BY origin")}
        new = {r[0]: r[1] for r in db.execute(
            "SELECT origin, COUNT(*) FROM samples WHERE added_at > ? GROUP BY origin", (since,))}
        by_camera: dict[str, dict[str, int]] = {}
        for camera, origin, n in db.execute(
                "SELECT camera_id, origin, COUNT(*) FROM samples WHERE camera_id IS NOT NULL "
                "GROUP BY camera_id, origin"):
            by_camera.setdefault(camera, {})[origin] = n
        total_bytes = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM samples").fetchone()[0]
        return {"by_origin": by_origin, "new_since": new, "by_camera": by_camera, "bytes": total_bytes}

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._db().execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r, detail=json.loads(r["detail"] or "{}")) for r in rows]

    def find(self, sha256: str) -> dict[str, Any] | None:
        row = self._db().execute("SELECT * FROM samples WHERE sha256=?", (sha256,)).fetchone()
        return dict(row) if row else None
