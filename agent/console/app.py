"""The operator console's Flask app: pages (Live, Review, Models, Activity), their JSON, the frames' files.

Security, in one place:
- login with a name and password (scrypt hashes, `auth.py`), throttled per name and per address;
- the session cookie (`adtr_console`) is HttpOnly, SameSite=Strict, Secure when `console.secure_cookies`,
  signed with a key made at start (never on disk), and names a server-side session that logout ends;
- CSRF: Flask-WTF's CSRFProtect checks a token on every POST (forms and the pages' fetch calls, header
  X-CSRFToken), and a POST whose Origin is another site is refused before that;
- output is escaped: Jinja autoescaping in templates, textContent (never innerHTML) in the scripts, a
  Content-Security-Policy that allows only the agent's own scripts, styles and images;
- files only through `FrameIndex.media_path` (no path from a request reaches the disk unchecked);
- role `viewer` may read everything and change nothing (every state-changing route needs `operator`).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import cv2
import numpy as np
import structlog
from flask import Flask, Response, abort, g, jsonify, redirect, render_template, request, send_file, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect

from adtr_edge.actors.retrain import manager_name
from adtr_edge.lifecycle.registry import RegistryError
from adtr_edge.lifecycle.samples import SampleStore, StoreError, StoreLimits

from ..learning import FrameNotFound, accept_frame, find_saved_frame
from ..web import call_manager, json_body
from .audit import REVIEW_ACTIONS, AuditLog
from .auth import Authenticator, LoginThrottle, Sessions
from .frames import FrameIndex, MediaNotFound
from .live import LiveView

log = structlog.get_logger(__name__)
HERE = Path(__file__).parent
WINDOWS = {"15m": 900, "1h": 3600, "8h": 8 * 3600, "24h": 86400, "7d": 7 * 86400, "all": None}
MAX_BODY = 16 << 20  # a brush mask of a large frame, as a PNG data URL
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _fmt_time(ts: Any) -> str:
    """A UTC time, or "—" for anything that is not one (a camera's clock may send 1e306 or a ms count)."""
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not ts:
        return "—"
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "—"


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _decode_mask(data_url: Any, width: int, height: int) -> bytes | None:
    if data_url is None:
        return None
    if not isinstance(data_url, str) or not data_url.startswith("data:image/png;base64,"):
        raise ValueError("mask must be a PNG data URL")
    try:
        raw = base64.b64decode(data_url.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("mask is not valid base64") from None
    pixels = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("mask is not a readable PNG")
    if pixels.shape[:2] != (height, width):
        raise ValueError(f"mask is {pixels.shape[1]}x{pixels.shape[0]}, the frame is {width}x{height}")
    marked = pixels[..., -1] > 0 if pixels.ndim == 3 and pixels.shape[2] == 4 else \
        (pixels.max(axis=2) if pixels.ndim == 3 else pixels) > 0
    if not marked.any():
        return None
    return cv2.imencode(".png", marked.astype(np.uint8) * 255)[1].tobytes()  # re-encoded: never stored as sent


def _check_box(box: Any, width: int, height: int) -> list[int] | None:
    if box is None:
        return None
    if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in box):
        raise ValueError("box must be [x, y, width, height] in whole frame pixels")
    x, y, w, h = box
    if w < 1 or h < 1 or x < 0 or y < 0 or (width and x + w > width) or (height and y + h > height):
        raise ValueError(f"box {box} is not inside the {width}x{height} frame")
    return box


@dataclass
class _Console:
    """What the console's route groups share: its parts, and the who-is-asking helpers."""

    agent: Any
    cache: Any
    cfg: Any
    auth: Any
    throttle: Any
    sessions: Any
    audit: Any
    index: Any
    live: Any
    registry: Any
    store: Any
    store_of: Any
    login_required: Any
    wants_json: Any
    by: Any
    point_view: Any


@dataclass
class _PointView:
    """One inspection point as the models page and its actions see it (a registry and a store, or neither)."""

    name: str
    registry: Any
    store: Any
    manager: Any


def _models_data(c: _Console, view: _PointView) -> dict[str, Any]:
    cache, registry, store, agent, audit = c.cache, view.registry, view.store, c.agent, c.audit
    snap = cache.get(wait_s=2.0)
    status = snap.get(manager_name(view.name)) or {}
    live = ((snap.get("inference") or {}).get("points") or {}).get(view.name) or {}
    points = {"points": list(agent.points), "point": view.name}
    if registry is None or store is None:  # both, or neither
        return {"learning": False, "serving": live.get("model_version", agent.model_version), **points}
    cameras = set((((snap.get("scoring") or {}).get("points") or {}).get(view.name) or {}).get("cameras") or [])
    versions = registry.versions()
    for v in versions:  # the files beside each version (not registry.show: it rereads the event log each time)
        folder = registry.version_dir(v["version"])
        v["gate_full"] = _read_json(folder / "gate.json") or None
        v["dataset"] = (_read_json(folder / "dataset.json") or {}).get("counts")
        v["adtr_plus"] = ((_read_json(folder / "manifest.json") or {}).get("training") or {}).get("adtr_plus")
    versions.reverse()  # newest first
    counts = store.counts()
    return {"learning": True, "versions": versions, "pointers": registry.pointers(),
            "serving": live.get("model_version"), "shadow": live.get("shadow_version"),
            "shadow_stats": [s for s in (snap.get("scoring") or {}).get("shadow", []) if s.get("camera_id") in cameras],
            "guard": status.get("guard"), "last_job": status.get("last_job"), "store": counts,
            "events": list(reversed(registry.events(30))), "activity": audit.tail(15), **points}


def create_console_app(agent, cache, users_file: Path, audit_file: Path) -> Flask:
    cfg = agent.cfg.console
    app = Flask("adtr-edge-console", template_folder=str(HERE / "templates"), static_folder=str(HERE / "static"),
                static_url_path="/static")
    app.config.update(
        SECRET_KEY=secrets.token_bytes(32),  # per start: a restart logs everyone out
        SESSION_COOKIE_NAME="adtr_console", SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=cfg.secure_cookies, PERMANENT_SESSION_LIFETIME=int(cfg.session_hours * 3600),
        WTF_CSRF_TIME_LIMIT=int(cfg.session_hours * 3600), WTF_CSRF_SSL_STRICT=True, MAX_CONTENT_LENGTH=MAX_BODY,
        SEND_FILE_MAX_AGE_DEFAULT=3600, TEMPLATES_AUTO_RELOAD=False)
    app.jinja_env.autoescape = True  # every template, whatever its extension
    app.jinja_env.filters.update(when=_fmt_time, num=_num)
    CSRFProtect(app)  # every POST needs the token (forms: csrf_token; the pages' fetch calls: X-CSRFToken)
    auth = Authenticator(users_file)
    throttle = LoginThrottle(cfg.max_login_failures, cfg.lockout_s)
    sessions = Sessions(cfg.session_hours * 3600)
    audit = AuditLog(audit_file)
    index = FrameIndex(Path(agent.cfg.output.dir))
    live = LiveView(cache)
    registry = agent.registry
    limits = StoreLimits(**agent.cfg.learning.store.model_dump())
    store = SampleStore(registry.store_dir, limits) if registry is not None else None
    point_stores: dict[str, SampleStore] = {}

    def point_view(name: str | None) -> _PointView | None:
        """The inspection point a models page or action is about (`point`; the first one by default)."""
        name = name or next(iter(agent.points))
        point = agent.points.get(name)
        if point is None:
            return None
        if point.registry is None:
            return _PointView(name, None, None, None)
        if point.registry is registry:
            return _PointView(name, registry, store, point.manager)
        if name not in point_stores:
            point_stores[name] = SampleStore(point.registry.store_dir, limits)
        return _PointView(name, point.registry, point_stores[name], point.manager)

    def store_of(camera: str, decision: dict[str, Any]) -> SampleStore:
        """The sample store of the point that decided the frame: a label belongs with that point's model."""
        name = decision.get("point") or agent.point_of(camera)
        point = agent.points.get(name)
        if point is None or point.registry is None:
            raise ValueError(f"the frame was decided by point {name!r}, which this agent does not serve from a "
                             "registry now")
        if point.registry is registry and store is not None:  # the first point's (a store iff a registry)
            return store
        if name not in point_stores:
            point_stores[name] = SampleStore(point.registry.store_dir, limits)
        return point_stores[name]
    app.extensions["adtr_console"] = {"index": index, "audit": audit, "sessions": sessions, "live": live}

    # ------------------------------------------------------------------ who is asking
    def current() -> Any:
        """The session's user, as the users file says now: a removed user is logged out at their next
        request, a changed role applies at once."""
        info = sessions.get(session.get("sid"))
        if info is None:
            return None
        user = auth.users().get(info.user)
        if user is None:
            sessions.end_user(info.user)
            return None
        info.role = user["role"]
        return info

    def wants_json() -> bool:
        return request.path.startswith(("/api/", "/media/"))

    def login_required(role: str | None = None):
        def wrap(view):
            @wraps(view)
            def inner(*args, **kwargs):
                user = current()
                if user is None:
                    if wants_json():
                        return jsonify(error="log in first"), 401
                    return redirect(url_for("login", next=request.full_path if request.query_string else request.path))
                g.user = user
                if role == "operator" and user.role != "operator":
                    audit.record(user.user, user.role, "refused", ok=False, address=request.remote_addr,
                                 what=f"{request.method} {request.path}", reason="viewer role")
                    return jsonify(error="your role (viewer) may look, not change anything"), 403
                return view(*args, **kwargs)
            return inner
        return wrap

    def by() -> str:
        return f"console:{g.user.user}"

    @app.before_request
    def same_origin_only():
        """A state-changing request from another site is refused even before the CSRF check."""
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            origin = request.headers.get("Origin")
            if origin and origin != "null" and urlsplit(origin).netloc != request.host:
                return jsonify(error="cross-origin request refused"), 403
            if origin == "null":
                return jsonify(error="cross-origin request refused"), 403
        return None

    @app.errorhandler(CSRFError)
    def csrf_failed(exc: CSRFError):
        user = current()
        audit.record(user.user if user else "-", user.role if user else "-", "refused", ok=False,
                     address=request.remote_addr, what=f"{request.method} {request.path}",
                     reason=f"CSRF: {exc.description}")
        if wants_json():
            return jsonify(error=f"CSRF check failed: {exc.description} (reload the page)"), 400
        return render_template("login.html", error="The form expired or did not come from this console; "
                                                   "try again.", next="/"), 400

    @app.errorhandler(413)
    def too_large(_exc):
        return jsonify(error=f"request body over {MAX_BODY >> 20} MiB"), 413

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        if not request.path.startswith(("/static/", "/media/")):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.context_processor
    def globals_():
        user = getattr(g, "user", None)
        return {"user": user, "can_change": bool(user and user.role == "operator"),
                "learning": registry is not None}
    c = _Console(agent=agent, cache=cache, cfg=cfg, auth=auth, throttle=throttle, sessions=sessions, audit=audit,
                 index=index, live=live, registry=registry, store=store, store_of=store_of,
                 login_required=login_required, wants_json=wants_json, by=by, point_view=point_view)
    _login_routes(app, c)
    _page_routes(app, c)
    _action_routes(app, c)
    return app


def _login_routes(app: Flask, c: _Console) -> None:
    """Log in and out."""
    audit, auth, login_required, sessions, throttle = c.audit, c.auth, c.login_required, c.sessions, c.throttle

    def safe_next(target: str | None) -> str:
        """Only a path on this console (no scheme, no host, no //, no backslash, no control characters that a
        browser would drop to make one): a login link cannot send anyone elsewhere."""
        if not target or not re.fullmatch(r"/(?![/\\])[A-Za-z0-9/_.~%?=&;:+,-]*", target):
            return url_for("live_page")
        return target

    @app.get("/login")
    def login():
        return render_template("login.html", error=None, next=safe_next(request.args.get("next")))

    @app.post("/login")
    def login_post():
        name = (request.form.get("user") or "")[:64]
        password = request.form.get("password") or ""
        target = safe_next(request.form.get("next"))
        keys = (f"user:{name}", f"addr:{request.remote_addr}")
        wait = throttle.wait_s(*keys)
        if wait > 0:
            audit.record(name or "-", "-", "login", ok=False, address=request.remote_addr, reason="locked out")
            return render_template("login.html", error=f"Too many failed logins: wait {math.ceil(wait)} s.",
                                   next=target), 429
        role = auth.check(name, password)
        if role is None:
            throttle.failed(*keys)
            audit.record(name or "-", "-", "login", ok=False, address=request.remote_addr,
                         reason="wrong name or password")
            return render_template("login.html", error="Wrong name or password.", next=target), 401
        throttle.succeeded(*keys)
        old = session.get("sid")
        sessions.end(old)
        session.clear()  # a new session (and CSRF token) at login: no fixation
        session.permanent = True
        session["sid"] = sessions.create(name, role)
        audit.record(name, role, "login", address=request.remote_addr)
        return redirect(target)

    @app.post("/logout")
    @login_required()
    def logout():
        sessions.end(session.get("sid"))
        session.clear()
        audit.record(g.user.user, g.user.role, "logout", address=request.remote_addr)
        return redirect(url_for("login"))



def _page_routes(app: Flask, c: _Console) -> None:
    """The pages (Live, Review, Models, Activity), their JSON and the frames' files."""
    audit, cfg, index, live, login_required, registry, store, wants_json = (
        c.audit, c.cfg, c.index, c.live, c.login_required, c.registry, c.store, c.wants_json)

    @app.get("/")
    def home():
        return redirect(url_for("live_page"))

    @app.get("/live")
    @login_required()
    def live_page():
        return render_template("live.html", page="live")

    def filters() -> dict[str, Any]:
        camera = request.args.get("camera") or None
        decision = request.args.get("decision", "all")
        window = request.args.get("window", "all")
        if decision not in ("all", "anomaly", "normal"):
            abort(400, f"decision must be all, anomaly or normal, not {decision!r}")
        if window not in WINDOWS:
            abort(400, f"window must be one of {', '.join(WINDOWS)}")
        return {"camera": camera, "decision": decision, "window": window}

    def query_args(f: dict[str, Any]) -> dict[str, Any]:
        span = WINDOWS[f["window"]]
        return {"camera": f["camera"], "decision": f["decision"], "since": time.time() - span if span else None}

    def card(frame) -> dict[str, Any]:
        side = index.sidecar(frame)
        width, height = side.get("width") or 0, side.get("height") or 0
        regions = []
        for r in side.get("regions") or []:
            box = r.get("box") if isinstance(r, dict) else None
            if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
                regions.append([float(v) for v in box])
        return {"frame": frame, "key": frame.key, "camera": frame.camera, "stem": frame.stem, "seq": frame.seq,
                "ts": frame.ts, "captured": side.get("ts"), "normal": frame.normal, "score": side.get("score"),
                "normalized": side.get("normalized_score"), "threshold": side.get("threshold"),
                "version": side.get("model_version"), "width": width, "height": height, "regions": regions,
                "payload": frame.stem + (frame.payload_suffix or ""),
                "thumb": frame.stem + ("_thumb.jpg" if "_thumb.jpg" in frame.suffixes else frame.payload_suffix or ""),
                "heat": frame.stem + "_heat.png" if "_heat.png" in frame.suffixes else None,
                "overlay": frame.stem + "_overlay.png" if "_overlay.png" in frame.suffixes else None,
                "reviewed": audit.review_state(frame.key)}

    @app.get("/review")
    @login_required()
    def review_page():
        f = filters()
        try:
            page = max(1, int(request.args.get("page", 1)))
        except ValueError:
            abort(400, "page must be a number")
        size = cfg.page_size
        t0 = time.perf_counter()
        total, frames = index.query(**query_args(f), offset=(page - 1) * size, limit=size)
        pages = max(1, math.ceil(total / size))
        cards = [card(fr) for fr in frames]
        def link(p: int) -> str:
            return url_for("review_page", **{k: v for k, v in {**f, "page": p}.items() if v})

        return render_template("review.html", page="review", cards=cards, total=total, page_no=page, pages=pages,
                               f=f, cameras=index.camera_names(), windows=list(WINDOWS),
                               prev_url=link(page - 1) if page > 1 else None,
                               next_url=link(page + 1) if page < pages else None,
                               filter_query=urlencode({k: v for k, v in f.items() if v}),
                               query_ms=(time.perf_counter() - t0) * 1000,
                               activity=audit.tail(15, REVIEW_ACTIONS))

    @app.get("/review/<camera>/<stem>")
    @login_required()
    def detail_page(camera: str, stem: str):
        frame = index.get(camera, stem)
        if frame is None:
            abort(404, "no such saved frame")
        f = filters()
        newer, older = index.neighbours(frame.key, **query_args(f))
        query = urlencode({k: v for k, v in f.items() if v})
        return render_template("detail.html", page="review", c=card(frame), side=index.sidecar(frame), f=f,
                               filter_query=query,
                               newer_url=url_for("detail_page", camera=newer.camera, stem=newer.stem) + "?" + query
                               if newer else None,
                               older_url=url_for("detail_page", camera=older.camera, stem=older.stem) + "?" + query
                               if older else None,
                               back_url=url_for("review_page") + "?" + query)

    def chosen_point() -> _PointView:
        """`?point=NAME` (the first point without it); an unknown name is a 404."""
        view = c.point_view(request.args.get("point"))
        if view is None:
            abort(404, f"no inspection point {request.args.get('point')!r}")
        return view

    @app.get("/models")
    @login_required()
    def models_page():
        return render_template("models.html", page="models", m=_models_data(c, chosen_point()))

    @app.get("/activity")
    @login_required()
    def activity_page():
        return render_template("activity.html", page="activity", entries=audit.tail(300),
                               store_events=store.events(100) if store else [],
                               registry_events=list(reversed(registry.events(100))) if registry else [])

    @app.errorhandler(400)
    @app.errorhandler(404)
    def not_found(exc):
        if wants_json():
            return jsonify(error=exc.description), exc.code
        return render_template("error.html", code=exc.code, message=exc.description), exc.code

    # ------------------------------------------------------------------ files
    @app.get("/media/<camera>/<name>")
    @login_required()
    def media(camera: str, name: str):
        try:
            path = index.media_path(camera, name)
        except MediaNotFound as exc:
            return jsonify(error=str(exc)), 404
        mimetype = {".jpg": "image/jpeg", ".png": "image/png", ".json": "application/json"}[path.suffix]
        response = send_file(path, mimetype=mimetype, max_age=3600, conditional=True, etag=True)
        response.headers["Cache-Control"] = "private, max-age=3600"
        return response

    # ------------------------------------------------------------------ JSON for the pages
    @app.get("/api/live")
    @login_required()
    def api_live():
        return jsonify(live.view())

    @app.get("/api/models")
    @login_required()
    def api_models():
        return jsonify(_models_data(c, chosen_point()))

    @app.get("/api/activity")
    @login_required()
    def api_activity():
        return jsonify(audit.tail(100))



def _action_routes(app: Flask, c: _Console) -> None:
    """What an operator changes: review labels, promotion, rollback, shadow, retrain."""
    (audit, by, index, login_required, registry, store, store_of) = (
        c.audit, c.by, c.index, c.login_required, c.registry, c.store, c.store_of)

    def need_learning():
        if registry is None or store is None:
            abort(Response('{"error": "labels and model versions need a model registry: start the agent with '
                           '--model REGISTRY"}', 409, mimetype="application/json"))

    def chosen() -> _PointView:
        """The point a model action is about: `point` in the body (or the query), else the first point."""
        name = json_body().get("point") or request.args.get("point")
        view = c.point_view(name if isinstance(name, str) else None)
        if view is None:
            abort(Response(json.dumps({"error": f"no inspection point {name!r}"}), 404, mimetype="application/json"))
        if view.registry is None or view.manager is None:
            abort(Response(json.dumps({"error": f"point {view.name!r} serves a plain model folder: model versions "
                                                "need a registry"}), 409, mimetype="application/json"))
        return view

    def act(action: str, frame_key: str | None, fn, **detail):
        """Run an action, audit it (ok or not) and answer JSON."""
        try:
            result, code = fn()
        except Exception as exc:  # audited and answered, never a traceback to the page
            audit.record(g.user.user, g.user.role, action, ok=False, frame=frame_key, address=request.remote_addr,
                         error=str(exc)[:300], **detail)
            raise
        audit.record(g.user.user, g.user.role, action, ok=code < 400, frame=frame_key, address=request.remote_addr,
                     result={k: v for k, v in result.items() if k in ("sha256", "added", "changed", "duplicate",
                                                                        "error", "promoted", "serving", "shadow",
                                                                        "submission_id", "label")}, **detail)
        return jsonify(result), code

    @app.post("/api/review/<camera>/<stem>/<action>")
    @login_required("operator")
    def review_action(camera: str, stem: str, action: str):
        if action not in ("accept", "confirm", "skip"):
            abort(404, "actions: accept, confirm, skip")
        frame = index.get(camera, stem)
        if frame is None:
            return jsonify(error="no such saved frame (it may have been deleted past output.max_bytes)"), 404
        name = {"accept": "accept_normal", "confirm": "confirm_defect", "skip": "skip"}[action]
        if action == "skip":
            return act(name, frame.key, lambda: ({"skipped": frame.key}, 200))
        need_learning()
        data = json_body()
        side = index.sidecar(frame)
        note = data.get("note")
        if note is not None and (not isinstance(note, str) or len(note) > 500):
            return jsonify(error="note must be text of at most 500 characters"), 400

        def run():
            try:
                width, height = int(side.get("width") or 0), int(side.get("height") or 0)
                box = _check_box(data.get("box"), width, height) if action == "confirm" else None
                mask = _decode_mask(data.get("mask"), width, height) if action == "confirm" else None
                payload, decision = find_saved_frame(index.root,
                                                     file=f"{frame.camera}/{frame.stem}{frame.payload_suffix}")
                result = accept_frame(store_of(frame.camera, decision), payload, decision,
                                      "normal" if action == "accept" else "defect", by(),
                                      box, note, mask)
            except FrameNotFound as exc:
                return {"error": str(exc)}, 404
            except (ValueError, TypeError, StoreError) as exc:
                return {"error": str(exc)}, 400
            result = dict(result, box=box, mask=mask is not None)
            result.pop("file", None)
            return result, 201 if result["added"] or result["changed"] else 200

        return act(name, frame.key, run, box=data.get("box") if action == "confirm" else None,
                   mask=bool(data.get("mask")) if action == "confirm" else None)

    def manager_call(view: _PointView, method: str, *args) -> tuple[dict[str, Any], int]:
        answer, code = call_manager(view.manager, method, *args)
        return answer or {}, code  # a refusal's answer is never empty

    @app.post("/api/models/promote")
    @login_required("operator")
    def promote():
        view = chosen()
        data = json_body()
        version = data.get("version")
        try:
            view.registry.version_dir(version if isinstance(version, str) else "")
        except RegistryError as exc:
            return jsonify(error=str(exc)), 400
        reason = str(data.get("reason") or "promoted in the console")[:300]
        return act("promote", None, lambda: manager_call(view, "promote", version, by(), reason), version=version,
                   point=view.name)

    @app.post("/api/models/rollback")
    @login_required("operator")
    def rollback():
        view = chosen()
        reason = str(json_body().get("reason") or "rolled back in the console")[:300]
        return act("rollback", None, lambda: manager_call(view, "rollback", by(), reason), point=view.name)

    @app.post("/api/models/shadow")
    @login_required("operator")
    def shadow():
        view = chosen()
        version = json_body().get("version")
        if version is None:
            return act("shadow_off", None, lambda: manager_call(view, "clear_shadow", by()), point=view.name)
        try:
            view.registry.version_dir(version if isinstance(version, str) else "")
        except RegistryError as exc:
            return jsonify(error=str(exc)), 400
        return act("shadow", None, lambda: manager_call(view, "shadow", version, by(), "shadowed in the console"),
                   version=version, point=view.name)

    @app.post("/api/retrain")
    @login_required("operator")
    def retrain():
        view = chosen()
        return act("retrain", None, lambda: manager_call(view, "submit_retrain", by(), []), point=view.name)

    @app.get("/api/retrain/<submission_id>")
    @login_required()
    def retrain_status(submission_id: str):
        if not submission_id.startswith("retrain-") or len(submission_id) > 80:
            return jsonify(error="not a retrain submission id"), 400
        result, code = manager_call(chosen(), "job", submission_id)
        return jsonify(result), code

