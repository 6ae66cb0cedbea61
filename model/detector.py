"""A trained ADTR model ready to score images: backbone + reconstructor + scoring settings + threshold.

The one scoring path used by `eval`, `predict` and (later) the live pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbone import Backbone
from .checkpoint import CheckpointError, load_checkpoint, load_into
from .config import AdtrConfig
from .data import resize_image, to_tensor_batch
from .reconstructor import Reconstructor
from .scoring import anomaly_map, image_score, normalized_score, pool_kernel_px


@dataclass
class Scores:
    maps: torch.Tensor  # (B, H, W) at image_size
    scores: torch.Tensor  # (B,)
    normalized: torch.Tensor  # (B,) score / threshold
    is_anomaly: torch.Tensor  # (B,) bool


class AnomalyDetector:
    def __init__(self, cfg: AdtrConfig, backbone: Backbone, reconstructor: Reconstructor,
                 threshold: float | None = None, manifest: dict[str, Any] | None = None):
        self.cfg, self.backbone, self.reconstructor = cfg, backbone, reconstructor.eval()
        self.threshold = threshold
        self.manifest = manifest or {}
        self.image_size = cfg.backbone.image_size
        self.pool_kernel = pool_kernel_px(cfg.scoring, self.image_size, cfg.backbone.feature_size)

    @property
    def model_version(self) -> str:
        return str(self.manifest.get("model_version", "untrained"))

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images of any size → (B, 3, S, S) float in [0, 1] at the model's size."""
        return to_tensor_batch([resize_image(img, self.image_size) for img in images])

    @torch.no_grad()
    def score_features(self, features: torch.Tensor) -> Scores:
        target, recon = self.reconstructor(features)
        maps = anomaly_map(target, recon, self.image_size, self.cfg.scoring.blur_sigma)
        scores = image_score(maps, self.pool_kernel)
        threshold = self.threshold if self.threshold else float("inf")
        return Scores(maps, scores, normalized_score(scores, threshold), scores >= threshold)

    @torch.no_grad()
    def score_images(self, images: list[np.ndarray]) -> Scores:
        return self.score_features(self.backbone(self.preprocess(images)))


def load_detector(model_dir: str | Path) -> AnomalyDetector:
    """Rebuild backbone and reconstructor from a checkpoint; refuses mismatches with a clear error."""
    model_dir = Path(model_dir)
    manifest, tensors = load_checkpoint(model_dir)
    try:
        cfg = AdtrConfig.model_validate(manifest["settings"])
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{model_dir}: manifest settings are invalid: {exc}") from exc
    backbone = Backbone(cfg.backbone)
    expected = manifest.get("backbone", {})
    if expected.get("weights_id") and expected["weights_id"] != backbone.weights_id:
        raise CheckpointError(
            f"{model_dir}: trained on backbone weights {expected['weights_id'][:20]}…, "
            f"but {cfg.backbone.weights} gives {backbone.weights_id[:20]}…"
        )
    if expected.get("channels") not in (None, backbone.out_channels):
        raise CheckpointError(
            f"{model_dir}: trained on {expected['channels']} feature channels, backbone gives {backbone.out_channels}"
        )
    reconstructor = Reconstructor(backbone.out_channels, cfg.backbone.feature_size, cfg.reconstructor)
    load_into(reconstructor, tensors, model_dir)
    return AnomalyDetector(cfg, backbone, reconstructor, manifest.get("threshold"), manifest)
