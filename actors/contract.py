"""The contracts between the agent and everything outside it: a frame's header (cameras in), a decision
(subscribers out), and the anomaly folder's file names (the console, `accept`, operators' scripts).

A leaf: it imports only the standard library and pydantic (no torch, no OpenCV, no NumPy, no Ray, no
ZeroMQ), so a camera or subscriber integrator can copy or import it alone. The wire JSON of a decision is
`Decision.wire()`; `docs/decision.schema.json` is generated from `Decision` (`python -m adtr_edge.actors.contract`)
and a test checks it is current.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4096
# seq and ts stay below 2**53: exact in a float64, so in every JSON parser and in Prometheus' floats.
MAX_SAFE_INT = 2**53 - 1
CAMERA_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}"  # the whole id (fullmatch: "cam\n" is not "cam")
CAMERA_ID_RE = re.compile(CAMERA_ID_PATTERN)

# ------------------------------------------------------------------ the anomaly folder
# <output.dir>/<camera_id>/[ok_]<YYYYmmddTHHMMSS.ffffff>[-n]_<seq, 10 digits><suffix>: anomalies, and with
# the `ok_` prefix the sampled normals; one stem, several files (the payload, overlay, thumbnail, heat
# map and the decision's JSON sidecar).
NORMAL_PREFIX = "ok_"
SUFFIXES = (".jpg", ".png", "_overlay.png", "_thumb.jpg", "_heat.png", ".json")
PAYLOADS = (".jpg", ".png")
STEM = r"(?P<ok>ok_)?(?P<time>\d{8}T\d{6})(?:\.(?P<us>\d{6}))?(?:-\d{1,9})?_(?P<seq>\d{10})"


class FrameHeader(BaseModel):
    """Header of one camera frame (protocol v1). Unknown extra fields are ignored (forward compatible)."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    v: Literal[1]
    camera_id: str
    seq: StrictInt = Field(ge=0, le=MAX_SAFE_INT)
    ts: StrictFloat | StrictInt = Field(ge=0, le=MAX_SAFE_INT)  # capture time, Unix seconds (plausibility: ingest)
    encoding: Literal["jpeg", "png", "raw"]
    width: StrictInt = Field(ge=1, le=1 << 16)
    height: StrictInt = Field(ge=1, le=1 << 16)
    channels: Literal[1, 3, 4] | None = None  # required for raw: 1 = mono, 3 = BGR, 4 = BGRA (OpenCV order)
    dtype: Literal["uint8", "uint16"] | None = None  # raw only

    @field_validator("v", "channels", mode="before")
    @classmethod
    def _not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # True == 1 to a Literal, even in strict mode
            raise ValueError("must be an integer, not a boolean")
        return value

    @field_validator("camera_id")
    @classmethod
    def _camera_id(cls, value: str) -> str:
        if not CAMERA_ID_RE.fullmatch(value):
            raise ValueError(f"camera_id must match {CAMERA_ID_PATTERN}")
        return value

    @field_validator("ts")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("ts must be finite")
        return float(value)

    @model_validator(mode="after")
    def _raw_needs_layout(self) -> FrameHeader:
        if self.encoding == "raw" and (self.channels is None or self.dtype is None):
            raise ValueError("raw frames need channels and dtype")
        return self


class Region(BaseModel):
    """One connected defect region of an anomalous frame, in frame pixels."""

    model_config = ConfigDict(extra="forbid")

    box: list[int] = Field(min_length=4, max_length=4, description="x, y, width, height in frame pixels")
    area: int = Field(ge=0, description="pixels above the threshold in the region")
    peak: float | None = Field(description="the region's highest anomaly score")
    peak_normalized: float | None = Field(description="peak / threshold (1.0 is the decision boundary)")

    @field_validator("peak", "peak_normalized")
    @classmethod
    def _null_if_not_finite(cls, value: float | None) -> float | None:
        return finite_or_none(value)


class Decision(BaseModel):
    """What the agent publishes for every frame it decides: ZeroMQ PUB, two parts [camera_id, this JSON].
    Numbers that are not finite are published as null (RFC 8259 JSON has no NaN or Infinity)."""

    model_config = ConfigDict(extra="forbid")

    camera_id: str = Field(description="the camera's id, as in its frame header")
    seq: int = Field(ge=0, description="the frame's sequence number, as in its header")
    ts: float = Field(description="the frame's capture time, Unix seconds, as the camera sent it")
    score: float | None = Field(description="the image's anomaly score (the model's units)")
    normalized_score: float | None = Field(description="score / threshold: above 1.0 is an anomaly")
    threshold: float | None = Field(description="the serving model's decision threshold")
    is_anomaly: bool = Field(description="the decision: true fails the part")
    regions: list[Region] = Field(description="defect regions, largest peak first (empty when it passes)")
    model_version: str = Field(description="the model version that decided")
    point: str = Field(description="the inspection point the camera belongs to")
    inspected: bool = Field(description="false while the point's first model is being taught: no decision")
    latency_ms: float | None = Field(description="capture → published; null when the camera's clock is off")
    agent_ms: float | None = Field(description="received by the agent → published")
    inference_ms: float | None = Field(description="the batch's forward pass")
    batch_size: int = Field(ge=1, description="frames in that batch")
    width: int = Field(ge=1, description="the frame's width in pixels")
    height: int = Field(ge=1, description="the frame's height in pixels")
    files: dict[str, str] | None = Field(None, description="anomalies only: the saved files, by suffix")

    @field_validator("score", "normalized_score", "threshold", "latency_ms", "agent_ms", "inference_ms")
    @classmethod
    def _null_if_not_finite(cls, value: float | None) -> float | None:
        return finite_or_none(value)

    def wire(self) -> dict[str, Any]:
        """The JSON object as published (`files` only when there are files)."""
        return self.model_dump(exclude={"files"} if self.files is None else None)


def finite_or_none(value: Any) -> Any:
    """A copy with every float that is not finite replaced by None: RFC 8259 JSON has no NaN/Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value: Any, **kwargs) -> bytes:
    """JSON any parser reads (JavaScript, Go): non-finite numbers become null, never NaN or -Infinity."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs).encode()


def decision_message(decision: Decision | dict[str, Any]) -> list[bytes]:
    wire = decision.wire() if isinstance(decision, Decision) else decision
    return [wire["camera_id"].encode(), strict_json(wire)]


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def parse_decision(parts: list[bytes]) -> dict[str, Any]:
    """A decision as any strict JSON parser reads it: NaN or Infinity in it is an error."""
    return json.loads(parts[1].decode("utf-8"), parse_constant=_no_constant)


def decision_schema() -> str:
    schema = Decision.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://adtr-edge/decision.schema.json"
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # python -m adtr_edge.actors.contract: rewrite docs/decision.schema.json
    from pathlib import Path

    target = Path(__file__).resolve().parents[1] / "docs" / "decision.schema.json"
    target.write_text(decision_schema())
    print(f"wrote {target}")
