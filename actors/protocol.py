"""The wire: checking and decoding camera frames ([JSON header, payload]); the header itself and the
decisions out are the contract's (actors/contract.py, a leaf module that imports no NumPy or OpenCV).

Plain Python (pydantic, NumPy, OpenCV, Pillow): no Ray, no ZeroMQ, so a camera integrator can reuse
it. Nothing here unpickles: headers are JSON, payloads are JPEG/PNG bytes or raw pixels read with
`np.frombuffer`. Every refusal is a `FrameError` whose `reason` is a short, stable metric label.
Headers are typed strictly (`"v": true` is not version 1) and every number is bounded, so nothing a
peer sends becomes a counter or a latency that Prometheus or a JSON parser cannot read. JPEGs are
decoded by libjpeg-turbo with its warnings as errors (simplejpeg, strict): corrupt data is refused by
the decoder itself, not guessed from markers.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import simplejpeg
from PIL import Image
from pydantic import ValidationError

from adtr_edge.model.data import DataError, decode_image, to_rgb8

from .contract import CAMERA_ID_RE, MAX_HEADER_BYTES, MAX_SAFE_INT, PROTOCOL_VERSION, FrameHeader

UNKNOWN_CAMERA = "_unknown"  # label for refused messages of a camera that has no label (see ingest)
DECODE_BYTES_PER_PIXEL = 20  # worst case while decoding: a 16-bit BGRA PNG (8 + 8 shifted + 4 bytes)
RAW_DTYPES: dict[str, type[np.unsignedinteger[Any]]] = {"uint8": np.uint8, "uint16": np.uint16}
PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG"}

# Invalid-frame reasons (metric label values).
INVALID_REASONS = (
    "parts", "header_too_large", "header_json", "header_schema", "payload_too_large",
    "too_large", "payload_size", "encoding_mismatch", "dimension_mismatch", "decode", "unknown_camera",
    "unexpected",  # a bug of ours, not the camera's: counted apart so it never hides among decode errors
)


class FrameError(ValueError):
    """A frame refused before it reached the model; `reason` is one of INVALID_REASONS."""

    def __init__(self, reason: str, detail: str, camera_id: str = UNKNOWN_CAMERA, seq: int | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.camera_id, self.seq = reason, detail, camera_id, seq


class _Who(TypedDict):
    """FrameError's attribution of a refused frame, passed on as keywords."""

    camera_id: str
    seq: int | None


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
    camera = camera if isinstance(camera, str) and CAMERA_ID_RE.fullmatch(camera) else UNKNOWN_CAMERA
    seq = seq if type(seq) is int and 0 <= seq <= MAX_SAFE_INT else None
    return camera, seq


def parse_header(raw: bytes) -> FrameHeader:
    if len(raw) > MAX_HEADER_BYTES:
        raise FrameError("header_too_large", f"header is {len(raw)} bytes (limit {MAX_HEADER_BYTES})")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise FrameError("header_json", f"header is not UTF-8 JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
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
    who = _Who(camera_id=header.camera_id, seq=header.seq)
    if len(payload) > limits.max_payload_bytes:
        raise FrameError("payload_too_large", f"{len(payload)} bytes (limit {limits.max_payload_bytes})", **who)
    if header.width * header.height > limits.max_pixels:
        raise FrameError("too_large", f"{header.width}x{header.height} exceeds {limits.max_pixels} pixels", **who)
    if header.encoding == "raw":
        channels, dtype = _raw_layout(header)
        expected = header.width * header.height * channels * dtype.itemsize
        if len(payload) != expected:
            raise FrameError("payload_size", f"raw payload is {len(payload)} bytes, header implies {expected}", **who)
        return
    try:  # Pillow reads only the image's own header here: no pixels are decoded
        with Image.open(io.BytesIO(payload)) as probe:
            fmt, size = probe.format, probe.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises SyntaxError, struct.error, EOFError… on junk too
        raise FrameError("decode", f"not a readable {header.encoding} image: {type(exc).__name__}: "
                                   f"{str(exc)[:200]}", **who) from None
    if fmt != PIL_FORMATS[header.encoding]:
        raise FrameError("encoding_mismatch", f"header says {header.encoding}, payload is {fmt}", **who)
    if size != (header.width, header.height):
        raise FrameError("dimension_mismatch",
                         f"header says {header.width}x{header.height}, image is {size[0]}x{size[1]}", **who)


def _raw_layout(header: FrameHeader) -> tuple[int, np.dtype[np.unsignedinteger[Any]]]:
    """A raw frame's channels and pixel type (the header's validator requires both for raw)."""
    if header.channels is None or header.dtype is None:
        raise FrameError("header_schema", "raw frames need channels and dtype", header.camera_id, header.seq)
    return header.channels, np.dtype(RAW_DTYPES[header.dtype])


def decode_payload(header: FrameHeader, payload: bytes) -> np.ndarray:
    """Checked payload → RGB uint8 (H, W, 3)."""
    who = _Who(camera_id=header.camera_id, seq=header.seq)
    try:
        if header.encoding == "raw":
            channels, dtype = _raw_layout(header)
            pixels = np.frombuffer(payload, dtype=dtype)
            return to_rgb8(pixels.reshape(header.height, header.width, channels), "raw frame")
        if header.encoding == "jpeg":
            image = decode_jpeg(payload)
        else:
            image = decode_image(payload, f"{header.encoding} frame")
    except DataError as exc:
        raise FrameError("decode", str(exc), **who) from None
    if image.shape[:2] != (header.height, header.width):
        raise FrameError("dimension_mismatch", f"decoded {image.shape[1]}x{image.shape[0]}", **who)
    return image


def decode_jpeg(payload: bytes, min_side: int = 0) -> np.ndarray:
    """JPEG bytes → RGB uint8 (H, W, 3), refusing what libjpeg only warns about: a cut-off or corrupt
    stream (which it would fill with grey), a frame whose SOF claims more rows than its data holds.
    Bytes after the end-of-image marker are ignored, as libjpeg does. `min_side` > 0 decodes at the
    smallest DCT scale whose sides are still ≥ min_side (cheap previews of big frames)."""
    try:
        return simplejpeg.decode_jpeg(payload, colorspace="RGB", strict=True, min_height=min_side,
                                      min_width=min_side)
    except ValueError as exc:
        raise DataError(f"corrupt JPEG: {exc}") from None


@dataclass
class Message:
    """A received message whose header and sizes are checked, payload not decoded yet."""

    header: FrameHeader
    payload: bytes
    received_at: float
    clock_ok: bool = True  # the capture ts is plausible (the ingest checks it against its own clock)

    @property
    def pixels(self) -> int:
        return self.header.width * self.header.height

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
        if parts and len(parts[0]) <= MAX_HEADER_BYTES:  # never parse more JSON than a header may hold
            try:
                camera, seq = _identity(json.loads(parts[0].decode("utf-8")))
            except (UnicodeDecodeError, ValueError, RecursionError):
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
