"""The saved frames (anomalies and sampled normals) in the agent's output folder, indexed for review.

The index is built from file names alone (`<camera>/[ok_]<YYYYmmddTHHMMSS>[.<µs>][-<n>]_<seq>.<suffix>`: the
agent's clock when the frame arrived, `-<n>` where that name was taken; names without the µs part come
from agents before the hostile-camera hardening and are still read), so it costs
one directory listing per camera, redone only when the folder's mtime changes: 10,000 saved frames
need no JSON read until a page shows them (then only that page's sidecars are read, and cached).

Every file the console serves goes through `media_path`: the camera must be a valid camera id, the name
one of the names the scoring actor writes, and the resolved path (symlinks followed) must lie directly
in that camera's folder inside the output folder. Nothing else is served.
"""
from __future__ import annotations

import calendar
import json
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adtr_edge.actors.contract import CAMERA_ID_PATTERN, PAYLOADS, STEM, SUFFIXES

_SUFFIX = "|".join(re.escape(s) for s in sorted(SUFFIXES, key=len, reverse=True))  # `_heat.png` before `.png`
_NAME = re.compile(rf"^(?P<stem>{STEM})(?P<suffix>{_SUFFIX})$")
STEM_PATTERN = rf"^{STEM}$"
_CAMERA = re.compile(CAMERA_ID_PATTERN)


class MediaNotFound(LookupError):
    pass


@dataclass
class Frame:
    camera: str
    stem: str
    ts: float  # when the agent received it (UTC; whole seconds in older names), from the name
    seq: int
    normal: bool
    suffixes: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        return f"{self.camera}/{self.stem}"

    @property
    def payload_suffix(self) -> str | None:
        return next((s for s in PAYLOADS if s in self.suffixes), None)

    @property
    def complete(self) -> bool:
        return ".json" in self.suffixes and self.payload_suffix is not None


def _epoch(stamp: str, micros: str | None = None) -> float:
    return calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%S")) + (int(micros) / 1e6 if micros else 0.0)


def stem_time(stem: str) -> tuple[float, bool] | None:
    """(when the agent received the frame, whether it is a sampled normal) from a saved frame's stem (the
    scoring actor's `frame_stem`); None for a name that is not one."""
    m = re.fullmatch(STEM_PATTERN, stem)
    return (_epoch(m["time"], m["us"]), bool(m["ok"])) if m else None


class FrameIndex:
    def __init__(self, root: Path, min_refresh_s: float = 0.5):
        self.root = Path(root).expanduser().resolve()
        self.min_refresh_s = min_refresh_s
        self.cameras: dict[str, tuple[int, list[Frame]]] = {}  # camera → (folder mtime_ns, frames newest first)
        self.lock = threading.Lock()
        self.refreshed_at = 0.0
        self.generation = 0
        self._merged: tuple[int, list[Frame]] = (-1, [])
        self._sidecars: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()

    # ------------------------------------------------------------------ the listing
    def refresh(self, force: bool = False) -> None:
        with self.lock:
            if not force and time.monotonic() - self.refreshed_at < self.min_refresh_s:
                return
            self.refreshed_at = time.monotonic()
            try:
                entries = [e for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)
                           and _CAMERA.fullmatch(e.name)]
            except FileNotFoundError:
                entries = []
            seen = set()
            for entry in entries:
                seen.add(entry.name)
                mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                known = self.cameras.get(entry.name)
                if known is not None and known[0] == mtime:
                    continue
                self.cameras[entry.name] = (mtime, self._scan(entry.name, entry.path))
                self.generation += 1
            for gone in set(self.cameras) - seen:
                del self.cameras[gone]
                self.generation += 1

    def _scan(self, camera: str, folder: str) -> list[Frame]:
        frames: dict[str, Frame] = {}
        for entry in os.scandir(folder):
            m = _NAME.match(entry.name)
            if m is None or not entry.is_file(follow_symlinks=False):
                continue
            frame = frames.get(m["stem"])
            if frame is None:
                frame = frames[m["stem"]] = Frame(camera, m["stem"], _epoch(m["time"], m["us"]), int(m["seq"]),
                                                   bool(m["ok"]))
            frame.suffixes.add(m["suffix"])
        out = [f for f in frames.values() if f.complete]
        out.sort(key=lambda f: (f.ts, f.seq), reverse=True)
        return out

    def _all(self) -> list[Frame]:
        with self.lock:
            if self._merged[0] != self.generation:
                merged = [f for _, frames in self.cameras.values() for f in frames]
                merged.sort(key=lambda f: (f.ts, f.seq, f.camera), reverse=True)
                self._merged = (self.generation, merged)
            return self._merged[1]

    def camera_names(self) -> list[str]:
        self.refresh()
        with self.lock:
            return sorted(self.cameras)

    # ------------------------------------------------------------------ queries
    def query(self, camera: str | None = None, decision: str = "all", since: float | None = None,
              until: float | None = None, offset: int = 0, limit: int = 48) -> tuple[int, list[Frame]]:
        """(how many match, the `limit` from `offset`), newest first."""
        self.refresh()
        frames = self._all()
        if camera or decision != "all" or since is not None or until is not None:
            want_normal = {"anomaly": False, "normal": True}.get(decision)
            frames = [f for f in frames if (not camera or f.camera == camera)
                      and (want_normal is None or f.normal == want_normal)
                      and (since is None or f.ts >= since) and (until is None or f.ts <= until)]
        return len(frames), frames[offset: offset + limit]

    def neighbours(self, key: str, **filters: Any) -> tuple[Frame | None, Frame | None]:
        """The frames before (newer) and after (older) `key` under the same filters."""
        _, frames = self.query(**filters, offset=0, limit=1 << 30)
        for i, f in enumerate(frames):
            if f.key == key:
                return (frames[i - 1] if i else None), (frames[i + 1] if i + 1 < len(frames) else None)
        return None, None

    def get(self, camera: str, stem: str) -> Frame | None:
        if not _CAMERA.fullmatch(camera or "") or not re.fullmatch(STEM_PATTERN, stem or ""):
            return None
        for force in (False, True):  # not listed yet (saved a moment ago): relist the changed folders once
            self.refresh(force=force)
            with self.lock:
                frames = self.cameras.get(camera, (0, []))[1]
            found = next((f for f in frames if f.stem == stem), None)
            if found is not None:
                return found
        return None

    def sidecar(self, frame: Frame) -> dict[str, Any]:
        """The decision saved with the frame ({} when it cannot be read); cached by path and mtime."""
        try:
            path = self.media_path(frame.camera, frame.stem + ".json")
            key = (str(path), path.stat().st_mtime_ns)
        except (MediaNotFound, OSError):
            return {}
        with self.lock:
            if key in self._sidecars:
                self._sidecars.move_to_end(key)
                return self._sidecars[key]
        try:
            data = json.loads(path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            data = {}
        with self.lock:
            self._sidecars[key] = data
            while len(self._sidecars) > 2048:
                self._sidecars.popitem(last=False)
        return data

    # ------------------------------------------------------------------ files
    def media_path(self, camera: str, name: str) -> Path:
        """The file `name` of `camera`'s folder, or MediaNotFound: only names the scoring actor writes,
        only inside the output folder (after resolving symlinks)."""
        if not isinstance(camera, str) or not _CAMERA.fullmatch(camera):
            raise MediaNotFound("not a camera id")
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise MediaNotFound("not a saved frame's file name")
        folder = (self.root / camera).resolve()
        path = (folder / name).resolve()
        if folder.parent != self.root or path.parent != folder or not path.is_file():
            raise MediaNotFound("no such file in the output folder")
        return path
