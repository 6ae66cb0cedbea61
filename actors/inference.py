"""InferenceActor: dynamic batching of frames into one forward pass, and model versions swapped live.

An async actor: `infer_batch` calls queue up on the event loop, a batching task forms batches (up to
the batch size, waiting at most `max_wait_ms` after the first frame), and the forward pass
(`AnomalyDetector.embed` + `coarse_maps`, the model's one device-aware path) runs on a worker thread,
so `stats`/`ping` answer while a batch runs.

Self-tuning (actors/tuning.py): before it serves, the actor times its forward pass for a ladder of
batch sizes (and torch thread counts on a CPU) on frames of the model's size and serves with the most
frames/s whose batch stays within `latency_budget_ms`; `max_batch` / `torch_threads` pin either. Once the
agent is saturated, the table's contender batch sizes take turns on live batches (the check under load,
`LoadCheck`; batches may then exceed the table's choice, up to the largest contender), and the one with
the most frames/s under that load serves. After a model swap it tunes again, one timed pass between two
live batches, serving with the previous choice until the new table is complete, then checks it anew.

Versions: `prepare` loads a version in the background (reusing the loaded backbone when its weights
match), warms it up and checks its outputs are finite; `activate` makes a prepared version the
serving one (or the shadow) between two batches. Each batch takes the serving model and its version
together before it starts, so a swap never mislabels a decision. The shadow runs on a sample of live
batches, on the same backbone features when it shares the backbone; its maps go to the scoring actor
for comparison, never to a decision. A failed load leaves everything as it was. A restarted actor
loads the registry's `current` (or the plain model folder) again in `__init__`.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from adtr_edge.lifecycle.registry import resolve_model
from adtr_edge.model.detector import AnomalyDetector, load_detector

from .config import DEFAULT_POINT, InferenceConfig, point_paths
from .logs import configure_logging, node_id
from .stats import BATCH_BUCKETS, Histogram
from .tuning import LoadCheck, Tuner, contenders, ladder

log = structlog.get_logger(__name__)


@dataclass
class InferenceResult:
    """One frame's output, inference → scoring (the contract between the two actors)."""

    coarse: np.ndarray  # (S, S) float32 feature distances of the serving model
    model_version: str
    batch_size: int
    inference_ms: float
    shadow_version: str | None = None
    shadow_coarse: np.ndarray | None = None  # the shadow model's map of the same frame, when sampled
    refused: str | None = None  # a frame sent as JPEG bytes that the device's decoder refused (no map)
    point: str = DEFAULT_POINT  # the inspection point whose model made the map


@dataclass
class LoadedModel:
    detector: AnomalyDetector
    version: str
    loaded_s: float


@dataclass
class PointModels:
    """One inspection point's models: its registry (or model folder), serving, shadow and staged versions."""

    model_path: str
    serving: LoadedModel
    shadow: LoadedModel | None = None
    staged: dict[str, LoadedModel] = field(default_factory=dict)


class ModelLoadError(RuntimeError):
    """A version that could not be loaded, or that gave non-finite outputs: it is never served."""


PROBE_EVERY = 4  # while a re-tune runs under load: one timed pass after this many live batches


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class InferenceActor:
    def __init__(self, model_path: str | dict[str, str], cfg: InferenceConfig, shadow_sample: float = 0.25,
                 state_file: str | None = None, run_id: str = "", cpu_budget: int | None = None):
        configure_logging("info", json_output=True)  # worker stderr reaches the driver
        self.cfg, self.shadow_sample = cfg, shadow_sample
        self.state_file, self.run_id = (Path(state_file) if state_file else None), run_id
        self.started_at = time.time()
        self.cpu_budget = cpu_budget or cpu_cores()  # the CPUs it reserved: the ceiling of its torch threads
        self.threads = cfg.torch_threads or self.cpu_budget  # until tuned
        torch.set_num_threads(self.threads)
        # Inspection points: each its own model (registry), all on the first one's backbone when the weights
        # match, so a batch of frames from several points is embedded once.
        self.points: dict[str, PointModels] = {}
        for point, path in point_paths(model_path).items():
            backbone = self.serving.detector.backbone if self.points else None
            self.points[point] = PointModels(path, self._load_current(path, backbone))
        sizes = {point: m.serving.detector.image_size for point, m in self.points.items()}
        if len(set(sizes.values())) > 1:  # one batch, one input size: the ingest resizes every frame once
            raise ModelLoadError(f"inspection points must share the input size to be batched together: {sizes}")
        self.device = self.serving.detector.device
        self.queue: list[tuple[np.ndarray | bytes, str, asyncio.Future[InferenceResult]]] = []  # frame, point
        self.arrived: asyncio.Event | None = None
        self.batcher: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.forward_seconds = Histogram()
        self.frames = self.shadow_frames = self.refused = 0
        self.swaps = self.load_failures = 0
        self.busy = False
        self.log = log.bind(model_version=self.serving.version, device=str(self.device))
        self.max_batch = cfg.max_batch or 1  # until tuned
        self.tuner: Tuner | None = None
        self.load_check: LoadCheck | None = None  # the table's contenders, timed again once under load
        self.tuned: dict[str, Any] = {"state": "pinned", "runs": 0, "table": []}
        if not self._reuse_tuning():
            self._tuner_for(self.serving)
            while self._probe_next():  # before serving: nothing waits for these passes
                pass
        self.ready_at = time.time()
        self.log.info("inference ready", load_s=round(self.serving.loaded_s, 2), max_batch=self.max_batch,
                      torch_threads=self.threads, tune_s=round(self.ready_at - self.started_at
                                                               - self.serving.loaded_s, 2))

    # ------------------------------------------------------------------ models
    def _load(self, model_dir: str, backbone) -> LoadedModel:
        """Load, move to the device, warm up, and refuse a model whose outputs are not finite."""
        started = time.monotonic()
        try:
            detector = load_detector(model_dir, backbone=backbone).to(
                self.cfg.device, self.cfg.half, self.cfg.channels_last, self.cfg.cpu_graph)
            size = detector.image_size
            probe = [np.full((size, size, 3), 127, np.uint8), np.zeros((size, size, 3), np.uint8)]
            maps = detector.coarse_maps(detector.embed(probe))
        except Exception as exc:  # any load failure: the version is refused, serving goes on
            raise ModelLoadError(f"{model_dir}: {type(exc).__name__}: {exc}") from exc
        if not torch.isfinite(maps).all():
            raise ModelLoadError(f"{model_dir}: the model's outputs on a warm-up batch are not finite")
        return LoadedModel(detector, detector.model_version, time.monotonic() - started)

    def _load_current(self, model_path: str, backbone=None) -> LoadedModel:
        """The registry's current version; if it will not load (a damaged file), its previous one, so a
        restarted actor never crash-loops on a bad pointer (the model manager then fixes the pointer)."""
        model_dir, registry = resolve_model(model_path)
        try:
            return self._load(str(model_dir), backbone=backbone)
        except ModelLoadError as exc:
            previous = registry.pointers()["previous"] if registry is not None else None
            if not previous:
                raise
            log.error("current version does not load; serving the previous one", error=str(exc)[:300],
                      previous=previous)
            return self._load(str(resolve_model(model_path, previous)[0]), backbone=backbone)

    async def add_point(self, point: str, model_path: str) -> dict[str, Any]:
        """Serve a new inspection point (on the shared backbone) from the next batch on."""
        if point in self.points:
            raise ValueError(f"inspection point {point!r} is already served")
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(self.loader, self._load_current, model_path, self.serving.detector.backbone)
        if model.detector.image_size != self.serving.detector.image_size:
            raise ModelLoadError(f"{model_path}: input size {model.detector.image_size} != the agent's "
                                 f"{self.serving.detector.image_size}; points are batched together")
        self.points[point] = PointModels(model_path, model)
        self.log.info("inspection point added", point=point, version=model.version)
        return {"point": point, "version": model.version,
                "shares_backbone": model.detector.backbone is self.serving.detector.backbone}

    async def remove_point(self, point: str) -> dict[str, Any]:
        """Stop serving `point` (`adtr-edge points remove`). Its frames must have stopped arriving: the ingest
        routes its cameras elsewhere and waits for what it had sent first; a frame of it still queued here is
        an error, not a silent loss."""
        models = self._point(point)
        if models is next(iter(self.points.values())):
            raise ValueError(f"inspection point {point!r} is the first one: the batch size is tuned on it and the "
                             "others share its backbone; it cannot be removed while the agent runs")
        queued = sum(p == point for _, p, _ in self.queue)
        if queued:
            raise RuntimeError(f"{queued} frames of inspection point {point!r} are still queued")
        del self.points[point]
        self.log.info("inspection point removed", point=point, version=models.serving.version)
        return {"point": point, "version": models.serving.version}

    @property
    def serving(self) -> LoadedModel:
        """The first point's serving model: the one the batch size is tuned on (all share the backbone)."""
        return next(iter(self.points.values())).serving

    def _point(self, point: str) -> PointModels:
        if point not in self.points:
            raise ValueError(f"no inspection point {point!r} here (points: {', '.join(self.points)})")
        return self.points[point]

    async def prepare(self, version: str, point: str = DEFAULT_POINT) -> dict[str, Any]:
        """Load `version` of `point` in the background and keep it ready to activate; batches go on meanwhile."""
        models = self._point(point)
        if version == models.serving.version:
            return {"version": version, "prepared": True, "already_serving": True}
        if version not in models.staged:
            loop = asyncio.get_running_loop()
            try:
                model_dir = str(resolve_model(models.model_path, version)[0])
                models.staged[version] = await loop.run_in_executor(
                    self.loader, self._load, model_dir, self.serving.detector.backbone)
            except Exception as exc:  # noqa: BLE001 - any version that cannot load is refused; serving goes on
                self.load_failures += 1
                self.log.error("model version refused", version=version, point=point, error=str(exc)[:300])
                raise ModelLoadError(str(exc)[:500]) from None
        staged = models.staged[version]
        shares = staged.detector.backbone is self.serving.detector.backbone
        self.log.info("model version prepared", version=version, point=point, load_s=round(staged.loaded_s, 2),
                      shares_backbone=shares)
        return {"version": version, "prepared": True, "load_s": staged.loaded_s, "shares_backbone": shares}

    async def activate(self, version: str, role: str = "serving", point: str = DEFAULT_POINT) -> dict[str, Any]:
        """Make a version `point`'s serving one (or its shadow), from the next batch on. Prepares it if needed."""
        if role not in ("serving", "shadow"):
            raise ValueError(f"role must be serving or shadow, not {role!r}")
        models = self._point(point)
        if version == models.serving.version:
            if role == "shadow":
                raise ValueError(f"{version} is the serving version; it cannot shadow itself")
            return {"version": version, "role": role, "changed": False}
        await self.prepare(version, point)
        model = models.staged.pop(version, None) or models.serving
        if role == "serving":
            first = models is next(iter(self.points.values()))
            previous, models.serving = models.serving, model  # the batch loop reads it once per batch
            if models.shadow is not None and models.shadow.version == version:
                models.shadow = None
            self.swaps += 1
            self.log.info("serving model switched", point=point, version=version, previous=previous.version)
            if first:
                self.log = log.bind(model_version=version, device=str(self.device))
                if self._tuner_for(model):  # timed between live batches by the batch loop
                    self._start_batcher()
            return {"version": version, "role": role, "changed": True, "previous": previous.version}
        models.shadow = model
        self.log.info("shadow model set", point=point, shadow_version=version)
        return {"version": version, "role": role, "changed": True}

    async def clear_shadow(self, point: str = DEFAULT_POINT) -> str | None:
        models = self._point(point)
        version, models.shadow = (models.shadow.version if models.shadow else None), None
        return version

    # ------------------------------------------------------------------ tuning
    def _tuner_for(self, model: LoadedModel) -> bool:
        """A new table for `model`, unless both values are pinned. Returns whether one was started."""
        pinned_batch, pinned_threads = self.cfg.max_batch, self.cfg.torch_threads
        self.load_check = None  # a new model: its own table first, then its own check under load
        self.tuned.pop("load_check", None)
        if pinned_batch and pinned_threads:
            self.max_batch, self.threads = pinned_batch, pinned_threads
            self.tuner = None
            return False
        on_cpu = self.device.type == "cpu"
        threads = [pinned_threads] if pinned_threads else (ladder(self.cpu_budget) if on_cpu else [self.threads])
        batches = [pinned_batch] if pinned_batch else self.cfg.tune_batches
        self.tuner = Tuner(threads, batches, self.cfg.latency_budget_ms, self.cfg.tune_seconds)
        self.tuning_model = model
        size = model.detector.image_size
        rng = np.random.default_rng(0)  # the pass costs the same on any pixels; these are never decided
        self.probe_frames = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(max(batches))]
        self.tuned = {**self.tuned, "state": "tuning", "model_version": model.version, "started_at": time.time()}
        return True

    def _reuse_tuning(self) -> bool:
        """A restarted actor (same agent run, same model version and settings) serves with its previous
        incarnation's choice at once: a crash costs no re-tune."""
        if self.state_file is None or not self.state_file.is_file():
            return False
        try:
            saved = json.loads(self.state_file.read_text())
            if saved.get("run_id") != self.run_id or saved.get("key") != self._tuning_key(self.serving):
                return False
            max_batch, threads, tuned = saved["max_batch"], saved["threads"], dict(saved["tuned"])
            if not all(type(v) is int and v >= 1 for v in (max_batch, threads, tuned["runs"] + 1)):
                raise ValueError(f"max_batch {max_batch!r}, threads {threads!r} and runs {tuned['runs']!r} "
                                 "must be whole numbers")
            budget_ms = float(tuned["budget_ms"])
            if not (math.isfinite(budget_ms) and budget_ms > 0):
                raise ValueError(f"budget_ms {budget_ms!r} must be a positive number")
            pending = tuned.get("load_check") or {}
            restart = bool(pending) and pending.get("state") in ("waiting", "checking") and not self.cfg.max_batch
            check = LoadCheck(pending["batches"], budget_ms) if restart else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # A torn or hand-edited file costs a re-tune, never the actor: it starts as if there were none.
            self.log.warning("the saved tuning is unreadable; tuning again", path=str(self.state_file), error=str(exc))
            return False
        self.max_batch, self.threads = max_batch, threads
        self.tuned = dict(tuned, state="reused")
        if check is not None:  # a restart mid-check: the check starts anew
            self._start_load_check(check)
        self.log.info("tuning reused from before the restart", max_batch=self.max_batch, torch_threads=self.threads)
        return True

    def _tuning_key(self, model: LoadedModel) -> dict:
        return {"model_version": model.version, "device": str(self.device), "cores": self.cpu_budget,
                "settings": self.cfg.model_dump(mode="json")}

    def _save_tuning(self) -> None:
        if self.state_file is None:
            return
        state = {"run_id": self.run_id, "key": self._tuning_key(self.serving), "max_batch": self.max_batch,
                 "threads": self.threads, "tuned": self.tuned}
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps(state))
            tmp.replace(self.state_file)
        except OSError as exc:
            self.log.warning("cannot save the tuning", path=str(self.state_file), error=str(exc))

    def _timed_forward(self, model: LoadedModel, threads: int, frames: list) -> float:
        """On the forward thread: torch's thread count is per thread, so it is set where the pass runs;
        after a change, one untimed pass first (the tuner's rotation alternates thread counts, and the
        first pass on a new count pays for its thread pool)."""
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
            self._forward(model, None, frames)
        started = time.perf_counter()
        self._forward(model, None, frames)
        return time.perf_counter() - started

    def _probe_next(self) -> bool:
        """Time one pass of the current table on the forward thread. False when there is nothing to time."""
        tuner = self.tuner
        if tuner is None:
            return False
        probe = tuner.next_probe()
        if probe is None:
            self._finish_tuning(tuner)
            return False
        threads, batch = probe
        try:
            seconds = self.executor.submit(self._timed_forward, self.tuning_model, threads,
                                           self.probe_frames[:batch]).result()
            tuner.record(threads, batch, seconds)
        except Exception as exc:  # noqa: BLE001 - e.g. out of GPU memory: this point and bigger are out
            tuner.record(threads, batch, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return True

    async def _probe_async(self) -> None:
        """One timed pass from the batch loop, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        self.busy = True
        try:
            await loop.run_in_executor(None, self._probe_next)
        finally:
            self.busy = False

    def _finish_tuning(self, tuner: Tuner) -> None:
        table, best = tuner.table(), tuner.best()
        self.tuner = None
        if self.tuning_model is not self.serving:  # swapped again meanwhile: that model's own table follows
            return
        self.max_batch, self.threads = best["batch"], best["threads"]
        near = [] if self.cfg.max_batch else contenders(table, tuner.budget_ms)
        check = LoadCheck(near, tuner.budget_ms) if near else None
        self.tuned = {"state": "tuned", "model_version": self.tuning_model.version, "runs": self.tuned["runs"] + 1,
                      "budget_ms": tuner.budget_ms, "table": table, "batch": best["batch"],
                      "threads": best["threads"], "ms": best["ms"], "frames_per_second": best["frames_per_second"],
                      "within_budget": best["within_budget"],
                      "seconds": round(time.time() - self.tuned["started_at"], 2),
                      **({"load_check": check.entry(time.monotonic())} if check else {})}
        self.log.info("tuned", max_batch=self.max_batch, torch_threads=self.threads, batch_ms=best["ms"],
                      frames_per_second=best["frames_per_second"], budget_ms=tuner.budget_ms,
                      seconds=self.tuned["seconds"], table=[
                          f"{r['threads']}t b{r['batch']}: {r['frames_per_second']} f/s {r['ms']} ms"
                          + ("" if r["within_budget"] else " (over budget)" if r["failed"] is None else " (failed)")
                          for r in table])
        self.load_check = check
        self._save_tuning()
        if not best["within_budget"]:
            self.log.warning("no batch size fits the latency budget on this device; serving the fastest batch",
                             budget_ms=tuner.budget_ms, batch_ms=best["ms"])

    def _start_load_check(self, check: LoadCheck) -> None:
        self.load_check = check
        self.tuned["load_check"] = check.entry(time.monotonic())

    def _check_under_load(self, check: LoadCheck, batch: int, frames: int, seconds: float | None) -> None:
        """One live batch for the check under load (seconds None: not a countable one); once the check is
        complete, its choice serves; once it has expired, the table's stays."""
        if check is not self.load_check:  # a swap replaced it meanwhile
            return
        if seconds is not None:
            check.record(batch, frames, seconds)
        entry = self.tuned["load_check"] = check.entry(time.monotonic())
        if entry["state"] in ("checking", "waiting"):
            return
        self.load_check = None
        chosen = check.best()
        before = self.max_batch
        if chosen is not None:
            self.max_batch = chosen
            live = next(r for r in entry["table"] if r["batch"] == chosen)  # what it serves with is live-timed
            self.tuned.update(batch=chosen, ms=live["ms"], frames_per_second=live["frames_per_second"])
        entry["batch"] = chosen
        rows = [f"b{r['batch']}: {r['frames_per_second']} f/s {r['ms']} ms ({r['passes']} batches)"
                for r in entry["table"]]
        self.log.info("tuned under load" if chosen else f"check under load {entry['state']}; the table's choice stays",
                      max_batch=self.max_batch, table_choice=before, table=rows)
        self._save_tuning()

    @property
    def serving_batch(self) -> int:
        """The batch size served now: the check's contender while one runs, else the chosen one."""
        return self.load_check.current() if self.load_check is not None else self.max_batch

    async def batching(self) -> dict[str, Any]:
        """The batch size and torch threads in use (the ingest sizes its chunks by the batch)."""
        return {"max_batch": self.serving_batch, "threads": self.threads, "state": self.tuned["state"]}

    # ------------------------------------------------------------------ frames
    async def infer_batch(self, frames: list[np.ndarray | bytes], point: str = DEFAULT_POINT) -> list[InferenceResult]:
        """Frames of one inspection point in (RGB uint8 at the model's size, or a JPEG's bytes with
        jpeg_decode=device), one result each out, once their batches ran. Calls from all cameras and
        points share the batches: a call is a unit of transport, not a batch."""
        self._point(point)
        loop = asyncio.get_running_loop()
        arrived = self._start_batcher()
        futures: list[asyncio.Future[InferenceResult]] = [loop.create_future() for _ in frames]
        self.queue.extend((frame, point, future) for frame, future in zip(frames, futures))
        arrived.set()
        return list(await asyncio.gather(*futures))

    def _start_batcher(self) -> asyncio.Event:
        """Starts the batch loop unless it runs (done: its event loop ended, asyncio.run in tests); returns
        the event that wakes it."""
        if self.batcher is None or self.batcher.done() or self.arrived is None:
            self.arrived = asyncio.Event()
            self.batcher = asyncio.get_running_loop().create_task(self._batch_loop(self.arrived))
        return self.arrived

    def _decoded(self, frames: list, size: int) -> tuple[list[np.ndarray] | torch.Tensor, dict[int, str]]:
        """Frames as pixels, and {index: reason} of those refused: JPEG bytes (jpeg_decode=device) are decoded
        in one batch on the device; pixels pass as they are."""
        if all(isinstance(f, np.ndarray) for f in frames):
            return frames, {}
        from .device_decode import decode_batch

        return decode_batch(frames, size, self.device)

    def _forward(self, serving: LoadedModel, shadow: LoadedModel | None, frames: list):
        """Maps of the serving model (and the shadow's), and {index: reason} of frames not decodable."""
        pixels, refused = self._decoded(frames, serving.detector.image_size)
        if not len(pixels):
            return np.zeros((0, 0, 0), np.float32), None, refused
        features = serving.detector.embed(pixels)
        maps = serving.detector.coarse_maps(features).numpy()
        if shadow is None:
            return maps, None, refused
        same_backbone = shadow.detector.backbone is serving.detector.backbone
        shadow_features = features if same_backbone else shadow.detector.embed(pixels)
        return maps, shadow.detector.coarse_maps(shadow_features).numpy(), refused

    def _run_batch(self, plan: dict[str, tuple[LoadedModel, LoadedModel | None]], points: list[str], frames: list):
        """Each frame's serving map (and its point's shadow map where sampled), and the frames refused. The
        backbone runs once over the whole batch when the points share it; each point's reconstructor and
        scorer run on that point's rows."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        if len(plan) == 1:
            serving, shadow = next(iter(plan.values()))
            maps, shadow_maps, refused = self._forward(serving, shadow, frames)
            return list(maps), (list(shadow_maps) if shadow_maps is not None else [None] * len(maps)), refused
        pixels, refused = self._decoded(frames, self.serving.detector.image_size)
        points = [p for i, p in enumerate(points) if i not in refused]
        maps = [None] * len(points)
        shadow_maps = [None] * len(points)
        if not len(points):
            return maps, shadow_maps, refused
        shared = self.serving.detector
        features = shared.embed(pixels)
        for point, (serving, shadow) in plan.items():
            rows = [i for i, p in enumerate(points) if p == point]
            if not rows:
                continue
            for model, out in ((serving, maps), (shadow, shadow_maps)):
                if model is None:
                    continue
                own = features[rows] if model.detector.backbone is shared.backbone else model.detector.embed(
                    pixels[rows] if isinstance(pixels, torch.Tensor) else [pixels[i] for i in rows])
                for i, m in zip(rows, model.detector.coarse_maps(own).numpy()):
                    out[i] = m
        return maps, shadow_maps, refused

    async def _batch_loop(self, arrived: asyncio.Event) -> None:
        """Forever: a batch of queued frames through the models, each frame's future answered. `arrived`
        is set when frames are queued."""
        loop = asyncio.get_running_loop()
        since_probe = 0
        while True:
            if self.tuner is not None and (not self.queue or since_probe >= PROBE_EVERY):
                await self._probe_async()  # a re-tune after a swap: one timed pass between live batches
                since_probe = 0
                continue
            if not self.queue:
                arrived.clear()
                await arrived.wait()
            check = self.load_check  # while it runs, its contenders take turns
            size = self.serving_batch
            deadline = loop.time() + self.cfg.max_wait_ms / 1000.0
            while len(self.queue) < size and loop.time() < deadline:
                await asyncio.sleep(min(0.001, max(0.0, deadline - loop.time())))
            batch, self.queue = self.queue[:size], self.queue[size:]
            if not batch:
                continue
            waiting = len(self.queue)  # frames left behind: how saturated the pipeline is
            since_probe += 1
            # Each point's model and version, taken together before the pass: a swap during it changes nothing.
            points = [point for _, point, _ in batch]
            plan = {}
            for point in dict.fromkeys(points):
                models = self.points[point]
                sampled = models.shadow is not None and random.random() < self.shadow_sample
                plan[point] = (models.serving, models.shadow if sampled else None)
            frames = [frame for frame, _, _ in batch]
            self.busy = True
            started = time.perf_counter()
            try:
                maps, shadow_maps, refused = await loop.run_in_executor(
                    self.executor, self._run_batch, plan, points, frames)
            except Exception as exc:  # noqa: BLE001 - fail this batch's frames, keep serving
                self.log.error("batch failed", size=len(batch), error=f"{type(exc).__name__}: {exc}")
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self.busy = False
            seconds = time.perf_counter() - started
            self.batch_sizes.observe(len(batch))
            self.forward_seconds.observe(seconds)
            self.frames += len(batch) - len(refused)
            self.refused += len(refused)
            shadowed = sum(m is not None for m in shadow_maps)
            self.shadow_frames += shadowed
            if check is not None:  # counted only saturated, and for the serving model alone
                countable = check.saturated(waiting) and not shadowed and not refused
                self._check_under_load(check, size, len(batch), seconds if countable else None)
            row = 0  # maps hold the frames that decoded, in order
            for i, (_, point, future) in enumerate(batch):
                serving, shadow = plan[point]
                if i in refused:
                    result = InferenceResult(np.zeros((0, 0), np.float32), serving.version, len(batch),
                                             seconds * 1000.0, refused=refused[i], point=point)
                else:
                    shadow_map = shadow_maps[row]
                    result = InferenceResult(
                        maps[row], serving.version, len(batch), seconds * 1000.0,
                        shadow.version if shadow is not None and shadow_map is not None else None, shadow_map,
                        point=point)
                    row += 1
                if not future.done():  # else the caller went away (e.g. cancelled)
                    future.set_result(result)

    # ------------------------------------------------------------------ observation
    async def stats(self) -> dict[str, Any]:
        first = next(iter(self.points.values()))
        return {"model_version": self.serving.version, "shadow_version": first.shadow.version if first.shadow else None,
                "staged": sorted(first.staged), "device": str(self.device), "pid": os.getpid(), "node_id": node_id(),
                "points": {name: {"model_version": m.serving.version,
                                  "shadow_version": m.shadow.version if m.shadow else None, "staged": sorted(m.staged),
                                  "shares_backbone": m.serving.detector.backbone is self.serving.detector.backbone}
                           for name, m in self.points.items()},
                "started_at": self.started_at, "ready_at": self.ready_at, "swaps": self.swaps,
                "load_failures": self.load_failures, "frames": self.frames, "shadow_frames": self.shadow_frames,
                "queued": len(self.queue), "busy": self.busy, "refused": self.refused,
                "max_batch": self.serving_batch, "torch_threads": self.threads,
                "backbone_graph": self.serving.detector.backbone.graph_state,
                "tuning": {k: v for k, v in self.tuned.items() if k != "started_at"},
                "batch_size": self.batch_sizes.cumulative(), "batch_size_sum": self.batch_sizes.total,
                "batch_count": self.batch_sizes.n, "forward": self.forward_seconds.cumulative(),
                "forward_sum": self.forward_seconds.total, "forward_count": self.forward_seconds.n}

    async def ping(self, point: str | None = None) -> str:
        return self._point(point).serving.version if point else self.serving.version
