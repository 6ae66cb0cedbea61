"""The wire: camera frames in ([JSON header, payload]) and decisions out ([camera_id, JSON]).

Plain Python (pydantic, NumPy, OpenCV, Pillow): no Ray, no ZeroMQ, so a camera integrator can reuse
it. Nothing here unpickles: headers are JSON, payloads are JPEG/PNG bytes or raw pixels read with
`np.frombuffer`. Every refusal is a `FrameError` whose `reason` is a short, stable metric label.
"""
from __future__ import annotations

import io
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator, model_validator

from model.data import DataError, decode_image, to_rgb8

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4096
CAMERA_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
UNKNOWN_CAMERA = "_unknown"  # label for messages whose header names no usable camera
RAW_DTYPES = {"uint8": np.uint8, "uint16": np.uint16}
PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG"}

# Invalid-frame reasons (metric label values).
INVALID_REASONS = (
    "parts", "header_too_large", "header_json", "header_schema", "payload_too_large",
    "too_large", "payload_size", "encoding_mismatch", "dimension_mismatch", "decode", "unknown_camera",
)


class FrameError(ValueError):
    """A frame refused before it reached the model; `reason` is one of INVALID_REASONS."""

    def __init__(self, reason: str, detail: str, camera_id: str = UNKNOWN_CAMERA, seq: int | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.camera_id, self.seq = reason, detail, camera_id, seq


class FrameHeader(BaseModel):
    """Header of one camera frame (protocol v1). Unknown extra fields are ignored (forward compatible)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1]
    camera_id: str = Field(pattern=CAMERA_ID_PATTERN)
    seq: StrictInt = Field(ge=0)
    ts: StrictFloat | StrictInt = Field(ge=0)  # capture time, Unix seconds
    encoding: Literal["jpeg", "png", "raw"]
    width: StrictInt = Field(ge=1, le=1 << 16)
    height: StrictInt = Field(ge=1, le=1 << 16)
    channels: Literal[1, 3, 4] | None = None  # required for raw: 1 = mono, 3 = BGR, 4 = BGRA (OpenCV order)
    dtype: Literal["uint8", "uint16"] | None = None  # raw only

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


@dataclass(frozen=True)
class FrameLimits:
    max_payload_bytes: int = 32 << 20
    max_pixels: int = 40_000_000


@dataclass
class Frame:
    header: FrameHeader
    image: np.ndarray  # RGB uint8 (H, W, 3), full resolution
    payload: bytes
    received_at: float


def _identity(header: Any) -> tuple[str, int | None]:
    """Best-effort camera and seq from a header that may fail validation, for attributing refusals."""
    if not isinstance(header, dict):
        return UNKNOWN_CAMERA, None
    camera = header.get("camera_id")
    seq = header.get("seq")
    camera = camera if isinstance(camera, str) and re.match(CAMERA_ID_PATTERN, camera) else UNKNOWN_CAMERA
    seq = seq if type(seq) is int and seq >= 0 else None
    return camera, seq


def parse_header(raw: bytes) -> FrameHeader:
    if len(raw) > MAX_HEADER_BYTES:
        raise FrameError("header_too_large", f"header is {len(raw)} bytes (limit {MAX_HEADER_BYTES})")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError("header_json", f"header is not UTF-8 JSON: {exc}") from None
    camera, seq = _identity(data)
    if not isinstance(data, dict):
        raise FrameError("header_json", f"header is a JSON {type(data).__name__}, not an object")
    try:
        return FrameHeader.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise FrameError("header_schema", f"{where}: {first['msg']}", camera, seq) from None


def check_payload(header: FrameHeader, payload: bytes, limits: FrameLimits) -> None:
    """Size checks before any decoding: declared pixels, payload bytes, and the image's own header."""
    who = dict(camera_id=header.camera_id, seq=header.seq)
    if len(payload) > limits.max_payload_bytes:
        raise FrameError("payload_too_large", f"{len(payload)} bytes (limit {limits.max_payload_bytes})", **who)
    if header.width * header.height > limits.max_pixels:
        raise FrameError("too_large", f"{header.width}x{header.height} exceeds {limits.max_pixels} pixels", **who)
    if header.encoding == "raw":
        expected = header.width * header.height * header.channels * np.dtype(RAW_DTYPES[header.dtype]).itemsize
        if len(payload) != expected:
            raise FrameError("payload_size", f"raw payload is {len(payload)} bytes, header implies {expected}", **who)
        return
    try:  # Pillow reads only the image's own header here: no pixels are decoded
        with Image.open(io.BytesIO(payload)) as probe:
            fmt, size = probe.format, probe.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FrameError("decode", f"not a readable {header.encoding} image: {exc}", **who) from None
    if fmt != PIL_FORMATS[header.encoding]:
        raise FrameError("encoding_mismatch", f"header says {header.encoding}, payload is {fmt}", **who)
    if size != (header.width, header.height):
        raise FrameError("dimension_mismatch",
                         f"header says {header.width}x{header.height}, image is {size[0]}x{size[1]}", **who)
    if header.encoding == "jpeg" and b"\xff\xd9" not in payload[-1024:]:
        # libjpeg decodes a cut-off JPEG with a grey fill and only a warning: refuse it instead.
        raise FrameError("decode", "JPEG is truncated: no end-of-image marker", **who)


def decode_payload(header: FrameHeader, payload: bytes) -> np.ndarray:
    """Checked payload → RGB uint8 (H, W, 3)."""
    who = dict(camera_id=header.camera_id, seq=header.seq)
    try:
        if header.encoding == "raw":
            pixels = np.frombuffer(payload, dtype=RAW_DTYPES[header.dtype])
            return to_rgb8(pixels.reshape(header.height, header.width, header.channels), "raw frame")
        image = decode_image(payload, f"{header.encoding} frame")
    except DataError as exc:
        raise FrameError("decode", str(exc), **who) from None
    if image.shape[:2] != (header.height, header.width):
        raise FrameError("dimension_mismatch", f"decoded {image.shape[1]}x{image.shape[0]}", **who)
    return image


@dataclass
class Message:
    """A received message whose header and sizes are checked, payload not decoded yet."""

    header: FrameHeader
    payload: bytes
    received_at: float

    def decode(self) -> Frame:
        return Frame(self.header, decode_payload(self.header, self.payload), self.payload, self.received_at)


def parse_frame(parts: list[bytes], limits: FrameLimits) -> Frame:
    """A received multipart message → a decoded, validated Frame, or FrameError with a reason."""
    return check_message(parts, limits).decode()


def check_message(parts: list[bytes], limits: FrameLimits) -> Message:
    """Everything but decoding the pixels (cheap): a frame that will be dropped is never decoded."""
    received_at = time.time()
    if len(parts) != 2:
        camera, seq = UNKNOWN_CAMERA, None
        if parts:
            try:
                camera, seq = _identity(json.loads(parts[0].decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
        raise FrameError("parts", f"expected 2 message parts (header, payload), got {len(parts)}", camera, seq)
    header = parse_header(parts[0])
    check_payload(header, parts[1], limits)
    return Message(header, parts[1], received_at)


def frame_message(camera_id: str, seq: int, payload: bytes, encoding: str, width: int, height: int,
                  channels: int | None = None, dtype: str | None = None, ts: float | None = None) -> list[bytes]:
    """Build the two-part message a camera sends (the publisher's side of `parse_frame`)."""
    header = {"v": PROTOCOL_VERSION, "camera_id": camera_id, "seq": seq, "ts": time.time() if ts is None else ts,
              "encoding": encoding, "width": width, "height": height}
    if channels is not None:
        header["channels"] = channels
    if dtype is not None:
        header["dtype"] = dtype
    return [json.dumps(header).encode(), payload]


def decision_message(decision: dict[str, Any]) -> list[bytes]:
    return [decision["camera_id"].encode(), json.dumps(decision).encode()]


def parse_decision(parts: list[bytes]) -> dict[str, Any]:
    return json.loads(parts[1].decode("utf-8"))
