"""What a hostile or broken camera sends, and how the tests read the agent back strictly: the message
mixes of the hostile tests and benchmark, a strict /metrics reader, a strict decision reader, the
resident memory of the agent's actors."""
from __future__ import annotations

import json
import math
import random
import struct
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import zmq

ANY_PORT = "tcp://127.0.0.1:*"


def nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def flat_jpeg(width: int, height: int, value: int = 128) -> bytes:
    """A valid JPEG that is small on the wire and large once decoded (a uniform image)."""
    image = np.full((height, width, 3), value, np.uint8)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def sof_offset(jpeg: bytes) -> int:
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at >= 0:
            return at
    raise ValueError("no SOF marker")


def resized_sof(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG whose frame header (SOF) claims another size: its scan no longer fits it."""
    at = sof_offset(jpeg)
    sof = bytearray(jpeg)
    sof[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(sof)


def corrupt_jpegs(jpeg: bytes, seed: int = 0) -> dict[str, bytes]:
    """Broken variants of one real JPEG: the first four must be refused, the last two decided."""
    rng = np.random.default_rng(seed)
    return {
        "half_with_eoi": jpeg[: len(jpeg) // 2] + b"\xff\xd9",  # passes an end-marker check
        "cut": jpeg[: len(jpeg) // 2],
        "cut_random_tail": jpeg[: len(jpeg) // 3] + rng.integers(0, 256, 50, dtype=np.uint8).tobytes(),
        "sof_6000": resized_sof(jpeg, 6000, 6000),
        "trailing_random": jpeg + rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(),
        "trailing_app1": jpeg + b"\xff\xe1" + b"metadata" * 250,
    }


def malformed(rng: random.Random, jpeg: bytes, w: int, h: int, camera: str = "fuzz",
              kinds: int = 21) -> tuple[list[bytes], str]:
    """One bad message of many kinds and the reason it must be counted under (`decided` for the kinds
    that are valid after all). Kinds 0-10 are test_agent's broken-camera mix (`kinds=11`), then the hostile ones."""
    good = {"v": 1, "camera_id": camera, "seq": 0, "ts": time.time(), "encoding": "jpeg", "width": w, "height": h}
    kind = rng.randrange(kinds)
    if kind == 0:
        return [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), jpeg], "header_json"
    if kind == 1:
        field = rng.choice(["seq", "width", "ts", "v", "encoding"])
        return [json.dumps(dict(good, **{field: [1, "x"]})).encode(), jpeg], "header_schema"
    if kind == 2:
        return [json.dumps(good).encode()], "parts"
    if kind == 3:
        cut = rng.randrange(100, len(jpeg) // 2)
        return [json.dumps(good).encode(), jpeg[:cut] + bytes(rng.randrange(256) for _ in range(50))], "decode"
    if kind == 4:
        raw = dict(good, encoding="raw", channels=3, dtype="uint8")
        return [json.dumps(raw).encode(), b"\0" * rng.randrange(1, 1000)], "payload_size"
    if kind == 5:
        return [json.dumps(dict(good, width=60000, height=60000)).encode(), jpeg], "too_large"
    if kind == 6:
        raw = dict(good, encoding="raw", channels=3, dtype=rng.choice(["float32", "int8", "object"]))
        return [json.dumps(raw).encode(), b"\0" * (w * h * 3)], "header_schema"
    if kind == 7:
        return [json.dumps(good).encode(), jpeg, b"extra"], "parts"
    if kind == 8:
        return [json.dumps(dict(good, width=w + 3)).encode(), jpeg], "dimension_mismatch"
    if kind == 9:
        return [json.dumps(dict(good, encoding="png")).encode(), jpeg], "encoding_mismatch"
    if kind == 10:
        return [b"[]", jpeg], "header_json"
    # the hostile kinds
    if kind == 11:
        return [json.dumps(dict(good, v=True)).encode(), jpeg], "header_schema"
    if kind == 12:
        return [json.dumps(dict(good, seq=rng.choice([2**53, 2**70, 10**400]))).encode(), jpeg], "header_schema"
    if kind == 13:
        return [json.dumps(dict(good, ts=10**400)).encode(), jpeg], "header_schema"
    if kind == 14:
        return [nested_json(rng.randrange(1100, 2000)), jpeg], "header_json"
    if kind == 15:
        return [json.dumps(dict(good, camera_id=camera + "\n")).encode(), jpeg], "header_schema"
    if kind == 16:
        return [json.dumps(good).encode(), corrupt_jpegs(jpeg)["half_with_eoi"]], "decode"
    if kind == 17:
        sof = corrupt_jpegs(jpeg)["sof_6000"]
        return [json.dumps(dict(good, width=6000, height=6000)).encode(), sof], "decode"
    if kind == 18:
        big = json.dumps(dict(good, pad="x" * rng.randrange(5000, 200_000))).encode()
        return [big, jpeg, b"x"], "parts"
    if kind == 19:
        return [json.dumps(dict(good, ts=float("nan"))).encode(), jpeg], "header_schema"
    return [json.dumps(good).encode(), jpeg[: len(jpeg) // 3] + b"\xff\xd9" * 3], "decode"


# ------------------------------------------------------------------ reading the agent back, strictly
def strict_decision(raw: bytes) -> dict:
    def refuse(name):
        raise ValueError(f"{name} in a decision")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


def scrape(base_url: str, timeout_s: float = 30.0) -> str:
    return urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout_s).read().decode()


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """/metrics through prometheus_client's own parser; every sample must be a finite number."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_bucket") or sample.labels.get("le") != "+Inf":
                assert math.isfinite(sample.value), f"{sample.name}{sample.labels} = {sample.value}"
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


class StrictDecisions:
    """Every decision on the results socket, parsed by a strict JSON parser; counts what failed to parse."""

    def __init__(self, endpoint: str):
        self.by_camera: dict[str, list[dict]] = {}
        self.order: list[tuple[str, int]] = []
        self.not_json: list[bytes] = []
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.rcvhwm = 0
        self._socket.connect(endpoint)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.5)  # let the subscription reach the PUB socket (slow joiner)

    def _run(self):
        while not self._stop.is_set():
            if self._socket.poll(100):
                parts = self._socket.recv_multipart()
                try:
                    decision = strict_decision(parts[1])
                except ValueError:
                    self.not_json.append(parts[1])
                    continue
                decision["_received_at"] = time.time()
                with self._lock:
                    self.by_camera.setdefault(decision["camera_id"], []).append(decision)
                    self.order.append((decision["camera_id"], decision["seq"]))

    def count(self, camera: str | None = None) -> int:
        with self._lock:
            if camera is None:
                return sum(len(v) for v in self.by_camera.values())
            return len(self.by_camera.get(camera, []))

    def of(self, camera: str) -> list[dict]:
        with self._lock:
            return list(self.by_camera.get(camera, []))

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close(linger=0)
        self._context.term()


def push_socket(context: zmq.Context, endpoint: str, sndhwm: int = 0) -> zmq.Socket:
    socket = context.socket(zmq.PUSH)
    socket.sndhwm = sndhwm
    socket.linger = 0
    socket.connect(endpoint)
    return socket


def rss_of(pids: dict[str, int]) -> dict[str, int]:
    import psutil

    return {name: psutil.Process(pid).memory_info().rss for name, pid in pids.items()}


_FORWARD_PEAK = """
import sys
from pathlib import Path

import numpy as np
import torch

from adtr_edge.model.detector import load_detector


def vm(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


torch.set_num_threads(int(sys.argv[3]))
detector = load_detector(sys.argv[1])
size = detector.image_size
frames = [np.full((size, size, 3), 127, np.uint8)] * int(sys.argv[2])
detector.coarse_maps(detector.embed(frames[:1]))  # every code path once, with one frame
before = vm("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
detector.coarse_maps(detector.embed(frames))
print(vm("VmHWM") - before)
"""


def forward_working_set(model_dir, batch: int, threads: int) -> int:
    """Bytes one forward pass of a full batch adds to a fresh process that has run one frame: the part
    of the inference actor's memory that the batch size setting, not the traffic, decides."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _FORWARD_PEAK, str(model_dir), str(batch), str(threads)],
                         capture_output=True, text=True, check=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    return int(out.stdout.strip().splitlines()[-1])
