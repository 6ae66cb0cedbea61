"""IngestActor: one ZeroMQ endpoint in, validated frames out to inference and scoring, every frame counted.

Threads: the receiver (socket → header and size checks → per-camera queue) and `decode_threads`
dispatchers (queue → decode → resize → inference → scoring, in chunks of at most
`decode_budget_pixels` and of the inference actor's batch size, one chunk per camera at a time, at most
`max_in_flight` frames per camera), so a camera of huge frames holds one decoder while the others serve
the rest. Each dispatcher is one thread of decoding (OpenCV's own pool is off): the actor's CPU budget
is `decode_threads`. With `jpeg_decode=device` JPEG frames go to inference undecoded (their header was
read at receipt); the inference actor decodes them and a frame its decoder refuses comes back as
`invalid{decode}`. Ray calls (stats, drain) run on the actor's own thread pool, so they answer while
frames flow.

What a peer sends cannot poison the books: ZeroMQ drops a peer that sends a message part over
`max_payload_bytes` before reading it (ZMQ_MAXMSGSIZE; counted as a peer event), a refused frame never
claims a camera label (only a valid frame, or a camera in `allowed_cameras`, does), and a sequence
that goes back, repeats or leaps beyond `max_seq_gap` is counted as a sequence event, not as lost
frames. Every warning about a peer is logged in samples (the first 10, then every 1000th).

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
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import ray
import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from adtr_edge.model.data import resize_image

from .config import DEFAULT_POINT, IngestConfig
from .logs import configure_logging, node_id
from .protocol import MAX_HEADER_BYTES, UNKNOWN_CAMERA, FrameError, FrameLimits, Message, check_message
from .stats import COST_BUCKETS_S, CameraStats, Histogram

log = structlog.get_logger(__name__)
OVERFLOW_CAMERA = "_overflow"  # cameras beyond max_cameras share this label
SHARED_LABELS = (UNKNOWN_CAMERA, OVERFLOW_CAMERA)
PEER_EVENTS: dict[int, str] = {  # keyed by int: a monitor message gives its event as one
    zmq.EVENT_ACCEPTED: "accepted", zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed", zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth_failed"}


def sampled(count: int) -> bool:
    """Log the first 10 of a kind, then every 1000th: a flood is counted in full, logged in samples."""
    return count <= 10 or count % 1000 == 0


ZAP_DOMAIN = "adtr-edge"


def _authenticator(socket: zmq.Socket, context: zmq.Context, cfg: IngestConfig,
                   endpoint: str) -> ThreadAuthenticator | None:
    """The ZAP handler (its own thread) of an ingest socket: the peers' addresses (ingest.allowed_peers) and,
    with CURVE, the cameras' public keys. Both are checked in the handshake, before any message is read."""
    peers = cfg.peer_allowlist(endpoint)
    if peers is None and not cfg.curve.enabled:
        return None
    auth = ThreadAuthenticator(context)
    auth.start()
    socket.zap_domain = ZAP_DOMAIN.encode()  # without a domain ZeroMQ never asks ZAP about a NULL peer
    if peers is not None:
        auth.allow(*peers)
    if cfg.curve.enabled:
        keys_dir, secret_file = cfg.curve.allowed_keys_dir, cfg.curve.server_secret_key
        if keys_dir is None or secret_file is None:  # the settings refuse CURVE without both
            auth.stop()
            raise ValueError("ingest.curve.enabled needs ingest.curve.server_secret_key and allowed_keys_dir")
        if not keys_dir.is_dir():
            auth.stop()
            raise ValueError(f"ingest.curve.allowed_keys_dir {keys_dir} is not a folder")
        public, secret = zmq.auth.load_certificate(str(secret_file))
        if secret is None:
            auth.stop()
            raise ValueError(f"{secret_file} holds no secret key (use the .key_secret file)")
        auth.configure_curve(domain=ZAP_DOMAIN, location=str(keys_dir))  # keys of this domain
        socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
    return auth


def key_bindings(cfg: IngestConfig) -> dict[str, tuple[str, frozenset[str]]] | None:
    """ingest.curve.cameras as the ZAP user id of each allowed key (its Z85 public key) → (the key's name, the
    camera ids it may send as); None when ids are not bound. A name without its key file is an error."""
    curve = cfg.curve
    if not curve.enabled or not curve.cameras or curve.allowed_keys_dir is None:
        return None
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for name, ids in curve.cameras.items():
        path = curve.allowed_keys_dir / f"{name}.key"
        if not path.is_file():
            raise ValueError(f"ingest.curve.cameras names key {name!r}, but {path} does not exist")
        public, _ = zmq.auth.load_certificate(str(path))
        out[public.decode("ascii")] = (name, frozenset(ids))
    return out


class IngestActor:
    def __init__(self, endpoint: str, cfg: IngestConfig, image_size: int, inference: str, scoring: str,
                 chunk: int = 8, state_file: str | None = None, run_id: str = "", jpeg_bytes: bool = False,
                 routes: dict[str, str] | None = None, default_point: str | None = DEFAULT_POINT):
        configure_logging("info", json_output=True)  # worker stderr reaches the driver
        cv2.setNumThreads(1)  # each dispatcher decodes on its own thread: decode_threads is the CPU budget
        self.endpoint, self.cfg, self.image_size = endpoint, cfg, image_size
        # camera → inspection point; a camera in none goes to `default_point` (None: it is refused)
        self.routes, self.default_point = dict(routes or {}), default_point
        self.state_file, self.run_id = (Path(state_file) if state_file else None), run_id
        self.chunk = chunk  # frames per inference call at most: the inference actor's batch size (refreshed)
        self.jpeg_bytes = jpeg_bytes
        self.chunk_checked: float | None = None  # JPEG frames go to inference as their bytes (decoded on its device)
        self.decode_seconds = Histogram(COST_BUCKETS_S)  # per frame: decode + resize on a dispatcher
        # By name, not by handle: a restarted ingest finds the live actors again. Any: Ray types a
        # handle's method calls (`handle.method.remote`) as Never unless the method is a @ray.method.
        namespace = ray.get_runtime_context().namespace
        self.inference: Any = ray.get_actor(inference, namespace=namespace)
        self.scoring: Any = ray.get_actor(scoring, namespace=namespace)
        self.limits = FrameLimits(cfg.max_payload_bytes, cfg.max_pixels)
        self.log = log.bind(endpoint=endpoint)
        self.cameras: dict[str, CameraStats] = {}
        self.queues: OrderedDict[str, deque[Message]] = OrderedDict()
        self.in_flight: dict[str, int] = {}
        self.point_in_flight: Counter[str] = Counter()  # frames sent to each inspection point, not yet decided
        self.decoding: set[str] = set()  # cameras whose chunk a dispatcher is decoding (one at a time)
        self.blocked_on: str | None = None  # the camera whose full queue the receiver waits on
        self.peers: Counter = Counter()  # ZeroMQ connection events (accepted, disconnected, …)
        self.unexpected = 0
        self.lock = threading.Condition()
        self.stopping = threading.Event()
        self.inference_up = threading.Event()  # cleared when a frame fails in inference, set again by a ping
        self.inference_up.set()
        self.receiving = True
        self.restored: set[str] = set()  # cameras whose next seq closes the gap a restart left
        self.changes = 0
        bind_to = self._restore() or endpoint
        self.bindings = key_bindings(cfg)  # a key name without its file fails here, before the socket
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PULL if cfg.mode == "every" else zmq.SUB)
        self.socket.rcvhwm = cfg.rcv_hwm
        # No message part larger than a payload is ever read: ZeroMQ drops the peer when the part's size
        # arrives, before allocating it (a 256 MiB message used to be received whole, then refused).
        self.socket.setsockopt(zmq.MAXMSGSIZE, max(cfg.max_payload_bytes, MAX_HEADER_BYTES))
        if cfg.socket_buffer_bytes:
            self.socket.rcvbuf = cfg.socket_buffer_bytes
        self.socket.linger = 0
        self.auth = _authenticator(self.socket, self.context, cfg, bind_to)
        if cfg.mode == "latest":
            self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.monitor = self.socket.get_monitor_socket(sum(PEER_EVENTS))
        self.socket.bind(bind_to)
        self.bound = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.receiver = threading.Thread(target=self._receive_loop, name="ingest-receive", daemon=True)
        self.dispatchers = [threading.Thread(target=self._dispatch_loop, name=f"ingest-dispatch-{i}", daemon=True)
                            for i in range(cfg.decode_threads)]
        self.receiver.start()
        for thread in self.dispatchers:
            thread.start()
        self.monitor_thread = threading.Thread(target=self._monitor_loop, name="ingest-peers", daemon=True)
        self.monitor_thread.start()
        threading.Thread(target=self._batching_loop, name="ingest-batching", daemon=True).start()
        if self.state_file is not None:
            self._save_state()
            threading.Thread(target=self._save_loop, name="ingest-books", daemon=True).start()
        self.log.info("ingest listening", mode=cfg.mode, curve=cfg.curve.enabled, bound=self.bound,
                      allowed_peers=cfg.peer_allowlist(bind_to) or "any",
                      cameras_bound_to_keys={name: sorted(ids) for name, ids in (self.bindings or {}).values()})
        if cfg.curve.enabled and self.bindings is None:
            self.log.warning("CURVE without ingest.curve.cameras: any allowed key may send as any camera id")

    # ------------------------------------------------------------------ Ray-callable
    def ready(self) -> str:
        return self.bound

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"endpoint": self.endpoint, "bound": self.bound, "mode": self.cfg.mode, "pid": os.getpid(),
                    "node_id": node_id(),
                    "restarted": self.restarted, "peers": dict(self.peers), "chunk": self.chunk,
                    "decode_seconds": self.decode_seconds.cumulative(), "decode_seconds_sum": self.decode_seconds.total,
                    "decode_seconds_count": self.decode_seconds.n,
                    "cameras": {cam: {"received": s.received, "processed": s.processed, "anomalies": s.anomalies,
                                      "dropped": dict(s.dropped), "invalid": dict(s.invalid),
                                      "events": dict(s.events),
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
        self.monitor_thread.join(timeout=2)
        self.socket.disable_monitor()
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
            if camera not in SHARED_LABELS:
                self.restored.add(camera)
        self.restarted = True
        self.log.warning("ingest restarted: counters restored", cameras=len(self.cameras),
                         lost_in_flight={c: d.get("queued", 0) + d.get("in_flight", 0)
                                         for c, d in saved["cameras"].items()})
        return saved.get("bound")

    def _save_state(self) -> None:
        state_file = self.state_file
        if state_file is None:  # books are kept only with a state file (the callers check it too)
            return
        with self.lock:
            books = {"run_id": self.run_id, "bound": self.bound, "saved_at": time.time(),
                     "cameras": {cam: dict(s.to_json(), queued=len(self.queues.get(cam, ())),
                                           in_flight=self.in_flight.get(cam, 0))
                                 for cam, s in self.cameras.items()}}
        tmp = state_file.with_name(state_file.name + ".tmp")
        tmp.write_text(json.dumps(books))
        tmp.replace(state_file)

    def _save_loop(self) -> None:
        saved = -1
        while not self.stopping.wait(0.5):
            if self.changes != saved:
                saved = self.changes
                try:
                    self._save_state()
                except OSError as exc:
                    self.log.error("cannot save ingest books", path=str(self.state_file), error=str(exc))

    def _batching_loop(self) -> None:
        """Chunks follow the inference actor's batch size, which it tunes at start and after a model swap."""
        while not self.stopping.wait(0 if self.chunk_checked is None else 2.0):
            try:
                self.chunk = max(1, int(ray.get(self.inference.batching.remote(), timeout=30)["max_batch"]))
                self.chunk_checked = time.monotonic()
            except Exception:  # noqa: BLE001 - restarting or busy: keep the last size, ask again later
                self.chunk_checked = self.chunk_checked or 0.0

    # ------------------------------------------------------------------ receiver thread
    def _label(self, camera: str, claim: bool) -> str:
        """Under self.lock: the metric label of a camera. A camera gets its own label from a valid frame
        (`claim`), never from a refused one: refusals of a camera without a label count under _unknown,
        so junk naming 5,000 cameras cannot fill max_cameras. Beyond max_cameras, cameras share
        _overflow, so metrics stay bounded."""
        if camera in self.cameras or camera in SHARED_LABELS:
            return camera
        if not claim:
            return UNKNOWN_CAMERA
        if sum(1 for c in self.cameras if c not in SHARED_LABELS) >= self.cfg.max_cameras:
            return OVERFLOW_CAMERA
        return camera

    def _unlabel_if_refused(self, camera: str) -> None:
        """Under self.lock, after a frame of `camera` was refused at decode time. A frame gets its camera a
        label once its header and sizes pass; if it is refused when decoded and the camera has nothing
        else (nothing decided, dropped, waiting or in flight), the label goes and its counts move to
        _unknown: a stream of cut JPEGs naming new cameras cannot fill max_cameras either."""
        stats = self.cameras.get(camera)
        if camera in SHARED_LABELS or camera in self.cfg.allowed_cameras or stats is None or stats.processed \
                or stats.dropped or self.queues.get(camera) or self.in_flight.get(camera, 0) \
                or camera in self.restored or camera == self.blocked_on:  # a frame counted in, not yet queued
            return
        unknown = self._stats(UNKNOWN_CAMERA)
        unknown.received += stats.received
        unknown.invalid.update(stats.invalid)
        unknown.events.update(stats.events)
        del self.cameras[camera]
        self.queues.pop(camera, None)
        self.in_flight.pop(camera, None)
        self.changes += 1

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
                if self.bindings is None:
                    parts, user = self.socket.recv_multipart(zmq.NOBLOCK), ""
                else:  # the sender's key (ZAP user id) travels with each frame; copy=False to read it
                    frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    parts, user = [f.bytes for f in frames], str(frames[0].get("User-Id") or "")
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                self.log.error("receive failed", error=str(exc))
                continue
            try:
                message = check_message(parts, self.limits)
                if self.bindings is not None:
                    self._check_binding(message, user)
                self._accept(message)
            except FrameError as exc:
                self._refuse(exc)
            except Exception as exc:  # noqa: BLE001 - one bad frame must never stop the camera
                self._unexpected("unexpected error on a received message")
                self._refuse(FrameError("unexpected", f"{type(exc).__name__}: {exc}"))

    def _check_binding(self, message: Message, user: str) -> None:
        """Under ingest.curve.cameras a key sends only as its own camera ids (an allowed key, not another's)."""
        name, ids = (self.bindings or {}).get(user, ("an unlisted key", frozenset()))
        camera = message.header.camera_id
        if camera not in ids:
            raise FrameError("camera_not_bound", f"{name} may send as {sorted(ids)}, not as {camera!r} "
                             "(ingest.curve.cameras)", camera, message.header.seq)

    def _unexpected(self, event: str, **fields) -> None:
        """A bug of ours that a peer can trigger at will: its traceback, in samples."""
        self.unexpected += 1
        if sampled(self.unexpected):
            self.log.exception(event, count=self.unexpected, **fields)

    def _monitor_loop(self) -> None:
        """Counts the socket's connection events: a peer that breaks the protocol (a message part over
        max_payload_bytes, a bad handshake) is disconnected by ZeroMQ, and only shows here."""
        from zmq.utils.monitor import recv_monitor_message

        while not self.stopping.is_set():
            if not self.monitor.poll(200):
                continue
            kind = PEER_EVENTS.get(recv_monitor_message(self.monitor)["event"])
            if kind is not None:
                with self.lock:
                    self.peers[kind] += 1
                    self.changes += 1
        self.monitor.close(linger=0)  # a socket is closed by the thread that uses it

    def _refuse(self, exc: FrameError, label: str | None = None) -> None:
        """Count a bad frame. `label`: the frame was received (and counted) under it already, and is
        refused at decode time; otherwise it was just received."""
        with self.lock:
            if label is None:
                known = exc.camera_id in self.cfg.allowed_cameras
                label = self._label(exc.camera_id, claim=known)
                stats = self._stats(label)
                stats.received += 1
                if exc.seq is not None:
                    self._note_seq(label, stats, exc.seq)
            else:
                stats = self._stats(label)
            stats.invalid[exc.reason] += 1
            self.changes += 1
            count = stats.invalid[exc.reason]
        if sampled(count):
            self.log.warning("invalid frame", camera_id=exc.camera_id, label=label, seq=exc.seq, reason=exc.reason,
                             detail=exc.detail, count=count, note="logs the first 10, then every 1000th")

    def _note_seq(self, camera: str, stats: CameraStats, seq: int) -> None:
        """Under self.lock. A gap of up to max_seq_gap in a camera's sequence = frames lost before they
        reached us. A seq that goes back is a `restart` (the camera's counter began again), the same
        seq again a `repeat`, a leap beyond max_seq_gap a `jump`: counted once each, no frame counted
        lost, and the sequence goes on from there. The shared labels (_unknown, _overflow) mix many
        cameras' seqs, which say nothing there."""
        if camera in SHARED_LABELS:
            return
        self.changes += 1
        last = stats.last_seq
        kind = None
        if last is not None:
            gap = seq - last - 1
            if 0 < gap <= self.cfg.max_seq_gap and camera in self.restored:  # lost with our previous incarnation
                stats.dropped["ingest_restart"] += gap
            elif 0 < gap <= self.cfg.max_seq_gap:
                stats.dropped["upstream_gap"] += gap
                stats.gaps += 1
                if sampled(stats.gaps):
                    self.log.warning("sequence gap", camera_id=camera, seq=seq, lost=gap, gaps=stats.gaps)
            elif gap > self.cfg.max_seq_gap:
                kind = "jump"
            elif seq == last:
                kind = "repeat"
            elif seq < last:
                kind = "restart"
        if kind is not None:
            stats.events[kind] += 1
            if sampled(stats.events[kind]):
                self.log.warning(f"sequence {kind}", camera_id=camera, seq=seq, previous=last,
                                 count=stats.events[kind], max_seq_gap=self.cfg.max_seq_gap,
                                 note="logs the first 10, then every 1000th")
        self.restored.discard(camera)
        stats.last_seq = seq

    def add_route(self, camera: str, point: str) -> None:
        """Frames of `camera` go to `point` from now on (a point added while the agent runs)."""
        with self.lock:
            self.routes[camera] = point

    def remove_routes(self, point: str, timeout_s: float) -> dict[str, Any]:
        """The cameras of `point` (removed while the agent runs) go to the default point from their next chunk
        on, or are refused as `unknown_camera` when there is none; waits until none of the frames already sent
        to `point` is still in flight. Returns {cameras, in_flight: what was still out at the deadline}."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            cameras = sorted(c for c, p in self.routes.items() if p == point)
            for camera in cameras:
                del self.routes[camera]
            while self.point_in_flight.get(point, 0) and time.monotonic() < deadline:
                self.lock.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            return {"cameras": cameras, "in_flight": self.point_in_flight.get(point, 0)}

    def _accept(self, item: Message) -> None:
        header = item.header
        camera = header.camera_id
        if self.cfg.allowed_cameras and camera not in self.cfg.allowed_cameras:
            raise FrameError("unknown_camera", f"camera {camera!r} is not in ingest.allowed_cameras", camera,
                             header.seq)
        if camera not in self.routes and self.default_point is None:
            raise FrameError("unknown_camera", f"camera {camera!r} is in no inspection point (points.<name>.cameras) "
                             "and the agent serves no default point", camera, header.seq)
        clock_problem = False
        with self.lock:
            camera = self._label(camera, claim=True)
            stats = self._stats(camera)
            stats.received += 1
            self._note_seq(camera, stats, header.seq)
            if abs(item.received_at - header.ts) > self.cfg.max_clock_skew_s:
                item.clock_ok, clock_problem = False, True
                stats.events["clock"] += 1
                clock_count = stats.events["clock"]
            queue = self.queues.setdefault(camera, deque())
            if self.cfg.mode == "every":
                self.blocked_on = camera  # its label and queue must outlive the wait (see _unlabel_if_refused)
                while len(queue) >= self.cfg.queue_depth and self.receiving:
                    self.lock.wait(0.1)  # back-pressure: stop reading, ZeroMQ then blocks the camera
                self.blocked_on = None
                if not self.receiving:
                    stats.dropped["shutdown"] += 1
                    return
            elif len(queue) >= self.cfg.queue_depth:
                queue.popleft()
                stats.dropped["stale"] += 1
            queue.append(item)
            self.lock.notify_all()
        if clock_problem and sampled(clock_count):
            self.log.warning("implausible capture time", camera_id=header.camera_id, seq=header.seq, ts=header.ts,
                             received_at=item.received_at, max_clock_skew_s=self.cfg.max_clock_skew_s,
                             count=clock_count, note="decided; latency not measured")

    # ------------------------------------------------------------------ dispatcher thread
    def _next_chunk(self) -> tuple[str, list[Message]] | None:
        """Under self.lock: the oldest frames of the first camera (round robin) with free in-flight slots,
        as many as are queued, free and fit one inference batch."""
        for camera in list(self.queues):
            queue = self.queues[camera]
            free = self.cfg.max_in_flight - self.in_flight.get(camera, 0)
            if queue and free > 0 and camera not in self.decoding:
                self.queues.move_to_end(camera)  # round robin between cameras
                most = min(free, len(queue), max(self.chunk, self.cfg.min_chunk))
                chunk = [queue.popleft()]
                pixels = chunk[0].pixels
                while len(chunk) < most and pixels + queue[0].pixels <= self.cfg.decode_budget_pixels:
                    pixels += queue[0].pixels
                    chunk.append(queue.popleft())
                # In flight from now on (also while decoding), so a drain never misses them.
                self.in_flight[camera] = self.in_flight.get(camera, 0) + len(chunk)
                self.decoding.add(camera)
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
            try:
                self._dispatch(camera, chunk)
            finally:
                with self.lock:
                    self.decoding.discard(camera)  # the camera's next chunk may go (after this one: in order)
                    self.lock.notify_all()

    def _dispatch(self, camera: str, chunk: list[Message]) -> None:
        frames: list[np.ndarray | bytes] = []  # decoded and resized, or a JPEG's bytes (`jpeg_bytes`)
        items: list[Message] = []
        for item in chunk:
            if self.jpeg_bytes and item.header.encoding == "jpeg":  # decoded by inference, on its device
                frames.append(item.payload)
                items.append(item)
                continue
            try:  # decoded only now: frames dropped while queued never cost a decode
                started = time.perf_counter()
                frames.append(resize_image(item.decode().image, self.image_size))
                items.append(item)
                self.decode_seconds.observe(time.perf_counter() - started)
            except FrameError as exc:
                self._refuse(exc, label=camera)
            except Exception as exc:  # noqa: BLE001 - one bad frame must never stop the dispatcher
                self._unexpected("unexpected error decoding a frame", camera_id=camera, seq=item.header.seq)
                self._refuse(FrameError("unexpected", f"{type(exc).__name__}: {exc}", item.header.camera_id,
                                        item.header.seq), label=camera)
        if len(items) < len(chunk):
            with self.lock:
                self.in_flight[camera] -= len(chunk) - len(items)
                self._unlabel_if_refused(camera)
                self.lock.notify_all()
        if not items:
            return
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
        with self.lock:  # the route and its count together: remove_routes() then waits for every frame sent
            point = self.routes.get(camera, self.default_point)
            if point is None:  # the camera's point was removed while these frames were queued; no default
                self._stats(camera).invalid["unknown_camera"] += len(items)
                self.in_flight[camera] -= len(items)
                self.changes += 1
                self.lock.notify_all()
            else:
                self.point_in_flight[point] += len(items)
        if point is None:
            self.log.warning("invalid frame", camera_id=camera, reason="unknown_camera", count=len(items),
                             seqs=[item.header.seq for item in items],
                             detail="its inspection point was removed and the agent serves no default point")
            return
        result_ref = self.inference.infer_batch.remote(frames, point)
        decisions_ref = self.scoring.score_batch.remote(
            [item.header.model_dump() for item in items], result_ref, [item.payload for item in items],
            [item.received_at for item in items], [item.clock_ok for item in items])
        decisions_ref.future().add_done_callback(
            lambda fut, cam=camera, its=items, res=result_ref, pt=point: self._decided(cam, its, res, fut, pt))

    def _decided(self, camera: str, items: list[Message], result_ref, fut, point: str) -> None:
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
                    if decision.get("refused"):  # JPEG bytes the inference actor's decoder refused
                        stats.invalid["decode"] += 1
                        count = stats.invalid["decode"]
                        if sampled(count):
                            self.log.warning("invalid frame", camera_id=camera, reason="decode",
                                             detail=decision["refused"], count=count, where="inference")
                        continue
                    stats.processed += 1
                    stats.anomalies += int(decision["is_anomaly"])
                    if decision["latency_ms"] is not None:  # None: the camera's clock is implausible
                        stats.latency.observe(decision["latency_ms"] / 1000.0)
            self.in_flight[camera] -= len(items)
            self.point_in_flight[point] -= len(items)
            self.changes += 1
            self.lock.notify_all()

    @staticmethod
    def _failed_stage(result_ref) -> str:
        try:
            ray.get(result_ref, timeout=0)
            return "scoring_failed"
        except Exception:  # noqa: BLE001 - whatever the inference call raised, the frames are counted lost there
            return "inference_failed"
