"""ADTR+ losses for the anomaly-available case (method §3): pseudo-Huber distance, push-pull."""
from __future__ import annotations

import torch
from torch import Tensor

# 1 − exp(−x) is clamped here so log never sees 0 (x = 0 happens on an all-normal sample).
_LOG_FLOOR = 1e-6


def pseudo_huber_distance(target: Tensor, reconstruction: Tensor) -> Tensor:
    """φ(u) = sqrt(((1/C)·Σ_i |d(i,u)|)² + 1) − 1 for (B, C, H, W) inputs → (B, H, W)."""
    mean_abs = (target - reconstruction).abs().mean(dim=1)
    return torch.sqrt(mean_abs.pow(2) + 1.0) - 1.0


def _push(x: Tensor) -> Tensor:
    """−log(1 − exp(−x)): large for small x, vanishing gradient as x grows."""
    return -torch.log((1.0 - torch.exp(-x)).clamp_min(_LOG_FLOOR))


def pixel_push_pull_loss(phi: Tensor, mask: Tensor, alpha: float = 0.003) -> Tensor:
    """L_px = (1/HW)Σ(1−y)φ − α·log(1 − exp(−(1/HW)Σ yφ)), per sample, mean over the batch.

    `phi` (B, H, W); `mask` (B, H, W) in {0, 1}. A sample without anomalous positions gets no push
    term (it would be log 0), so all-normal batches are valid.
    """
    mask = mask.to(phi.dtype)
    hw = phi.shape[-1] * phi.shape[-2]
    pull = ((1.0 - mask) * phi).flatten(1).sum(1) / hw
    anomalous_error = (mask * phi).flatten(1).sum(1) / hw
    has_anomaly = mask.flatten(1).amax(1) > 0
    push = torch.where(has_anomaly, _push(anomalous_error), torch.zeros_like(anomalous_error))
    return (pull + alpha * push).mean()


def image_topk_loss(phi: Tensor, labels: Tensor, alpha: float = 0.003, k: int = 20) -> Tensor:
    """L_img = (1−y)·q − α·y·log(1 − exp(−q)), q = mean of the top-k φ of each sample."""
    flat = phi.flatten(1)
    q = flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1)
    y = labels.to(phi.dtype)
    push = torch.where(y > 0, _push(q), torch.zeros_like(q))
    return ((1.0 - y) * q + alpha * y * push).mean()
