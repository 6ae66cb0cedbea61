"""Cold start: a new camera's inspection point taught from its first frames, on the box.

The point's registry holds `cold_start.json` while it is taught: state `recording` (the scoring actor
files the camera's frames into the point's sample store, and publishes its decisions as not
inspected), `training` (the recording is complete and a retrain job was submitted), `candidate` (the
job published a gated model, shadowed or waiting), and the file goes when a version of the point's
own is promoted. The template model serves meanwhile only so the pipeline runs end to end; its
decisions on this camera are never published as pass/fail.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from adtr_edge.lifecycle.registry import write_json_atomic

COLD_FILE = "cold_start.json"
MIN_RECORDED = 40  # frames a first model needs: 70 % train, and a retrain needs min_train_samples (20)


def read_cold(registry_root: str | Path) -> dict[str, Any] | None:
    """The point's cold start, or None once a model of its own serves (or for a point never taught)."""
    import json

    path = Path(registry_root) / COLD_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def write_cold(registry_root: str | Path, state: dict[str, Any]) -> None:
    write_json_atomic(Path(registry_root) / COLD_FILE, state)


def end_cold(registry_root: str | Path) -> None:
    (Path(registry_root) / COLD_FILE).unlink(missing_ok=True)
