"""`adtr-edge demo`: a real agent, a camera replaying a dataset's test split, and a live subscriber.

The agent and the camera run as their own processes (`adtr-edge run`, `adtr-edge publish`), exactly as
a user would start them; this process subscribes to the decisions, prints them, and ends with a summary.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

from adtr_edge.actors.contract import parse_decision
from adtr_edge.model.checkpoint import read_manifest
from adtr_edge.model.config import AdtrConfig
from adtr_edge.model.data import load_dataset
from adtr_edge.model.metrics import auroc

from .errors import AgentError
from .rayhead import free_port
from .watch import subscribe


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adtr_edge.agent.cli", *args]


def _event(path: Path, name: str) -> dict | None:
    """The agent prints one JSON line per lifecycle event on stdout (its logs go to stderr)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            return json.loads(line)
    return None


def stop_agent(agent: subprocess.Popen, *logs) -> None:
    """SIGTERM (the agent drains and prints its books), then the kill if it does not end in 2 minutes."""
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(timeout=120)
    except subprocess.TimeoutExpired:
        agent.kill()
    for log_file in logs:
        log_file.close()


def _wait_ready(agent: subprocess.Popen, stdout: Path, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        event = _event(stdout, "agent ready")
        if event:
            return event
        if agent.poll() is not None:
            raise AgentError(f"the agent exited with code {agent.returncode} before it was ready "
                             f"(see {stdout.parent / 'agent.log'})")
        time.sleep(0.2)
    raise AgentError(f"the agent was not ready within {timeout_s:.0f} s")


def run_demo(model_dir: Path, data: str, out: Path, fps: float = 0.0, overrides: list[str] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cfg = AdtrConfig.model_validate(read_manifest(model_dir)["settings"])
    test = load_dataset(data, cfg.data).test
    (out / "frames.txt").write_text("".join(f"{s.path}\n" for s in test))
    labels = [s.label for s in test]
    ingest, results, http = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", free_port()
    agent_log, agent_out = open(out / "agent.log", "w"), open(out / "agent.out", "w")
    agent = subprocess.Popen(
        _cli("--log-json", "run", "--model", str(model_dir), "--ingest", ingest, "--results", results,
             "--set", f"output.dir={out / 'anomalies'}", "--set", f"http.port={http}", *sum((["--set", o] for o in
                                                                                               overrides or []), [])),
        stdout=agent_out, stderr=agent_log, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        print(f"starting the agent (Ray, model {model_dir}) …", flush=True)
        _wait_ready(agent, out / "agent.out", 300)
        print(f"agent ready: cameras → {ingest}, decisions → {results}, metrics → http://127.0.0.1:{http}/metrics",
              flush=True)
        summary = dict(_stream(test, labels, ingest, results, out, fps, http), fps=fps)
    finally:
        stop_agent(agent, agent_log, agent_out)
    stopped = _event(out / "agent.out", "agent stopped")
    summary["agent_accounting"] = stopped["cameras"] if stopped else None
    summary["anomaly_folder"] = str(out / "anomalies")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def _metric_samples(http_port: int) -> list | None:
    """Every sample of the agent's own /metrics; None when it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    except OSError:
        return None
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def agent_batching(http_port: int) -> dict | None:
    """The batch size and torch threads the agent serves with, from its /metrics, and the frames/s per
    batch size of its check under load (empty until the agent has been saturated)."""
    samples = _metric_samples(http_port)
    if samples is None:
        return None
    out: dict = {"batch": None, "threads": None, "tuning": None, "under_load": {}}
    for sample in samples:
        if sample.name == "adtr_inference_max_batch":
            out["batch"] = int(sample.value)
        elif sample.name == "adtr_inference_torch_threads":
            out["threads"] = int(sample.value)
        elif sample.name == "adtr_tuning_state" and sample.value:
            out["tuning"] = sample.labels["state"]
        elif sample.name == "adtr_tuning_load_frames_per_second":
            out["under_load"][int(sample.labels["batch"])] = sample.value
    return out


def agent_counts(http_port: int, camera: str) -> dict[str, float]:
    """A camera's counters from the agent's own /metrics (received, processed, dropped, invalid)."""
    out: dict[str, float] = {}
    for sample in _metric_samples(http_port) or []:
        if sample.labels.get("camera") == camera and sample.name.endswith("_total"):
            key = sample.name.removeprefix("adtr_frames_").removeprefix("adtr_").removesuffix("_total")
            out[key] = out.get(key, 0.0) + sample.value
    return out


def _stream(test, labels, ingest: str, results: str, out: Path, fps: float, http_port: int,
            camera_id: str = "demo-cam", stall_s: float = 180.0) -> dict:
    """Replay the frames, print each decision, and wait for progress, not for a fixed time: until the
    agent's own books say every frame the camera sent is accounted for, giving up only when neither the
    camera nor the agent has moved for `stall_s`."""
    context = zmq.Context()
    sub = subscribe(context, results)
    camera = subprocess.Popen(_cli("--log-json", "publish", "--source", str(out / "frames.txt"), "--endpoint", ingest,
                                   "--camera-id", camera_id, "--fps", str(fps), "--sent-log", str(out / "sent.jsonl")),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if camera.stdout is None:  # stdout=PIPE: always there
        raise AgentError("the demo camera's output is not piped")
    decisions: dict[int, dict] = {}
    first: float | None = None
    last: float | None = None
    sent = None
    progress_at, seen, next_check = time.monotonic(), (0, 0.0), 0.0
    while time.monotonic() - progress_at < stall_s:
        if sub.poll(500):
            d = parse_decision(sub.recv_multipart())
            now = time.time()
            first, last = first or now, now
            decisions[d["seq"]] = dict(d, received_ms=(now - d["ts"]) * 1000.0)
            progress_at = time.monotonic()
            sample = test[d["seq"]]
            verdict = "ANOMALY" if d["is_anomaly"] else "ok     "
            truth = sample.defect_type if sample.label else "normal"
            print(f"#{d['seq']:4d} {verdict} {d['normalized_score']:5.2f}x thr  {d['latency_ms']:6.0f} ms  "
                  f"{len(d['regions'])} region(s)  [{truth}] {sample.path.name}", flush=True)
        if sent is None and camera.poll() is not None:
            lines = camera.stdout.read().strip().splitlines()
            sent = json.loads(lines[-1])["sent"] if lines else 0
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + 2.0
            counts = agent_counts(http_port, camera_id)
            accounted = counts.get("processed", 0) + counts.get("dropped", 0) + counts.get("invalid", 0)
            if (len(decisions), accounted) != seen or camera.poll() is None:
                seen, progress_at = (len(decisions), accounted), time.monotonic()
            if sent is not None and accounted >= sent and len(decisions) >= counts.get("processed", 0):
                break
    if camera.poll() is None:
        camera.kill()
    inference = agent_batching(http_port)  # before the agent stops: what it served with
    sub.close(linger=0)
    context.term()
    seqs = sorted(decisions)
    scores = np.array([decisions[s]["score"] for s in seqs])
    y = np.array([labels[s] for s in seqs])
    flagged = np.array([decisions[s]["is_anomaly"] for s in seqs])
    latency = np.array([decisions[s]["received_ms"] for s in seqs])
    auc = auroc(y, scores) if 0 < y.sum() < len(y) else None
    return {
        "frames_sent": sent,
        "frames_decided": len(decisions),
        "anomalies": int(flagged.sum()),
        "live_image_auroc": float(auc) if auc is not None else None,
        "recall": float(flagged[y == 1].mean()) if y.sum() else None,
        "false_alarm_rate": float(flagged[y == 0].mean()) if (y == 0).any() else None,
        "frames_per_second": ((len(seqs) - 1) / (last - first)
                              if first is not None and last is not None and last > first else None),
        "latency_ms_p50": float(np.percentile(latency, 50)) if len(latency) else None,
        "latency_ms_p99": float(np.percentile(latency, 99)) if len(latency) else None,
        "inference": inference,
    }


def _print_summary(s: dict) -> None:
    def f(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    print("\n── live demo summary " + "─" * 40)
    print(f"frames sent {s['frames_sent']}, decided {s['frames_decided']}, anomalies {s['anomalies']}")
    print(f"live image AUROC {f(s['live_image_auroc'])}  recall {f(s['recall'])}  "
          f"false alarms {f(s['false_alarm_rate'])}")
    print(f"throughput {f(s['frames_per_second'], '.1f')} frames/s, latency p50 {f(s['latency_ms_p50'], '.0f')} ms, "
          f"p99 {f(s['latency_ms_p99'], '.0f')} ms (capture → decision received"
          + ("; the camera sent as fast as the agent took frames, so latency includes queueing)" if not s.get("fps")
             else f"; camera at {s['fps']:g} fps)"))
    inference = s.get("inference") or {}
    if inference.get("batch"):
        load = ", ".join(f"batch {b} {v:.1f}" for b, v in sorted(inference["under_load"].items()))
        notes = [n for n in (inference["tuning"], load and f"frames/s under load: {load}") if n]
        print(f"inference: batch {inference['batch']} × {inference['threads']} torch thread(s)"
              + (f" ({'; '.join(notes)})" if notes else ""))
    print(f"agent accounting: {json.dumps(s['agent_accounting'])}")
    print(f"anomalous frames, heatmap overlays and JSON sidecars: {s['anomaly_folder']}")
