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
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import ray
import structlog
from flask import Flask, Response, g, jsonify, request
from prometheus_client import CollectorRegistry, generate_latest
from waitress.server import create_server

from adtr_edge.actors.config import DEFAULT_POINT
from adtr_edge.actors.retrain import manager_name
from adtr_edge.lifecycle.registry import RegistryError
from adtr_edge.lifecycle.samples import SampleStore, StoreError, StoreLimits

from .collector import AgentCollector, SnapshotCache
from .errors import AgentError
from .learning import FrameNotFound, accept_frame, accept_many, find_saved_frame
from .private import create_private
from .runner import Agent
from .web import call_manager, json_body

log = structlog.get_logger(__name__)


# ------------------------------------------------------------------ the token
def load_or_create_token(path: Path) -> str:
    """The API token in `path` (mode 0600); a new random one is written there when the file is missing."""
    path = Path(path).expanduser()
    create_private(path, secrets.token_urlsafe(32) + "\n")
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


def create_app(agent: Agent, cache: SnapshotCache, token: TokenCheck | None) -> Flask:
    app = Flask("adtr-edge")
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(cache))

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

    _learning_api(app, agent, token, cache)
    return app


def _who(data: dict[str, Any]) -> str:
    name = str(data.get("by") or "api")[:64]
    return f"operator:{name}"


def _learning_api(app: Flask, agent: Agent, token: TokenCheck | None, cache: SnapshotCache) -> None:
    """/v1/...: behind the token; each call is about one inspection point (`g.point`, `g.store`)."""
    limits = StoreLimits(**agent.cfg.learning.store.model_dump())
    stores = {name: SampleStore(p.registry.store_dir, limits) for name, p in agent.points.items()
              if p.registry is not None}
    anomalies = Path(agent.cfg.output.dir)

    def authorized() -> bool:
        return token is not None and token.ok(request.headers.get("Authorization"))

    def chosen_point() -> str | None:
        """The inspection point a learning call is about: `point` (query or body), else the point of the
        body's camera, else the first point."""
        data = json_body()
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
        data = json_body()
        camera = data.get("camera_id")
        owner = agent.point_of(camera) if isinstance(camera, str) else None
        if owner is not None and owner != g.point.name:
            return jsonify(error=f"camera {camera!r} belongs to point {owner!r}, not {g.point.name!r}"), 400
        if any(k in data for k in ("seqs", "files", "since", "until")):
            try:
                result = accept_many(g.store, anomalies, data, _who(data))
            except FrameNotFound as exc:
                return jsonify(error=str(exc)), 404
            except (ValueError, TypeError, StoreError) as exc:
                return jsonify(error=str(exc)), 400
            log.info("samples accepted in bulk", point=g.point.name, camera_id=camera, label=result["label"],
                     filed=result["filed"], added=result["added"], missing=len(result["missing"]), by=_who(data))
            return jsonify(dict(result, point=g.point.name)), 201 if result["added"] or result["changed"] else 200
        try:
            payload, decision = find_saved_frame(anomalies, data.get("camera_id"), data.get("seq"), data.get("file"))
            result = accept_frame(g.store, payload, decision, data.get("label", "normal"), _who(data), data.get("box"),
                                  data.get("note"))
        except FrameNotFound as exc:
            return jsonify(error=str(exc)), 404
        except (ValueError, TypeError, StoreError) as exc:
            return jsonify(error=str(exc)), 400
        log.info("sample accepted", **{k: result[k] for k in ("label", "camera_id", "seq", "added")}, by=_who(data))
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
        answer, code = call_manager(g.point.manager, method, *args)
        return jsonify(answer), code

    @app.post("/v1/models/promote")
    def promote():
        data = json_body()
        if not isinstance(data.get("version"), str):
            return jsonify(error="JSON body needs a version"), 400
        return manager_call("promote", data["version"], _who(data), str(data.get("reason", "")))

    @app.post("/v1/models/rollback")
    def rollback():
        data = json_body()
        return manager_call("rollback", _who(data), str(data.get("reason", "")))

    @app.post("/v1/models/shadow")
    def shadow():
        data = json_body()
        if not isinstance(data.get("version"), str):
            return jsonify(error="JSON body needs a version"), 400
        return manager_call("shadow", data["version"], _who(data), str(data.get("reason", "")))

    @app.delete("/v1/models/shadow")
    def clear_shadow():
        return manager_call("clear_shadow", _who(json_body()))

    @app.post("/v1/retrain")
    def retrain():
        data = json_body()
        overrides = data.get("overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            return jsonify(error="overrides must be a list of key=value strings"), 400
        return manager_call("submit_retrain", _who(data), overrides)

    @app.get("/v1/retrain/<submission_id>")
    def retrain_status(submission_id: str):
        return manager_call("job", submission_id)

    _point_api(app, agent, cache, stores, limits, manager_call)

    @app.get("/v1/events")
    def events():
        return jsonify(point=g.point.name, registry=g.point.registry.events(200), store=g.store.events(200))


def _point_api(app: Flask, agent: Agent, cache: SnapshotCache, stores: dict[str, SampleStore],
               limits: StoreLimits, manager_call) -> None:
    """/v1/points: list the inspection points, teach a new one (cold start), end its recording, remove one."""
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
                               for name, p in list(agent.points.items())})

    @app.post("/v1/points")
    def add_point():
        data = json_body()
        name, cameras, frames = data.get("name"), data.get("cameras"), data.get("frames")
        if not isinstance(name, str) or not isinstance(cameras, list) or not all(isinstance(c, str) for c in cameras) \
                or (frames is not None and (not isinstance(frames, int) or isinstance(frames, bool))):
            return jsonify(error="JSON body needs name, cameras (a list of camera ids) and optionally frames"), 400
        try:
            result = agent.add_point(name, cameras, _who(data), frames)
        except AgentError as exc:
            return jsonify(error=str(exc)), 409
        except (ray.exceptions.RayError, TimeoutError) as exc:
            return jsonify(error=f"the actors did not take the new point: {exc}"), 503
        stores[name] = SampleStore(agent.points[name].registry.store_dir, limits)
        return jsonify(result), 201

    @app.delete("/v1/points/<name>")
    def remove_point(name: str):
        try:
            result = agent.remove_point(name, _who(json_body()))
        except AgentError as exc:
            return jsonify(error=str(exc)), 409
        except (ray.exceptions.RayError, TimeoutError) as exc:
            return jsonify(error=f"the actors did not let the point go: {exc}"), 503
        store = stores.pop(name, None)
        if store is not None:
            store.close()
        return jsonify(result)

    @app.post("/v1/points/finish-recording")
    def finish_recording():
        return manager_call("finish_recording", _who(json_body()))


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
