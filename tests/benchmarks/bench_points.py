"""Inspection points on one box: frames/s and memory of the inference actor with 1 point and with 3.

Three layouts, each in a fresh process (so one's memory cannot inflate another's), alternated
`--rounds` times in one run (this box is noisy: compare within a run):
  one      1 point, every frame to it (today's single-model agent);
  shared   3 points on one backbone (the agent's `points`): frames spread over the points, one batch;
  separate 3 single-point inference actors (what three agents on the box would hold): three backbones,
           three batch loops competing for the cores.
With three `--model`s (one per point: e.g. Magnetic Tile, ELPV mono, ELPV poly) each point serves its own;
`one` serves the first. Every layout runs the same real Magnetic Tile test frames at the model's size,
batch and threads pinned
(`--batch`, `--threads`), as concurrent calls of `--chunk` frames (what the ingest sends).

    python tests/benchmarks/bench_points.py --model runs/bench/adtr-edge --rounds 2

Prints a table; writes runs/bench/points.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LAYOUTS = ("one", "shared", "separate")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def registries(models: list[Path], root: Path, n: int) -> list[str]:
    """n registries: the n models given (one per point), or n copies of the one model under versions of
    their own."""
    from adtr_edge.lifecycle.registry import Registry

    out = []
    for i in range(n):
        copy = root / f"model-{i}"
        if not copy.exists():
            shutil.copytree(models[i % len(models)], copy)
            manifest = json.loads((copy / "manifest.json").read_text())
            manifest["model_version"] = f"point-{i}-{manifest['model_version']}"
            (copy / "manifest.json").write_text(json.dumps(manifest))
        reg = root / f"registry-{i}"
        out.append(str((Registry(reg) if reg.exists() else Registry.create(reg, copy, by="bench")).root))
    return out


def child(args) -> dict:

    from adtr_edge.actors.config import InferenceConfig
    from adtr_edge.actors.inference import InferenceActor
    from adtr_edge.agent.settings import load_settings
    from adtr_edge.model.data import load_dataset, read_image, resize_image

    cfg = InferenceConfig(max_batch=args.batch, torch_threads=args.threads, max_wait_ms=2.0)
    paths = registries(args.model, args.work, 3)
    before = rss_mb()
    started = time.perf_counter()
    if args.layout == "one":
        actors = [(InferenceActor(paths[0], cfg), "default")]
    elif args.layout == "shared":
        shared = InferenceActor({f"p{i}": p for i, p in enumerate(paths)}, cfg)
        actors = [(shared, f"p{i}") for i in range(3)]
    else:
        actors = [(InferenceActor(p, cfg), "default") for p in paths]
    load_s = time.perf_counter() - started
    loaded = rss_mb()
    size = actors[0][0].serving.detector.image_size
    dataset = load_dataset(str(args.data), load_settings().data)
    frames = [resize_image(read_image(s.path), size) for s in dataset.test[: args.frames]]

    async def run(frames_list):
        calls = []
        for i in range(0, len(frames_list), args.chunk):
            actor, point = actors[(i // args.chunk) % len(actors)]
            calls.append(actor.infer_batch(frames_list[i : i + args.chunk], point))
        return await asyncio.gather(*calls)

    async def timed():
        await run(frames[: 2 * args.chunk * len(actors)])  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            await run(frames)
        return time.perf_counter() - t0

    seconds = asyncio.run(timed())
    done = len(frames) * args.repeats
    return {"layout": args.layout, "points": 1 if args.layout == "one" else 3,
            "frames_per_second": done / seconds, "load_s": load_s,
            "rss_before_mb": before, "rss_loaded_mb": loaded, "rss_after_mb": rss_mb(),
            "models_mb": loaded - before, "image_size": size, "batch": args.batch, "threads": args.threads,
            "batches": sum(a.batch_sizes.n for a, _ in {id(a): (a, p) for a, p in actors}.values())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, nargs="+", default=[ROOT / "runs" / "bench" / "adtr-edge"],
                   help="one model (three copies serve the points) or three (one per point)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "magnetic-tile")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each inference actor (the box's cores)")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)  # a child's one measurement
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.layout:
        print(json.dumps(child(args)))
        return 0
    missing = [m for m in args.model if not (m / "manifest.json").is_file()]
    if missing or len(args.model) not in (1, 3):
        raise SystemExit(f"{missing or args.model}: one or three trained models (make bench trains "
                         "runs/bench/adtr-edge; or pass --model)")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for layout in LAYOUTS:
                cmd = [sys.executable, __file__, "--layout", layout, "--work", work, *sys.argv[1:]]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = dict(json.loads(out.stdout.strip().splitlines()[-1]), round=r)
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "points.json").write_text(json.dumps(rows, indent=1))
    table = render(rows, args)
    print(table)
    if not args.no_readme:
        from results_table import update_section

        update_section(ROOT / "docs" / "results.md", "points-bench", table)
    return 0


def render(rows: list[dict], args) -> str:
    one = statistics.median(r["frames_per_second"] for r in rows if r["layout"] == "one")
    names = " ".join(str(m) for m in args.model)
    lines = [f"Measured by `python tests/benchmarks/bench_points.py --model {names}` ({args.rounds} rounds, "
             f"layouts alternated, each in a fresh process; batch {args.batch}, {args.threads} torch thread(s), "
             f"{args.frames} Magnetic Tile frames × {args.repeats}, calls of {args.chunk}; medians):", "",
             "| layout | points | frames/s | vs 1 point | models' memory MB | process RSS MB |",
             "|---|---|---|---|---|---|"]
    for layout in LAYOUTS:
        its = [r for r in rows if r["layout"] == layout]
        fps = statistics.median(r["frames_per_second"] for r in its)
        lines.append(f"| {layout} | {its[0]['points']} | {fps:.1f} | {fps / one:.2f} | "
                     f"{statistics.median(r['models_mb'] for r in its):.0f} | "
                     f"{statistics.median(r['rss_after_mb'] for r in its):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
