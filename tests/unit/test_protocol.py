"""The frame protocol: what a camera may send, and the reason each bad frame is refused with."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from adtr_edge.actors.protocol import FrameError, FrameLimits, frame_message, parse_frame

from conftest import MAGNETIC_TILE

pytestmark = pytest.mark.usefixtures("magnetic_tile")  # real data; skipped, and said, without it

LIMITS = FrameLimits(max_payload_bytes=1 << 20, max_pixels=4_000_000)


@pytest.fixture(scope="module")
def jpeg_file():
    return sorted((MAGNETIC_TILE / "MT_Free" / "Imgs").glob("*.jpg"))[0]


def _message(payload: bytes, **header) -> list[bytes]:
    base = {"v": 1, "camera_id": "cam-1", "seq": 7, "ts": 1.5, "encoding": "jpeg", "width": 1, "height": 1}
    base.update(header)
    return [json.dumps({k: v for k, v in base.items() if v is not ...}).encode(), payload]


def _reason(parts) -> str:
    with pytest.raises(FrameError) as info:
        parse_frame(parts, LIMITS)
    return info.value.reason


def test_a_real_jpeg_decodes_to_the_same_pixels_as_the_file(jpeg_file):
    image = cv2.cvtColor(cv2.imread(str(jpeg_file)), cv2.COLOR_BGR2RGB)
    parts = frame_message("cam-1", 3, jpeg_file.read_bytes(), "jpeg", image.shape[1], image.shape[0])
    frame = parse_frame(parts, LIMITS)
    assert frame.header.seq == 3 and frame.header.camera_id == "cam-1"
    assert np.array_equal(frame.image, image)


@pytest.mark.parametrize("channels,dtype", [(1, "uint8"), (3, "uint8"), (4, "uint8"), (1, "uint16")])
def test_raw_frames_of_each_layout_decode_to_rgb(channels, dtype):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(5, 7, channels), dtype=np.uint8).astype(dtype)
    frame = parse_frame(frame_message("c", 0, pixels.tobytes(), "raw", 7, 5, channels, dtype), LIMITS)
    assert frame.image.shape == (5, 7, 3) and frame.image.dtype == np.uint8


def test_png_frames_decode(jpeg_file):
    image = cv2.imread(str(jpeg_file))
    png = cv2.imencode(".png", image)[1].tobytes()
    frame = parse_frame(frame_message("c", 0, png, "png", image.shape[1], image.shape[0]), LIMITS)
    assert np.array_equal(frame.image, cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def test_each_kind_of_bad_frame_is_refused_with_its_own_reason(jpeg_file):
    jpeg = jpeg_file.read_bytes()
    w, h = cv2.imread(str(jpeg_file)).shape[1::-1]
    png = cv2.imencode(".png", np.zeros((h, w, 3), np.uint8))[1].tobytes()
    assert _reason([b"{not json", jpeg]) == "header_json"
    assert _reason([b"\xff\xfe", jpeg]) == "header_json"
    assert _reason([b"[1, 2]", jpeg]) == "header_json"
    assert _reason(_message(jpeg, seq="7")) == "header_schema"
    assert _reason(_message(jpeg, width=...)) == "header_schema"
    assert _reason(_message(jpeg, v=2)) == "header_schema"
    assert _reason(_message(jpeg, camera_id="../etc")) == "header_schema"
    assert _reason(_message(jpeg, ts=float("nan"))) == "header_schema"  # Python's json reads NaN; we refuse it
    assert _reason(_message(b"x", encoding="raw", width=2, height=2, channels=3, dtype="float64")) == "header_schema"
    assert _reason(_message(b"x", encoding="raw", width=2, height=2)) == "header_schema"  # raw needs a layout
    assert _reason(_message(jpeg, width=w, height=h)[:1]) == "parts"
    assert _reason([*_message(jpeg, width=w, height=h), b"extra"]) == "parts"
    assert _reason([b" " * 5000, jpeg]) == "header_too_large"
    assert _reason(_message(b"\0" * 11, encoding="raw", width=2, height=2, channels=3, dtype="uint8")) == "payload_size"
    assert _reason(_message(jpeg, width=60000, height=60000)) == "too_large"
    assert _reason(_message(b"\0" * (2 << 20), width=w, height=h)) == "payload_too_large"
    assert _reason(_message(jpeg[: len(jpeg) // 3] + b"\0" * 100, width=w, height=h)) == "decode"
    assert _reason(_message(b"\xff\xd8 not really a jpeg", width=w, height=h)) == "decode"
    assert _reason(_message(png, width=w, height=h)) == "encoding_mismatch"
    assert _reason(_message(jpeg, width=w + 1, height=h)) == "dimension_mismatch"


def test_a_refused_frame_still_names_its_camera_and_seq_when_the_header_says_them():
    with pytest.raises(FrameError) as info:
        parse_frame(_message(b"junk", width=4, height=4), LIMITS)
    assert (info.value.camera_id, info.value.seq) == ("cam-1", 7)
    with pytest.raises(FrameError) as info:
        parse_frame([b"garbage"], LIMITS)
    assert info.value.camera_id == "_unknown" and info.value.seq is None
