"""Training-free baselines on the SAME backbone features, scored by the same post-processing as ADTR
(upsample, blur, max of the pooled map: a `ScoreHead` with one term). The per-cell math is the
model's own (`model.scoring`), so a baseline differs from ADTR only in what it compares against.

- full_memory: nearest neighbour among every training cell of every image (PatchCore without coreset).
- local_memory: nearest neighbour among the training features seen at the same grid cell.
- padim: a Gaussian per grid cell (full covariance + shrinkage), Mahalanobis distance (PaDiM).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from adtr_edge.model.config import AdtrConfig
from adtr_edge.model.detector import ScoreHead
from adtr_edge.model.scoring import (
    cell_tokens,
    channel_major_memory,
    fit_cell_gaussians,
    fit_cell_memory,
    mahalanobis_distance,
    memory_distance,
    memory_norms,
)

from patch_memory import PatchMemory

METHODS = ("full_memory", "local_memory", "padim")
LABELS = {"full_memory": "nearest-neighbour memory, all cells (PatchCore w/o coreset)",
          "local_memory": "nearest-neighbour memory, same cell",
          "padim": "PaDiM (Gaussian per cell)"}


def fit_baseline(method: str, train_features: Tensor, shrinkage: float = 0.1) -> dict[str, Tensor]:
    if method == "full_memory":
        return {"bank": PatchMemory(train_features).bank}
    if method == "local_memory":
        return {"memory": fit_cell_memory(cell_tokens(train_features), 0)}
    if method == "padim":
        c = train_features.shape[1]
        return fit_cell_gaussians(cell_tokens(train_features), rank=c, shrinkage=shrinkage)
    raise ValueError(f"unknown baseline {method}")


@torch.no_grad()
def coarse_map(method: str, tensors: dict[str, Tensor], features: Tensor) -> Tensor:
    """(B, C, S, S) backbone features → (B, S, S) distances."""
    b, _, s, _ = features.shape
    if method == "full_memory":
        memory = PatchMemory(features[:1])
        memory.bank = tensors["bank"]
        return memory.distance_map(features)
    if method == "local_memory":  # norms once and the channel-major layout, as the model's scorer does
        if "memory_sq" not in tensors:  # first use of a fitted or loaded memory, both (P, M, C) in storage
            tensors["memory"] = channel_major_memory(tensors["memory"])
            tensors["memory_sq"] = memory_norms(tensors["memory"])
        memory_sq = tensors["memory_sq"]
        return memory_distance(cell_tokens(features), tensors["memory"], memory_sq).view(b, s, s)
    return mahalanobis_distance(cell_tokens(features), tensors).view(b, s, s)


def save_baseline(path: Path, method: str, tensors: dict[str, Tensor], cfg: AdtrConfig) -> int:
    """Safetensors with the method and settings as metadata; returns the file's size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items() if not k.endswith("_sq")}, str(path),
              metadata={"method": method, "settings": cfg.model_dump_json()})
    return path.stat().st_size


def load_baseline(path: Path):
    """A saved baseline as a function: images (B, 3, H, W) in [0, 1] → Scores (backbone included)."""
    from safetensors import safe_open

    from adtr_edge.model.backbone import Backbone

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    cfg = AdtrConfig.model_validate(json.loads(meta["settings"]))
    tensors, method = load_file(str(path)), meta["method"]
    backbone, head = Backbone(cfg.backbone), ScoreHead(cfg, float("inf"))
    return lambda images: head.score(coarse_map(method, tensors, backbone(images)))
