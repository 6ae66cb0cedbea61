"""ModelManager: the agent's side of the learning loop, one named actor ("models") per agent.

- promote / rollback: the version is loaded and warmed up in the inference actor first (a version that
  fails to load never moves a pointer), then the registry pointer moves, then the actors switch
  between two batches. A guard then watches each camera's anomaly rate and rolls back by itself if it
  jumps far above the previous model's rate on the same camera.
- shadow: the candidate runs beside the serving model on a sample of live batches; the scoring actor
  compares their decisions (never publishing the candidate's).
- reconcile: every `reconcile_s`, the serving version is checked against the registry's `current`
  (a pointer moved by the CLI, a missed call, a restarted actor) and fixed.
- schedule: submits a retrain job after enough new accepted samples, at most once per interval,
  inside an optional daily window.
"""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import structlog

from adtr_edge.lifecycle.registry import Registry
from adtr_edge.lifecycle.samples import SampleStore

from .cold import MIN_RECORDED, end_cold, read_cold, write_cold
from .config import DEFAULT_POINT, LearningConfig, RetrainConfig
from .jobs import job_info, submit_retrain
from .logs import configure_logging
from .retrain import RetrainBusy

log = structlog.get_logger(__name__)


class PromotionError(RuntimeError):
    """A promotion, rollback or shadow that did not happen; the serving model is unchanged."""


def in_window(window: str | None, now: datetime) -> bool:
    """"22:00-05:00" (local time, may wrap midnight); None = always."""
    if not window:
        return True
    start, end = (datetime.strptime(t, "%H:%M").time() for t in window.split("-"))
    t = now.time()
    return start <= t < end if start <= end else (t >= start or t < end)


class ModelManager:
    def __init__(self, registry_path: str, learning: LearningConfig, namespace: str, jobs_address: str | None,
                 inference: str = "inference", scoring: str = "scoring", point: str = DEFAULT_POINT):
        configure_logging("info", json_output=True)
        self.registry, self.point = Registry(registry_path), point
        self.cfg, self.namespace, self.jobs_address = learning, namespace, jobs_address
        # Any: Ray types a handle's method calls (`handle.method.remote()`) as Never unless the method is a
        # @ray.method, and the type checker would then skip everything after the first call.
        self.inference: Any = ray.get_actor(inference, namespace=namespace)
        self.scoring: Any = ray.get_actor(scoring, namespace=namespace)
        self.lock: asyncio.Lock | None = None
        self.tasks: list[asyncio.Task] = []
        self.guard: dict[str, Any] | None = None
        self.last_job: dict[str, Any] | None = None
        self.reconcile_failures: dict[str, str] = {}
        self.schedule_state = Path(self.registry.root) / "schedule.json"
        self.log = log.bind(registry=str(self.registry.root), point=point)

    async def start(self) -> dict[str, Any]:
        """Start the background loops (once; a restarted actor is started again by the agent's reconcile)."""
        if not self.tasks:
            self.lock = asyncio.Lock()
            loop = asyncio.get_running_loop()
            self.tasks = [loop.create_task(self._reconcile_loop()), loop.create_task(self._schedule_loop()),
                          loop.create_task(self._cold_start_loop())]
        return await self.status()

    def _lock(self) -> asyncio.Lock:
        if self.lock is None:
            self.lock = asyncio.Lock()
        return self.lock

    # ------------------------------------------------------------------ versions
    async def _prepare(self, version: str, by: str) -> None:
        try:
            await self.inference.prepare.remote(version, self.point)
        except Exception as exc:  # noqa: BLE001 - ModelLoadError arrives wrapped in a RayTaskError
            reason = str(exc).strip().splitlines()[-1][:400]
            self.registry.record("load_failed", version, by, reason)
            if self.registry.pointers()["candidate"] == version:
                self.registry.reject(version, by, f"load failed: {reason}")
            raise PromotionError(f"{version} cannot be loaded: {reason}") from None

    async def promote(self, version: str, by: str, reason: str = "") -> dict[str, Any]:
        async with self._lock():
            previous = self.registry.current()
            if version == previous:
                raise PromotionError(f"{version} is already serving")
            await self._prepare(version, by)
            before = await self.scoring.anomaly_rates.remote(self.point)
            pointers = self.registry.promote(version, by, reason)
            await self.inference.activate.remote(version, "serving", self.point)
            await self.scoring.reset_shadow.remote(self.point)
            if read_cold(self.registry.root) is not None:  # the point's own first model: it inspects from now on
                end_cold(self.registry.root)
                await self.scoring.set_cold.remote(self.point, None)
                self.log.info("cold start done: the point's first model serves", version=version)
            self._start_guard(previous, version, before)
            self.log.info("promoted", version=version, previous=previous, by=by)
            return {"promoted": version, "previous": previous, "pointers": pointers}

    async def rollback(self, by: str, reason: str = "") -> dict[str, Any]:
        async with self._lock():
            return await self._rollback(by, reason)

    async def _rollback(self, by: str, reason: str) -> dict[str, Any]:
        pointers = self.registry.pointers()
        target = pointers["previous"]
        if not target:
            raise PromotionError("nothing to roll back to: the registry has no previous version")
        await self._prepare(target, by)
        pointers = self.registry.rollback(by, reason)
        await self.inference.activate.remote(target, "serving", self.point)
        self.guard = None
        self.log.warning("rolled back", version=target, by=by, reason=reason)
        return {"serving": target, "pointers": pointers}

    async def shadow(self, version: str, by: str, reason: str = "") -> dict[str, Any]:
        async with self._lock():
            await self._prepare(version, by)
            pointers = self.registry.set_candidate(version, by, reason or "shadowing on live frames", event="shadow")
            await self.scoring.reset_shadow.remote(self.point)
            await self.inference.activate.remote(version, "shadow", self.point)
            return {"shadow": version, "pointers": pointers}

    async def clear_shadow(self, by: str) -> dict[str, Any]:
        async with self._lock():
            version = await self.inference.clear_shadow.remote(self.point)
            return {"cleared": version}

    # ------------------------------------------------------------------ the guard after a promotion
    def _start_guard(self, previous: str, version: str, before: dict[str, dict[str, list[int]]]) -> None:
        g = self.cfg.guard
        if not g.enabled:
            return
        baseline = {camera: rates[previous] for camera, rates in before.items()
                    if previous in rates and rates[previous][0] >= g.min_decisions}
        self.guard = {"version": version, "previous": previous, "baseline": baseline, "since": time.time(),
                      "checks": 0}
        asyncio.get_running_loop().create_task(self._guard_loop(dict(self.guard)))

    async def _guard_loop(self, guard: dict[str, Any]) -> None:
        g = self.cfg.guard
        while time.time() - guard["since"] < g.watch_s:
            await asyncio.sleep(1.0)
            if self.guard is None or self.guard["version"] != guard["version"]:
                return  # superseded by another promotion or a rollback
            rates = await self.scoring.anomaly_rates.remote(self.point)
            self.guard["checks"] += 1
            for camera, (n_old, a_old) in guard["baseline"].items():
                n_new, a_new = rates.get(camera, {}).get(guard["version"], [0, 0])
                if n_new < g.min_decisions:
                    continue
                old, new = a_old / n_old, a_new / n_new
                if new > max(g.factor * old, old + g.margin):
                    reason = (f"guard: camera {camera} anomaly rate {new:.3f} over {n_new} decisions vs "
                              f"{old:.3f} before the promotion (limit max({g.factor}×, +{g.margin}))")
                    async with self._lock():
                        if self.registry.current() == guard["version"]:
                            await self._rollback("guard", reason)
                    return
        if self.guard is not None and self.guard["version"] == guard["version"]:
            self.guard = dict(self.guard, done=True)

    # ------------------------------------------------------------------ reconcile
    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reconcile_s)
            try:
                await self.reconcile()
            except Exception as exc:  # noqa: BLE001 - keep reconciling; the agent's /readyz shows actors down
                self.log.warning("reconcile failed", error=str(exc)[:300])

    async def reconcile(self) -> dict[str, Any]:
        """Serve the registry's current version (a pointer moved elsewhere, a missed call, a restart)."""
        current = self.registry.current()
        serving = await self.inference.ping.remote(self.point)
        if serving == current:
            return {"serving": serving, "changed": False}
        if current in self.reconcile_failures:
            return {"serving": serving, "changed": False, "error": self.reconcile_failures[current]}
        async with self._lock():
            try:
                await self._prepare(current, "reconcile")
            except PromotionError as exc:
                self.reconcile_failures[current] = str(exc)
                pointers = self.registry.pointers()
                if pointers["previous"] == serving:  # put the pointer back on what really serves
                    self.registry.rollback("reconcile", f"current {current} failed to load: {exc}")
                return {"serving": serving, "changed": False, "error": str(exc)}
            await self.inference.activate.remote(current, "serving", self.point)
        self.log.info("reconciled: now serving the registry's current version", version=current, was=serving)
        return {"serving": current, "changed": True, "was": serving}

    # ------------------------------------------------------------------ retraining
    async def submit_retrain(self, by: str, overrides: list[str] | None = None) -> dict[str, Any]:
        address = self.jobs_address
        if not address:
            raise RetrainBusy("this agent has no Ray Jobs address (its Ray has no dashboard)")
        # The job runs with this agent's retrain settings, then any the caller adds.
        defaults = RetrainConfig().model_dump()
        own = [f"learning.retrain.{key}={json.dumps(value)}" for key, value in self.cfg.retrain.model_dump().items()
               if value != defaults[key]]
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(None, lambda: submit_retrain(
            address, self.registry.root, self.namespace, by, [*own, *(overrides or [])]))
        self.last_job = job
        self.schedule_state.write_text(json.dumps({"last_submitted_at": time.time(), "job": job}))
        self.log.info("retrain submitted", by=by, submission_id=job["submission_id"])
        return job

    async def job(self, submission_id: str | None = None) -> dict[str, Any] | None:
        submission_id = submission_id or (self.last_job or {}).get("submission_id")
        if not submission_id or not self.jobs_address:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, job_info, self.jobs_address, submission_id)

    async def _schedule_loop(self) -> None:
        s = self.cfg.schedule
        if not s.enabled:
            return
        store = SampleStore(self.registry.store_dir)
        while True:
            await asyncio.sleep(s.check_every_s)
            try:
                last = json.loads(self.schedule_state.read_text()).get("last_submitted_at", 0.0) \
                    if self.schedule_state.is_file() else 0.0
                new = store.counts(since=last)["new_since"]
                fresh = sum(n for origin, n in new.items() if origin != "base")
                if fresh >= s.min_new_samples and time.time() - last >= s.min_interval_s and \
                        in_window(s.window, datetime.now()):
                    await self.submit_retrain(f"schedule ({fresh} new samples)")
            except RetrainBusy as exc:
                self.log.info("scheduled retrain skipped", reason=str(exc))
            except Exception as exc:  # noqa: BLE001 - the schedule must outlive a failed submission
                self.log.error("scheduled retrain failed to submit", error=str(exc)[:300])

    # ------------------------------------------------------------------ cold start (actors/cold.py)
    async def finish_recording(self, by: str) -> dict[str, Any]:
        """The operator says the recorded run is enough (at least MIN_RECORDED frames): train on it now."""
        cold = read_cold(self.registry.root)
        if cold is None or cold.get("state") != "recording":
            raise PromotionError(f"point {self.point} is not recording (cold start: {cold and cold.get('state')})")
        stored = SampleStore(self.registry.store_dir).total()
        if stored < MIN_RECORDED:
            raise PromotionError(f"{stored} frames recorded; at least {MIN_RECORDED} are needed to train a first model")
        cold = dict(cold, frames=stored, finished_by=by)
        write_cold(self.registry.root, cold)
        await self.scoring.set_cold.remote(self.point, cold)
        self.log.info("cold start: recording ended by the operator", by=by, frames=stored)
        return {"point": self.point, "frames": stored}

    async def _cold_start_loop(self) -> None:
        """While the point is taught: once its recording is complete, submit the retrain that builds its
        first model (refit first, then `cold_start.epochs` of training); note when a candidate is out. A
        point is taught only from its creation (`points add`) until its first promotion, so the loop ends
        with the cold start, and after one look for a point that serves its own model."""
        c = self.cfg.cold_start
        store = SampleStore(self.registry.store_dir)
        while True:
            await asyncio.sleep(1.0)
            cold = read_cold(self.registry.root)  # read after the sleep: a promotion may have ended it meanwhile
            if cold is None:
                return
            try:
                if cold["state"] == "recording" and store.total() >= cold["frames"]:
                    job = await self.submit_retrain("cold_start", [f"learning.retrain.epochs={c.epochs}"])
                    cold = dict(cold, state="training", recorded_at=time.time(), job=job["submission_id"])
                    write_cold(self.registry.root, cold)
                    await self.scoring.set_cold.remote(self.point, cold)
                    self.log.info("cold start: recording complete, first model training", job=job["submission_id"])
                elif cold["state"] == "training" and self.registry.pointers()["candidate"]:
                    cold = dict(cold, state="candidate", candidate=self.registry.pointers()["candidate"],
                                candidate_at=time.time())
                    write_cold(self.registry.root, cold)
                    await self.scoring.set_cold.remote(self.point, cold)
                    self.log.info("cold start: first model ready; promote it after review", version=cold["candidate"])
            except RetrainBusy as exc:
                self.log.info("cold start retrain waits", reason=str(exc))
            except Exception as exc:  # noqa: BLE001 - keep teaching; the state file says where it stands
                self.log.error("cold start step failed", error=str(exc)[:300])

    # ------------------------------------------------------------------ observation
    async def status(self) -> dict[str, Any]:
        inference = (await self.inference.stats.remote())["points"][self.point]
        return {"point": self.point, "cold_start": read_cold(self.registry.root),
                "pointers": self.registry.pointers(), "serving": inference["model_version"],
                "shadow": inference["shadow_version"], "guard": self.guard, "last_job": self.last_job,
                "schedule": self.cfg.schedule.model_dump(), "reconcile_failures": self.reconcile_failures}

    async def ping(self) -> str:
        return "ok"

    async def registry_root(self) -> str:
        """Which registry (inspection point) this manager serves: a retrain job publishes only to its own."""
        return str(self.registry.root.resolve())
