"""InferenceActor: dynamic batching of frames into one forward pass, and model versions swapped live.

An async actor: `infer_batch` calls queue up on the event loop, a batching task forms batches (up to
`max_batch`, waiting at most `max_wait_ms` after the first frame), and the forward pass
(`AnomalyDetector.embed` + `coarse_maps`, the model's one device-aware path) runs on a worker thread,
so `stats`/`ping` answer while a batch runs.

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
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

from model.detector import AnomalyDetector, load_detector
from model.registry import resolve_model

from .config import InferenceConfig
from .logs import configure_logging
from .stats import BATCH_BUCKETS, Histogram

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


@dataclass
class LoadedModel:
    detector: AnomalyDetector
    version: str
    loaded_s: float


class ModelLoadError(RuntimeError):
    """A version that could not be loaded, or that gave non-finite outputs: it is never served."""


class InferenceActor:
    def __init__(self, model_path: str, cfg: InferenceConfig, shadow_sample: float = 0.25):
        configure_logging("info", json_output=True)  # worker stderr reaches the driver
        self.model_path, self.cfg, self.shadow_sample = model_path, cfg, shadow_sample
        self.started_at = time.time()
        torch.set_num_threads(cfg.torch_threads or os.cpu_count() or 1)
        self.serving = self._load_current()
        self.device = self.serving.detector.device
        self.shadow: LoadedModel | None = None
        self.staged: dict[str, LoadedModel] = {}
        self.queue: list[tuple[np.ndarray, asyncio.Future]] = []
        self.arrived: asyncio.Event | None = None
        self.batcher: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.forward_seconds = Histogram()
        self.frames = self.shadow_frames = 0
        self.swaps = self.load_failures = 0
        self.busy = False
        self.log = log.bind(model_version=self.serving.version, device=str(self.device))
        self.ready_at = time.time()
        self.log.info("inference ready", load_s=round(self.serving.loaded_s, 2))

    # ------------------------------------------------------------------ models
    def _load(self, model_dir: str, backbone) -> LoadedModel:
        """Load, move to the device, warm up, and refuse a model whose outputs are not finite."""
        started = time.monotonic()
        try:
            detector = load_detector(model_dir, backbone=backbone).to(
                self.cfg.device, self.cfg.half, self.cfg.channels_last)
            size = detector.image_size
            probe = [np.full((size, size, 3), 127, np.uint8), np.zeros((size, size, 3), np.uint8)]
            maps = detector.coarse_maps(detector.embed(probe))
        except Exception as exc:  # noqa: BLE001 - any load failure: the version is refused, serving goes on
            raise ModelLoadError(f"{model_dir}: {type(exc).__name__}: {exc}") from exc
        if not torch.isfinite(maps).all():
            raise ModelLoadError(f"{model_dir}: the model's outputs on a warm-up batch are not finite")
        return LoadedModel(detector, detector.model_version, time.monotonic() - started)

    def _load_current(self) -> LoadedModel:
        """The registry's current version; if it will not load (a damaged file), its previous one, so a
        restarted actor never crash-loops on a bad pointer (the model manager then fixes the pointer)."""
        model_dir, registry = resolve_model(self.model_path)
        try:
            return self._load(str(model_dir), backbone=None)
        except ModelLoadError as exc:
            previous = registry.pointers()["previous"] if registry is not None else None
            if not previous:
                raise
            log.error("current version does not load; serving the previous one", error=str(exc)[:300],
                      previous=previous)
            return self._load(self._version_dir(previous), backbone=None)

    def _version_dir(self, version: str) -> str:
        return str(resolve_model(self.model_path, version)[0])

    async def prepare(self, version: str) -> dict[str, Any]:
        """Load `version` in the background and keep it ready to activate; batches go on meanwhile."""
        if version == self.serving.version:
            return {"version": version, "prepared": True, "already_serving": True}
        if version not in self.staged:
            loop = asyncio.get_running_loop()
            try:
                model_dir = self._version_dir(version)
                self.staged[version] = await loop.run_in_executor(
                    self.loader, self._load, model_dir, self.serving.detector.backbone)
            except Exception as exc:  # noqa: BLE001
                self.load_failures += 1
                self.log.error("model version refused", version=version, error=str(exc)[:300])
                raise ModelLoadError(str(exc)[:500]) from None
        staged = self.staged[version]
        shares = staged.detector.backbone is self.serving.detector.backbone
        self.log.info("model version prepared", version=version, load_s=round(staged.loaded_s, 2),
                      shares_backbone=shares)
        return {"version": version, "prepared": True, "load_s": staged.loaded_s, "shares_backbone": shares}

    async def activate(self, version: str, role: str = "serving") -> dict[str, Any]:
        """Make a version the serving one (or the shadow), from the next batch on. Prepares it if needed."""
        if role not in ("serving", "shadow"):
            raise ValueError(f"role must be serving or shadow, not {role!r}")
        if version == self.serving.version:
            if role == "shadow":
                raise ValueError(f"{version} is the serving version; it cannot shadow itself")
            return {"version": version, "role": role, "changed": False}
        await self.prepare(version)
        model = self.staged.pop(version, None) or self.serving
        if role == "serving":
            previous, self.serving = self.serving, model  # the batch loop reads it once per batch
            if self.shadow is not None and self.shadow.version == version:
                self.shadow = None
            self.swaps += 1
            self.log = log.bind(model_version=version, device=str(self.device))
            self.log.info("serving model switched", previous=previous.version)
            return {"version": version, "role": role, "changed": True, "previous": previous.version}
        self.shadow = model
        self.log.info("shadow model set", shadow_version=version)
        return {"version": version, "role": role, "changed": True}

    async def clear_shadow(self) -> str | None:
        version, self.shadow = (self.shadow.version if self.shadow else None), None
        return version

    # ------------------------------------------------------------------ frames
    async def infer_batch(self, frames: list[np.ndarray]) -> list[InferenceResult]:
        """Frames in (RGB uint8 at the model's size), one result each out, once their batches ran.
        Calls from all cameras share the batches: a call is a unit of transport, not a batch."""
        loop = asyncio.get_running_loop()
        if self.batcher is None:
            self.arrived = asyncio.Event()
            self.batcher = loop.create_task(self._batch_loop())
        futures = [loop.create_future() for _ in frames]
        self.queue.extend(zip(frames, futures))
        self.arrived.set()
        return list(await asyncio.gather(*futures))

    @staticmethod
    def _forward(serving: LoadedModel, shadow: LoadedModel | None, frames: list[np.ndarray]):
        features = serving.detector.embed(frames)
        maps = serving.detector.coarse_maps(features).numpy()
        if shadow is None:
            return maps, None
        same_backbone = shadow.detector.backbone is serving.detector.backbone
        shadow_features = features if same_backbone else shadow.detector.embed(frames)
        return maps, shadow.detector.coarse_maps(shadow_features).numpy()

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            deadline = loop.time() + self.cfg.max_wait_ms / 1000.0
            while len(self.queue) < self.cfg.max_batch and loop.time() < deadline:
                await asyncio.sleep(min(0.001, max(0.0, deadline - loop.time())))
            batch, self.queue = self.queue[: self.cfg.max_batch], self.queue[self.cfg.max_batch :]
            if not self.queue:
                self.arrived.clear()
            if not batch:
                continue
            # The model and its version, taken together before the pass: a swap during it changes nothing.
            serving = self.serving
            shadow = self.shadow if self.shadow is not None and random.random() < self.shadow_sample else None
            frames = [frame for frame, _ in batch]
            self.busy = True
            started = time.perf_counter()
            try:
                maps, shadow_maps = await loop.run_in_executor(self.executor, self._forward, serving, shadow, frames)
            except Exception as exc:  # noqa: BLE001 - fail this batch's frames, keep serving
                self.log.error("batch failed", size=len(batch), error=f"{type(exc).__name__}: {exc}")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self.busy = False
            seconds = time.perf_counter() - started
            self.batch_sizes.observe(len(batch))
            self.forward_seconds.observe(seconds)
            self.frames += len(batch)
            self.shadow_frames += len(batch) if shadow_maps is not None else 0
            for i, (_, future) in enumerate(batch):
                if future.done():  # the caller went away (e.g. cancelled)
                    continue
                future.set_result(InferenceResult(
                    maps[i], serving.version, len(batch), seconds * 1000.0,
                    shadow.version if shadow_maps is not None else None,
                    shadow_maps[i] if shadow_maps is not None else None))

    # ------------------------------------------------------------------ observation
    async def stats(self) -> dict[str, Any]:
        return {"model_version": self.serving.version, "shadow_version": self.shadow.version if self.shadow else None,
                "staged": sorted(self.staged), "device": str(self.device), "pid": os.getpid(),
                "started_at": self.started_at, "ready_at": self.ready_at, "swaps": self.swaps,
                "load_failures": self.load_failures, "frames": self.frames, "shadow_frames": self.shadow_frames,
                "queued": len(self.queue), "busy": self.busy,
                "batch_size": self.batch_sizes.cumulative(), "batch_size_sum": self.batch_sizes.total,
                "batch_count": self.batch_sizes.n, "forward": self.forward_seconds.cumulative(),
                "forward_sum": self.forward_seconds.total, "forward_count": self.forward_seconds.n}

    async def ping(self) -> str:
        return self.serving.version
