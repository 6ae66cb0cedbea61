"""GPU benchmark of the inference path, in one process (gpu_bench.sh runs it, then the live agent).

1. The inference actor's own tuning (actors/tuning.py, run by `InferenceActor` itself) on the GPU, in fp32
   and in fp16 autocast + channels-last: the table and the batch it chose.
2. At the chosen batch: the full model (`embed` + `coarse_maps`, as the actor runs it) against the backbone
   alone, the bound any model on these features has.
3. JPEG decoding of real frames: batched on the GPU (actors/device_decode.py, nvJPEG) against the ingest's
   CPU path (strict libjpeg-turbo + OpenCV resize), per frame.
4. fp16 parity: the largest relative difference of the coarse maps, and of the image scores, against fp32.

Each part records its error and the rest go on, so one run always leaves a JSON. `--device cpu` runs
every part on the CPU (a dry run of this script on a machine without a GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adtr_edge.actors.config import InferenceConfig
from adtr_edge.actors.inference import InferenceActor


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rate(fn, device: str, seconds: float) -> float:
    fn()  # warm-up
    sync(device)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        n += fn()
    sync(device)
    return n / (time.perf_counter() - started)


def part(results: dict, name: str, fn) -> None:
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - a failed part is reported, the others still run
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    print(f"[{time.perf_counter() - started:6.1f} s] {name}: {json.dumps(results[name], default=str)[:600]}",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="trained model folder")
    p.add_argument("--frames", help="a folder of JPEG frames (searched recursively) for the decode part")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--budget-ms", type=float, default=100.0)
    p.add_argument("--tune-seconds", type=float, default=0.5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", default="runs/bench/gpu.json")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device visible (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True
    results: dict = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                     "torch": torch.__version__, "model": args.model, "budget_ms": args.budget_ms}
    actors: dict[str, InferenceActor] = {}

    def tune(half: bool):
        cfg = InferenceConfig(device=args.device, half=half, channels_last=half, latency_budget_ms=args.budget_ms,
                              tune_seconds=args.tune_seconds)
        actor = InferenceActor(args.model, cfg)
        actors["fp16" if half else "fp32"] = actor
        t = actor.tuned
        return {"batch": actor.max_batch, "threads": actor.threads, "seconds": t.get("seconds"), "table": t["table"]}

    part(results, "tuning_fp32", lambda: tune(False))
    part(results, "tuning_fp16_channels_last", lambda: tune(True))

    def bound():
        out = {}
        for name, actor in actors.items():
            det, batch = actor.serving.detector, actor.max_batch
            size = det.image_size
            frames = [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(batch)]

            def full(det=det, frames=frames, batch=batch):
                det.coarse_maps(det.embed(frames))  # back on the CPU: includes the copy, as in the actor
                return batch

            def backbone(det=det, frames=frames, batch=batch):
                with torch.inference_mode(), det._autocast():
                    det.backbone(det.preprocess(frames))
                return batch

            f, b = rate(full, args.device, args.seconds), rate(backbone, args.device, args.seconds)
            out[name] = {"batch": batch, "full_frames_per_second": f, "backbone_frames_per_second": b,
                         "full_vs_backbone": f / b}
        return out

    part(results, "full_vs_backbone", bound)

    def decode():
        from adtr_edge.actors.device_decode import decode_batch
        from adtr_edge.actors.protocol import decode_jpeg
        from adtr_edge.model.data import resize_image

        paths = sorted(Path(args.frames).rglob("*.jpg"))[:256] if args.frames else []
        if not paths:
            raise RuntimeError("no JPEG frames given (--frames)")
        payloads = [p.read_bytes() for p in paths]
        actor = actors.get("fp16") or actors.get("fp32")
        size, device = actor.serving.detector.image_size, torch.device(args.device)
        out = {"frames": len(payloads), "mean_jpeg_bytes": float(np.mean([len(b) for b in payloads]))}
        for batch in (1, 32, 128):
            chunks = [payloads[i: i + batch] for i in range(0, len(payloads), batch)]
            state = {"i": 0}

            def on_device(chunks=chunks, state=state):
                chunk = chunks[state["i"] % len(chunks)]
                state["i"] += 1
                decode_batch(chunk, size, device)
                return len(chunk)

            out[f"device_batch_{batch}_frames_per_second"] = rate(on_device, args.device, args.seconds)
        state = {"i": 0}

        def on_cpu():
            resize_image(decode_jpeg(payloads[state["i"] % len(payloads)]), size)
            state["i"] += 1
            return 1

        out["cpu_one_thread_frames_per_second"] = rate(on_cpu, "cpu", args.seconds)
        return out

    part(results, "jpeg_decode", decode)

    def parity():
        a, b = actors["fp32"].serving.detector, actors["fp16"].serving.detector
        size = a.image_size
        frames = [np.random.default_rng(100 + i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(8)]
        if args.frames:
            from adtr_edge.model.data import read_image

            frames = [read_image(q) for q in sorted(Path(args.frames).rglob("*.jpg"))[:8]] or frames
        ma, mb = a.coarse_maps(a.embed(frames)), b.coarse_maps(b.embed(frames))
        sa, sb = a.head.score(ma).scores, b.head.score(mb).scores
        return {"max_rel_map_diff": float(((ma - mb).abs() / ma.abs().clamp_min(1e-6)).max()),
                "max_rel_map_diff_vs_peak": float((ma - mb).abs().max() / ma.abs().max()),
                "max_rel_score_diff": float(((sa - sb).abs() / sa.abs().clamp_min(1e-6)).max())}

    part(results, "fp16_parity", parity)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "table"})
                      for k, v in results.items()}, default=str)[:3000])


if __name__ == "__main__":
    main()
