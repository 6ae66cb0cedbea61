"""Hostile-peer benchmark (`make bench`, through bench_agent.py): a well-behaved camera's latency while
another peer attacks the same ingest endpoint, as a ratio to its quiet latency, attack by attack.

Real Ray, ZeroMQ on loopback, Magnetic Tile frames, default agent settings (every-frame mode). The
victim sends at a fixed rate well under capacity; each attack runs for `--seconds` from its own thread
(junk at a fixed rate, frames as fast as the agent takes them). Latency is the victim's capture
timestamp → decision received by a subscriber. On a shared 2-core box the attacker's own CPU counts
too: compare the ratios of one run, not seconds across runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import ray
import zmq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from adtr_edge.agent.http import start_http
from adtr_edge.agent.runner import Agent
from adtr_edge.agent.settings import AgentSettings, load_settings

from hostile import StrictDecisions, corrupt_jpegs, flat_jpeg, nested_json, parse_metrics, scrape
from results_table import update_section


def _header(camera: str, seq, width: int, height: int, ts=None, **extra) -> bytes:
    return json.dumps({"v": 1, "camera_id": camera, "seq": seq, "ts": time.time() if ts is None else ts,
                       "encoding": "jpeg", "width": width, "height": height, **extra}).encode()


def _push(context: zmq.Context, endpoint: str, sndhwm: int = 16) -> zmq.Socket:
    sock = context.socket(zmq.PUSH)
    sock.sndhwm, sock.linger = sndhwm, 0
    sock.connect(endpoint)
    return sock


class Attack:
    """An attack: `step(i)` sends one unit of it; `rate` units/s (0 = as fast as the agent takes them)."""

    def __init__(self, name: str, what: str, rate: float, step):
        self.name, self.what, self.rate, self.step = name, what, rate, step


def attacks(context: zmq.Context, agent: Agent, server, jpeg: bytes, w: int, h: int) -> list[Attack]:
    endpoint = agent.bound_ingest[0]
    junk = _push(context, endpoint, sndhwm=1000)
    frames = _push(context, endpoint)
    max_payload = agent.cfg.ingest.max_payload_bytes
    oversize = bytes(2 * max_payload)
    huge = flat_jpeg(6000, 6000)
    broken = corrupt_jpegs(jpeg)
    many_parts = json.dumps({"camera_id": "named", "pad": "x" * (1 << 20)}).encode()
    slow: list[socket.socket] = []

    def oversize_step(i):
        sock = _push(context, endpoint, sndhwm=1)
        sock.send_multipart([_header("big", i, w, h), oversize], copy=False)
        time.sleep(0.05)
        sock.close()

    def huge_step(i):
        frames.send_multipart([_header("heavy", i, 6000, 6000), huge])

    def six_step(i):  # the case: six small frames that decode to 6000x6000, every 2 s
        for k in range(6):
            frames.send_multipart([_header("heavy6", 6 * i + k, 6000, 6000), huge])

    def corrupt_step(i):
        junk.send_multipart([_header("broken", i, w, h), broken["half_with_eoi"]])
        junk.send_multipart([_header("broken", i, 6000, 6000), broken["sof_6000"]])

    def junk_step(i):
        junk.send_multipart([nested_json(1500), jpeg])
        junk.send_multipart([_header("x", 10**400, w, h), jpeg])
        junk.send_multipart([_header("x", i, w, h, v=True, ts=10**400), jpeg])
        junk.send_multipart([_header("cam\n", i, w, h), jpeg])

    def spray_step(i):
        junk.send_multipart([_header(f"spray-{i}", 0, w + 1, h), jpeg])

    def seq_step(i):
        frames.send_multipart([_header("poison", (i % 3) * 10**9 + i, w, h, ts=time.time() * 1000), jpeg])

    def parts_step(i):
        junk.send_multipart([many_parts, jpeg, b"x"])

    def http_step(i):
        if not slow:  # 300 clients that never finish their request, then a scrape flood
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", server.port))
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                slow.append(s)
        for s in slow:
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                slow.remove(s)
                s2 = socket.create_connection(("127.0.0.1", server.port))
                s2.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                slow.append(s2)
        threads = [threading.Thread(target=lambda: scrape(server.url, 60)) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return [
        Attack("oversize", f"a message part of {2 * max_payload >> 20} MiB (over max_payload_bytes), reconnecting",
               10, oversize_step),
        Attack("many_parts", "3-part messages with a 1 MiB JSON first part", 100, parts_step),
        Attack("huge_frames", "90 KB JPEGs that decode to 6000x6000, as fast as taken", 0, huge_step),
        Attack("six_huge", "six such frames every 2 s (the issue's case)", 0.5, six_step),
        Attack("corrupt_jpeg", "half a JPEG + FF D9; a SOF rewritten to 6000x6000", 100, corrupt_step),
        Attack("junk_headers", "nested JSON, seq/ts 10**400, v: true, camera `cam\\n`", 100, junk_step),
        Attack("label_spray", "refused frames naming a new camera each", 400, spray_step),
        Attack("seq_clock_poison", "valid frames: seq jumps of 10^9, a clock in ms", 10, seq_step),
        Attack("http", "300 trickling half-sent requests + 20 concurrent scrapes per step", 2, http_step),
    ]


def victim_phase(agent: Agent, context: zmq.Context, decisions: StrictDecisions, frames, fps: float,
                 seconds: float, attack: Attack | None, start_seq: int) -> dict:
    camera = _push(context, agent.bound_ingest[0])
    stop = threading.Event()
    steps = [0]

    def run_attack():
        next_at = time.monotonic()
        while not stop.is_set():
            attack.step(steps[0])
            steps[0] += 1
            if attack.rate:
                next_at += 1.0 / attack.rate
                stop.wait(max(0.0, next_at - time.monotonic()))

    attacker = threading.Thread(target=run_attack, daemon=True) if attack else None
    if attacker:
        attacker.start()
        time.sleep(1.0)  # the attack is under way before the victim is measured
    seq, started = start_seq, time.monotonic()
    next_at = started
    while time.monotonic() - started < seconds:
        data, w, h = frames[seq % len(frames)]
        camera.send_multipart([_header("victim", seq, w, h), data])
        seq += 1
        next_at += 1.0 / fps
        time.sleep(max(0.0, next_at - time.monotonic()))
    sent = seq - start_seq
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(1 for d in decisions.of("victim") if d["seq"] >= start_seq) < sent:
        time.sleep(0.1)
    stop.set()
    if attacker:
        attacker.join(timeout=60)
    camera.close()
    got = [d for d in decisions.of("victim") if d["seq"] >= start_seq]
    latency = np.array([(d["_received_at"] - d["ts"]) * 1000.0 for d in got]) if got else np.array([np.nan])
    return {"sent": sent, "decided": len(got), "attack_steps": steps[0],
            "p50_ms": float(np.percentile(latency, 50)), "p99_ms": float(np.percentile(latency, 99)),
            "max_ms": float(latency.max())}


def run(model_dir: Path, data: str, out: Path, seconds: float = 20.0, fps: float = 5.0, readme: bool = True,
        overrides: list[str] = ()) -> dict:
    from adtr_edge.model.checkpoint import read_manifest
    from adtr_edge.model.config import AdtrConfig
    from adtr_edge.model.data import load_dataset

    cfg = load_settings(overrides=[*overrides, "http.port=0", "output.save_anomalies=true",
                                   f"output.dir={out / 'hostile-anomalies'}"], kind=AgentSettings)
    model_cfg = AdtrConfig.model_validate(read_manifest(model_dir)["settings"])
    paths = [s.path for s in load_dataset(data, model_cfg.data).test[:48]]
    import cv2

    frames = [(p.read_bytes(), *cv2.imread(str(p)).shape[1::-1]) for p in paths if p.suffix.lower() == ".jpg"]
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "model": str(model_dir),
                     "victim_fps": fps, "seconds": seconds, "machine": {"platform": platform.platform()},
                     "phases": {}}
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    agent = Agent(model_dir, ["tcp://127.0.0.1:*"], "tcp://127.0.0.1:*", cfg).start()
    server = start_http(agent)
    context = zmq.Context()
    decisions = StrictDecisions(agent.bound_results)
    try:
        seq = 0
        victim_phase(agent, context, decisions, frames, fps, 5.0, None, seq)  # warm-up
        seq += 10_000
        quiet = victim_phase(agent, context, decisions, frames, fps, seconds, None, seq)
        results["phases"]["quiet"] = quiet
        for attack in attacks(context, agent, server, *frames[0]):
            seq += 10_000
            phase = victim_phase(agent, context, decisions, frames, fps, seconds, attack, seq)
            phase.update(what=attack.what, p50_ratio=phase["p50_ms"] / quiet["p50_ms"],
                         p99_ratio=phase["p99_ms"] / quiet["p99_ms"])
            parse_metrics(scrape(server.url, 60))  # /metrics still answers, strictly parseable
            results["phases"][attack.name] = phase
            print(f"{attack.name:18s} victim p50 {phase['p50_ms']:7.0f} ms ({phase['p50_ratio']:.2f}x) "
                  f"p99 {phase['p99_ms']:7.0f} ms ({phase['p99_ratio']:.2f}x) decided {phase['decided']}/"
                  f"{phase['sent']}, {phase['attack_steps']} attack steps", flush=True)
            # Let the agent drain what the attack left queued before the next phase.
            time.sleep(2.0)
        results["not_json_decisions"] = len(decisions.not_json)
    finally:
        decisions.close()
        server.shutdown()
        agent.stop(drain=False)
        context.term()
        if started_ray:
            ray.shutdown()
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostile.json").write_text(json.dumps(results, indent=2))
    if readme:
        update_section(ROOT / "docs" / "results.md", "hostile-bench", render(results))
    return results


def render(r: dict) -> str:
    q = r["phases"]["quiet"]
    lines = [f"Measured by `make bench` on {r['date'][:10]} (this 2-core box, no GPU), model `{r['model']}`, default "
             f"agent settings; a victim camera at {r['victim_fps']:g} fps on the same endpoint as the attacker, "
             f"{r['seconds']:g} s per attack. Quiet: p50 {q['p50_ms']:.0f} ms, p99 {q['p99_ms']:.0f} ms.", "",
             "| attack | victim p50 | × quiet | victim p99 | × quiet | victim frames decided |",
             "|---|---|---|---|---|---|"]
    for name, p in r["phases"].items():
        if name == "quiet":
            continue
        lines.append(f"| {name}: {p['what']} | {p['p50_ms']:.0f} ms | {p['p50_ratio']:.2f} | {p['p99_ms']:.0f} ms | "
                     f"{p['p99_ratio']:.2f} | {p['decided']}/{p['sent']} |")
    lines += ["", f"Decisions that were not strict JSON: {r.get('not_json_decisions', 0)}. /metrics parsed by "
              "prometheus_client after every attack."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--model", default="runs/bench/adtr-edge")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--fps", type=float, default=5.0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    run(Path(args.model), args.data, Path(args.out), args.seconds, args.fps, not args.no_readme, args.set)


if __name__ == "__main__":
    main()
