"""Agent benchmarks (`make bench`): live pipeline throughput vs the raw batched model, and end-to-end
latency at 50% and 90% of capacity. Real Ray, real ZeroMQ on loopback, real Magnetic Tile frames.

Raw model: `AnomalyDetector.score_images` on decoded frames, at the batch size and torch threads the
agent's inference actor chose for itself (its tuning table and its check under load are reported), in this
process, measured before and after the agent runs. Agent: the same model behind ingest → inference → scoring, fed by a
PUSH camera as fast as it accepts frames (every-frame mode, so nothing is shed). Both in one run, on
one machine. With --splits, the agent again for each thread split of the box's cores (torch threads
of inference, decode threads of the ingest, scoring threads), at the tuned batch size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import ray
import structlog
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from adtr_edge.agent.publisher import FramePublisher, SourceFrame, frame_from_file
from adtr_edge.agent.runner import Agent, totals
from adtr_edge.agent.settings import AgentSettings, load_settings
from adtr_edge.model.data import load_dataset, read_image
from adtr_edge.model.detector import load_detector

from live import Decisions
from results_table import plural, update_section

log = structlog.get_logger("bench-agent")


def frames_of(data: str, model_dir: Path, count: int) -> list[Path]:
    from adtr_edge.model.checkpoint import read_manifest
    from adtr_edge.model.config import AdtrConfig

    cfg = AdtrConfig.model_validate(read_manifest(model_dir)["settings"])
    test = load_dataset(data, cfg.data).test
    return [s.path for s in test[:count]]


def raw_throughput(model_dir: Path, paths: list[Path], batch: int, threads: int, backbone_only: bool = False) -> float:
    """Frames/s of the model alone: decoded images in, scores out, batch after batch. `backbone_only`:
    resize + backbone features only, the bound every frame pays before the model's own work."""
    torch.set_num_threads(threads)
    detector = load_detector(model_dir)
    images = [read_image(p) for p in paths]
    run = detector.embed if backbone_only else detector.score_images
    with torch.inference_mode():
        run(images[:batch])  # warm-up
        started = time.perf_counter()
        for i in range(0, len(images), batch):
            run(images[i : i + batch])
    return len(images) / (time.perf_counter() - started)


def publish_at(agent: Agent, camera: str, frames: list[SourceFrame], count: int, fps: float = 0.0) -> float:
    """Send `count` frames (PUSH: blocks while the agent is full); returns the offered rate."""
    publisher = FramePublisher(agent.bound_ingest[0], camera, sndhwm=16)
    started = next_at = time.monotonic()
    for i in range(count):
        publisher.send(frames[i % len(frames)])
        if fps:
            next_at += 1.0 / fps
            time.sleep(max(0.0, next_at - time.monotonic()))
    rate = count / (time.monotonic() - started)
    publisher.close()
    return rate


def agent_run(agent: Agent, camera: str, frames: list[SourceFrame], count: int, fps: float = 0.0) -> dict:
    decisions = Decisions(agent.bound_results)
    sender = threading.Thread(target=publish_at, args=(agent, camera, frames, count, fps))
    sender.start()
    done = decisions.wait_for(count, timeout_s=count / max(fps, 1.0) + 600)
    sender.join()
    decisions.close()
    keys = sorted(decisions.by_key, key=lambda k: decisions.received_at[k])
    warm = keys[min(len(keys) - 1, max(8, count // 10)):]  # leave out the warm-up
    span = decisions.received_at[warm[-1]] - decisions.received_at[warm[0]]
    latency = np.array([decisions.received_at[k] - decisions.by_key[k]["ts"] for k in warm]) * 1000.0
    batch = np.array([decisions.by_key[k]["batch_size"] for k in warm])
    return {"frames": count, "decided": len(keys), "complete": done,
            "frames_per_second": (len(warm) - 1) / span if span > 0 else None,
            "latency_ms_p50": float(np.percentile(latency, 50)), "latency_ms_p99": float(np.percentile(latency, 99)),
            "mean_batch": float(batch.mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--model", default="runs/bench/adtr-edge", help="trained model (trained with defaults if missing)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--frames", type=int, default=400)
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument("--set", action="append", default=[], help="agent setting override, e.g. inference.max_batch=16")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--no-hostile", action="store_true", help="skip the hostile-peer benchmark (bench_hostile.py)")
    p.add_argument("--splits", default="2,2,1;2,1,1;1,1,1;1,2,1;2,1,2",
                   help="thread splits to compare, 'torch,decode,scoring;…' ('' = none)")
    p.add_argument("--split-frames", type=int, default=200)
    args = p.parse_args()
    model_dir = Path(args.model)
    if not (model_dir / "manifest.json").is_file():
        from adtr_edge.model.train import train_model

        model_cfg = load_settings()
        train_model(model_cfg, load_dataset(args.data, model_cfg.data), model_dir, progress=False)
    cfg = load_settings(overrides=[*args.set, "http.enabled=false", "output.save_anomalies=false"], kind=AgentSettings)
    paths = frames_of(args.data, model_dir, 200)
    frames = [frame_from_file(q) for q in paths]
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                                 "load_average_start": os.getloadavg()},
                     "model": str(model_dir), "settings": args.set}
    ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    agent = Agent(model_dir, ["tcp://127.0.0.1:*"], "tcp://127.0.0.1:*", cfg).start()
    try:
        started = agent.snapshot()["inference"]  # max_batch: what it serves now (a check's turn while one runs)
        table_batch = started["tuning"].get("batch") or started["max_batch"]
        agent_run(agent, "warm-up", frames, 3 * table_batch)
        check_frames = settle(agent, frames)  # the table's contenders, timed again under this load
        inference = agent.snapshot()["inference"]
        batch, threads = inference["max_batch"], inference["torch_threads"]
        results.update(tuning=inference["tuning"], max_batch=batch, torch_threads=threads, table_batch=table_batch,
                       load_check_frames=check_frames)
        raw_before = raw_throughput(model_dir, paths, batch, threads)  # the agent's actors idle meanwhile
        backbone_before = raw_throughput(model_dir, paths, batch, threads, backbone_only=True)
        saturated = agent_run(agent, "saturation", frames, args.frames)
        capacity = saturated["frames_per_second"]
        latency = {}
        for share in (0.5, 0.9):
            n = max(20, int(capacity * share * args.latency_seconds))
            latency[f"{int(share * 100)}%"] = dict(agent_run(agent, f"load-{int(share * 100)}", frames, n,
                                                             fps=capacity * share), offered_fps=capacity * share)
        time.sleep(0.5)  # the last decisions reach the ingest's counters
        snap = agent.snapshot()
        accounting = totals([snap[k] for k in snap if k.startswith("ingest-")])
        costs = frame_costs(snap)
    finally:
        agent.stop()
    raw_after = raw_throughput(model_dir, paths, batch, threads)
    backbone_after = raw_throughput(model_dir, paths, batch, threads, backbone_only=True)
    raw, backbone = (raw_before + raw_after) / 2, (backbone_before + backbone_after) / 2
    results.update({"raw_frames_per_second": raw, "raw_before": raw_before, "raw_after": raw_after,
                    "backbone_frames_per_second": backbone, "backbone_before": backbone_before,
                    "backbone_after": backbone_after,
                    "agent_saturation": saturated, "agent_vs_raw": capacity / raw, "latency": latency,
                    "accounting": accounting, "costs_ms": costs})
    if args.splits:
        results["splits"] = [run_split(model_dir, frames, args, batch, split) for split in args.splits.split(";")]
    ray.shutdown()
    results["machine"]["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agent.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({"batch": batch, "threads": threads, "raw_fps": round(raw, 1), "agent_fps": round(capacity, 1),
                      "ratio": round(capacity / raw, 3), "costs_ms": costs,
                      **{k: (round(v["latency_ms_p50"]), round(v["latency_ms_p99"])) for k, v in latency.items()},
                      "splits": [(s["split"], round(s["frames_per_second"] or 0, 1))
                                 for s in results.get("splits", [])]}))
    if not args.no_readme:
        update_section(ROOT / "docs" / "results.md", "agent-bench", render(results))
    if not args.no_hostile:  # `make bench` runs this script: the hostile-peer benchmark comes with it
        from bench_hostile import run as run_hostile

        run_hostile(model_dir, args.data, out, readme=not args.no_readme, overrides=args.set)


def frame_costs(snap: dict) -> dict:
    """Mean decode (ingest) and scoring cost per frame, in ms, from the actors' own stats."""
    ingests = [snap[k] for k in snap if k.startswith("ingest-") and snap[k]]
    decode_n = sum(i["decode_seconds_count"] for i in ingests)
    scoring = snap.get("scoring") or {}
    return {"decode": 1000 * sum(i["decode_seconds_sum"] for i in ingests) / decode_n if decode_n else None,
            "scoring": (1000 * scoring["seconds_sum"] / scoring["seconds_count"]
                        if scoring.get("seconds_count") else None)}


def run_split(model_dir: Path, frames: list, args, batch: int, split: str) -> dict:
    """The agent at saturation with one thread split: "T,D,S" = torch threads, decode threads, scoring threads."""
    t, d, sc = (int(x) for x in split.split(","))
    cfg = load_settings(overrides=[*args.set, "http.enabled=false", "output.save_anomalies=false",
                                   f"inference.max_batch={batch}", f"inference.torch_threads={t}",
                                   f"ingest.decode_threads={d}", f"scoring.threads={sc}"], kind=AgentSettings)
    agent = Agent(model_dir, ["tcp://127.0.0.1:*"], "tcp://127.0.0.1:*", cfg).start()
    try:
        agent_run(agent, "warm-up", frames, 3 * batch)
        run = agent_run(agent, f"split-{t}-{d}-{sc}", frames, args.split_frames)
        costs = frame_costs(agent.snapshot())
    finally:
        agent.stop()
    log.info("split", split=split, fps=run["frames_per_second"], costs_ms=costs)
    return {"split": split, "torch_threads": t, "decode_threads": d, "scoring_threads": sc,
            "frames_per_second": run["frames_per_second"], "latency_ms_p50": run["latency_ms_p50"], "costs_ms": costs}


def settle(agent: Agent, frames: list[SourceFrame], per_run: int = 60, most_runs: int = 20) -> int:
    """Keep the agent saturated until its inference actor's check under load has ended (progress, not a
    fixed time): the frames it took, 0 when there was nothing to check. A check still running after
    `most_runs` is reported as it stands (the benchmark then measures the contender whose turn it is)."""
    sent = 0
    for i in range(most_runs):
        inference = agent.snapshot().get("inference") or {}
        check = (inference.get("tuning") or {}).get("load_check")
        if check is None or check["state"] in ("done", "expired"):
            return sent
        agent_run(agent, f"load-check-{i}", frames, per_run)
        sent += per_run
    log.warning("the check under load has not ended", frames=sent)
    return sent


def render(r: dict) -> str:
    s, m, t = r["agent_saturation"], r["machine"], r["tuning"]
    load = f"load average {m['load_average_start'][0]:.1f} → {m['load_average_end'][0]:.1f}"
    lines = [f"Measured by `make bench` on {r['date'][:10]} ({m['cpus']} CPUs, {m['gpu'] or 'no GPU'}; {load} on this "
             f"shared box), model `{r['model']}`, Magnetic Tile test frames as the camera's own JPEG bytes, "
             "every-frame mode, default settings: the inference actor tuned itself to "
             f"batch {r['max_batch']} × {plural(r['torch_threads'], 'torch thread')} ({t.get('state')}, budget "
             f"{t.get('budget_ms', '—')} ms).", "",
             "| | frames/s | ratio to raw model | p50 latency | p99 latency | mean batch |",
             "|---|---|---|---|---|---|",
             f"| raw model (`score_images`, in-process, batch {r['max_batch']}, "
             f"{plural(r['torch_threads'], 'thread')}) | "
             f"{r['raw_frames_per_second']:.1f} | 1.00 | — | — | {r['max_batch']} |",
             f"| agent at saturation (camera → decision) | {s['frames_per_second']:.1f} | {r['agent_vs_raw']:.2f} | "
             f"{s['latency_ms_p50']:.0f} ms | {s['latency_ms_p99']:.0f} ms | {s['mean_batch']:.1f} |"]
    if r.get("backbone_frames_per_second"):  # results written before this row existed lack it
        lines.insert(-1, f"| backbone alone (resize + features, in-process, same batch and threads; the bound) | "
                         f"{r['backbone_frames_per_second']:.1f} | "
                         f"{r['backbone_frames_per_second'] / r['raw_frames_per_second']:.2f} | — | — | "
                         f"{r['max_batch']} |")
    for share, v in r["latency"].items():
        lines.append(f"| agent at {share} of capacity ({v['offered_fps']:.1f} fps offered) | "
                     f"{v['frames_per_second']:.1f} | — | {v['latency_ms_p50']:.0f} ms | "
                     f"{v['latency_ms_p99']:.0f} ms | {v['mean_batch']:.1f} |")
    costs = r["costs_ms"]
    lines += ["", f"The raw model was measured before and after the agent in the same run "
              f"({r['raw_before']:.1f} and {r['raw_after']:.1f} frames/s); the ratio uses their mean"
              + (f", and so was the backbone alone ({r['backbone_before']:.1f} and "
                 f"{r['backbone_after']:.1f}): the agent "
                 f"keeps {s['frames_per_second'] / r['backbone_frames_per_second']:.2f} × the backbone's own rate"
                 if r.get("backbone_frames_per_second") else "") + ". Latency is "
              "capture timestamp → decision received by a subscriber. Per frame, from the actors' own stats: decode + "
              f"resize {costs['decode']:.1f} ms (ingest), scoring {costs['scoring']:.1f} ms.", "",
              "The inference actor's tuning table (forward pass of frames at the model's size; frames/s from the "
              "median of its passes):", "",
              "| torch threads | batch | ms per batch | frames/s | within budget |", "|---|---|---|---|---|"]
    for row in t.get("table", []):
        lines.append(f"| {row['threads']} | {row['batch']} | {row['ms'] if row['ms'] is not None else '—'} | "
                     f"{row['frames_per_second']:.1f} | {'yes' if row['within_budget'] else 'no'} |")
    check = t.get("load_check")
    if check and check.get("table"):
        lines += ["", (f"Then its check under load: the table chose batch {r.get('table_batch', '—')}; once the "
                       f"agent was saturated ({r.get('load_check_frames', '—')} frames), the contenders took turns on "
                       f"live batches and batch {check.get('batch') or '—'} served from then on:"), "",
                  "| batch | ms per batch (live, median) | frames/s | live batches |", "|---|---|---|---|"]
        for row in check["table"]:
            fps = row["frames_per_second"]
            lines.append(f"| {row['batch']} | {row['ms'] if row['ms'] is not None else '—'} | "
                         f"{f'{fps:.1f}' if fps is not None else '—'} | {row['passes']} |")
    if r.get("splits"):
        lines += ["", f"Thread splits of the box (each its own agent at batch {r['max_batch']}, saturation, "
                  "same run):", "",
                  "| torch threads (inference) | decode threads (ingest) | scoring threads | frames/s | "
                  "decode ms/frame | scoring ms/frame |", "|---|---|---|---|---|---|"]
        for sp in r["splits"]:
            c = sp["costs_ms"]
            lines.append(f"| {sp['torch_threads']} | {sp['decode_threads']} | {sp['scoring_threads']} | "
                         f"{sp['frames_per_second']:.1f} | {c['decode']:.1f} | {c['scoring']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
