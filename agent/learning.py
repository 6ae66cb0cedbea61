"""The operator's side of learning on the line: find a frame the agent saved, put it in the sample store.

Used by the agent's HTTP API (`POST /v1/samples`) and by `adtr-edge accept` when no agent runs.
A saved frame is one the scoring actor wrote for an anomaly: `<anomalies>/<camera>/<time>_<seq>.<ext>`
with a `.json` sidecar (the decision), or a sampled normal one (`ok_<time>_<seq>.<ext>`). "Accept as
normal" files it as origin `operator`; "confirm defect" as `confirmed_defect`, with an optional box.
"""
from __future__ import annotations

import json
import re
from datetime import UTC
from pathlib import Path
from typing import Any

from adtr_edge.actors.contract import CAMERA_ID_PATTERN
from adtr_edge.lifecycle.samples import SampleStore

from .console.frames import stem_time

PAYLOAD_SUFFIXES = (".jpg", ".png")
MAX_BULK = 5000  # frames one bulk accept may file


class FrameNotFound(LookupError):
    """No saved frame matches what was asked for."""


def find_saved_frame(anomalies: Path, camera_id: str | None = None, seq: int | None = None,
                     file: str | None = None) -> tuple[Path, dict[str, Any]]:
    """(payload path, its decision) for camera + seq, or for a file inside the anomaly folder."""
    root = Path(anomalies).expanduser().resolve()
    if file is not None:
        path = (root / file).resolve() if not Path(file).is_absolute() else Path(file).resolve()
        if root not in path.parents:
            raise FrameNotFound(f"{file} is not inside the anomaly folder {root}")
        if path.suffix not in PAYLOAD_SUFFIXES or path.stem.endswith("_overlay") or not path.is_file():
            raise FrameNotFound(f"{file} is not a saved frame (a .jpg or .png payload)")
        return path, _sidecar(path)
    if camera_id is None or seq is None:
        raise FrameNotFound("name a saved frame: camera_id and seq, or file")
    if not re.fullmatch(CAMERA_ID_PATTERN, camera_id):
        raise FrameNotFound(f"not a camera id: {camera_id!r}")
    folder = root / camera_id
    matches = sorted(folder.glob(f"*_{int(seq):010d}.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    for sidecar in reversed(matches):  # the newest, if the camera's sequence restarted
        for suffix in PAYLOAD_SUFFIXES:
            payload = sidecar.with_suffix(suffix)
            if payload.is_file():
                return payload, _sidecar(payload)
    raise FrameNotFound(f"no saved frame for camera {camera_id} seq {seq} in {folder} (anomalies are saved, "
                        "normals only one per output.normals.every_s, and the oldest are deleted past "
                        "output.max_bytes)")


def _sidecar(payload: Path) -> dict[str, Any]:
    try:
        return json.loads(payload.with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def accept_frame(store: SampleStore, payload: Path, decision: dict[str, Any], label: str, by: str,
                 box: list[int] | None = None, note: str | None = None, mask: bytes | None = None) -> dict[str, Any]:
    """File a saved frame in the store: label "normal" (origin operator) or "defect" (confirmed_defect,
    optionally with a box or a mask: a PNG the frame's size, nonzero = defect)."""
    if label not in ("normal", "defect"):
        raise ValueError(f"label must be normal or defect, not {label!r}")
    if box is not None and (len(box) != 4 or any(not isinstance(v, int) or v < 0 for v in box) or box[2] < 1
                            or box[3] < 1):
        raise ValueError(f"box must be [x, y, width, height] in frame pixels, got {box!r}")
    result = store.add(payload.read_bytes(), "operator" if label == "normal" else "confirmed_defect", by,
                       payload.suffix, decision.get("camera_id"), decision.get("seq"), source=str(payload),
                       model_version=decision.get("model_version"), score=decision.get("score"),
                       normalized_score=decision.get("normalized_score"), box=box, note=note,
                       mask=mask if label == "defect" else None)
    return dict(result.as_dict(), label=label, file=str(payload), camera_id=decision.get("camera_id"),
                seq=decision.get("seq"))


def parse_time(value: float | int | str) -> float:
    """Seconds since the epoch, from a number or an ISO 8601 time (UTC when it has no zone)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        from datetime import datetime

        try:
            return float(value)
        except ValueError:
            pass

        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"not a time: {value!r} (seconds since the epoch, or ISO 8601)") from None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    raise ValueError(f"not a time: {value!r} (seconds since the epoch, or ISO 8601)")


def saved_anomalies(anomalies: Path, camera_id: str, since: float | None = None,
                    until: float | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """A camera's saved anomalous frames whose arrival time is in [since, until), oldest first."""
    if not re.fullmatch(CAMERA_ID_PATTERN, camera_id):
        raise FrameNotFound(f"not a camera id: {camera_id!r}")
    folder = Path(anomalies).expanduser().resolve() / camera_id
    found = []
    for sidecar in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        named = stem_time(sidecar.stem)
        if named is None or named[1]:  # not ours, or a sampled normal (ok_…)
            continue
        at = named[0]
        if (since is not None and at < since) or (until is not None and at >= until):
            continue
        payload = next((sidecar.with_suffix(x) for x in PAYLOAD_SUFFIXES if sidecar.with_suffix(x).is_file()), None)
        if payload is not None:
            found.append((payload, _sidecar(payload)))
    return found


def accept_many(store: SampleStore, anomalies: Path, request: dict[str, Any], by: str) -> dict[str, Any]:
    """Several saved frames in one call: `files`, or `camera_id` with `seqs`, or `camera_id` with a window
    (`since` / `until`: the camera's anomalies that arrived then). One label, box-less. What cannot be
    found is listed, never silently skipped; nothing is filed when the request itself is wrong."""
    label, note = request.get("label", "normal"), request.get("note")
    if label not in ("normal", "defect"):
        raise ValueError(f"label must be normal or defect, not {label!r}")
    camera, seqs, files = request.get("camera_id"), request.get("seqs"), request.get("files")
    if files is not None:
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("files must be a list of saved frames' paths")
        wanted = [("file", f) for f in files]
    elif seqs is not None:
        if not isinstance(camera, str) or not isinstance(seqs, list) or \
                not all(isinstance(q, int) and not isinstance(q, bool) for q in seqs):
            raise ValueError("seqs needs a camera_id and a list of whole numbers")
        wanted = [("seq", q) for q in seqs]
    elif isinstance(camera, str) and ("since" in request or "until" in request):
        since = parse_time(request["since"]) if request.get("since") is not None else None
        until = parse_time(request["until"]) if request.get("until") is not None else None
        wanted = [("frame", found) for found in saved_anomalies(anomalies, camera, since, until)]
    else:
        raise ValueError("a bulk accept names files, or camera_id with seqs, or camera_id with since/until")
    if len(wanted) > MAX_BULK:
        raise ValueError(f"{len(wanted)} frames: at most {MAX_BULK} per call (narrow the window)")
    results, missing = [], []
    for kind, what in wanted:
        try:
            payload, decision = what if kind == "frame" else \
                find_saved_frame(anomalies, file=what) if kind == "file" else find_saved_frame(anomalies, camera, what)
        except FrameNotFound as exc:
            missing.append({"what": what, "error": str(exc)})
            continue
        results.append(accept_frame(store, payload, decision, label, by, note=note))
    return {"label": label, "requested": len(wanted), "filed": len(results),
            "added": sum(bool(r["added"]) for r in results), "changed": sum(bool(r.get("changed")) for r in results),
            "missing": missing, "items": results}
