"""Prometheus /metrics: one snapshot of every actor's stats, taken by a background thread, read by every scrape
through a custom collector (scrapes never call the actors)."""
from __future__ import annotations

import threading
import time
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .runner import Agent, totals

log = structlog.get_logger(__name__)


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
