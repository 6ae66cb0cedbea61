"""ScoringActor: coarse maps → decisions (each map by its own model version's ScoreHead), published on a
ZeroMQ PUB socket.

Beside each decision it keeps what the learning loop watches: per camera, the score drift against the
serving model's validation scores, the recent anomaly rate per model version (the promotion guard
reads it), the shadow model's agreement with the serving one (shadow decisions are never published),
and a sample of confidently normal frames for the accepted-sample store (written by a thread, off
the decision path; what does not fit its queue is shed and counted). Anomalous frames are written
to disk: the original payload, a heatmap overlay, a thumbnail, the heatmap alone and a JSON sidecar,
under a size cap; so is a sample of normal frames (by a thread, for review in the operator console).
"""
from __future__ import annotations

import asyncio
import math
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog
import torch
import zmq

from adtr_edge.lifecycle.drift import Reference, ScoreDrift, reference_bins
from adtr_edge.lifecycle.registry import resolve_model
from adtr_edge.lifecycle.samples import SampleStore, StoreLimits
from adtr_edge.model.checkpoint import read_manifest
from adtr_edge.model.detector import ScoreHead, load_score_head
from adtr_edge.model.scoring import defect_regions
from adtr_edge.model.visualize import heatmap_overlay

from .cold import read_cold
from .config import AutoSampleConfig, LearningConfig, OutputConfig, point_paths
from .contract import NORMAL_PREFIX, Decision, FrameHeader, decision_message, strict_json
from .inference import InferenceResult
from .logs import configure_logging, node_id
from .protocol import decode_jpeg, decode_payload
from .stats import COST_BUCKETS_S, Histogram

log = structlog.get_logger(__name__)
PAYLOAD_SUFFIX = {"jpeg": ".jpg", "png": ".png", "raw": ".png"}
MAX_HEADS = 8  # score heads kept (serving, shadow, recent versions)


THUMB_WIDTH = 240


class AnomalyStore:
    """Files for anomalous frames (and a sample of normal ones) in `<dir>/<camera>/`, total size kept under
    `max_bytes`, the normals' share under `normals_max_bytes`; the oldest go first. Thread-safe (the
    normals are written by their own thread).

    A write never replaces a file: a stem already taken (the same camera, seq and time twice, e.g. a
    camera whose sequence restarted) gets a `-1`, `-2`… before its `_<seq>` end. Each path is counted
    once, so `total` is what is on disk."""

    def __init__(self, root: Path, max_bytes: int, normals_max_bytes: int = 0):
        self.root, self.max_bytes, self.normals_max_bytes = Path(root), max_bytes, normals_max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        existing = sorted(((p, p.stat()) for p in self.root.rglob("*") if p.is_file()), key=lambda e: e[1].st_mtime)
        # path → (size, written at): one map for anomalies, one for normals, each oldest first
        self.files: OrderedDict[Path, tuple[int, float]] = OrderedDict()
        self.normals: OrderedDict[Path, tuple[int, float]] = OrderedDict()
        for path, st in existing:
            (self.normals if path.name.startswith(NORMAL_PREFIX) else self.files)[path] = (st.st_size, st.st_mtime)
        self.normals_total = sum(size for size, _ in self.normals.values())
        self.total = sum(size for size, _ in self.files.values()) + self.normals_total
        self.deleted = 0

    def _free_stem(self, folder: Path, stem: str, suffixes) -> str:
        head, sep, tail = stem.rpartition("_")  # keep `_<seq>` last: readers glob `*_<seq>.json`
        head, tail = (head, sep + tail) if sep else (stem, "")
        candidate, n = stem, 0
        while any((path := folder / f"{candidate}{suffix}") in self.files or path in self.normals or path.exists()
                  for suffix in suffixes):
            n += 1
            candidate = f"{head}-{n}{tail}"
        return candidate

    def _forget(self, path: Path) -> None:
        """`path` is about to be (re)written: its old size is no longer on disk."""
        for normal, entries in ((False, self.files), (True, self.normals)):
            if path in entries:
                size, _ = entries.pop(path)
                self.total -= size
                self.normals_total -= size if normal else 0

    def write(self, camera: str, stem: str, files: dict[str, bytes], normal: bool = False) -> dict[str, str]:
        folder = self.root / camera
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        with self.lock:
            stem = self._free_stem(folder, stem, files)
            entries = self.normals if normal else self.files
            for suffix, data in files.items():
                path = folder / f"{stem}{suffix}"
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
                self._forget(path)
                entries[path] = (len(data), time.time())
                self.total += len(data)
                self.normals_total += len(data) if normal else 0
                written[suffix] = str(path)
            self._trim()
        return written

    def _drop(self, normal: bool) -> None:
        path, (size, _) = (self.normals if normal else self.files).popitem(last=False)
        path.unlink(missing_ok=True)
        self.total -= size
        self.normals_total -= size if normal else 0
        self.deleted += 1

    def _oldest(self, entries: OrderedDict[Path, tuple[int, float]]) -> float:
        return next(iter(entries.values()))[1]

    def _trim(self) -> None:
        while self.normals and self.normals_total > self.normals_max_bytes:
            self._drop(True)
        while self.total > self.max_bytes and (self.files or self.normals):
            # the oldest file of either kind
            normal_first = bool(self.normals) and (not self.files or
                                                   self._oldest(self.normals) <= self._oldest(self.files))
            self._drop(normal_first)

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"bytes": self.total, "files": len(self.files) + len(self.normals), "deleted": self.deleted,
                    "normal_bytes": self.normals_total, "normal_files": len(self.normals)}


def heat_png(amap: np.ndarray, threshold: float) -> bytes:
    """The anomaly map alone, as a transparent JET heatmap (BGRA PNG at the map's resolution; colours over
    [0, 2 × threshold] like the overlay; clear below 0.75 × threshold, 75 % opaque from 1.25 × threshold):
    the console lays it over the frame and can switch it off."""
    t = max(threshold, 1e-12)
    scaled = np.clip(amap / (2.0 * t), 0.0, 1.0)
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (np.clip((amap / t - 0.75) * 1.5, 0.0, 0.75) * 255).astype(np.uint8)
    return cv2.imencode(".png", np.dstack([heat, alpha]))[1].tobytes()


def thumbnail_jpg(frame_rgb: np.ndarray, width: int = THUMB_WIDTH) -> bytes:
    height, w = frame_rgb.shape[:2]
    size = (width, max(1, round(height * width / w)))
    small = cv2.resize(frame_rgb, size, interpolation=cv2.INTER_AREA)
    if small.ndim == 2:
        small = cv2.cvtColor(small, cv2.COLOR_GRAY2RGB)
    return cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()


def frame_stem(received_at: float, seq: int, normal: bool = False) -> str:
    """`[ok_]<YYYYmmddTHHMMSS.ffffff>_<seq>`: named by the agent's clock when the frame arrived (a camera's
    may be wrong); the store keeps equal stems apart."""
    stamp = time.strftime('%Y%m%dT%H%M%S', time.gmtime(received_at)) + f".{int(received_at % 1 * 1e6):06d}"
    stem = f"{stamp}_{seq:010d}"
    return NORMAL_PREFIX + stem if normal else stem


def bounded_frame(header: dict[str, Any], payload: bytes, limit: int) -> np.ndarray:
    """The frame for an overlay or thumbnail, its longer side at most `limit` (output.overlay_max_side): a
    JPEG is decoded at the smallest DCT scale that is still large enough (a 6000×6000 frame costs 1/64 of
    a full decode), anything else decoded and shrunk."""
    long_side, short_side = max(header["width"], header["height"]), min(header["width"], header["height"])
    if header["encoding"] == "jpeg" and long_side > limit:  # the long side still ≥ limit after scaling
        frame = decode_jpeg(payload, min_side=math.ceil(limit * short_side / long_side))
    else:
        frame = decode_payload(FrameHeader.model_validate(header), payload)
    height, width = frame.shape[:2]
    if max(height, width) > limit:
        factor = limit / max(height, width)
        frame = cv2.resize(frame, (max(1, round(width * factor)), max(1, round(height * factor))),
                           interpolation=cv2.INTER_AREA)
    return frame


class NormalSaver:
    """A sample of normal decisions → the output folder (payload, thumbnail, heatmap, sidecar), at most one
    per camera per `every_s`, on a thread with a bounded queue: the decision path only enqueues. The frame
    is decoded no larger than `max_side` for its thumbnail (a camera of huge frames cannot stall it)."""

    def __init__(self, store: AnomalyStore, cfg, log_, max_side: int = 1024):
        self.store, self.cfg, self.log, self.max_side = store, cfg, log_, max_side
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue)
        self.last: dict[str, float] = {}
        self.saved = self.shed = self.errors = 0
        threading.Thread(target=self._write_loop, name="normal-saver", daemon=True).start()

    def consider(self, header: dict, decision: dict, amap: np.ndarray, payload: bytes, received_at: float) -> None:
        camera, now = header["camera_id"], time.monotonic()
        if now - self.last.get(camera, -math.inf) < self.cfg.every_s:
            return
        self.last[camera] = now
        try:
            self.queue.put_nowait((header, decision, amap.copy(), payload, received_at))
        except queue.Full:
            self.shed += 1

    def _write_loop(self) -> None:
        while True:
            header, decision, amap, payload, received_at = self.queue.get()
            try:
                frame = bounded_frame(header, payload, self.max_side)
                if header["encoding"] == "raw":  # raw pixels are stored as a lossless PNG
                    full = decode_payload(FrameHeader.model_validate(header), payload)
                    payload = cv2.imencode(".png", cv2.cvtColor(full, cv2.COLOR_RGB2BGR))[1].tobytes()
                self.store.write(header["camera_id"], frame_stem(received_at, header["seq"], normal=True), {
                    PAYLOAD_SUFFIX[header["encoding"]]: payload,
                    "_thumb.jpg": thumbnail_jpg(frame),
                    "_heat.png": heat_png(amap, decision["threshold"]),
                    ".json": strict_json(dict(decision, source_encoding=header["encoding"], sampled="normal"),
                                         indent=1),
                }, normal=True)
                self.saved += 1
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop decisions
                self.errors += 1
                if self.errors <= 10 or self.errors % 1000 == 0:
                    self.log.error("normal sample not saved", camera_id=header["camera_id"], error=str(exc)[:200])

    def stats(self) -> dict[str, int]:
        return {"saved": self.saved, "shed": self.shed, "errors": self.errors, "queued": self.queue.qsize()}


@dataclass
class VersionHead:
    head: ScoreHead
    drift_reference: Reference | None
    # The share of normal frames the threshold promises to flag (1 − threshold.normal_quantile when it was
    # calibrated on normals alone; None when it was chosen with labelled defects).
    false_alarm_promise: float | None = None


def false_alarm_promise(manifest: dict[str, Any]) -> float | None:
    """What the threshold can promise: 1 − threshold.normal_quantile, but no less than 1 / (n + 1) for n
    validation normals (a quantile above the largest of n scores cannot be estimated from them; ELPV poly's
    47 normals calibrated at 0.99 flagged 4.9 % of its test normals)."""
    if manifest.get("threshold_method") != "normal_quantile":
        return None
    quantile = manifest.get("settings", {}).get("threshold", {}).get("normal_quantile")
    if quantile is None:
        return None
    n = int(manifest.get("validation_scores", {}).get("n") or 0)
    return max(1.0 - float(quantile), 1.0 / (n + 1)) if n else 1.0 - float(quantile)


class PointStats:
    """One inspection point's decisions: totals and the flagged share of its last `window` decisions, the
    live false-alarm rate on a line of normal parts (every flag counts until an operator reviews it)."""

    def __init__(self, window: int):
        self.decisions = self.anomalies = 0
        self.recent: deque[bool] = deque(maxlen=window)
        self.promise: float | None = None
        self.model_version = ""

    def observe(self, is_anomaly: bool, version: str, promise: float | None) -> None:
        self.decisions += 1
        self.anomalies += int(is_anomaly)
        self.recent.append(is_anomaly)
        self.model_version, self.promise = version, promise

    def summary(self) -> dict[str, Any]:
        n = len(self.recent)
        return {"decisions": self.decisions, "anomalies": self.anomalies, "model_version": self.model_version,
                "window": n, "flag_rate": sum(self.recent) / n if n else None,
                "false_alarm_promise": self.promise}


@dataclass
class ShadowStats:
    """The shadow model against the serving one on the same frames (one camera, one shadow version)."""

    serving_version: str = ""
    n: int = 0
    agree: int = 0
    serving_anomalies: int = 0
    shadow_anomalies: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # Σx Σy Σx² Σy² Σxy of log scores

    def observe(self, serving_score: float, shadow_score: float, serving_anomaly: bool, shadow_anomaly: bool):
        self.n += 1
        self.agree += int(serving_anomaly == shadow_anomaly)
        self.serving_anomalies += int(serving_anomaly)
        self.shadow_anomalies += int(shadow_anomaly)
        x, y = math.log(max(serving_score, 1e-12)), math.log(max(shadow_score, 1e-12))
        for i, v in enumerate((x, y, x * x, y * y, x * y)):
            self.sums[i] += v

    def summary(self) -> dict[str, Any]:
        n = self.n
        sx, sy, sxx, syy, sxy = self.sums
        var_x, var_y = n * sxx - sx * sx, n * syy - sy * sy
        corr = (n * sxy - sx * sy) / math.sqrt(var_x * var_y) if n > 2 and var_x > 0 and var_y > 0 else None
        return {"serving_version": self.serving_version, "frames": n,
                "agreement": self.agree / n if n else None,
                "serving_anomaly_rate": self.serving_anomalies / n if n else None,
                "shadow_anomaly_rate": self.shadow_anomalies / n if n else None,
                "score_correlation": corr}


class AutoSampler:
    """Confidently normal frames → the sample store, on a thread with a bounded queue (never blocks).

    With `target` (a cold start's recording, actors/cold.py): every frame offered (at most one per camera
    per `cfg.min_interval_s`) whatever its score, until `target` samples are stored."""

    def __init__(self, store_dir: Path, limits: StoreLimits, cfg, log_, target: int | None = None):
        self.cfg, self.log, self.target = cfg, log_, target
        self.store = SampleStore(store_dir, limits)
        self.by = "agent:cold_start" if target else None
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue)
        self.last: dict[str, float] = {}
        self.offered = self.written = self.duplicates = self.shed = self.errors = 0
        if target:  # a restarted recording counts what it stored before
            self.written = self.store.total()
        self.thread = threading.Thread(target=self._write_loop, name="cold-recorder" if target else "auto-sampler",
                                       daemon=True)
        self.thread.start()

    def close(self, timeout_s: float = 10.0) -> dict[str, int]:
        """Write what is queued (up to timeout_s), then stop the thread; what is left is counted as shed."""
        try:
            self.queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self.thread.join(timeout_s)
        while True:
            try:
                self.shed += int(self.queue.get_nowait() is not None)
            except queue.Empty:
                break
        return self.stats()

    @property
    def complete(self) -> bool:
        return self.target is not None and self.written >= self.target

    def consider(self, header: dict, payload: bytes, version: str, score: float, normalized: float) -> None:
        camera, now = header["camera_id"], time.monotonic()
        confident = self.target is not None or normalized < self.cfg.max_normalized_score
        if not confident or self.complete or now - self.last.get(camera, -math.inf) < self.cfg.min_interval_s:
            return
        self.last[camera] = now
        self.offered += 1
        try:
            self.queue.put_nowait((header, payload, version, score, normalized))
        except queue.Full:
            self.shed += 1

    def _write_loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:  # close()
                return
            header, payload, version, score, normalized = item
            if self.complete:
                continue
            try:
                ext = PAYLOAD_SUFFIX[header["encoding"]]
                if header["encoding"] == "raw":
                    frame = decode_payload(FrameHeader.model_validate(header), payload)
                    payload = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()
                result = self.store.add(payload, "auto", self.by or f"agent:auto:{version}", ext, header["camera_id"],
                                        header["seq"], model_version=version, score=score, normalized_score=normalized)
                self.written += int(result.added)
                self.duplicates += int(result.duplicate)
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop decisions
                self.errors += 1
                if self.errors <= 10 or self.errors % 1000 == 0:
                    self.log.error("auto sample not stored", camera_id=header["camera_id"], error=str(exc)[:200])

    def stats(self) -> dict[str, int]:
        return {"offered": self.offered, "written": self.written, "duplicates": self.duplicates, "shed": self.shed,
                "errors": self.errors, "queued": self.queue.qsize(),
                **({"target": self.target, "complete": self.complete} if self.target else {})}


class ScoringActor:
    def __init__(self, model_path: str | dict[str, str], results_endpoint: str, cfg: OutputConfig,
                 learning: LearningConfig | None = None, threads: int = 1):
        configure_logging("info", json_output=True)  # worker stderr reaches the driver
        # Its CPU budget (scoring.threads): the score maps and overlays are small; more threads would
        # only take cores from the forward pass on a small box.
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        self.seconds = Histogram(COST_BUCKETS_S)  # per frame: score, decide, publish, save
        self.paths, self.cfg = point_paths(model_path), cfg
        self.learning = learning or LearningConfig()
        self.heads: OrderedDict[tuple[str, str], VersionHead] = OrderedDict()
        self.points: dict[str, PointStats] = {}
        self.camera_point: dict[str, str] = {}
        self.registries: dict[str, Any] = {}
        self.samplers: dict[str, AutoSampler] = {}
        self.cold: dict[str, dict[str, Any]] = {}  # points being taught (actors/cold.py): not inspected
        self.recorders: dict[str, AutoSampler] = {}
        self.log = log
        for point, path in list(self.paths.items()):
            self._add_point(point, path)
        self.serving_version = next(iter(self.points.values())).model_version
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.sndhwm = 10_000
        self.socket.linger = 1000
        self.socket.bind(results_endpoint)
        self.bound = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.store = AnomalyStore(cfg.dir, cfg.max_bytes, cfg.normals.max_bytes) if cfg.save_anomalies else None
        # Normals are sampled into the same folder: only where it is in use (save_anomalies off = no files).
        self.normal_saver = NormalSaver(self.store, cfg.normals, log, cfg.overlay_max_side) \
            if self.store is not None and cfg.normals.every_s > 0 and cfg.normals.max_bytes > 0 else None
        self.decisions = self.anomalies = self.write_errors = 0
        self.drift: dict[str, tuple[str, ScoreDrift | None]] = {}
        self.drift_alarms: dict[str, bool] = {}
        self.recent: dict[str, deque[tuple[str, bool]]] = {}
        self.shadow: dict[tuple[str, str], ShadowStats] = {}
        self.log = log.bind(model_version=self.serving_version)
        self.log.info("scoring ready", results=self.bound, output=str(cfg.dir) if self.store else None,
                      auto_sample=sorted(self.samplers), points=sorted(self.paths))

    @property
    def sampler(self) -> AutoSampler | None:  # the first point's (one point: the agent's)
        return self.samplers.get(next(iter(self.paths)))

    def _add_point(self, point: str, path: str) -> None:
        """Serve `point`: its head, its counts, and either its auto sampler or (a cold start) its recorder."""
        self.paths[point] = path
        model_dir, registry = resolve_model(path)
        version = self._head(point, str(read_manifest(model_dir)["model_version"]), model_dir).head.model_version
        self.points[point] = PointStats(self.learning.guard.window)
        self.points[point].model_version = version
        self.registries[point] = registry
        cold = read_cold(registry.root) if registry is not None else None
        self._set_cold(point, cold)

    def _set_cold(self, point: str, cold: dict[str, Any] | None) -> None:
        """The point's cold start as it now stands: while taught, one recorder (kept across the state's steps,
        its target following `frames`); once not, the auto sampler instead."""
        registry, limits = self.registries[point], StoreLimits(**self.learning.store.model_dump())
        if registry is None:
            return
        c = self.learning.cold_start
        if cold is None:
            self.cold.pop(point, None)
            self.recorders.pop(point, None)
            if self.learning.auto_sample.enabled and point not in self.samplers:
                self.samplers[point] = AutoSampler(registry.store_dir, limits, self.learning.auto_sample,
                                                   self.log.bind(point=point))
            return
        self.cold[point] = cold
        self.samplers.pop(point, None)
        target = int(cold.get("frames", c.frames))
        if point in self.recorders:
            self.recorders[point].target = target  # the operator may end the recording early
        else:
            recording = AutoSampleConfig(min_interval_s=c.every_s, queue=c.queue)
            self.recorders[point] = AutoSampler(registry.store_dir, limits, recording, self.log.bind(point=point),
                                                target=target)

    async def add_point(self, point: str, path: str) -> dict[str, Any]:
        """Serve a new inspection point from the next frame on (`adtr-edge points add`)."""
        self._add_point(point, path)
        self.log.info("inspection point added", point=point, cold_start=self.cold.get(point))
        return {"point": point, "cold_start": self.cold.get(point)}

    async def remove_point(self, point: str) -> dict[str, Any]:
        """Stop serving `point` (`adtr-edge points remove`): its heads, counts and samplers go; the samples
        they had queued are written first. Its frames must have stopped arriving (the ingest waits for that)."""
        if point not in self.paths:
            raise ValueError(f"no inspection point {point!r} here (points: {', '.join(self.paths)})")
        if point == next(iter(self.paths)):
            raise ValueError(f"inspection point {point!r} is the first one: the agent's batch size, overlays and "
                             "defaults are tuned on it; it cannot be removed while the agent runs")
        samplers = [s for s in (self.samplers.pop(point, None), self.recorders.pop(point, None)) if s is not None]
        loop = asyncio.get_running_loop()
        flushed = [await loop.run_in_executor(None, s.close) for s in samplers]
        final = self.points.pop(point).summary() if point in self.points else None
        for key in [k for k in self.heads if k[0] == point]:
            del self.heads[key]
        self.paths.pop(point)
        self.registries.pop(point, None)
        self.cold.pop(point, None)
        self.log.info("inspection point removed", point=point, decided=final, samplers=flushed)
        return {"point": point, "decided": final, "samplers": flushed}

    async def set_cold(self, point: str, cold: dict[str, Any] | None) -> None:
        """The point's cold start moved on (None: a model of its own serves: decisions are inspected)."""
        self._set_cold(point, cold)

    def _head(self, point: str, version: str, model_dir: Path | None = None) -> VersionHead:
        """The threshold and drift reference must be those of the model that made the map."""
        key = (point, version)
        if key in self.heads:
            self.heads.move_to_end(key)
            return self.heads[key]
        if point not in self.paths:
            raise RuntimeError(f"map from inspection point {point!r}, which this agent does not serve")
        model_dir = model_dir or resolve_model(self.paths[point], version)[0]
        head = load_score_head(model_dir)
        if head.model_version != version:
            raise RuntimeError(f"map from model {version}, but {model_dir} holds {head.model_version}")
        manifest = read_manifest(model_dir)
        entry = VersionHead(head, reference_bins(manifest.get("validation_scores", {})), false_alarm_promise(manifest))
        self.heads[key] = entry
        while len(self.heads) > MAX_HEADS * len(self.paths):
            self.heads.popitem(last=False)
        return entry

    async def score_batch(self, headers: list[dict[str, Any]], results: list[InferenceResult],
                          payloads: list[bytes], received_at: list[float],
                          clock_ok: list[bool] | None = None) -> list[dict[str, Any]]:
        """Decide frames from their coarse maps, publish each decision, save anomalies (payloads are
        the camera's bytes). Returns what the ingest counts: is_anomaly and latency per frame.
        `clock_ok[i]` False: the frame's capture ts is implausible, so its latency_ms is null."""
        started = time.perf_counter()
        clock_ok = clock_ok or [True] * len(results)
        out: list[dict[str, Any]] = [{}] * len(results)
        for i, r in enumerate(results):
            if r.refused is not None:  # the inference actor's decoder refused its bytes: counted as invalid
                out[i] = {"refused": r.refused, "is_anomaly": False, "latency_ms": None}
        # One ScoreHead call per point and model version (one, except across a model swap).
        for key in dict.fromkeys((r.point, r.model_version) for r in results if r.refused is None):
            idx = [i for i, r in enumerate(results) if (r.point, r.model_version) == key and r.refused is None]
            entry = self._head(*key)
            scored = entry.head.score(torch.from_numpy(np.stack([np.asarray(results[i].coarse, np.float32)
                                                                 for i in idx])))
            for j, i in enumerate(idx):
                out[i] = self._decide(entry, headers[i], results[i], payloads[i], received_at[i], scored, j,
                                      clock_ok[i])
        self._compare_shadow(headers, results, out)
        per_frame = (time.perf_counter() - started) / max(1, len(results))
        for _ in results:
            self.seconds.observe(per_frame)
        return out

    def _decide(self, entry: VersionHead, header, result: InferenceResult, payload: bytes, received_at: float,
                scored, j: int, clock_ok: bool = True) -> dict:
        head = entry.head
        amap = scored.maps[j].numpy()
        score, threshold = float(scored.scores[j]), head.decision_threshold
        cold = self.cold.get(result.point)
        is_anomaly = bool(scored.is_anomaly[j]) and cold is None  # a point being taught decides nothing yet
        regions = defect_regions(amap, threshold, (header["width"], header["height"]),
                                 self.cfg.min_region_area_px, self.cfg.max_regions) if is_anomaly else []
        now = time.time()
        decision = Decision(  # the published contract, checked; a non-finite number becomes null (strict JSON)
            camera_id=header["camera_id"], seq=header["seq"], ts=header["ts"],
            score=score, normalized_score=float(scored.normalized[j]), threshold=threshold,
            is_anomaly=is_anomaly, regions=regions, model_version=head.model_version,
            point=result.point, inspected=cold is None,
            # capture → published, only when the camera's clock is plausible (a ms clock, 1e306: null)
            latency_ms=(now - header["ts"]) * 1000.0 if clock_ok else None,
            agent_ms=(now - received_at) * 1000.0,
            inference_ms=result.inference_ms, batch_size=result.batch_size,
            width=header["width"], height=header["height"],
        ).wire()
        if is_anomaly and self.store is not None:
            decision["files"] = self._save(header, decision, amap, payload, received_at)
        self.socket.send_multipart(decision_message(decision))
        self.decisions += 1
        self.anomalies += int(is_anomaly)
        self.camera_point[header["camera_id"]] = result.point
        if cold is not None:  # recorded for the point's first model; not watched, sampled or counted as decided
            recorder = self.recorders.get(result.point)
            if recorder is not None:
                recorder.consider(header, payload, head.model_version, score, decision["normalized_score"])
            return {"is_anomaly": False, "latency_ms": decision["latency_ms"], "score": score,
                    "normalized_score": decision["normalized_score"]}
        self.points[result.point].observe(is_anomaly, head.model_version, entry.false_alarm_promise)
        self._watch(result.point, header["camera_id"], head.model_version, score, is_anomaly)
        sampler = self.samplers.get(result.point)
        if sampler is not None and not is_anomaly:
            sampler.consider(header, payload, head.model_version, score, decision["normalized_score"])
        if self.normal_saver is not None and not is_anomaly:
            self.normal_saver.consider(header, decision, amap, payload, received_at)
        return {"is_anomaly": is_anomaly, "latency_ms": decision["latency_ms"], "score": score,
                "normalized_score": decision["normalized_score"]}

    def _watch(self, point: str, camera: str, version: str, score: float, is_anomaly: bool) -> None:
        """Per camera: recent decisions by version (the guard), and score drift against this version."""
        if point == next(iter(self.paths)):
            self.serving_version = version
        recent = self.recent.setdefault(camera, deque(maxlen=self.learning.guard.window))
        recent.append((version, is_anomaly))
        if not self.learning.drift.enabled:
            return
        monitored, monitor = self.drift.get(camera, (None, None))
        if monitored != version:  # a new model has its own validation scores: start over
            reference = self.heads[(point, version)].drift_reference if (point, version) in self.heads else None
            d = self.learning.drift
            monitor = ScoreDrift(reference, d.window, d.min_samples, d.alarm_psi) if reference else None
            self.drift[camera] = (version, monitor)
        if monitor is None:
            return
        monitor.observe(score)
        state = monitor.state()  # O(bins): cheap enough for every frame
        alarm = state["alarm"]
        if alarm != self.drift_alarms.get(camera, False):
            if alarm:
                self.log.warning("score drift", camera_id=camera, psi=round(state["psi"], 3),
                                 median_ratio=state["median_ratio"], window=state["n"],
                                 hint="the line's normals changed: review this camera's recent frames, accept the "
                                      "false alarms as normal, then retrain (adtr-edge retrain --submit)")
            else:
                self.log.info("score drift cleared", camera_id=camera, psi=state["psi"])
        self.drift_alarms[camera] = alarm

    def _compare_shadow(self, headers, results: list[InferenceResult], decided: list[dict]) -> None:
        groups: dict[tuple[str, str], list[int]] = {}  # (point, shadow version) → rows, in order of arrival
        for i, r in enumerate(results):
            if r.shadow_coarse is not None and r.shadow_version is not None:  # both set where sampled
                groups.setdefault((r.point, r.shadow_version), []).append(i)
        for (point, version), rows in groups.items():
            head = self._head(point, version).head
            scored = head.score(torch.from_numpy(np.stack([np.asarray(results[i].shadow_coarse, np.float32)
                                                           for i in rows])))
            for j, i in enumerate(rows):
                camera = headers[i]["camera_id"]
                stats = self.shadow.setdefault((camera, version), ShadowStats())
                stats.serving_version = results[i].model_version
                stats.observe(decided[i]["normalized_score"], float(scored.normalized[j]), decided[i]["is_anomaly"],
                              bool(scored.is_anomaly[j]))

    def _overlay_frame(self, header, payload: bytes) -> np.ndarray:
        """The frame for the overlay, its longer side at most output.overlay_max_side (see bounded_frame)."""
        return bounded_frame(header, payload, self.cfg.overlay_max_side)

    def _save(self, header, decision, amap, payload: bytes, received_at: float) -> dict[str, str]:
        store = self.store
        if store is None:  # anomalies are saved only with output.save_anomalies (the caller checks)
            return {}
        try:
            frame = self._overlay_frame(header, payload)
            height, width = frame.shape[:2]
            big = cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)
            if header["encoding"] == "raw":  # raw pixels are stored as a lossless PNG
                full = decode_payload(FrameHeader.model_validate(header), payload)
                payload = cv2.imencode(".png", cv2.cvtColor(full, cv2.COLOR_RGB2BGR))[1].tobytes()
            caption = f"ANOMALY {decision['normalized_score']:.2f}x thr  {header['camera_id']} #{header['seq']}"
            overlay = heatmap_overlay(frame, big, 2 * decision["threshold"], big >= decision["threshold"], caption)
            sidecar = dict(decision, source_encoding=header["encoding"])
            return store.write(header["camera_id"], frame_stem(received_at, header["seq"]), {
                PAYLOAD_SUFFIX[header["encoding"]]: payload,
                "_overlay.png": cv2.imencode(".png", overlay)[1].tobytes(),
                "_thumb.jpg": thumbnail_jpg(frame),  # for the console: a small frame and the map alone
                "_heat.png": heat_png(amap, decision["threshold"]),
                ".json": strict_json(sidecar, indent=1),
            })
        except Exception as exc:  # noqa: BLE001 - a full disk (or any save failure) must not stop decisions
            self.write_errors += 1
            self.log.error("cannot save anomaly", camera_id=header["camera_id"], seq=header["seq"], error=str(exc))
            return {}

    # ------------------------------------------------------------------ observation
    async def stats(self) -> dict[str, Any]:
        store = dict(self.store.stats(), normals=self.normal_saver.stats() if self.normal_saver else None) \
            if self.store else None
        return {"model_version": self.serving_version, "decisions": self.decisions, "anomalies": self.anomalies,
                "seconds": self.seconds.cumulative(), "seconds_sum": self.seconds.total,
                "seconds_count": self.seconds.n,
                "write_errors": self.write_errors, "store": store, "results": self.bound, "pid": os.getpid(),
                "node_id": node_id(),
                "drift": {camera: dict(monitor.state(), model_version=version)
                          for camera, (version, monitor) in self.drift.items() if monitor is not None},
                "shadow": [dict(stats.summary(), camera_id=camera, shadow_version=version)
                           for (camera, version), stats in self.shadow.items()],
                "auto_samples": self.sampler.stats() if self.sampler else None,
                "points": {point: dict(stats.summary(), auto_samples=self.samplers[point].stats()
                                       if point in self.samplers else None,
                                       cold_start=dict(self.cold[point], recording=self.recorders[point].stats()
                                                       if point in self.recorders else None)
                                       if point in self.cold else None,
                                       cameras=sorted(c for c, p in self.camera_point.items() if p == point))
                           for point, stats in self.points.items()}}

    async def anomaly_rates(self, point: str | None = None) -> dict[str, dict[str, list[int]]]:
        """Per camera (of `point`, or all), per model version: [decisions, anomalies] among the camera's last
        `guard.window`."""
        out: dict[str, dict[str, list[int]]] = {}
        for camera, recent in self.recent.items():
            if point is not None and self.camera_point.get(camera) != point:
                continue
            for version, is_anomaly in recent:
                pair = out.setdefault(camera, {}).setdefault(version, [0, 0])
                pair[0] += 1
                pair[1] += int(is_anomaly)
        return out

    async def reset_shadow(self, point: str | None = None) -> None:
        """Forget the shadow comparisons (of `point`'s cameras, or all)."""
        for key in [k for k in self.shadow if point is None or self.camera_point.get(k[0]) == point]:
            del self.shadow[key]

    async def ping(self) -> str:
        return self.serving_version

    async def close(self) -> None:
        self.socket.close(linger=1000)
