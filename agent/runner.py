"""The agent: Ray bootstrap, the named actors of one pipeline, supervision and a clean drain on stop."""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import structlog

from adtr_edge.actors.cold import MIN_RECORDED, write_cold
from adtr_edge.actors.config import DEFAULT_POINT, camera_points, check_point_name
from adtr_edge.actors.inference import InferenceActor
from adtr_edge.actors.ingest import IngestActor, key_bindings
from adtr_edge.actors.jobs import stop_retrains
from adtr_edge.actors.logs import route_library_loggers
from adtr_edge.actors.models import ModelManager
from adtr_edge.actors.retrain import AGENT_FILE, manager_name
from adtr_edge.actors.scoring import ScoringActor
from adtr_edge.lifecycle.registry import Registry, resolve_model, write_json_atomic
from adtr_edge.model.detector import load_score_head

from .errors import AgentError
from .rayhead import LocalHead, memory_monitor_env
from .settings import AgentConfig

log = structlog.get_logger(__name__)
POINTS_FILE = "points.json"  # in state_dir: the points added on this box ({name: {model, cameras}})


def tighten_ray_token() -> None:
    """Ray writes its auth token world-readable (0644); only this user may read it."""
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), os.path.expanduser("~/.ray/auth_token")):
        if path and os.path.isfile(path):
            os.chmod(path, 0o600)


def connect_ray(cfg: AgentConfig, jobs: bool) -> tuple[bool, str | None, LocalHead | None]:
    """Join the configured Ray cluster, or start one: in-process, or (when retraining needs Ray Jobs) a
    local head node of its own (see agent.rayhead). Returns (we started it, Jobs address, head)."""
    if ray.is_initialized():
        return False, _dashboard_of_current(), None
    options: dict[str, Any] = {"namespace": cfg.ray.namespace, "log_to_driver": True}
    head = None
    if cfg.ray.address is None and jobs:
        head = LocalHead(num_cpus=cfg.ray.num_cpus, memory_usage_threshold=cfg.ray.memory_usage_threshold,
                         dashboard_port=cfg.ray.dashboard_port)
        if head.dashboard_port != cfg.ray.dashboard_port and cfg.ray.dashboard_port:
            log.warning("Ray Jobs port taken; the agent's Jobs API is on another", wanted=cfg.ray.dashboard_port,
                        jobs=head.dashboard, hint="adtr-edge status --registry REG prints it")
        options["address"] = head.address
    elif cfg.ray.address is None:
        os.environ.update(memory_monitor_env(cfg.ray.memory_usage_threshold))  # read by the raylet ray.init starts
        options["include_dashboard"] = cfg.ray.include_dashboard
        if cfg.ray.include_dashboard:
            options["dashboard_host"] = "127.0.0.1"
        if cfg.ray.num_cpus is not None:
            options["num_cpus"] = cfg.ray.num_cpus
    else:
        options["address"] = cfg.ray.address
    try:
        context = ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if head is not None:
            head.stop()
        raise AgentError(f"cannot connect to Ray at {cfg.ray.address or '(embedded)'}: {exc}") from exc
    route_library_loggers()  # Ray set up its own handlers on import: its lines join our JSON stream
    tighten_ray_token()
    dashboard = head.dashboard if head else getattr(context, "dashboard_url", None)
    if dashboard and not dashboard.startswith("http"):
        dashboard = f"http://{dashboard}"
    return cfg.ray.address is None, dashboard or None, head


def _dashboard_of_current() -> str | None:
    """The Jobs address of the cluster this process is already connected to (tests, notebooks)."""
    try:
        url = ray._private.worker.get_dashboard_url()
    except Exception:  # noqa: BLE001 - no dashboard: no Jobs
        return None
    return f"http://{url}" if url and not url.startswith("http") else (url or None)


class Point:
    """One inspection point as the agent runs it: its model path, registry (if any), score head, manager."""

    def __init__(self, name: str, model_path: str | Path, cameras: list[str]):
        self.name, self.cameras = name, list(cameras)
        self.model_path = str(Path(model_path).expanduser().resolve())
        model_dir, self.registry = resolve_model(self.model_path)  # a bad registry fails here, before Ray
        self.head = load_score_head(model_dir)  # a bad checkpoint fails here, clearly, before Ray starts
        if self.head.threshold is None:
            raise AgentError(f"{model_dir}: the model has no threshold; train or finetune it first")
        self.manager: Any = None  # its ModelManager's Ray handle while the agent runs (Any: see Agent)


class Agent:
    """One inspection pipeline: N ingest actors → one inference actor → one scoring actor, and for each
    inspection point served from a model registry its model manager (promotions, shadow, guard,
    reconcile, retrain schedule). `model_path` is the `default` point (every camera no other point
    lists); `cfg.points` adds the others."""

    def __init__(self, model_path: str | Path | None, ingest: list[str], results: str, cfg: AgentConfig):
        if not ingest:
            raise AgentError("at least one --ingest endpoint is needed")
        if model_path is None and not cfg.points:
            raise AgentError("no model: pass --model, or set points.<name>.model and points.<name>.cameras")
        try:  # before Ray starts: an endpoint open to any host, or a key binding without its key, clearly
            for endpoint in ingest:
                cfg.ingest.peer_allowlist(endpoint)
            key_bindings(cfg.ingest)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        self.ingest_endpoints, self.results_endpoint, self.cfg = ingest, results, cfg
        self.points: dict[str, Point] = {}
        if model_path is not None:
            self.points[DEFAULT_POINT] = Point(DEFAULT_POINT, model_path, [])
        self.state_dir = Path(cfg.state_dir).expanduser().resolve()
        added = self._added_points()  # points taught on the box (`adtr-edge points add`) outlive a restart
        for name, point in {**added, **{n: p.model_dump() for n, p in cfg.points.items()}}.items():
            self.points[name] = Point(name, point["model"], point["cameras"])
        registries = [p.registry.root for p in self.points.values() if p.registry is not None]
        if len(set(registries)) < len(registries):
            raise AgentError("two inspection points serve the same registry: each point needs its own "
                             "(adtr-edge models init REGISTRY --model MODEL)")
        sizes = {name: p.head.image_size for name, p in self.points.items()}
        if len(set(sizes.values())) > 1:
            raise AgentError(f"inspection points must share the input size to be batched together: {sizes}")
        first = next(iter(self.points.values()))
        self.model_path, self.registry, self.head = first.model_path, first.registry, first.head
        self.routes = camera_points({name: p.cameras for name, p in self.points.items()})
        self.owns_ray = False
        self.ray_head: LocalHead | None = None
        self.jobs_address: str | None = None
        # Ray actor handles once started. Any: Ray types a handle's method calls (`handle.method.remote()`)
        # only for methods decorated with @ray.method.
        self.inference: Any = None
        self.scoring: Any = None
        self.manager: Any = None
        self.ingests: list = []
        self.bound_ingest: list[str] = []
        self.bound_results = ""
        self.started_at = 0.0
        self.nodes: dict[str, str | None] = {}  # actor → the Ray node it runs on (placement on a cluster)
        self.stopped = False
        self.run_id = uuid.uuid4().hex
        self.announced: tuple[str | None, Path | None] | None = None

    @property
    def model_version(self) -> str:
        return self.head.model_version

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 180.0) -> Agent:
        learning_points = [p for p in self.points.values() if p.registry is not None]
        self.owns_ray, self.jobs_address, self.ray_head = connect_ray(self.cfg, jobs=bool(learning_points))
        namespace = ray.get_runtime_context().namespace
        restarts = self.cfg.actor_max_restarts
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = self.cfg.inference.device == "cuda" or (self.cfg.inference.device == "auto" and gpus >= 1)
        if self.cfg.inference.device == "cuda" and gpus < 1:
            raise AgentError("inference.device=cuda, but the Ray cluster has no GPU")
        state_dir = self.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        learning = self.cfg.learning
        cpus = self.cfg.inference.num_cpus
        if cpus is None:  # the node's cores but one: the ingest's decoding and the scoring share that one
            node = min(ray.cluster_resources().get("CPU", 1.0), float(os.cpu_count() or 1))
            cpus = max(1.0, float(int(node) - 1))
        paths = {name: p.model_path for name, p in self.points.items()}
        # Placement on a cluster: the socket-binding actors on the node facing the cameras, inference where told.
        # No task events for the per-frame actors: Ray's GCS keeps an event for every actor call (up to 100,000),
        # which grew it by ~7 MB a minute at 18 frames/s in the soak; their own stats say what happens.
        edge: dict[str, Any] = {"enable_task_events": False}
        near_model: dict[str, Any] = {"enable_task_events": False}
        if self.cfg.ray.edge_labels:
            edge["label_selector"] = dict(self.cfg.ray.edge_labels)
        if self.cfg.ray.inference_labels:
            near_model["label_selector"] = dict(self.cfg.ray.inference_labels)
        try:
            self.inference = ray.remote(InferenceActor).options(
                name="inference", namespace=namespace, max_restarts=restarts, max_task_retries=0,
                num_cpus=cpus, num_gpus=1 if use_gpu else 0, max_concurrency=1000, **near_model,
            ).remote(paths, self.cfg.inference, learning.shadow.sample, str(state_dir / "inference.json"),
                      self.run_id, max(1, int(cpus)))
            self.scoring = ray.remote(ScoringActor).options(
                name="scoring", namespace=namespace, max_restarts=restarts, max_task_retries=0, num_cpus=0, **edge,
            ).remote(paths, self.results_endpoint, self.cfg.output, learning, self.cfg.scoring.threads)
            self.ingests = [
                ray.remote(IngestActor).options(
                    name=f"ingest-{i}", namespace=namespace, max_restarts=restarts, max_task_retries=0,
                    num_cpus=0, max_concurrency=4, **edge,
                ).remote(endpoint, self.cfg.ingest, self.head.image_size, "inference", "scoring",
                          self.cfg.inference.max_batch or 1, str(state_dir / f"ingest-{i}.json"), self.run_id,
                          self.cfg.inference.jpeg_decode == "device", self.routes, self.default_point)
                for i, endpoint in enumerate(self.ingest_endpoints)
            ]
            for point in learning_points:
                registry = point.registry
                if registry is None:  # learning_points are the points with a registry
                    continue
                point.manager = ray.remote(ModelManager).options(
                    name=manager_name(point.name), namespace=namespace, max_restarts=restarts, max_task_retries=0,
                    num_cpus=0,
                ).remote(str(registry.root), learning, namespace, self.jobs_address, point=point.name)
            self.manager = next(iter(self.points.values())).manager
        except ValueError as exc:  # a name already taken in this namespace
            raise AgentError(f"cannot create the agent's actors in namespace {namespace!r}: {exc}") from exc
        try:
            ready = ray.get([self.scoring.stats.remote(), *[actor.ready.remote() for actor in self.ingests],
                             self.inference.ping.remote()], timeout=timeout_s)
            ray.get([p.manager.start.remote() for p in learning_points], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            self.stop(drain=False)
            placement = {k: v for k, v in (("ray.edge_labels", self.cfg.ray.edge_labels),
                                           ("ray.inference_labels", self.cfg.ray.inference_labels)) if v}
            hint = f" (no node may match {placement}: check the nodes' labels)" if placement else ""
            raise AgentError(f"the agent's actors were not ready within {timeout_s:.0f} s{hint}") from exc
        except ray.exceptions.RayError as exc:
            self.stop(drain=False)
            cause = str(exc).strip().splitlines()[-1][:300]
            raise AgentError(f"an actor failed to start: {cause}") from exc
        # What was really bound (a `tcp://host:*` endpoint gets a free port).
        self.bound_results, self.bound_ingest = ready[0]["results"], ready[1:-1]
        self.started_at = time.time()
        nodes = ray.get([self.inference.stats.remote(), *[a.stats.remote() for a in self.ingests]], timeout=timeout_s)
        self.nodes = {"inference": nodes[0].get("node_id"), "scoring": ready[0].get("node_id"),
                      **{f"ingest-{i}": s.get("node_id") for i, s in enumerate(nodes[1:])}}
        log.info("agent running", model=self.model_path, model_version=self.model_version, nodes=self.nodes,
                 points={name: {"model": p.model_path, "model_version": p.head.model_version, "cameras": p.cameras}
                         for name, p in self.points.items()},
                 registry=bool(self.registry), ingest=self.ingest_endpoints, results=self.results_endpoint,
                 gpu=use_gpu, namespace=namespace, jobs=self.jobs_address)
        return self

    @property
    def default_point(self) -> str | None:
        """The point of every camera no point lists: `default` when `--model` was given, else none."""
        return DEFAULT_POINT if DEFAULT_POINT in self.points else None

    def point_of(self, camera: str) -> str | None:
        """The inspection point a camera's frames go to (None: the camera is in none, and is refused)."""
        return self.routes.get(camera, self.default_point)

    # ------------------------------------------------------------------ points taught on the box
    def _added_points(self) -> dict[str, dict[str, Any]]:
        path = self.state_dir / POINTS_FILE
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as exc:
            raise AgentError(f"{path}: the points added on this box cannot be read: {exc}") from exc

    def add_point(self, name: str, cameras: list[str], by: str, frames: int | None = None,
                  timeout_s: float = 120.0) -> dict[str, Any]:
        """Teach a new inspection point from its cameras' first frames (actors/cold.py): a registry of its own
        under `points_dir`, starting from the first point's serving model; its frames recorded, then a
        retrain job builds its first model, which is shadowed for the operator to promote."""
        try:
            check_point_name(name)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        if name in self.points:
            raise AgentError(f"inspection point {name!r} exists already")
        if not cameras:
            raise AgentError("a new point needs at least one camera")
        taken = {c: self.routes[c] for c in cameras if c in self.routes}
        if taken:
            raise AgentError(f"cameras already in a point: {taken}")
        template = next(iter(self.points.values()))
        if template.registry is None or self.jobs_address is None:
            raise AgentError("teaching a new point needs the first point served from a registry, with Ray Jobs")
        frames = frames or self.cfg.learning.cold_start.frames
        if frames < MIN_RECORDED:
            raise AgentError(f"frames {frames}: at least {MIN_RECORDED} (70 % of them train, and a retrain needs 20)")
        root = Path(self.cfg.points_dir).expanduser().resolve() / name
        registry = Registry.create(root, template.registry.current_dir(), by)
        write_cold(root, {"state": "recording", "frames": frames, "cameras": cameras, "by": by,
                          "since": time.time(), "template": template.registry.current()})
        point = Point(name, root, cameras)
        namespace = ray.get_runtime_context().namespace
        ray.get(self.inference.add_point.remote(name, point.model_path), timeout=timeout_s)
        ray.get(self.scoring.add_point.remote(name, point.model_path), timeout=timeout_s)
        point.manager = ray.remote(ModelManager).options(
            name=manager_name(name), namespace=namespace, max_restarts=self.cfg.actor_max_restarts,
            max_task_retries=0, num_cpus=0,
        ).remote(str(registry.root), self.cfg.learning, namespace, self.jobs_address, point=name)
        ray.get(point.manager.start.remote(), timeout=timeout_s)
        self.points[name] = point
        added = self._added_points()
        added[name] = {"model": str(root), "cameras": cameras}
        write_json_atomic(self.state_dir / POINTS_FILE, added)
        for camera in cameras:  # last: frames of these cameras reach the new point only once it is served
            self.routes[camera] = name
            ray.get([ingest.add_route.remote(camera, name) for ingest in self.ingests], timeout=timeout_s)
        if self.announced is not None:
            self._announce(point, *self.announced)
        log.info("inspection point added: recording its first frames", point=name, cameras=cameras, frames=frames,
                 registry=str(root))
        return {"point": name, "registry": str(root), "cameras": cameras, "frames": frames,
                "template": template.registry.current()}

    def remove_point(self, name: str, by: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Stop serving a point taught on the box (`adtr-edge points remove`). Its cameras go to the default
        point from their next frame on (or are refused as unknown when there is none); the frames it had in
        flight are decided first; its retrain job, if any, is stopped; its registry stays on disk, untouched,
        for the record (delete it by hand, or teach the point again under another name).
        Points from the settings are removed there, with a restart."""
        if name not in self.points:
            raise AgentError(f"no inspection point {name!r} (points: {', '.join(self.points)})")
        added = self._added_points()
        if name not in added:
            raise AgentError(f"inspection point {name!r} comes from the settings (points.{name} or --model): "
                             "remove it there and restart the agent; only points added on the box are removed live")
        if name == next(iter(self.points)):  # (added, with no --model) refused before any route moves
            raise AgentError(f"inspection point {name!r} is the first one: the batch size is tuned on it and the "
                             "others share its backbone; it cannot be removed while the agent runs")
        point = self.points[name]
        moved = ray.get([ingest.remove_routes.remote(name, timeout_s) for ingest in self.ingests],
                        timeout=timeout_s + 30)
        late = sum(m["in_flight"] for m in moved)
        if late:
            raise AgentError(f"{late} frames of point {name!r} were still in flight after {timeout_s:.0f} s; its "
                             "cameras already go to the default point: try again")
        for camera in point.cameras:
            self.routes.pop(camera, None)
        ray.get(self.inference.remove_point.remote(name), timeout=timeout_s)
        final = ray.get(self.scoring.remove_point.remote(name), timeout=timeout_s)
        stopped: list[str] = []
        if point.registry is not None:
            if self.jobs_address is not None:
                stopped = stop_retrains(self.jobs_address, point.registry.root)
            (point.registry.root / AGENT_FILE).unlink(missing_ok=True)
        if point.manager is not None:
            ray.kill(point.manager, no_restart=True)
        del self.points[name]
        added.pop(name)
        write_json_atomic(self.state_dir / POINTS_FILE, added)
        after = self.default_point
        log.info("inspection point removed", point=name, by=by, cameras=point.cameras, now_to=after,
                 decided=final["decided"], stopped_jobs=stopped, registry_kept=str(point.model_path))
        return {"point": name, "cameras": point.cameras, "cameras_now_go_to": after, "decided": final["decided"],
                "stopped_jobs": stopped, "registry_kept": point.model_path}

    def announce(self, http_url: str | None, token_file: Path | None) -> None:
        """Tell the CLI (`adtr-edge accept`, `models promote`, `retrain --submit`) where this agent is."""
        self.announced = (http_url, token_file)
        for point in self.points.values():
            self._announce(point, http_url, token_file)

    def _announce(self, point: Point, http_url: str | None, token_file: Path | None) -> None:
        if point.registry is None:
            return
        info = {"pid": os.getpid(), "http": http_url, "jobs": self.jobs_address, "token_file": str(token_file)
                if token_file else None, "namespace": ray.get_runtime_context().namespace,
                "started_at": self.started_at, "point": point.name, "cameras": point.cameras,
                "ray_token_file": str(self.ray_head.token_path) if self.ray_head else
                os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token"),
                "anomalies": str(Path(self.cfg.output.dir).expanduser().resolve())}
        path = point.registry.root / AGENT_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(path)

    def stop(self, drain: bool = True) -> dict[str, Any]:
        """Drain frames in flight (up to drain_timeout_s), flush the results socket, release the actors."""
        if self.stopped:
            return {}
        self.stopped = True
        final: dict[str, Any] = {}
        if drain and self.ingests:
            refs = [actor.drain.remote(self.cfg.drain_timeout_s) for actor in self.ingests]
            try:
                final["ingest"] = ray.get(refs, timeout=self.cfg.drain_timeout_s + 30)
            except ray.exceptions.RayError as exc:
                log.error("drain failed", error=str(exc)[:300])
        if self.scoring is not None and drain:
            try:
                final["scoring"] = ray.get(self.scoring.stats.remote(), timeout=10)
                ray.get(self.scoring.close.remote(), timeout=10)
            except ray.exceptions.RayError:
                pass
        for actor in [*self.ingests, self.scoring, self.inference, *(p.manager for p in self.points.values())]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        for point in self.points.values():
            if point.registry is not None:
                (point.registry.root / AGENT_FILE).unlink(missing_ok=True)
        if self.owns_ray:
            ray.shutdown()
        if self.ray_head is not None:
            self.ray_head.stop()
        log.info("agent stopped", totals=totals(final.get("ingest", [])))
        return final

    # ------------------------------------------------------------------ observation
    def snapshot(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """Stats from every actor; an actor that does not answer in time is reported as down."""
        actors = {"inference": self.inference, "scoring": self.scoring,
                  **{f"ingest-{i}": a for i, a in enumerate(self.ingests)}}
        points = list(self.points.items())  # a point may be added or removed meanwhile (another thread)
        managers = {manager_name(name): p.manager for name, p in points if p.manager is not None}
        actors.update(managers)
        refs = {name: actor.stats.remote() if name not in managers else actor.status.remote()
                for name, actor in actors.items()}
        out: dict[str, Any] = {"up": {}, "model_version": self.model_version, "taken_at": time.time()}
        deadline = time.monotonic() + timeout_s
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=max(0.01, deadline - time.monotonic()))
                out["up"][name] = True
            except (ray.exceptions.RayError, TimeoutError):
                out["up"][name] = False
        return out


def totals(ingest_stats: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per camera across endpoints: received, processed, anomalies, dropped and invalid by reason."""
    out: dict[str, dict[str, Any]] = {}
    for endpoint in ingest_stats:
        for camera, s in endpoint["cameras"].items():
            t = out.setdefault(camera, {"received": 0, "processed": 0, "anomalies": 0, "in_flight": 0, "queued": 0,
                                        "dropped": {}, "invalid": {}})
            for key in ("received", "processed", "anomalies", "in_flight", "queued"):
                t[key] += s[key]
            for key in ("dropped", "invalid"):
                for reason, n in s[key].items():
                    t[key][reason] = t[key].get(reason, 0) + n
    return out
