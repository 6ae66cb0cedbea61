"""Inference cost of one method in a fresh process: images/s at batch 1 and 8, and the process's
peak resident memory (so one method's memory bank does not inflate another's number).

    python infer_cost.py --model MODEL_DIR --images FILE.npy             # an ADTR checkpoint
    python infer_cost.py --baseline FILE.safetensors --images FILE.npy   # a baseline saved by the bench

Prints one JSON line. `--images` holds (N, H, W, 3) uint8 frames at the model's size.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adtr_edge.model.data import to_tensor_batch


def rate(fn, batch: torch.Tensor, bs: int, repeats: int) -> float:
    fn(batch[:bs])  # warm-up
    n, started = 0, time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(batch), bs):
            fn(batch[i : i + bs])
            n += len(batch[i : i + bs])
    return n / (time.perf_counter() - started)


def peak_rss_mb() -> float:
    """This process's own peak resident memory. Not `ru_maxrss`: Linux carries it across exec, so a
    child started by the (large) benchmark process would report the parent's footprint (4.4 GB here
    for a model that peaks at ~1.2 GB); VmHWM belongs to the new address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path)
    p.add_argument("--baseline", type=Path)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = to_tensor_batch(list(np.load(args.images)))
    if args.model:
        from adtr_edge.model.detector import load_detector

        detector = load_detector(args.model)

        def run(x):
            return detector.head.score(detector.coarse_maps(detector.backbone(x)))
    else:
        from baselines import load_baseline

        run = load_baseline(args.baseline)
    with torch.inference_mode():
        out = {f"batch_{bs}": rate(run, batch, bs, args.repeats) for bs in (1, 8)}
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
