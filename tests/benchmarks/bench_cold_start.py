"""A new camera taught on the box while another camera streams: how long, and what the other camera feels.

One run, real parts: the agent serving a registry (its own Ray head with Ray Jobs), camera `line`
streaming Magnetic Tile at 50 % of the agent's measured capacity throughout. Then `points add` for a
camera showing a product the model never saw (Magnetic Tile inverted), streaming at `--fps-new`:
its first `--frames` frames are recorded, a retrain job builds its first model, which is shadowed;
the benchmark promotes it (as the operator would) the moment it is offered.

Reports: first frame → gated candidate → promoted; the other camera's frames/s and p99 latency while
it happened against before (ratios, one run); false alarms on the new camera's next normals under the
new model and under the template model (the control: what the camera would get without teaching).

    python tests/benchmarks/bench_cold_start.py --model runs/bench/adtr-edge
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import cv2
import ray

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_learning import camera_at_half_load

from adtr_edge.agent.operate import import_base
from adtr_edge.agent.publisher import FramePublisher, SourceFrame, frame_from_file
from adtr_edge.agent.runner import Agent
from adtr_edge.agent.settings import AgentSettings, load_settings
from adtr_edge.lifecycle.registry import Registry
from adtr_edge.model.data import load_dataset, resize_image
from adtr_edge.model.detector import load_detector

from bench_agent import frames_of
from live import wait_until
from results_table import update_section


def inverted(path: Path) -> SourceFrame:
    image = 255 - cv2.imread(str(path))
    return SourceFrame(path.name, encoded=cv2.imencode(".jpg", image)[1].tobytes(), encoding="jpeg")


def stream(agent: Agent, camera: str, frames: list[SourceFrame], fps: float,
           stop: threading.Event) -> tuple[FramePublisher, threading.Thread]:
    publisher = FramePublisher(agent.bound_ingest[0], camera, sndhwm=1000)

    def run():
        next_at, i = time.monotonic(), 0
        while not stop.is_set() and i < len(frames):
            publisher.send(frames[i])
            i += 1
            next_at += 1.0 / fps
            time.sleep(max(0.0, next_at - time.monotonic()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return publisher, thread


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--model", default="runs/bench/adtr-edge")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--frames", type=int, default=200, help="frames the new camera records (cold_start.frames)")
    p.add_argument("--fps-new", type=float, default=5.0)
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    model_dir, out = Path(args.model), Path(args.out) / "cold-start"
    if not (model_dir / "manifest.json").is_file():
        raise SystemExit(f"{model_dir}: no model (make bench trains runs/bench/adtr-edge; or pass --model)")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    registry = Registry.create(out / "registry", model_dir, by="bench")
    import_base(registry, args.data, "bench")
    cfg = load_settings(overrides=["http.enabled=false", "output.save_anomalies=false", f"state_dir={out / 'state'}",
                                   f"points_dir={out / 'points'}", "learning.guard.enabled=false",
                                   "learning.auto_sample.enabled=false"], kind=AgentSettings)
    frames = [frame_from_file(q) for q in frames_of(args.data, model_dir, 120)]
    dataset = load_dataset(args.data, load_settings().data)
    normals = [s.path for s in [*dataset.test, *dataset.val, *dataset.train] if s.label == 0]
    recorded, later = normals[: args.frames + 40], normals[args.frames + 40: args.frames + 100]
    agent = Agent(registry.root, ["tcp://127.0.0.1:*"], "tcp://127.0.0.1:*", cfg).start()
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "model": str(model_dir),
                     "frames": args.frames, "fps_new": args.fps_new}
    try:
        camera, capacity, idle = camera_at_half_load(agent, frames)
        results.update(capacity_fps=capacity, idle=idle)

        first = time.time()
        agent.add_point("new", ["cam-new"], "bench", args.frames)
        stop = threading.Event()
        new_cam, sender = stream(agent, "cam-new", [inverted(q) for q in recorded], args.fps_new, stop)
        manager = agent.points["new"].manager

        def state() -> dict:
            return ray.get(manager.status.remote(), timeout=30)["cold_start"] or {}

        if not wait_until(lambda: state().get("state") == "candidate", 1800, 1.0):
            raise SystemExit(f"no candidate: {state()}")
        candidate_at = time.time()
        cold = state()
        ray.get(manager.promote.remote(cold["candidate"], "bench"), timeout=300)
        promoted_at = time.time()
        stop.set()
        sender.join(timeout=30)
        results.update(first_frame_to_candidate_s=candidate_at - first, first_frame_to_promoted_s=promoted_at - first,
                       recording_s=cold["recorded_at"] - first, other_camera=camera.window(first, promoted_at))
        seq0 = new_cam.seq  # the new camera's next normals, decided by its own model now
        for q in later:
            new_cam.send(inverted(q))

        def keys() -> list:
            return [k for k in camera.decisions.by_key if k[0] == "cam-new" and k[1] >= seq0]

        wait_until(lambda: len(keys()) >= len(later), 300)
        decided = [camera.decisions.by_key[k] for k in keys()]
        results["new_model_false_alarms"] = sum(d["is_anomaly"] for d in decided) / max(1, len(decided))
        results["new_model_inspected"] = all(d["inspected"] for d in decided)
        camera.close()
        new_cam.close()
    finally:
        agent.stop(drain=False)
    template = load_detector(model_dir)
    images = [resize_image(cv2.cvtColor(255 - cv2.imread(str(q)), cv2.COLOR_BGR2RGB), template.image_size)
              for q in later]
    results["template_false_alarms"] = float((template.score_images(images).scores > template.threshold)
                                             .float().mean())
    (Path(args.out) / "cold_start.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, default=str))
    if not args.no_readme:
        update_section(ROOT / "docs" / "results.md", "cold-start-bench", render(results))
    return 0


def render(r: dict) -> str:
    idle, during = r["idle"], r["other_camera"]
    return "\n".join([
        f"Measured by `python tests/benchmarks/bench_cold_start.py` on {r['date'][:10]} (2 CPU threads, no GPU), "
        f"model `{r['model']}`: camera `line` at 50 % of the agent's capacity ({r['capacity_fps']:.1f} frames/s) "
        f"throughout; a new camera showing inverted Magnetic Tile at {r['fps_new']:g} frames/s, "
        f"{r['frames']} frames recorded, promoted the moment its first model was offered.",
        "",
        "| new camera | seconds |",
        "|---|---|",
        f"| first frame → recording complete | {r['recording_s']:.0f} |",
        f"| first frame → gated candidate (shadowed) | {r['first_frame_to_candidate_s']:.0f} |",
        f"| first frame → promoted, inspecting | {r['first_frame_to_promoted_s']:.0f} |",
        "",
        "| camera `line` | frames/s | ratio | p99 latency | ratio |",
        "|---|---|---|---|---|",
        f"| before | {idle['frames_per_second']:.1f} | 1.00 | {idle['latency_ms_p99']:.0f} ms | 1.00 |",
        f"| while the new camera was taught | {during['frames_per_second']:.1f} | "
        f"{during['frames_per_second'] / idle['frames_per_second']:.2f} | {during['latency_ms_p99']:.0f} ms | "
        f"{during['latency_ms_p99'] / idle['latency_ms_p99']:.2f} |",
        "",
        f"False alarms on the new camera's next 60 normals: **{r['new_model_false_alarms']:.2f}** with its own first "
        f"model, {r['template_false_alarms']:.2f} with the template model (the control).",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
