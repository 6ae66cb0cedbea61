"""IngestActor: one ZeroMQ endpoint in, validated frames out to inference and scoring, every frame counted.

Two threads: the receiver (socket → header and size checks → per-camera queue) and the dispatcher
(queue → decode → resize → inference → scoring, in chunks, at most `max_in_flight` frames per
camera). Ray calls (stats, drain) run on the actor's own thread pool, so they answer while frames flow.

The books survive a crash of this actor: a third thread writes the per-camera counters to `state_file`
twice a second, and a restarted actor (same `run_id`) reloads them and binds the same endpoint again.
What was queued or in flight at the last save, and the sequence numbers between the last one saved
and the first one the new actor sees, are counted as `dropped{ingest_restart}`: sent = processed +
dropped + invalid still holds across the restart (a frame decided in the instant before the crash
may be counted as lost; none is counted twice or missed).
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import ray
import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from model.data import resize_image

from .config import IngestConfig
from .logs import configure_logging
from .protocol import UNKNOWN_CAMERA, FrameError, FrameLimits, Message, check_message
from .stats import CameraStats

log = structlog.get_logger(__name__)
OVERFLOW_CAMERA = "_overflow"  # cameras beyond max_cameras share this label


def _curve_server(socket: zmq.Socket, context: zmq.Context, cfg: IngestConfig) -> ThreadAuthenticator:
    """CURVE server with an allowlist of camera public keys (ZAP handler on its own thread)."""
    curve = cfg.curve  # the settings guarantee both paths are set when CURVE is on
    if not curve.allowed_keys_dir.is_dir():
        raise ValueError(f"ingest.curve.allowed_keys_dir {curve.allowed_keys_dir} is not a folder")
    public, secret = zmq.auth.load_certificate(str(curve.server_secret_key))
    if secret is None:
        raise ValueError(f"{curve.server_secret_key} holds no secret key (use the .key_secret file)")
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(curve.allowed_keys_dir))
    socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
    return auth


class IngestActor:
    def __init__(self, endpoint: str, cfg: IngestConfig, image_size: int, inference: str, scoring: str,
                 chunk: int = 8, state_file: str | None = None, run_id: str = ""):
        configure_logging("info", json_output=True)  # worker stderr reaches the driver
        self.endpoint, self.cfg, self.image_size = endpoint, cfg, image_size
        self.state_file, self.run_id = (Path(state_file) if state_file else None), run_id
        self.chunk = chunk  # frames per inference call at most (= the inference batch size)
        # By name, not by handle: a restarted ingest finds the live actors again.
        namespace = ray.get_runtime_context().namespace
        self.inference = ray.get_actor(inference, namespace=namespace)
        self.scoring = ray.get_actor(scoring, namespace=namespace)
        self.limits = FrameLimits(cfg.max_payload_bytes, cfg.max_pixels)
        self.log = log.bind(endpoint=endpoint)
        self.cameras: dict[str, CameraStats] = {}
        self.queues: OrderedDict[str, deque[Message]] = OrderedDict()
        self.in_flight: dict[str, int] = {}
        self.lock = threading.Condition()
        self.stopping = threading.Event()
        self.inference_up = threading.Event()  # cleared when a frame fails in inference, set again by a ping
        self.inference_up.set()
        self.receiving = True
        self.restored: set[str] = set()  # cameras whose next seq closes the gap a restart left
        self.changes = 0
        bind_to = self._restore() or endpoint
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PULL if cfg.mode == "every" else zmq.SUB)
        self.socket.rcvhwm = cfg.rcv_hwm
        if cfg.socket_buffer_bytes:
            self.socket.rcvbuf = cfg.socket_buffer_bytes
        self.socket.linger = 0
        self.auth = _curve_server(self.socket, self.context, cfg) if cfg.curve.enabled else None
        if cfg.mode == "latest":
            self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.bind(bind_to)
        self.bound = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.receiver = threading.Thread(target=self._receive_loop, name="ingest-receive", daemon=True)
        self.dispatcher = threading.Thread(target=self._dispatch_loop, name="ingest-dispatch", daemon=True)
        self.receiver.start()
        self.dispatcher.start()
        if self.state_file is not None:
            self._save_state()
            threading.Thread(target=self._save_loop, name="ingest-books", daemon=True).start()
        self.log.info("ingest listening", mode=cfg.mode, curve=cfg.curve.enabled, bound=self.bound)

    # ------------------------------------------------------------------ Ray-callable
    def ready(self) -> str:
        return self.bound

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"endpoint": self.endpoint, "bound": self.bound, "mode": self.cfg.mode, "pid": os.getpid(),
                    "restarted": self.restarted,
                    "cameras": {cam: {"received": s.received, "processed": s.processed, "anomalies": s.anomalies,
                                      "dropped": dict(s.dropped), "invalid": dict(s.invalid),
                                      "in_flight": self.in_flight.get(cam, 0),
                                      "queued": len(self.queues.get(cam, ())),
                                      "latency": s.latency.cumulative(), "latency_sum": s.latency.total,
                                      "latency_count": s.latency.n}
                                for cam, s in self.cameras.items()}}

    def drain(self, timeout_s: float) -> dict[str, Any]:
        """Stop receiving, finish what is queued and in flight (up to timeout_s), count the rest as dropped."""
        self.receiving = False
        self.receiver.join(timeout=5)
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while any(self.queues.values()) or any(self.in_flight.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(min(left, 0.1))
            for cam, queue in self.queues.items():
                if queue:
                    self._stats(cam).dropped["shutdown"] += len(queue)
                    queue.clear()
            self.stopping.set()
            self.lock.notify_all()
        self.socket.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        if self.state_file is not None:
            self._save_state()
        stats = self.stats()
        self.log.info("ingest drained", cameras=list(stats["cameras"]))
        return stats

    # ------------------------------------------------------------------ the books across a restart
    def _restore(self) -> str | None:
        """Counters and endpoint of this actor's previous incarnation in the same agent run, if any."""
        self.restarted = False
        if self.state_file is None or not self.state_file.is_file():
            return None
        try:
            saved = json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            self.log.error("ingest books unreadable; starting from zero", path=str(self.state_file), error=str(exc))
            return None
        if saved.get("run_id") != self.run_id:
            return None  # a file from an earlier agent run: counters start at zero
        for camera, data in saved["cameras"].items():
            stats = CameraStats.from_json(data)
            pending = data.get("queued", 0) + data.get("in_flight", 0)
            if pending:
                stats.dropped["ingest_restart"] += pending
            self.cameras[camera] = stats
            if camera not in (UNKNOWN_CAMERA, OVERFLOW_CAMERA):
                self.restored.add(camera)
        self.restarted = True
        self.log.warning("ingest restarted: counters restored", cameras=len(self.cameras),
                         lost_in_flight={c: d.get("queued", 0) + d.get("in_flight", 0)
                                         for c, d in saved["cameras"].items()})
        return saved.get("bound")

    def _save_state(self) -> None:
        with self.lock:
            books = {"run_id": self.run_id, "bound": self.bound, "saved_at": time.time(),
                     "cameras": {cam: dict(s.to_json(), queued=len(self.queues.get(cam, ())),
                                           in_flight=self.in_flight.get(cam, 0))
                                 for cam, s in self.cameras.items()}}
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(books))
        tmp.replace(self.state_file)

    def _save_loop(self) -> None:
        saved = -1
        while not self.stopping.wait(0.5):
            if self.changes != saved:
                saved = self.changes
                try:
                    self._save_state()
                except OSError as exc:
                    self.log.error("cannot save ingest books", path=str(self.state_file), error=str(exc))

    # ------------------------------------------------------------------ receiver thread
    def _label(self, camera: str) -> str:
        """Under self.lock: the metric label of a camera. Cameras beyond max_cameras share one label
        so metrics stay bounded."""
        if camera not in self.cameras and len(self.cameras) >= self.cfg.max_cameras + 2:  # + _unknown, _overflow
            return OVERFLOW_CAMERA
        return camera

    def _stats(self, label: str) -> CameraStats:
        """Under self.lock: the counters of a label from `_label`."""
        return self.cameras.setdefault(label, CameraStats())

    def _receive_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while self.receiving:
            if not poller.poll(100):
                continue
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                self.log.error("receive failed", error=str(exc))
                continue
            try:
                self._accept(check_message(parts, self.limits))
            except FrameError as exc:
                self._refuse(exc)
            except Exception as exc:  # noqa: BLE001 - one bad frame must never stop the camera
                self._refuse(FrameError("decode", f"unexpected {type(exc).__name__}: {exc}"))

    def _refuse(self, exc: FrameError, received: bool = True) -> None:
        """Count a bad frame; `received=False` when it was already counted in (refused at decode time)."""
        with self.lock:
            label = self._label(exc.camera_id)
            stats = self._stats(label)
            stats.invalid[exc.reason] += 1
            self.changes += 1
            if received:
                stats.received += 1
                if exc.seq is not None:
                    self._note_seq(label, stats, exc.seq)
            count = stats.invalid[exc.reason]
        if count <= 10 or count % 1000 == 0:  # a flood of bad frames is counted in full, logged in samples
            self.log.warning("invalid frame", camera_id=exc.camera_id, seq=exc.seq, reason=exc.reason,
                             detail=exc.detail, count=count, note="logs the first 10, then every 1000th")

    def _note_seq(self, camera: str, stats: CameraStats, seq: int) -> None:
        """Under self.lock. A gap in a camera's sequence = frames lost before they reached us. The shared
        labels (_unknown, _overflow) mix many cameras' seqs, which say nothing there."""
        if camera in (UNKNOWN_CAMERA, OVERFLOW_CAMERA):
            return
        self.changes += 1
        if stats.last_seq is not None:
            gap = seq - stats.last_seq - 1
            if gap > 0 and camera in self.restored:  # lost with the previous incarnation of this actor
                stats.dropped["ingest_restart"] += gap
            elif gap > 0:
                stats.dropped["upstream_gap"] += gap
                stats.gaps += 1
                if stats.gaps <= 10 or stats.gaps % 1000 == 0:
                    self.log.warning("sequence gap", camera_id=camera, seq=seq, lost=gap, gaps=stats.gaps)
            elif gap < 0:
                self.log.warning("sequence restarted", camera_id=camera, seq=seq, previous=stats.last_seq)
        self.restored.discard(camera)
        stats.last_seq = seq

    def _accept(self, item: Message) -> None:
        header = item.header
        camera = header.camera_id
        if self.cfg.allowed_cameras and camera not in self.cfg.allowed_cameras:
            raise FrameError("unknown_camera", f"camera {camera!r} is not in ingest.allowed_cameras", camera, header.seq)
        with self.lock:
            camera = self._label(camera)
            stats = self._stats(camera)
            stats.received += 1
            self._note_seq(camera, stats, header.seq)
            queue = self.queues.setdefault(camera, deque())
            if self.cfg.mode == "every":
                while len(queue) >= self.cfg.queue_depth and self.receiving:
                    self.lock.wait(0.1)  # back-pressure: stop reading, ZeroMQ then blocks the camera
                if not self.receiving:
                    stats.dropped["shutdown"] += 1
                    return
            elif len(queue) >= self.cfg.queue_depth:
                queue.popleft()
                stats.dropped["stale"] += 1
            queue.append(item)
            self.lock.notify_all()

    # ------------------------------------------------------------------ dispatcher thread
    def _next_chunk(self) -> tuple[str, list[Message]] | None:
        """Under self.lock: the oldest frames of the first camera (round robin) with free in-flight slots,
        as many as are queued, free and fit one inference batch."""
        for camera in list(self.queues):
            queue = self.queues[camera]
            free = self.cfg.max_in_flight - self.in_flight.get(camera, 0)
            if queue and free > 0:
                self.queues.move_to_end(camera)  # round robin between cameras
                chunk = [queue.popleft() for _ in range(min(free, len(queue), self.chunk))]
                # In flight from now on (also while decoding), so a drain never misses them.
                self.in_flight[camera] = self.in_flight.get(camera, 0) + len(chunk)
                return camera, chunk
        return None

    def _wait_for_inference(self) -> None:
        """After an inference failure, hold new frames until the (restarted) actor answers: frames sent to
        an actor that is still restarting would be lost too, and only those in flight at the crash may be."""
        while not self.stopping.is_set() and not self.inference_up.is_set():
            try:
                ray.get(self.inference.ping.remote(), timeout=2.0)
                self.inference_up.set()
                self.log.info("inference answering again; dispatch resumes")
            except Exception:  # noqa: BLE001 - restarting, unavailable or timed out: keep waiting
                time.sleep(0.2)

    def _dispatch_loop(self) -> None:
        while not self.stopping.is_set():
            self._wait_for_inference()
            with self.lock:
                job = self._next_chunk()
                if job is None:
                    self.lock.wait(0.05)
                    continue
                camera, chunk = job
                self.lock.notify_all()  # queue slots are free: a blocked receiver may read again
            frames, items = [], []
            for item in chunk:
                try:  # decoded only now: frames dropped while queued never cost a decode
                    frames.append(resize_image(item.decode().image, self.image_size))
                    items.append(item)
                except FrameError as exc:
                    self._refuse(exc, received=False)
                except Exception as exc:  # noqa: BLE001 - one bad frame must never stop the dispatcher
                    self._refuse(FrameError("decode", f"unexpected {type(exc).__name__}: {exc}", camera,
                                            item.header.seq), received=False)
            if len(items) < len(chunk):
                with self.lock:
                    self.in_flight[camera] -= len(chunk) - len(items)
                    self.lock.notify_all()
            if not items:
                continue
            try:
                self._submit(camera, frames, items)
            except Exception as exc:  # noqa: BLE001 - e.g. an actor gone for good: count, keep the thread
                self.log.error("cannot submit frames", camera_id=camera, error=f"{type(exc).__name__}: {exc}")
                with self.lock:
                    self._stats(camera).dropped["inference_failed"] += len(items)
                    self.in_flight[camera] -= len(items)
                    self.inference_up.clear()
                    self.lock.notify_all()

    def _submit(self, camera: str, frames: list, items: list[Message]) -> None:
        """One inference call and one scoring call for a chunk of one camera's frames. Frames and payloads
        go as plain arguments: Ray inlines small ones and moves large ones (> 100 KB) through the
        shared-memory object store itself (an explicit ray.put per frame cost a third of this actor's CPU)."""
        result_ref = self.inference.infer_batch.remote(frames)
        decisions_ref = self.scoring.score_batch.remote(
            [item.header.model_dump() for item in items], result_ref, [item.payload for item in items],
            [item.received_at for item in items])
        decisions_ref.future().add_done_callback(
            lambda fut, cam=camera, its=items, res=result_ref: self._decided(cam, its, res, fut))

    def _decided(self, camera: str, items: list[Message], result_ref, fut) -> None:
        """On Ray's callback thread: count each frame's outcome and free its slot."""
        try:
            decisions = fut.result()
            reason = None
        except Exception as exc:  # noqa: BLE001 - every failure is counted by its stage
            decisions, reason = None, self._failed_stage(result_ref)
            self.log.warning("frames lost", camera_id=camera, seqs=[item.header.seq for item in items],
                             reason=reason, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        with self.lock:
            stats = self._stats(camera)
            if decisions is None:
                stats.dropped[reason] += len(items)
                if reason == "inference_failed":
                    self.inference_up.clear()
            else:
                for decision in decisions:
                    stats.processed += 1
                    stats.anomalies += int(decision["is_anomaly"])
                    stats.latency.observe(decision["latency_ms"] / 1000.0)
            self.in_flight[camera] -= len(items)
            self.changes += 1
            self.lock.notify_all()

    @staticmethod
    def _failed_stage(result_ref) -> str:
        try:
            ray.get(result_ref, timeout=0)
            return "scoring_failed"
        except Exception:  # noqa: BLE001
            return "inference_failed"
