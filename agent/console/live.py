"""What the Live page shows, per camera, from the agent's stats snapshots (never a call to the actors):
frames/s and anomaly rate over the last `window_s`, p50/p99 latency from the latency histogram (the
same buckets as /metrics), drops and invalid frames by reason, the drift state, the serving model."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from adtr_edge.actors.stats import LATENCY_BUCKETS_S

from ..runner import totals


def histogram_quantile(q: float, counts: list[int]) -> float | None:
    """Like Prometheus' histogram_quantile over per-bucket counts (the last bucket is +Inf): linear inside
    the bucket; in +Inf, the largest finite bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, running, lower = q * total, 0, 0.0
    for bound, n in zip([*LATENCY_BUCKETS_S, float("inf")], counts):
        if n and running + n >= rank:
            if bound == float("inf"):
                return LATENCY_BUCKETS_S[-1]
            return lower + (bound - lower) * (rank - running) / n
        running += n
        lower = bound if bound != float("inf") else lower
    return LATENCY_BUCKETS_S[-1]


def _per_bucket(cumulative: list) -> list[int]:
    """[(bound, cumulative count), …] → counts per bucket."""
    out, previous = [], 0
    for _, running in cumulative:
        out.append(running - previous)
        previous = running
    return out


def camera_counters(snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ingests = [v for k, v in snap.items() if k.startswith("ingest-") and v]
    per_camera = totals(ingests)
    for ingest in ingests:
        for camera, s in ingest["cameras"].items():
            buckets = _per_bucket(s.get("latency", []))
            t = per_camera[camera]
            t["latency"] = [a + b for a, b in zip(t["latency"], buckets)] if "latency" in t else buckets
    return per_camera


class LiveView:
    def __init__(self, cache, window_s: float = 10.0):
        self.cache, self.window_s = cache, window_s
        self.history: deque[tuple[float, dict[str, dict[str, Any]]]] = deque(maxlen=600)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        threading.Thread(target=self._follow, name="console-live", daemon=True).start()

    def _follow(self) -> None:
        """Record every snapshot the cache takes, so rates are there before anyone opens the page."""
        interval = getattr(self.cache, "interval_s", 1.0)
        while not self.stop.wait(interval / 2):
            snap = self.cache.latest
            if snap.get("taken_at"):
                self._observe(snap)

    def _observe(self, snap: dict[str, Any]) -> None:
        taken = snap.get("taken_at", 0.0)
        with self.lock:
            if not self.history or taken > self.history[-1][0]:
                self.history.append((taken, camera_counters(snap)))

    def _baseline(self, now: float) -> tuple[float, dict[str, dict[str, Any]]] | None:
        with self.lock:
            older = [h for h in self.history if h[0] <= now - self.window_s]
            if older:
                return older[-1]
            return self.history[0] if len(self.history) > 1 else None

    def view(self) -> dict[str, Any]:
        snap = self.cache.get(wait_s=2.0)
        self._observe(snap)
        taken = snap.get("taken_at", 0.0)
        current = self.history[-1][1] if self.history else {}
        base = self._baseline(taken)
        inference = snap.get("inference") or {}
        scoring = snap.get("scoring") or {}
        drift = scoring.get("drift", {})
        cameras = []
        for camera in sorted(current):
            t = current[camera]
            b = (base[1].get(camera) if base else None) or {}
            dt = taken - base[0] if base else 0.0
            d_processed = t["processed"] - b.get("processed", 0) if base else 0
            d_anomalies = t["anomalies"] - b.get("anomalies", 0) if base else 0
            recent_latency = [x - y for x, y in zip(t.get("latency", []), b.get("latency", [0] * 99))] if base else []
            latency = recent_latency if sum(recent_latency) > 0 else t.get("latency", [])
            d = drift.get(camera) or {}
            cameras.append({
                "camera": camera, "received": t["received"], "processed": t["processed"],
                "anomalies": t["anomalies"], "in_flight": t["in_flight"] + t["queued"],
                "fps": d_processed / dt if base and dt > 0 else None,
                "anomaly_rate": (d_anomalies / d_processed) if d_processed > 0 else
                                (t["anomalies"] / t["processed"] if t["processed"] else None),
                "anomaly_rate_total": t["anomalies"] / t["processed"] if t["processed"] else None,
                "p50_ms": _ms(histogram_quantile(0.5, latency)), "p99_ms": _ms(histogram_quantile(0.99, latency)),
                "latency_recent": sum(recent_latency) > 0,
                "dropped": dict(sorted(t["dropped"].items())), "invalid": dict(sorted(t["invalid"].items())),
                # the alarm threshold: alarm_psi or the window's noise floor, whichever is higher
                "drift": {"alarm": bool(d.get("alarm")), "psi": d.get("psi"), "threshold": d.get("threshold"),
                          "n": d.get("n"), "median_ratio": d.get("median_ratio")} if d else None,
            })
        store = scoring.get("store") or {}
        return {"taken_at": taken, "age_s": max(0.0, time.time() - taken) if taken else None,
                "window_s": self.window_s, "serving": inference.get("model_version", snap.get("model_version")),
                "shadow": inference.get("shadow_version"), "actors": snap.get("up", {}),
                "decisions": scoring.get("decisions"), "store": store, "cameras": cameras,
                "shadow_stats": scoring.get("shadow", []),
                "drift_alarms": sorted(c for c, s in drift.items() if s.get("alarm"))}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)
