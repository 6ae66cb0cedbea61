"""GPU benchmark of the inference path (run on a GPU box; `gpu_bench.sh` wraps it with the agent run).

Raw model throughput of `actors.inference.BatchedModel` (what the InferenceActor runs) for each
batch size, in fp32 and in fp16 autocast with channels-last, plus peak GPU memory. Needs no
dataset and no trained model: throughput does not depend on pixel content or trained weights, so
it uses the edge default architecture with random frames unless --model is given.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from actors.inference import BatchedModel  # noqa: E402
from agent.settings import InferenceConfig, load_settings  # noqa: E402
from model.backbone import Backbone  # noqa: E402
from model.detector import AnomalyDetector, load_detector  # noqa: E402
from model.reconstructor import Reconstructor  # noqa: E402


def detector_for(model: str | None, overrides: list[str]) -> AnomalyDetector:
    if model:
        return load_detector(model)
    cfg = load_settings(overrides=overrides)
    backbone = Backbone(cfg.backbone)
    return AnomalyDetector(cfg, backbone, Reconstructor(backbone.out_channels, cfg.backbone.feature_size,
                                                        cfg.reconstructor), threshold=1.0)


def throughput(model: BatchedModel, frames: list[np.ndarray], batch: int, seconds: float) -> dict:
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        model.coarse_maps(frames[:batch])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.coarse_maps(frames[:batch])  # returns CPU numpy: includes the copy back, as in the actor
        n += batch
    elapsed = time.perf_counter() - started
    return {"batch": batch, "frames_per_second": n / elapsed, "ms_per_batch": 1000 * elapsed / (n / batch),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="trained model folder (default: the edge architecture, random weights)")
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--out", default="runs/bench/gpu.json")
    p.add_argument("--set", action="append", default=[], help="model setting override (without --model)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device visible (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True
    detector = detector_for(args.model, args.set)
    size = detector.image_size
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    frames = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(max(batches))]
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "image_size": size, "runs": {}}
    for name, half, channels_last in (("fp32", False, False), ("fp16+channels_last", True, True)):
        model = BatchedModel(detector, InferenceConfig(device="cuda", half=half, channels_last=channels_last))
        results["runs"][name] = [throughput(model, frames, b, args.seconds) for b in batches]
        for r in results["runs"][name]:
            print(f"{name:20s} batch {r['batch']:4d}: {r['frames_per_second']:8.1f} frames/s "
                  f"{r['ms_per_batch']:7.2f} ms/batch  peak {r['peak_gpu_mb']:.0f} MB", flush=True)
    fp32 = {r["batch"]: r["frames_per_second"] for r in results["runs"]["fp32"]}
    fp16 = {r["batch"]: r["frames_per_second"] for r in results["runs"]["fp16+channels_last"]}
    # Does half precision change the answer? Max relative difference of the coarse maps.
    a = BatchedModel(detector, InferenceConfig(device="cuda", half=False)).coarse_maps(frames[:8])
    b = BatchedModel(detector, InferenceConfig(device="cuda", half=True)).coarse_maps(frames[:8])
    results["fp16_max_rel_diff"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-6)))
    results["fp16_speedup"] = {b_: fp16[b_] / fp32[b_] for b_ in batches}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({"fp16_speedup": {k: round(v, 2) for k, v in results["fp16_speedup"].items()},
                      "fp16_max_rel_diff": results["fp16_max_rel_diff"]}))


if __name__ == "__main__":
    main()
