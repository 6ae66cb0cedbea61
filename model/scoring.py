"""The one place for the scoring math: anomaly map, image score, thresholds, normalized score.

Training, evaluation, offline prediction and the live pipeline all call these functions, so a frame
scores the same everywhere.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ScoringConfig


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, H, W) maps, kernel truncated at 4σ, reflect padding."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(4.0 * sigma)))
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps.unsqueeze(1)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def anomaly_map(target: Tensor, reconstruction: Tensor, out_size: int, blur_sigma: float = 0.0) -> Tensor:
    """s(u) = ||f(:,u) − f̂(:,u)||₂ → bilinear upsample to out_size → optional blur. (B, H, W)."""
    return upsample_map(feature_distance(target, reconstruction), out_size, blur_sigma)


def feature_distance(target: Tensor, reconstruction: Tensor) -> Tensor:
    """The per-cell L2 distance ||f(:,u) − f̂(:,u)||₂ on the feature grid: (B, C, S, S) → (B, S, S).

    The live pipeline ships this small map from the inference actor to the scoring actor, which
    finishes it with `upsample_map`; `anomaly_map` is exactly that composition.
    """
    return (target - reconstruction).pow(2).sum(dim=1).sqrt()


def upsample_map(coarse: Tensor, out_size: int, blur_sigma: float = 0.0) -> Tensor:
    """A (B, S, S) feature-grid map → (B, out_size, out_size): bilinear, then optional blur."""
    full = F.interpolate(coarse.unsqueeze(1), size=(out_size, out_size), mode="bilinear", align_corners=False)
    return gaussian_blur(full.squeeze(1), blur_sigma)


def pool_kernel_px(cfg: ScoringConfig, image_size: int, feature_size: int) -> int:
    """The image-score pooling kernel in pixels; 0 in the config means one feature cell."""
    return cfg.pool_kernel or max(1, image_size // feature_size)


def image_score(maps: Tensor, kernel: int) -> Tensor:
    """Max of the (B, H, W) maps average-pooled with a kernel×kernel window at stride 1. (B,)."""
    kernel = max(1, min(kernel, maps.shape[-1], maps.shape[-2]))
    return box_mean(maps, kernel).flatten(1).amax(dim=1).to(maps.dtype)


def box_mean(maps: Tensor, kernel: int) -> Tensor:
    """Mean over every kernel×kernel window at stride 1: (B, H, W) → (B, H−k+1, W−k+1), float64.

    Summed-area tables in float64 (exact to ~1e-12 here): the same numbers as `avg_pool2d`, at a
    cost independent of the kernel, which matters in the live scoring actor (once per frame, CPU).
    """
    table = F.pad(maps.double().cumsum(dim=1), (0, 0, 1, 0))
    rows = table[:, kernel:] - table[:, :-kernel]
    table = F.pad(rows.cumsum(dim=2), (1, 0))
    return (table[:, :, kernel:] - table[:, :, :-kernel]) / (kernel * kernel)


def normalized_score(score, threshold: float):
    """score / threshold: 1.0 is the decision boundary."""
    return score / threshold


def threshold_from_normals(scores: np.ndarray, quantile: float) -> float:
    """Normals only: a high quantile of validation normal image scores."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no validation scores to calibrate a threshold on")
    return float(np.quantile(scores, quantile))


def threshold_f1_optimal(scores: np.ndarray, labels: np.ndarray) -> float:
    """With labelled anomalies: the threshold that maximizes F1 (decision: score >= threshold)."""
    from sklearn.metrics import precision_recall_curve

    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        raise ValueError("F1-optimal threshold needs both normal and anomalous validation samples")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
    return float(thresholds[int(np.argmax(f1))])


def defect_regions(amap: np.ndarray, threshold: float, frame_size: tuple[int, int] | None = None,
                   min_area_px: int = 1, max_regions: int = 20) -> list[dict]:
    """Connected components (8-neighbour, OpenCV) of `amap >= threshold` on one (H, W) anomaly map.

    Each region: `box` [x, y, w, h] and `area` in frame pixels (scaled from the map when
    `frame_size` = (width, height) is given), `peak` score and `peak_normalized` (peak / threshold).
    The largest peaks first; at most `max_regions`.
    """
    if not math.isfinite(threshold):
        return []
    mask = (amap >= threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    height, width = amap.shape
    sx, sy = (frame_size[0] / width, frame_size[1] / height) if frame_size else (1.0, 1.0)
    regions = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area_px:
            continue
        peak = float(amap[labels == label].max())
        regions.append({
            "box": [round(x * sx), round(y * sy), max(1, round(w * sx)), max(1, round(h * sy))],
            "area": round(area * sx * sy),
            "peak": peak,
            "peak_normalized": peak / threshold,
        })
    regions.sort(key=lambda r: r["peak"], reverse=True)
    return regions[:max_regions]
