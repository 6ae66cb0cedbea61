"""Soak (`make soak`): the agent for a set time (default 60 min) at half its measured capacity, with four
cameras, retrains and promotions every few minutes (real Ray jobs, through the model manager) and a hostile
peer sending malformed messages throughout. Every minute it records the resident memory and open files of
every process (this driver, Ray's head processes, every actor), Ray's object store use, the bytes of Ray's
session logs, p50/p99 latency of the minute's decisions and the books per camera. At the end it checks the
targets, writes runs/soak/soak.json and soak.png (four panels), and the Soak section of docs/results.md.

Targets (after the warm-up): RSS slope < 1 MB/min per process, open files and object store flat, p99 drift
< 20 %, books exact (every frame sent = decided + dropped + refused, by reason), log volume < 50 MB.

    python tests/benchmarks/soak.py --minutes 60          # make soak
    python tests/benchmarks/soak.py --minutes 10 --warmup 3 --retrain-every 4   # a short check
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import psutil
import ray
import zmq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from adtr_edge.agent.publisher import frame_from_file
from adtr_edge.agent.runner import Agent, totals
from adtr_edge.agent.settings import AgentSettings, load_settings
from adtr_edge.model.data import load_dataset

from bench_agent import agent_run, frames_of
from hostile import malformed, push_socket
from live import Streamer, accounted, registry_with_base
from results_table import update_section

MB = 1 << 20


class Latencies:
    """The results socket on a thread, keeping only what the soak needs: each decision's latency, for two minutes
    (keeping every decision, as the tests' Decisions does, would grow this process by megabytes a minute and
    hide the agent's own memory in it)."""

    def __init__(self, endpoint: str):
        from adtr_edge.actors.contract import parse_decision
        from adtr_edge.agent.watch import subscribe

        self._parse = parse_decision
        self.recent: deque[tuple[float, float]] = deque()  # (received at, latency ms)
        self.decided = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = subscribe(self._context, endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._socket.poll(100):
                decision = self._parse(self._socket.recv_multipart())
                now = time.time()
                with self._lock:
                    self.decided += 1
                    self.recent.append((now, (now - decision["ts"]) * 1000.0))
                    while self.recent and self.recent[0][0] < now - 120:
                        self.recent.popleft()

    def since(self, t: float) -> list[float]:
        with self._lock:
            return [ms for at, ms in self.recent if at >= t]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close(linger=0)
        self._context.term()


class Hostile:
    """A peer on its own socket sending one malformed message every `interval_s` (a mix of 21 kinds)."""

    def __init__(self, endpoint: str, jpeg: bytes, size: int, interval_s: float):
        self.sent = 0
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = push_socket(self._context, endpoint, sndhwm=100)
        self._thread = threading.Thread(target=self._run, args=(jpeg, size, interval_s), daemon=True)
        self._thread.start()

    def _run(self, jpeg: bytes, size: int, interval_s: float) -> None:
        rng = random.Random(0)
        while not self._stop.wait(interval_s):
            parts, _ = malformed(rng, jpeg, size, size, camera="hostile")
            try:
                self._socket.send_multipart(parts, zmq.NOBLOCK)
                self.sent += 1
            except zmq.Again:
                pass

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close(linger=0)
        self._context.term()
        return self.sent


_LABELS: dict[int, str] = {}


def processes() -> dict[str, psutil.Process]:
    """This driver and everything it started (Ray's head processes, the actors' workers, retrain jobs), each
    named once by what it was when first seen (Ray retitles a worker with every task it runs)."""
    me = psutil.Process()
    out = {"driver": me}
    for child in me.children(recursive=True):
        try:
            if child.pid not in _LABELS:
                first = (child.cmdline() or [child.name()])[0]
                _LABELS[child.pid] = f"{Path(first.split()[0]).name.split('(')[0]}:{child.pid}"
            out[_LABELS[child.pid]] = child
        except psutil.Error:
            continue
    return out


def object_store_mb() -> float:
    """Plasma bytes in use, from Ray's own memory summary."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    match = re.search(r"Plasma memory usage (\d+(?:\.\d+)?) MiB", text)
    return float(match.group(1)) if match else 0.0


def log_bytes() -> int:
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return sum(p.stat().st_size for p in logs.rglob("*") if p.is_file())


def sample(agent: Agent, decisions: Latencies, since: float) -> dict:
    """One minute's record."""
    record: dict = {"t": time.time(), "rss_mb": {}, "fds": {}}
    for name, proc in processes().items():
        try:
            record["rss_mb"][name] = proc.memory_info().rss / MB
            record["fds"][name] = proc.num_fds()
        except psutil.Error:
            continue
    record["object_store_mb"] = object_store_mb()
    record["log_bytes"] = log_bytes()
    recent = decisions.since(since)
    record["decided"] = len(recent)
    record["p50_ms"] = float(np.percentile(recent, 50)) if recent else None
    record["p99_ms"] = float(np.percentile(recent, 99)) if recent else None
    snap = agent.snapshot(timeout_s=10)
    record["books"] = totals([snap[k] for k in snap if k.startswith("ingest-") and snap[k]])
    record["pointers"] = (snap.get("models") or {}).get("pointers")
    return record


def learning_step(agent: Agent, state: dict, log: list) -> None:
    """Promote a waiting candidate; else, when it is time, submit a retrain (the store fills itself from the
    auto sampler's confident normals)."""
    pointers = agent.registry.pointers()
    if pointers["candidate"] and pointers["candidate"] != state.get("promoted"):
        version = pointers["candidate"]
        try:
            ray.get(agent.manager.promote.remote(version, "soak"), timeout=300)
            state["promoted"] = version
            log.append({"t": time.time(), "event": "promoted", "version": version})
        except ray.exceptions.RayError as exc:
            log.append({"t": time.time(), "event": "promote_failed", "error": str(exc).splitlines()[-1][:200]})
        return
    if time.time() >= state["next_retrain"]:
        state["next_retrain"] = time.time() + state["every_s"]
        try:
            job = ray.get(agent.manager.submit_retrain.remote("soak", []), timeout=120)
            log.append({"t": time.time(), "event": "retrain", "job": job["submission_id"]})
        except ray.exceptions.RayError as exc:
            log.append({"t": time.time(), "event": "retrain_refused", "error": str(exc).splitlines()[-1][:200]})


def slope_mb_per_min(records: list[dict], name: str) -> float | None:
    points = [(r["t"], r["rss_mb"][name]) for r in records if name in r["rss_mb"]]
    if len(points) < 3:
        return None
    t, y = np.array(points).T
    return float(np.polyfit((t - t[0]) / 60.0, y, 1)[0])


def judge(records: list[dict], warm: list[dict], final_books: dict, sent: dict, hostile_sent: int,
          log_start: int) -> dict:
    # The processes that lived through the whole soak (a retrain job's workers come, grow and go)
    names = sorted(n for n in warm[0]["rss_mb"] if all(n in r["rss_mb"] for r in warm)) if len(warm) >= 3 else []
    slopes = {n: slope_mb_per_min(warm, n) for n in names}
    fds = {n: [r["fds"][n] for r in warm if n in r["fds"]] for n in names}
    p99 = [r["p99_ms"] for r in warm if r["p99_ms"] is not None]
    head, tail = np.median(p99[:3]) if p99 else None, np.median(p99[-3:]) if p99 else None
    books = {camera: {"sent": n, "accounted": accounted(final_books.get(camera, {"processed": 0, "dropped": {},
                                                                                  "invalid": {}})),
                      "processed": final_books.get(camera, {}).get("processed"),
                      "dropped": final_books.get(camera, {}).get("dropped"),
                      "invalid": final_books.get(camera, {}).get("invalid")} for camera, n in sent.items()}
    refused = {c: t["invalid"] for c, t in final_books.items() if c not in sent}
    store = [r["object_store_mb"] for r in warm]
    out = {
        "rss_slope_mb_per_min": slopes,
        "worst_rss_slope": max((s for s in slopes.values() if s is not None), default=None),
        "fds_growth": {n: max(v) - min(v) for n, v in fds.items() if v},
        "object_store_mb": [min(store), max(store)] if store else None,
        "p99_ms_first_last": [head, tail], "p99_drift": float(tail / head - 1) if p99 and head else None,
        "books": books, "books_exact": all(b["sent"] == b["accounted"] for b in books.values()),
        "hostile_sent": hostile_sent, "hostile_refused": refused,
        "log_mb": (records[-1]["log_bytes"] - log_start) / MB,
    }
    out["targets"] = {
        "rss_slope < 1 MB/min": out["worst_rss_slope"] is not None and out["worst_rss_slope"] < 1.0,
        "fds flat (growth ≤ 2)": all(g <= 2 for g in out["fds_growth"].values()),
        "object store flat (≤ 16 MB range)": bool(store) and max(store) - min(store) <= 16,
        "p99 drift < 20 %": out["p99_drift"] is not None and out["p99_drift"] < 0.2,
        "books exact": out["books_exact"],
        "logs < 50 MB": out["log_mb"] < 50,
    }
    return out


def plot(records: list[dict], events: list[dict], path: Path) -> None:
    """Four panels (RSS per process, latency, open files, object store) over minutes, drawn with OpenCV."""
    w, h, pad = 1200, 900, 60
    img = np.full((h, w, 3), 255, np.uint8)
    t0 = records[0]["t"]
    minutes = [(r["t"] - t0) / 60.0 for r in records]
    panels = [("RSS MB per process", {n: [r["rss_mb"].get(n) for r in records]
                                      for n in sorted({n for r in records for n in r["rss_mb"]})}),
              ("latency ms (p50, p99)", {"p50": [r["p50_ms"] for r in records], "p99": [r["p99_ms"] for r in records]}),
              ("open files per process", {n: [r["fds"].get(n) for r in records]
                                          for n in sorted({n for r in records for n in r["fds"]})}),
              ("object store MB", {"plasma": [r["object_store_mb"] for r in records]})]
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
              (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    ph = (h - pad) // len(panels)
    for i, (title, series) in enumerate(panels):
        top, bottom, left, right = i * ph + 30, (i + 1) * ph - 10, pad, w - 20
        values = [v for s in series.values() for v in s if v is not None]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        cv2.rectangle(img, (left, top), (right, bottom), (200, 200, 200), 1)
        cv2.putText(img, f"{title}  [{lo:.1f} .. {hi:.1f}]", (left + 5, top - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
        span = max(minutes[-1], 1e-6)
        for j, (_, ys) in enumerate(series.items()):
            pts = [(int(left + (m / span) * (right - left)), int(bottom - (y - lo) / (hi - lo) * (bottom - top)))
                   for m, y in zip(minutes, ys) if y is not None]
            if len(pts) > 1:
                cv2.polylines(img, [np.array(pts, np.int32)], False, colors[j % len(colors)][::-1], 2, cv2.LINE_AA)
        for event in events:
            if event["event"] in ("promoted", "retrain"):
                x = int(left + ((event["t"] - t0) / 60.0 / span) * (right - left))
                cv2.line(img, (x, top), (x, bottom), (0, 160, 0) if event["event"] == "promoted" else (0, 0, 200), 1)
    cv2.putText(img, f"minutes 0 .. {minutes[-1]:.0f}; red lines: retrain submitted, green: promoted",
                (pad, h - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def render(result: dict) -> str:
    j = result["judged"]
    lines = [f"Measured by `python tests/benchmarks/soak.py {result['args']}` on {result['date']} "
             f"({os.cpu_count()} cores, no GPU): {result['cameras']} cameras at {result['load']:.0%} of the measured "
             f"capacity ({result['capacity_fps']:.1f} frames/s, so {result['fps_per_camera']:.2f} frames/s each), "
             f"a retrain every {result['retrain_every_min']:g} min with its candidate promoted, a hostile peer "
             f"({j['hostile_sent']} malformed messages). Warm-up excluded: {result['warmup_min']:g} min.", "",
             "| target | measured | met |", "|---|---|---|"]
    rows = [("RSS slope per process < 1 MB/min", f"worst {j['worst_rss_slope']:.2f} MB/min"
             if j["worst_rss_slope"] is not None else "—"),
            ("open files flat", f"largest growth {max(j['fds_growth'].values(), default=0)}"),
            ("object store flat", f"{j['object_store_mb'][0]:.1f}–{j['object_store_mb'][1]:.1f} MB"
             if j["object_store_mb"] else "—"),
            ("p99 drift < 20 %", f"{j['p99_ms_first_last'][0]:.0f} → {j['p99_ms_first_last'][1]:.0f} ms "
             f"({j['p99_drift']:+.0%})" if j["p99_drift"] is not None else "—"),
            ("books exact", ", ".join(f"{c}: {b['sent']} sent = {b['accounted']} accounted"
                                      for c, b in j["books"].items())),
            ("log volume < 50 MB", f"{j['log_mb']:.1f} MB")]
    for (name, measured), met in zip(rows, j["targets"].values()):
        lines.append(f"| {name} | {measured} | {'yes' if met else '**no**'} |")
    events = result["events"]
    lines += ["", f"Learning during the soak: {sum(e['event'] == 'retrain' for e in events)} retrains submitted, "
              f"{sum(e['event'] == 'promoted' for e in events)} candidates promoted, "
              f"{sum(e['event'].endswith(('refused', 'failed')) for e in events)} refused or failed. "
              "Plot: `runs/soak/soak.png`; every minute's record: `runs/soak/soak.json`."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--model", default="runs/bench/adtr-edge", help="trained model (trained with defaults if missing)")
    p.add_argument("--out", default="runs/soak")
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=5.0, help="minutes left out of the slopes and drifts")
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--load", type=float, default=0.5, help="share of the measured capacity offered")
    p.add_argument("--retrain-every", type=float, default=15.0, help="minutes between retrain submissions")
    p.add_argument("--hostile-interval", type=float, default=0.5, help="seconds between malformed messages")
    p.add_argument("--no-results", action="store_true", help="do not rewrite docs/results.md")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model)
    if not (model_dir / "manifest.json").is_file():
        from adtr_edge.model.train import train_model

        model_cfg = load_settings()
        train_model(model_cfg, load_dataset(args.data, model_cfg.data), model_dir, progress=False)
    registry = registry_with_base(model_dir, out / f"registry-{int(time.time())}", args.data)
    cfg = load_settings(overrides=["http.enabled=false", f"state_dir={out / 'state'}",
                                   f"output.dir={out / 'anomalies'}", "learning.retrain.epochs=2"],
                        kind=AgentSettings)
    agent = Agent(registry.root, ["tcp://127.0.0.1:*"], "tcp://127.0.0.1:*", cfg).start()
    try:
        paths = frames_of(args.data, model_dir, 48)
        frames = [frame_from_file(p) for p in paths]
        capacity = agent_run(agent, "capacity", frames, 200)["frames_per_second"]
        fps = capacity * args.load / args.cameras
        decisions = Latencies(agent.bound_results)
        cameras = {f"cam-{i}": Streamer(agent.bound_ingest[0], f"cam-{i}", frames, fps=fps)
                   for i in range(args.cameras)}
        hostile = Hostile(agent.bound_ingest[0], paths[0].read_bytes(), 256, args.hostile_interval)
        started = time.time()
        state = {"every_s": args.retrain_every * 60, "next_retrain": started + args.retrain_every * 60}
        events: list[dict] = []
        records: list[dict] = []
        log_start = log_bytes()
        while time.time() - started < args.minutes * 60:
            minute = time.time()
            time.sleep(max(0.0, 60.0 - (time.time() - minute)))
            learning_step(agent, state, events)
            records.append(sample(agent, decisions, minute))
            r = records[-1]
            print(f"[soak] {len(records):3d} min: decided {r['decided']}, p99 {r['p99_ms'] or 0:.0f} ms, "
                  f"store {r['object_store_mb']:.1f} MB, driver {r['rss_mb']['driver']:.0f} MB, "
                  f"events {[e['event'] for e in events[-2:]]}", flush=True)
        sent = {name: camera.stop() for name, camera in cameras.items()}
        hostile_sent = hostile.stop()
        time.sleep(5)
        snap_books = sample(agent, decisions, time.time())["books"]
        deadline = time.time() + 120
        while time.time() < deadline and any(snap_books.get(c, {}).get("in_flight") or snap_books.get(c, {}).get(
                "queued") for c in sent):
            time.sleep(2)
            snap_books = sample(agent, decisions, time.time())["books"]
        decisions.close()
    finally:
        agent.stop(drain=False)
    warm = [r for r in records if r["t"] - started >= args.warmup * 60] or records
    judged = judge(records, warm, snap_books, sent, hostile_sent, log_start)
    result = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "args": " ".join(sys.argv[1:]),
              "minutes": args.minutes, "warmup_min": args.warmup,
              "cameras": args.cameras, "load": args.load, "capacity_fps": capacity, "fps_per_camera": fps,
              "retrain_every_min": args.retrain_every, "judged": judged, "events": events, "records": records}
    (out / "soak.json").write_text(json.dumps(result, indent=2, default=str))
    plot(records, events, out / "soak.png")
    text = render(result)
    print(text)
    if not args.no_results:
        update_section(ROOT / "docs" / "results.md", "soak", text)


if __name__ == "__main__":
    main()
