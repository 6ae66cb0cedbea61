"""anomalib's PaDiM and PatchCore on our split, in their own virtualenv (`make bench-peers` runs this file
with .venv-peers/bin/python; it imports nothing of adtr-edge).

Reads the images that bench_peers.py wrote (the same seeded split as our benchmark, decoded and resized to
256×256 by our own code, so every method sees the same pixels), fits one model on the training normals,
scores the test images, and writes per-image scores, 256×256 anomaly maps, fit seconds and images/s. The
metrics are computed by bench_peers.py with our own metric code, so every row of the table is measured
the same way.

The models are anomalib's plain torch modules (`PadimModel`, `PatchcoreModel`), the way its Lightning
wrappers drive them: embeddings collected in training mode, then `fit()` (PaDiM's Gaussians) or
`subsample_embedding()` (PatchCore's coreset), then eval-mode forward passes. The backbone is timm's
`tf_efficientnet_lite0` with the ImageNet weights our backbone uses, read by timm from the offline
Hugging Face cache that bench_peers.py wrote (HF_HOME, HF_HUB_OFFLINE=1): no hub. Inputs are
normalized as those weights expect (mean = std = 0.5), as in our backbone.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

MEAN = STD = 0.5


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def build(method: str, args) -> torch.nn.Module:
    if method == "padim":
        from anomalib.models.image.padim.torch_model import PadimModel

        torch.manual_seed(0)  # PaDiM keeps a random subset of n_features channels
        return PadimModel(backbone=args.backbone, layers=args.padim_layers.split(","), pre_trained=True,
                          n_features=args.padim_features)
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    return PatchcoreModel(layers=args.patchcore_layers.split(","), backbone=args.backbone, pre_trained=True,
                          num_neighbors=args.patchcore_neighbors)


def fit(model: torch.nn.Module, method: str, train: np.ndarray, args) -> float:
    started = time.perf_counter()
    model.train()
    model.feature_extractor.eval()  # frozen backbone, BatchNorm in inference mode (as anomalib does)
    with torch.no_grad():
        for i in range(0, len(train), args.batch):
            model(to_batch(list(train[i: i + args.batch])))
        if method == "padim":
            model.fit()
        else:
            model.subsample_embedding(args.coreset_ratio)
    model.eval()
    return time.perf_counter() - started


def images_per_second(model: torch.nn.Module, images: list[np.ndarray], batch: int, repeats: int = 2) -> float:
    with torch.no_grad():
        model(to_batch(images[:batch]))  # warm-up
        started, n = time.perf_counter(), 0
        for _ in range(repeats):
            for i in range(0, len(images), batch):
                model(to_batch(images[i: i + batch]))
                n += len(images[i: i + batch])
    return n / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", required=True, help="folder with train.npy and test.npy from bench_peers.py")
    p.add_argument("--method", choices=["padim", "patchcore"], required=True)
    p.add_argument("--out", required=True, help="output .npz (scores, maps) and .json (timings)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--speed-batches", default="1,8")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--padim-layers", default="blocks.1,blocks.2,blocks.4")  # strides 4, 8, 16 (ResNet layer1-3)
    p.add_argument("--padim-features", type=int, default=100)
    p.add_argument("--patchcore-layers", default="blocks.2,blocks.4")  # strides 8, 16 (ResNet layer2-3)
    p.add_argument("--patchcore-neighbors", type=int, default=9)
    p.add_argument("--coreset-ratio", type=float, default=0.001)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        raise SystemExit("run with HF_HUB_OFFLINE=1 and HF_HOME at the cache bench_peers.py wrote (no hub here)")
    train = np.load(os.path.join(args.images, "train.npy"), mmap_mode="r")
    test = np.load(os.path.join(args.images, "test.npy"), mmap_mode="r")
    size = test.shape[1]
    model = build(args.method, args)
    fit_seconds = fit(model, args.method, train, args)
    scores, maps = [], []
    with torch.no_grad():
        for i in range(0, len(test), args.batch):
            out = model(to_batch(list(test[i: i + args.batch])))
            scores.append(out.pred_score.reshape(-1).float().numpy())
            maps.append(out.anomaly_map.reshape(-1, size, size).float().numpy().astype(np.float16))
    speed_images = list(test[:32])
    speed = {int(b): images_per_second(model, speed_images, int(b)) for b in args.speed_batches.split(",")}
    np.savez_compressed(args.out + ".npz", scores=np.concatenate(scores), maps=np.concatenate(maps))
    import anomalib
    import timm

    info = {"method": args.method, "fit_seconds": fit_seconds, "images_per_second": speed,
            "threads": torch.get_num_threads(), "anomalib": anomalib.__version__, "torch": torch.__version__,
            "timm": timm.__version__, "settings": {k: v for k, v in vars(args).items() if k not in ("images", "out")}}
    if args.method == "patchcore":
        info["memory_bank"] = int(model.memory_bank.shape[0])
    with open(args.out + ".json", "w") as fh:
        json.dump(info, fh, indent=2)
    print(json.dumps({k: info[k] for k in ("method", "fit_seconds", "images_per_second")}))


if __name__ == "__main__":
    main()
