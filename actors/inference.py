"""InferenceActor: dynamic batching of frames into one backbone + reconstructor forward pass.

An async actor: `infer` calls queue up on the event loop, a batching task forms batches (up to
`max_batch`, waiting at most `max_wait_ms` after the first frame), and the forward pass runs on a
worker thread so `stats`/`ping` answer while a batch runs. A restarted actor reruns `__init__`,
which loads the model from disk again.
"""
from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import structlog
import torch

from agent.logs import configure_logging
from agent.settings import InferenceConfig
from model.detector import AnomalyDetector, load_detector
from model.scoring import feature_distance

from .stats import BATCH_BUCKETS, Histogram

log = structlog.get_logger(__name__)


def pick_device(cfg: InferenceConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class BatchedModel:
    """The detector's networks prepared for one device: what the actor and the benchmarks both run."""

    def __init__(self, detector: AnomalyDetector, cfg: InferenceConfig):
        self.detector, self.cfg = detector, cfg
        self.device = pick_device(cfg)
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.torch_threads or os.cpu_count() or 1)
        self.backbone = detector.backbone.to(self.device).eval()
        self.reconstructor = detector.reconstructor.to(self.device).eval()
        self.half = cfg.half and self.device.type == "cuda"
        if cfg.channels_last and self.device.type == "cuda":
            self.backbone = self.backbone.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def coarse_maps(self, frames: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 frames at the model's size → (B, S, S) float32 feature distances."""
        x = self.detector.preprocess(frames).to(self.device, non_blocking=True)
        if self.cfg.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
            features = self.backbone(x)
            target, recon = self.reconstructor(features)
        return feature_distance(target.float(), recon.float()).cpu().numpy()


class InferenceActor:
    def __init__(self, model_dir: str, cfg: InferenceConfig):
        configure_logging("info", json_output=True)  # worker stderr reaches the driver
        self.model_dir, self.cfg = model_dir, cfg
        self.started_at = time.time()
        started = time.monotonic()
        self.model = BatchedModel(load_detector(model_dir), cfg)
        self.model_version = self.model.detector.model_version
        self.queue: list[tuple[np.ndarray, asyncio.Future]] = []
        self.arrived: asyncio.Event | None = None
        self.batcher: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.forward_seconds = Histogram()
        self.frames = 0
        self.busy = False
        self.log = log.bind(model_version=self.model_version, device=str(self.model.device))
        self.ready_at = time.time()
        self.log.info("inference ready", load_s=round(time.monotonic() - started, 2))

    async def infer_batch(self, frames: list[np.ndarray]) -> list[dict[str, Any]]:
        """Frames in (RGB uint8 at the model's size), one coarse map each out, once their batches ran.
        Calls from all cameras share the batches: a call is a unit of transport, not a batch."""
        loop = asyncio.get_running_loop()
        if self.batcher is None:
            self.arrived = asyncio.Event()
            self.batcher = loop.create_task(self._batch_loop())
        futures = [loop.create_future() for _ in frames]
        self.queue.extend(zip(frames, futures))
        self.arrived.set()
        return list(await asyncio.gather(*futures))

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
            frames = [frame for frame, _ in batch]
            self.busy = True
            started = time.perf_counter()
            try:
                maps = await loop.run_in_executor(self.executor, self.model.coarse_maps, frames)
            except Exception as exc:  # noqa: BLE001 - fail this batch's frames, keep serving
                self.log.error("batch failed", size=len(batch), error=f"{type(exc).__name__}: {exc}")
                for _, future in batch:
                    future.set_exception(exc)
                continue
            finally:
                self.busy = False
            seconds = time.perf_counter() - started
            self.batch_sizes.observe(len(batch))
            self.forward_seconds.observe(seconds)
            self.frames += len(batch)
            for i, (_, future) in enumerate(batch):
                future.set_result({"coarse": maps[i], "model_version": self.model_version,
                                   "batch_size": len(batch), "inference_ms": seconds * 1000.0})

    async def stats(self) -> dict[str, Any]:
        return {"model_version": self.model_version, "device": str(self.model.device), "pid": os.getpid(),
                "started_at": self.started_at, "ready_at": self.ready_at,
                "frames": self.frames, "queued": len(self.queue), "busy": self.busy,
                "batch_size": self.batch_sizes.cumulative(), "batch_size_sum": self.batch_sizes.total,
                "batch_count": self.batch_sizes.n, "forward": self.forward_seconds.cumulative(),
                "forward_sum": self.forward_seconds.total, "forward_count": self.forward_seconds.n}

    async def ping(self) -> str:
        return self.model_version
