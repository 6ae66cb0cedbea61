"""The running agent's outside: Prometheus /metrics, /healthz, /readyz, and the SIGINT/SIGTERM loop.

Counters live in the actors (they survive nothing but their own process); /metrics asks every actor
for its stats at scrape time, so one scrape is one consistent-enough snapshot of the pipeline.
"""
from __future__ import annotations

import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .runner import Agent, totals

log = structlog.get_logger(__name__)


class AgentCollector:
    """prometheus_client custom collector over `Agent.snapshot()`."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def collect(self):
        snap = self.agent.snapshot(timeout_s=2.0)
        up = GaugeMetricFamily("adtr_actor_up", "1 when the actor answered this scrape", labels=["actor"])
        for name, ok in snap["up"].items():
            up.add_metric([name], 1.0 if ok else 0.0)
        yield up
        info = GaugeMetricFamily("adtr_model_info", "The model version being served", labels=["model_version"])
        info.add_metric([snap.get("inference", {}).get("model_version", snap["model_version"])], 1.0)
        yield info
        yield from self._camera_metrics([v for k, v in snap.items() if k.startswith("ingest-") and v])
        inference = snap.get("inference")
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
        scoring = snap.get("scoring")
        if scoring and scoring["store"]:
            stored = GaugeMetricFamily("adtr_anomaly_store_bytes", "Bytes in the anomaly output folder")
            stored.add_metric([], scoring["store"]["bytes"])
            yield stored
            errors = CounterMetricFamily("adtr_anomaly_write_errors", "Anomaly files that could not be written")
            errors.add_metric([], scoring["write_errors"])
            yield errors

    @staticmethod
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
                family.add_metric([camera], t[key])
            anomalies.add_metric([camera], t["anomalies"])
            in_flight.add_metric([camera], t["in_flight"] + t["queued"])
            for reason, n in t["dropped"].items():
                dropped.add_metric([camera, reason], n)
            for reason, n in t["invalid"].items():
                invalid.add_metric([camera, reason], n)
        yield from (*families.values(), anomalies, dropped, invalid, in_flight)
        latency = HistogramMetricFamily("adtr_end_to_end_seconds", "Capture timestamp to decision published",
                                        labels=["camera"])
        for ingest in ingests:
            for camera, s in ingest["cameras"].items():
                if s["latency_count"]:
                    latency.add_metric([camera], s["latency"], s["latency_sum"])
        yield latency


def start_http(agent: Agent) -> ThreadingHTTPServer:
    """/metrics (Prometheus text), /healthz (the agent process is serving), /readyz (every actor answers)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/metrics":
                self._reply(200, generate_latest(registry), "text/plain; version=0.0.4")
            elif self.path == "/healthz":
                ok = not agent.stopped
                self._json(200 if ok else 503, {"status": "ok" if ok else "stopping"})
            elif self.path == "/readyz":
                ok, up = agent.ready()
                self._json(200 if ok else 503, {"ready": ok, "actors": up,
                                                "model_version": agent.head.model_version})
            else:
                self._json(404, {"error": f"no such path {self.path}; try /metrics, /healthz, /readyz"})

        def _json(self, code: int, body: dict) -> None:
            self._reply(code, json.dumps(body).encode(), "application/json")

        def _reply(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes are not news
            pass

    http = agent.cfg.http
    server = ThreadingHTTPServer((http.host, http.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("http listening", url=f"http://{http.host}:{server.server_address[1]}", paths="/metrics /healthz /readyz")
    return server


def serve_until_signal(agent: Agent) -> int:
    """Start, serve until SIGINT/SIGTERM, then drain and flush. Returns the process exit code."""
    stop = threading.Event()
    agent.start()
    # After ray.init: Ray installs its own SIGTERM handler there, which would end us without a drain.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.set())
    server = start_http(agent) if agent.cfg.http.enabled else None
    print(json.dumps({"event": "agent ready", "ingest": agent.ingest_endpoints, "results": agent.results_endpoint,
                      "model_version": agent.head.model_version,
                      "http": server.server_address[1] if server else None}), flush=True)
    while not stop.wait(1.0):
        pass
    log.info("stopping: draining frames in flight", timeout_s=agent.cfg.drain_timeout_s)
    final = agent.stop(drain=True)
    if server is not None:
        server.shutdown()
    print(json.dumps({"event": "agent stopped", "cameras": totals(final.get("ingest", []))}), flush=True)
    return 0
