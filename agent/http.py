"""The agent's HTTP side: Prometheus /metrics, /healthz, /readyz, and the learning API (/v1/...).

Flask routes, served by waitress: a bounded pool of handler threads, a connection cap, a listen backlog,
and an inactivity timeout; waitress reads a whole request before a handler thread sees it, so a slow
or half-sent request holds no thread, and a request still arriving after `request_timeout_s` is cut
off (a trickling client is never idle, so the inactivity timeout alone let it hold a connection slot).
Scrapes never call the actors: a background thread refreshes one snapshot of every actor's stats
(`http.snapshot_s`), and /metrics and /readyz answer from it.

The learning API needs the token (`Authorization: Bearer …`), compared by its hash in constant time:
accept a saved frame as normal or confirm it as a defect, list/promote/roll back/shadow model
versions, submit a retrain job and read its status.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import ray
import structlog
from flask import Flask, Response, g, jsonify, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from waitress.server import create_server

from actors.config import DEFAULT_POINT
from actors.retrain import manager_name
from lifecycle.registry import RegistryError
from lifecycle.samples import SampleStore, StoreError, StoreLimits

from .errors import AgentError
from .learning import FrameNotFound, accept_frame, accept_many, find_saved_frame
from .runner import Agent, totals

log = structlog.get_logger(__name__)


# ------------------------------------------------------------------ the token
def load_or_create_token(path: Path) -> str:
    """The API token in `path` (mode 0600); a new random one is written there when the file is missing."""
    path = Path(path).expanduser()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"{path}: the API token must be at least 16 characters")
    return token


class TokenCheck:
    """Keeps only the token's hash; `ok` compares hashes in constant time."""

    def __init__(self, token: str):
        self._digest = hashlib.sha256(token.encode()).digest()

    def ok(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        presented = hashlib.sha256(header.removeprefix("Bearer ").strip().encode()).digest()
        return hmac.compare_digest(presented, self._digest)


# ------------------------------------------------------------------ snapshots for scrapes
class SnapshotCache:
    """One thread asks the actors; every scrape reads the latest answer."""

    def __init__(self, agent: Agent, interval_s: float):
        self.agent, self.interval_s = agent, interval_s
        self.latest: dict[str, Any] = {"up": {}, "taken_at": 0.0}
        self.fresh = threading.Event()
        self.stop = threading.Event()
        threading.Thread(target=self._loop, name="stats-snapshot", daemon=True).start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.latest = self.agent.snapshot(timeout_s=max(1.0, 2 * self.interval_s))
                self.fresh.set()
            except Exception as exc:  # noqa: BLE001 - e.g. Ray shutting down; keep the last snapshot
                log.warning("stats snapshot failed", error=str(exc)[:200])
            self.stop.wait(self.interval_s)

    def get(self, wait_s: float = 5.0) -> dict[str, Any]:
        self.fresh.wait(wait_s)  # only the very first scrape may wait (for the first snapshot)
        return self.latest


def _finite(value: float) -> float:
    """Prometheus text cannot carry what float() cannot: clamp to the float range, NaN stays NaN."""
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


class AgentCollector:
    """prometheus_client custom collector over the latest snapshot."""

    def __init__(self, cache: SnapshotCache):
        self.cache = cache

    def collect(self):
        snap = self.cache.get()
        up = GaugeMetricFamily("adtr_actor_up", "1 when the actor answered the last stats snapshot", labels=["actor"])
        for name, ok in snap["up"].items():
            up.add_metric([name], 1.0 if ok else 0.0)
        yield up
        age = GaugeMetricFamily("adtr_stats_age_seconds", "Age of the actor stats these metrics come from")
        age.add_metric([], max(0.0, time.time() - snap.get("taken_at", 0.0)))
        yield age
        inference = snap.get("inference") or {}
        info = GaugeMetricFamily("adtr_model_info", "The model version serving decisions (role serving), and "
                                 "the one shadowing it (role shadow)", labels=["model_version", "role"])
        info.add_metric([inference.get("model_version", snap.get("model_version", "")), "serving"], 1.0)
        if inference.get("shadow_version"):
            info.add_metric([inference["shadow_version"], "shadow"], 1.0)
        yield info
        yield from _camera_metrics([v for k, v in snap.items() if k.startswith("ingest-") and v])
        if inference:
            batch = HistogramMetricFamily("adtr_batch_size", "Frames per inference batch")
            batch.add_metric([], inference["batch_size"], inference["batch_size_sum"])
            yield batch
            forward = HistogramMetricFamily("adtr_inference_seconds", "Time of one batched forward pass")
            forward.add_metric([], inference["forward"], inference["forward_sum"])
            yield forward
            queued = GaugeMetricFamily("adtr_inference_queued", "Frames waiting for a batch")
            queued.add_metric([], inference["queued"])
            yield queued
            swaps = CounterMetricFamily("adtr_model_swaps", "Serving model switches in the inference actor")
            swaps.add_metric([], inference["swaps"])
            yield swaps
            failures = CounterMetricFamily("adtr_model_load_failures", "Model versions that failed to load")
            failures.add_metric([], inference["load_failures"])
            yield failures
            yield from _tuning_metrics(inference)
        costs = [("adtr_decode_seconds", "Decode and resize of one frame in an ingest actor", "ingest",
                  [v for k, v in snap.items() if k.startswith("ingest-") and v], "decode_seconds"),
                 ("adtr_scoring_seconds", "Scoring one frame (maps, decision, publish, files)", "scoring",
                  [snap.get("scoring") or {}], "seconds")]
        for name, text, actor, stats, key in costs:
            family = HistogramMetricFamily(name, text, labels=["actor"])
            for i, s in enumerate(stats):
                if s.get(key):
                    label = f"{actor}-{i}" if actor == "ingest" else actor
                    family.add_metric([label], s[key], _finite(s[key + "_sum"]))
            yield family
        scoring = snap.get("scoring") or {}
        if scoring.get("store"):
            stored = GaugeMetricFamily("adtr_anomaly_store_bytes", "Bytes in the anomaly output folder")
            stored.add_metric([], scoring["store"]["bytes"])
            yield stored
        if scoring:
            errors = CounterMetricFamily("adtr_anomaly_write_errors", "Anomaly files that could not be written")
            errors.add_metric([], scoring["write_errors"])
            yield errors
            yield from _learning_metrics(scoring)
            yield from _point_metrics(scoring, inference)


def _tuning_metrics(inference: dict[str, Any]):
    """The inference actor's self-tuning: what it serves with, and the table it chose from."""
    tuning = inference.get("tuning") or {}
    batch = GaugeMetricFamily("adtr_inference_max_batch", "Batch size the inference actor serves with")
    batch.add_metric([], inference.get("max_batch", 0))
    threads = GaugeMetricFamily("adtr_inference_torch_threads", "Torch threads of the forward pass")
    threads.add_metric([], inference.get("torch_threads", 0))
    state = GaugeMetricFamily("adtr_tuning_state", "1 for the tuner's state: tuning, tuned, or pinned (settings)",
                              labels=["state"])
    state.add_metric([tuning.get("state", "pinned")], 1.0)
    runs = CounterMetricFamily("adtr_tuning_runs", "Completed tuning runs (at start and after model swaps)")
    runs.add_metric([], tuning.get("runs", 0))
    fps = GaugeMetricFamily("adtr_tuning_frames_per_second", "Measured forward throughput per (threads, batch)",
                            labels=["threads", "batch"])
    ms = GaugeMetricFamily("adtr_tuning_batch_seconds", "Measured forward time of one batch (median)",
                           labels=["threads", "batch"])
    for row in tuning.get("table", []):
        labels = [str(row["threads"]), str(row["batch"])]
        fps.add_metric(labels, row["frames_per_second"])
        if row["ms"] is not None:
            ms.add_metric(labels, row["ms"] / 1000.0)
    load = GaugeMetricFamily("adtr_tuning_load_frames_per_second", "Forward throughput per batch size on live "
                             "batches under load (the check after each table; its choice serves)", labels=["batch"])
    for row in (tuning.get("load_check") or {}).get("table", []):
        if row["frames_per_second"] is not None:  # a contender not timed yet has no rate
            load.add_metric([str(row["batch"])], row["frames_per_second"])
    graph = GaugeMetricFamily("adtr_backbone_graph", "1 for what the backbone's CPU forward runs: graph (frozen, "
                              "oneDNN), pending, failed (eager after a tracing error), off, not_cpu", labels=["state"])
    graph.add_metric([inference.get("backbone_graph", "off")], 1.0)
    yield from (batch, threads, state, runs, fps, ms, load, graph)


def _camera_metrics(ingests: list[dict[str, Any]]):
    per_camera = totals(ingests)
    families = {
        key: CounterMetricFamily(f"adtr_frames_{key}", f"Frames {key}, per camera", labels=["camera"])
        for key in ("received", "processed")
    }
    anomalies = CounterMetricFamily("adtr_anomalies", "Frames decided anomalous", labels=["camera"])
    dropped = CounterMetricFamily("adtr_frames_dropped", "Frames lost, by reason", labels=["camera", "reason"])
    invalid = CounterMetricFamily("adtr_frames_invalid", "Frames refused, by reason", labels=["camera", "reason"])
    in_flight = GaugeMetricFamily("adtr_frames_in_flight", "Frames in inference or scoring", labels=["camera"])
    for camera, t in per_camera.items():
        for key, family in families.items():
            family.add_metric([camera], _finite(t[key]))
        anomalies.add_metric([camera], _finite(t["anomalies"]))
        in_flight.add_metric([camera], t["in_flight"] + t["queued"])
        for reason, n in t["dropped"].items():
            dropped.add_metric([camera, reason], _finite(n))
        for reason, n in t["invalid"].items():
            invalid.add_metric([camera, reason], _finite(n))
    yield from (*families.values(), anomalies, dropped, invalid, in_flight)
    faults = CounterMetricFamily("adtr_camera_faults", "Camera faults that lose no frame: its sequence restarted, "
                                 "repeated or jumped beyond max_seq_gap; its capture clock was implausible (clock)",
                                 labels=["camera", "kind"])
    events: dict[tuple[str, str], int] = {}
    for ingest in ingests:
        for camera, s in ingest["cameras"].items():
            for kind, n in s.get("events", {}).items():
                events[camera, kind] = events.get((camera, kind), 0) + n
    for (camera, kind), n in sorted(events.items()):
        faults.add_metric([camera, kind], _finite(n))
    yield faults
    peers = CounterMetricFamily("adtr_ingest_peer_events", "Connections to an ingest socket, by event (a peer that "
                                "sends a part over max_payload_bytes is disconnected)", labels=["endpoint", "event"])
    for ingest in ingests:
        for event, n in ingest.get("peers", {}).items():
            peers.add_metric([ingest["bound"], event], _finite(n))
    yield peers
    latency = HistogramMetricFamily("adtr_end_to_end_seconds", "Capture timestamp to decision published",
                                    labels=["camera"])
    for ingest in ingests:
        for camera, s in ingest["cameras"].items():
            if s["latency_count"]:
                latency.add_metric([camera], s["latency"], _finite(s["latency_sum"]))
    yield latency


def _learning_metrics(scoring: dict[str, Any]):
    psi = GaugeMetricFamily("adtr_score_drift_psi", "PSI of the camera's recent image scores against the serving "
                            "model's validation scores (> alarm threshold: drift)", labels=["camera"])
    alarm = GaugeMetricFamily("adtr_score_drift_alarm", "1 while the camera's scores have drifted", labels=["camera"])
    for camera, state in scoring.get("drift", {}).items():
        if state["psi"] is not None:
            psi.add_metric([camera], state["psi"])
        alarm.add_metric([camera], 1.0 if state["alarm"] else 0.0)
    yield psi
    yield alarm
    labels = ["camera", "shadow_version"]
    agreement = GaugeMetricFamily("adtr_shadow_agreement", "Share of sampled frames where the shadow model's "
                                  "decision equals the serving one's", labels=labels)
    rates = GaugeMetricFamily("adtr_shadow_anomaly_rate", "Anomaly rate on the frames the shadow saw, by model",
                              labels=[*labels, "model"])
    correlation = GaugeMetricFamily("adtr_shadow_score_correlation", "Correlation of log normalized scores, "
                                    "shadow vs serving", labels=labels)
    frames = CounterMetricFamily("adtr_shadow_frames", "Frames the shadow model scored", labels=labels)
    for s in scoring.get("shadow", []):
        key = [s["camera_id"], s["shadow_version"]]
        frames.add_metric(key, s["frames"])
        if s["frames"]:
            agreement.add_metric(key, s["agreement"])
            rates.add_metric([*key, "serving"], s["serving_anomaly_rate"])
            rates.add_metric([*key, "shadow"], s["shadow_anomaly_rate"])
        if s["score_correlation"] is not None:
            correlation.add_metric(key, s["score_correlation"])
    yield from (frames, agreement, rates, correlation)
    auto = scoring.get("auto_samples")
    if auto:
        samples = CounterMetricFamily("adtr_auto_samples", "Confident normals offered to the sample store, by "
                                      "outcome", labels=["outcome"])
        for outcome in ("written", "duplicates", "shed", "errors"):
            samples.add_metric([outcome], auto[outcome])
        yield samples


def _point_metrics(scoring: dict[str, Any], inference: dict[str, Any]):
    """Per inspection point: decisions, the flagged share of its last decisions (the false-alarm rate on a
    line of normal parts, every flag counted until reviewed) beside what its threshold promised, and its
    serving and shadow versions."""
    labels = ["point"]
    decisions = CounterMetricFamily("adtr_point_decisions", "Frames decided, per inspection point", labels=labels)
    anomalies = CounterMetricFamily("adtr_point_anomalies", "Frames decided anomalous, per inspection point",
                                    labels=labels)
    rate = GaugeMetricFamily("adtr_false_alarm_rate", "Share of the point's last guard.window decisions flagged "
                             "anomalous (on normal parts: its false-alarm rate)", labels=labels)
    promise = GaugeMetricFamily("adtr_false_alarm_promise", "The share of normal frames the point's threshold was "
                                "calibrated to flag (1 - threshold.normal_quantile)", labels=labels)
    for point, s in (scoring.get("points") or {}).items():
        decisions.add_metric([point], s["decisions"])
        anomalies.add_metric([point], s["anomalies"])
        if s["flag_rate"] is not None:
            rate.add_metric([point], s["flag_rate"])
        if s["false_alarm_promise"] is not None:
            promise.add_metric([point], s["false_alarm_promise"])
    info = GaugeMetricFamily("adtr_point_model_info", "Each point's serving (and shadow) model version",
                             labels=["point", "model_version", "role"])
    for point, m in (inference.get("points") or {}).items():
        info.add_metric([point, m["model_version"], "serving"], 1.0)
        if m["shadow_version"]:
            info.add_metric([point, m["shadow_version"], "shadow"], 1.0)
    yield from (decisions, anomalies, rate, promise, info)


# ------------------------------------------------------------------ the app
def create_app(agent: Agent, cache: SnapshotCache, token: TokenCheck | None) -> Flask:
    app = Flask("adtr-edge")
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(cache))
    limits = StoreLimits(**agent.cfg.learning.store.model_dump())
    stores = {name: SampleStore(p.registry.store_dir, limits) for name, p in agent.points.items()
              if p.registry is not None}
    anomalies = Path(agent.cfg.output.dir)

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")

    @app.get("/healthz")
    def healthz():
        ok = not agent.stopped
        return jsonify(status="ok" if ok else "stopping"), 200 if ok else 503

    @app.get("/readyz")
    def readyz():
        snap = cache.get()
        ok = not agent.stopped and bool(snap["up"]) and all(snap["up"].values()) and \
            time.time() - snap.get("taken_at", 0) < 10 * cache.interval_s + 5
        drift = (snap.get("scoring") or {}).get("drift", {})
        return jsonify(ready=ok, actors=snap["up"],
                       model_version=(snap.get("inference") or {}).get("model_version", agent.model_version),
                       shadow_version=(snap.get("inference") or {}).get("shadow_version"),
                       drift={camera: {k: state[k] for k in ("alarm", "psi", "n", "median_ratio")}
                              for camera, state in drift.items()},
                       hint=_drift_hint(drift)), 200 if ok else 503

    def authorized() -> bool:
        return token is not None and token.ok(request.headers.get("Authorization"))

    def body() -> dict[str, Any]:
        data = request.get_json(silent=True)
        return data if isinstance(data, dict) else {}

    def who(data: dict[str, Any]) -> str:
        name = str(data.get("by") or "api")[:64]
        return f"operator:{name}"

    def chosen_point() -> str | None:
        """The inspection point a learning call is about: `point` (query or body), else the point of the
        body's camera, else the first point."""
        data = body()
        name = request.args.get("point") or data.get("point")
        if name is None and isinstance(data.get("camera_id"), str):
            name = agent.point_of(data["camera_id"])
        return str(name) if name is not None else next(iter(agent.points))

    @app.before_request
    def guard():
        if request.path.startswith("/v1/"):
            name = chosen_point()
            if name not in agent.points:
                return jsonify(error=f"no inspection point {name!r} (points: {', '.join(agent.points)})"), 404
            if agent.points[name].registry is None:
                return jsonify(error=f"learning needs a model registry: point {name!r} serves a plain model folder "
                                     "(adtr-edge models init REGISTRY --model MODEL)"), 404
            if not authorized():
                return jsonify(error="missing or wrong token (Authorization: Bearer <token>)"), 401
            g.point = agent.points[name]
            g.store = stores[name]
        return None

    @app.post("/v1/samples")
    def add_sample():
        data = body()
        camera = data.get("camera_id")
        owner = agent.point_of(camera) if isinstance(camera, str) else None
        if owner is not None and owner != g.point.name:
            return jsonify(error=f"camera {camera!r} belongs to point {owner!r}, not {g.point.name!r}"), 400
        if any(k in data for k in ("seqs", "files", "since", "until")):
            try:
                result = accept_many(g.store, anomalies, data, who(data))
            except FrameNotFound as exc:
                return jsonify(error=str(exc)), 404
            except (ValueError, TypeError, StoreError) as exc:
                return jsonify(error=str(exc)), 400
            log.info("samples accepted in bulk", point=g.point.name, camera_id=camera, label=result["label"],
                     filed=result["filed"], added=result["added"], missing=len(result["missing"]), by=who(data))
            return jsonify(dict(result, point=g.point.name)), 201 if result["added"] or result["changed"] else 200
        try:
            payload, decision = find_saved_frame(anomalies, data.get("camera_id"), data.get("seq"), data.get("file"))
            result = accept_frame(g.store, payload, decision, data.get("label", "normal"), who(data), data.get("box"),
                                  data.get("note"))
        except FrameNotFound as exc:
            return jsonify(error=str(exc)), 404
        except (ValueError, TypeError, StoreError) as exc:
            return jsonify(error=str(exc)), 400
        log.info("sample accepted", **{k: result[k] for k in ("label", "camera_id", "seq", "added")}, by=who(data))
        return jsonify(result), 201 if result["added"] or result["changed"] else 200

    @app.get("/v1/samples")
    def samples():
        return jsonify(point=g.point.name, counts=g.store.counts(), events=g.store.events(50))

    @app.get("/v1/models")
    def models():
        registry = g.point.registry
        return jsonify(point=g.point.name, versions=registry.versions(), pointers=registry.pointers(),
                       status=(cache.get().get(manager_name(g.point.name)) or None), events=registry.events(50))

    @app.get("/v1/models/<version>")
    def model(version: str):
        try:
            return jsonify(g.point.registry.show(version))
        except RegistryError as exc:
            return jsonify(error=str(exc)), 404

    def manager_call(method: str, *args):
        try:
            return jsonify(ray.get(getattr(g.point.manager, method).remote(*args), timeout=300)), 200
        except ray.exceptions.RayTaskError as exc:
            return jsonify(error=str(exc).strip().splitlines()[-1]), 409
        except (ray.exceptions.RayError, TimeoutError) as exc:
            return jsonify(error=f"the model manager did not answer: {exc}"), 503

    @app.post("/v1/models/promote")
    def promote():
        data = body()
        if not isinstance(data.get("version"), str):
            return jsonify(error="JSON body needs a version"), 400
        return manager_call("promote", data["version"], who(data), str(data.get("reason", "")))

    @app.post("/v1/models/rollback")
    def rollback():
        data = body()
        return manager_call("rollback", who(data), str(data.get("reason", "")))

    @app.post("/v1/models/shadow")
    def shadow():
        data = body()
        if not isinstance(data.get("version"), str):
            return jsonify(error="JSON body needs a version"), 400
        return manager_call("shadow", data["version"], who(data), str(data.get("reason", "")))

    @app.delete("/v1/models/shadow")
    def clear_shadow():
        return manager_call("clear_shadow", who(body()))

    @app.post("/v1/retrain")
    def retrain():
        data = body()
        overrides = data.get("overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            return jsonify(error="overrides must be a list of key=value strings"), 400
        return manager_call("submit_retrain", who(data), overrides)

    @app.get("/v1/retrain/<submission_id>")
    def retrain_status(submission_id: str):
        return manager_call("job", submission_id)

    @app.get("/v1/points")
    def points():
        snap = cache.get()
        served = (snap.get("inference") or {}).get("points", {})
        decided = (snap.get("scoring") or {}).get("points", {})
        return jsonify(points={name: {"cameras": p.cameras or ("every camera no other point lists"
                                                                if name == DEFAULT_POINT else []),
                                      "model": p.model_path, "registry": str(p.registry.root) if p.registry else None,
                                      "serving": served.get(name, {}).get("model_version"),
                                      "shadow": served.get(name, {}).get("shadow_version"),
                                      "decided": decided.get(name)}
                               for name, p in agent.points.items()})

    @app.post("/v1/points")
    def add_point():
        data = body()
        name, cameras, frames = data.get("name"), data.get("cameras"), data.get("frames")
        if not isinstance(name, str) or not isinstance(cameras, list) or not all(isinstance(c, str) for c in cameras) \
                or (frames is not None and (not isinstance(frames, int) or isinstance(frames, bool))):
            return jsonify(error="JSON body needs name, cameras (a list of camera ids) and optionally frames"), 400
        try:
            result = agent.add_point(name, cameras, who(data), frames)
        except AgentError as exc:
            return jsonify(error=str(exc)), 409
        except (ray.exceptions.RayError, TimeoutError) as exc:
            return jsonify(error=f"the actors did not take the new point: {exc}"), 503
        stores[name] = SampleStore(agent.points[name].registry.store_dir, limits)
        return jsonify(result), 201

    @app.post("/v1/points/finish-recording")
    def finish_recording():
        return manager_call("finish_recording", who(body()))

    @app.get("/v1/events")
    def events():
        return jsonify(point=g.point.name, registry=g.point.registry.events(200), store=g.store.events(200))

    return app


def _drift_hint(drift: dict[str, Any]) -> str | None:
    cameras = sorted(camera for camera, state in drift.items() if state["alarm"])
    if not cameras:
        return None
    return (f"score drift on {', '.join(cameras)}: review their recent frames, accept false alarms as normal "
            "(adtr-edge accept), then retrain (adtr-edge retrain --submit)")


def _request_deadline(server, seconds: float) -> None:
    """waitress closes a connection when it has been idle for channel_timeout, but a client that trickles
    a header line every few seconds is never idle: a hundred of them held every connection slot, and
    scrapes waited in the backlog for as long as they wished. Also close a connection whose request has
    been arriving for longer than `seconds` (checked every cleanup_interval)."""
    inner = server.maintenance
    arriving: dict[int, tuple[object, float]] = {}  # fd → (the partial request, when it was first seen)

    def maintenance(now: float) -> None:
        inner(now)
        seen = {}
        for fd, channel in list(server.active_channels.items()):
            request = channel.request  # a request not yet received in full
            if request is None:
                continue
            previous = arriving.get(fd)
            since = previous[1] if previous is not None and previous[0] is request else now
            seen[fd] = (request, since)
            if now - since > seconds:
                channel.will_close = True
        arriving.clear()
        arriving.update(seen)

    server.maintenance = maintenance


class HttpServer:
    """waitress on its own thread; `port` is the one really bound (http.port 0 = any free port)."""

    def __init__(self, agent: Agent):
        cfg = agent.cfg.http
        self.token_file = None
        token = None
        first_registry = next((p.registry for p in agent.points.values() if p.registry is not None), None)
        if first_registry is not None:
            self.token_file = Path(cfg.token_file or first_registry.root / "api_token").expanduser()
            token = TokenCheck(load_or_create_token(self.token_file))
        self.cache = SnapshotCache(agent, cfg.snapshot_s)
        self.app = create_app(agent, self.cache, token)
        self.server = create_server(
            self.app, host=cfg.host, port=cfg.port, threads=cfg.threads, connection_limit=cfg.connection_limit,
            backlog=cfg.backlog, channel_timeout=cfg.request_timeout_s,
            cleanup_interval=max(1, int(cfg.request_timeout_s / 4)),
            max_request_header_size=16 << 10, max_request_body_size=1 << 20, ident="adtr-edge", expose_tracebacks=False)
        _request_deadline(self.server, cfg.request_timeout_s)
        self.port = self.server.effective_port
        self.url = f"http://{cfg.host}:{self.port}"
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)
        self.thread.start()
        log.info("http listening", url=self.url, paths="/metrics /healthz /readyz /v1/...")

    def shutdown(self) -> None:
        self.cache.stop.set()
        # Closed on the server's own loop thread: closing its sockets from here raced its select() (EBADF).
        # Handler threads first (they pull the loop's trigger when a response is ready), then the loop.
        self.server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)
        try:
            self.server.trigger.pull_trigger(self._close_in_loop)
        except OSError as exc:  # its trigger already closed (seen once in CI, EBADF): the loop cannot be woken
            log.warning("http server trigger already closed; closing from this thread", error=str(exc))
            self._close_in_loop()
        self.thread.join(timeout=5)

    def _close_in_loop(self) -> None:
        for channel in list(self.server._map.values()):
            if channel is not self.server and channel is not self.server.trigger:
                channel.close()  # open client connections; the loop ends when none is left
        self.server.close()


def start_http(agent: Agent) -> HttpServer:
    return HttpServer(agent)
