"""Camera side: send frames from an image folder, a list file, a video or a camera device over ZeroMQ.

Both the demo's camera and a reference for integrators: it speaks the two-part frame protocol
(`actors.protocol.frame_message`). Image files already in the requested encoding are sent as they
are (bit-exact, no re-encoding), so a live decision can be compared with `adtr-edge predict`.
"""
from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import structlog
import zmq
import zmq.auth
from PIL import Image

from adtr_edge.actors.protocol import frame_message
from adtr_edge.model.data import IMAGE_SUFFIXES, DataError, images_in

from .errors import PublishError

log = structlog.get_logger(__name__)
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v"}
FILE_ENCODING = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}


@dataclass
class SourceFrame:
    """One frame to send: encoded bytes when the source already had them, else BGR pixels."""

    name: str
    encoded: bytes | None = None
    encoding: str | None = None
    pixels: np.ndarray | None = None


def frame_from_file(path: Path) -> SourceFrame:
    """One image file as a frame: its own bytes when JPEG/PNG (sent bit-exact), else decoded pixels."""
    data = path.read_bytes()
    encoding = FILE_ENCODING.get(path.suffix.lower())
    if encoding:
        return SourceFrame(str(path), encoded=data, encoding=encoding)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise DataError(f"{path}: not a readable image")
    return SourceFrame(str(path), pixels=pixels)


def frames_from(source: str) -> Iterator[SourceFrame]:
    """A folder of images, a .txt list of image paths, a video file, or a camera (`/dev/videoN`, `cam:N`)."""
    path = Path(source)
    if source.startswith("cam:") or source.startswith("/dev/video"):
        yield from _capture(int(source[4:]) if source.startswith("cam:") else source, source)
        return
    if path.is_dir():
        files = images_in(path)
    elif path.is_file() and path.suffix.lower() == ".txt":
        files = [Path(line.strip()) for line in path.read_text().splitlines() if line.strip()]
    elif path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        yield from _capture(str(path), source)
        return
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        files = [path]
    else:
        raise PublishError(f"--source {source}: not an image folder, .txt list, video file or camera")
    if not files:
        raise PublishError(f"--source {source}: no images found")
    for file in files:
        try:
            yield frame_from_file(file)
        except (OSError, DataError) as exc:
            log.warning("skipping unreadable source image", path=str(file), error=str(exc))


def _capture(device, name: str) -> Iterator[SourceFrame]:
    capture = cv2.VideoCapture(device)
    if not capture.isOpened():
        raise PublishError(f"--source {name}: cannot open the video or camera")
    try:
        index = 0
        while True:
            ok, pixels = capture.read()
            if not ok:
                return
            yield SourceFrame(f"{name}#{index}", pixels=pixels)
            index += 1
    finally:
        capture.release()


def encode(frame: SourceFrame, encoding: str) -> tuple[bytes, str, int, int, int | None, str | None]:
    """→ payload, encoding, width, height, channels, dtype. Source bytes pass through when they match."""
    wanted = frame.encoding if encoding == "auto" and frame.encoded else ("jpeg" if encoding == "auto" else encoding)
    if wanted is None:
        raise DataError(f"{frame.name}: encoded bytes without their encoding")
    if frame.encoded is not None and frame.encoding == wanted:
        try:  # the image's own header gives its size without decoding it
            with Image.open(io.BytesIO(frame.encoded)) as probe:
                width, height = probe.size
        except (OSError, ValueError) as exc:
            raise DataError(f"{frame.name}: not a readable image: {exc}") from None
        return frame.encoded, wanted, width, height, None, None
    pixels = frame.pixels
    if pixels is None and frame.encoded is not None:
        pixels = cv2.imdecode(np.frombuffer(frame.encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise DataError(f"{frame.name}: no pixels, and no bytes that decode")
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    height, width = pixels.shape[:2]
    if wanted == "raw":
        return np.ascontiguousarray(pixels).tobytes(), "raw", width, height, channels, str(pixels.dtype)
    ok, buf = cv2.imencode(".jpg" if wanted == "jpeg" else ".png", pixels)
    if not ok:
        raise DataError(f"{frame.name}: cannot encode as {wanted}")
    return buf.tobytes(), wanted, width, height, channels, None


class FramePublisher:
    """A camera's socket: PUSH (every frame; blocks when the agent is full) or PUB (latest frame wins)."""

    def __init__(self, endpoint: str, camera_id: str, socket: Literal["push", "pub"] = "push",
                 curve_server_key: Path | None = None, curve_key: Path | None = None, sndhwm: int = 16,
                 connect_timeout_s: float = 10.0):
        self.camera_id, self.seq = camera_id, 0
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUSH if socket == "push" else zmq.PUB)
        self.socket.sndhwm = sndhwm
        self.socket.sndbuf = 256 << 10  # with sndhwm: a bounded backlog, not several MB in TCP buffers
        self.socket.linger = 2000
        if curve_server_key or curve_key:
            if not (curve_server_key and curve_key):
                raise PublishError("CURVE needs both --curve-server-key and --curve-key")
            server_public, _ = zmq.auth.load_certificate(str(curve_server_key))
            public, secret = zmq.auth.load_certificate(str(curve_key))
            if secret is None:
                raise PublishError(f"{curve_key}: no secret key in it (use the camera's .key_secret file)")
            self.socket.curve_serverkey, self.socket.curve_publickey, self.socket.curve_secretkey = \
                server_public, public, secret
        monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.socket.connect(endpoint)
        # Wait until the connection is up: a PUB socket drops what it sends before that (slow joiner).
        self.connected = monitor.poll(int(connect_timeout_s * 1000)) != 0
        self.socket.disable_monitor()
        monitor.close()
        if socket == "pub" and self.connected:
            time.sleep(0.2)  # the subscription travels after the handshake
        if not self.connected:
            log.warning("no agent connected yet; frames will queue or wait", endpoint=endpoint)

    def send(self, frame: SourceFrame, encoding: str = "auto", ts: float | None = None,
             timeout_ms: int | None = None) -> int | None:
        """Send one frame; returns its seq, or None when the agent did not take it within timeout_ms."""
        payload, enc, width, height, channels, dtype = encode(frame, encoding)
        message = frame_message(self.camera_id, self.seq, payload, enc, width, height, channels, dtype, ts)
        if timeout_ms is None:
            self.socket.send_multipart(message, copy=False)
        else:  # POLLOUT can be true while a peer is (re)connecting and gone by the send: never block
            deadline = time.monotonic() + timeout_ms / 1000.0
            while True:
                try:
                    self.socket.send_multipart(message, flags=zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    if time.monotonic() >= deadline:
                        return None
                    self.socket.poll(10, zmq.POLLOUT)
        self.seq += 1
        return self.seq - 1

    def send_parts(self, parts: list[bytes]) -> None:
        """Send any message as it is (for integrators' tests and fuzzing)."""
        self.socket.send_multipart(parts)

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def publish(source: str, endpoint: str, camera_id: str, fps: float = 0.0, encoding: str = "auto",
            socket: Literal["push", "pub"] = "push", loop: bool = False, count: int = 0,
            sent_log: Path | None = None, curve_server_key: Path | None = None, curve_key: Path | None = None) -> dict:
    """Send frames at `fps` (0 = as fast as the agent takes them). Returns counts; writes seq→name lines."""
    publisher = FramePublisher(endpoint, camera_id, socket, curve_server_key, curve_key)
    interval = 1.0 / fps if fps > 0 else 0.0
    log_file = open(sent_log, "w") if sent_log else None
    sent, started, next_at = 0, time.monotonic(), time.monotonic()
    try:
        while True:
            for frame in frames_from(source):
                if interval:
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))
                seq = publisher.send(frame, encoding)
                sent += 1
                if log_file:
                    log_file.write(json.dumps({"seq": seq, "source": frame.name}) + "\n")
                if count and sent >= count:
                    raise StopIteration
            if not loop:
                break
    except StopIteration:
        pass
    finally:
        if log_file:
            log_file.close()
        publisher.close()
    seconds = time.monotonic() - started
    summary = {"camera_id": camera_id, "sent": sent, "seconds": round(seconds, 2),
               "fps": round(sent / seconds, 2) if seconds else 0.0}
    log.info("publisher done", **summary)
    return summary
