"""The operator's side of learning on the line: find a frame the agent saved, put it in the sample store.

Used by the agent's HTTP API (`POST /v1/samples`) and by `adtr-edge accept` when no agent runs.
A saved frame is one the scoring actor wrote for an anomaly: `<anomalies>/<camera>/<time>_<seq>.<ext>`
with a `.json` sidecar (the decision). "Accept as normal" files it as origin `operator`; "confirm
defect" as `confirmed_defect`, with an optional box.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from actors.protocol import CAMERA_ID_PATTERN
from model.samples import SampleStore

PAYLOAD_SUFFIXES = (".jpg", ".png")


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
    raise FrameNotFound(f"no saved frame for camera {camera_id} seq {seq} in {folder} (only anomalies are "
                        "saved, and the oldest are deleted past output.max_bytes)")


def _sidecar(payload: Path) -> dict[str, Any]:
    try:
        return json.loads(payload.with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def accept_frame(store: SampleStore, payload: Path, decision: dict[str, Any], label: str, by: str,
                 box: list[int] | None = None, note: str | None = None) -> dict[str, Any]:
    """File a saved frame in the store: label "normal" (origin operator) or "defect" (confirmed_defect)."""
    if label not in ("normal", "defect"):
        raise ValueError(f"label must be normal or defect, not {label!r}")
    if box is not None and (len(box) != 4 or any(not isinstance(v, int) or v < 0 for v in box) or box[2] < 1
                            or box[3] < 1):
        raise ValueError(f"box must be [x, y, width, height] in frame pixels, got {box!r}")
    result = store.add(payload.read_bytes(), "operator" if label == "normal" else "confirmed_defect", by,
                       payload.suffix, decision.get("camera_id"), decision.get("seq"), source=str(payload),
                       model_version=decision.get("model_version"), score=decision.get("score"),
                       normalized_score=decision.get("normalized_score"), box=box, note=note)
    return dict(result.as_dict(), label=label, file=str(payload), camera_id=decision.get("camera_id"),
                seq=decision.get("seq"))
