"""A trained ADTR model ready to score images: backbone + reconstructor + scoring settings + threshold.

The one forward path (device, fp16 autocast and channels-last resolved once, in `AnomalyDetector.to`)
used by `eval`, `predict`, training's feature extraction, the retrain job and the live pipeline, which
splits it at `coarse_maps`: the inference actor runs the networks, the scoring actor `ScoreHead.score`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .backbone import Backbone
from .checkpoint import CheckpointError, load_checkpoint, load_into, read_manifest
from .config import AdtrConfig
from .data import resize_image, to_tensor_batch
from .reconstructor import Reconstructor
from .scoring import feature_distance, image_score, normalized_score, pool_kernel_px, upsample_map


@dataclass
class Scores:
    maps: torch.Tensor  # (B, H, W) at image_size
    scores: torch.Tensor  # (B,)
    normalized: torch.Tensor  # (B,) score / threshold
    is_anomaly: torch.Tensor  # (B,) bool


class ScoreHead:
    """Coarse feature-distance maps → pixel maps, image scores and decisions.

    Needs only the manifest (scoring settings, sizes, threshold), not the networks: the live
    scoring actor uses it on maps the inference actor computed, offline scoring uses it in-process.
    """

    def __init__(self, cfg: AdtrConfig, threshold: float | None = None, model_version: str = "untrained"):
        self.cfg, self.threshold, self.model_version = cfg, threshold, model_version
        self.image_size = cfg.backbone.image_size
        self.pool_kernel = pool_kernel_px(cfg.scoring, self.image_size, cfg.backbone.feature_size)

    @property
    def decision_threshold(self) -> float:
        """The threshold decisions use: without a calibrated one, nothing is anomalous."""
        return float(self.threshold) if self.threshold else float("inf")

    @torch.no_grad()
    def score(self, coarse: torch.Tensor) -> Scores:
        """(B, S, S) feature distances → Scores at the model's image size."""
        maps = upsample_map(coarse, self.image_size, self.cfg.scoring.blur_sigma)
        scores = image_score(maps, self.pool_kernel)
        threshold = self.decision_threshold
        return Scores(maps, scores, normalized_score(scores, threshold), scores >= threshold)


def load_score_head(model_dir: str | Path) -> ScoreHead:
    """The scoring half of a checkpoint: settings and threshold from the manifest, no tensors."""
    manifest = read_manifest(Path(model_dir))
    return ScoreHead(_manifest_config(model_dir, manifest), manifest.get("threshold"),
                     str(manifest.get("model_version", "untrained")))


DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" → the GPU when torch sees one, else the CPU; "cuda" without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for, but torch sees no GPU")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class AnomalyDetector:
    def __init__(self, cfg: AdtrConfig, backbone: Backbone, reconstructor: Reconstructor,
                 threshold: float | None = None, manifest: dict[str, Any] | None = None):
        self.cfg, self.backbone, self.reconstructor = cfg, backbone, reconstructor.eval()
        self.manifest = manifest or {}
        self.head = ScoreHead(cfg, threshold, str(self.manifest.get("model_version", "untrained")))
        self.image_size = cfg.backbone.image_size
        self.device, self.half, self.channels_last = torch.device("cpu"), False, False

    def to(self, device: str | torch.device = "auto", half: bool = False, channels_last: bool = False) -> AnomalyDetector:
        """Move the networks to a device once. fp16 autocast and channels-last apply on a GPU only (on
        this CPU they are slower or unsupported); the distance map is always computed in fp32."""
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        gpu = self.device.type == "cuda"
        self.half, self.channels_last = half and gpu, channels_last and gpu
        self.backbone.to(self.device)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.reconstructor.to(self.device)
        return self

    def reconfigure(self, cfg: AdtrConfig) -> None:
        """New settings (e.g. --set scoring.blur_sigma=8) for the same networks and threshold."""
        self.cfg = cfg
        self.head = ScoreHead(cfg, self.head.threshold, self.head.model_version)

    @property
    def threshold(self) -> float | None:
        return self.head.threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self.head.threshold = value

    @property
    def model_version(self) -> str:
        return self.head.model_version

    def preprocess(self, images: list[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """RGB uint8 images of any size → (B, 3, S, S) float in [0, 1] at the model's size, on its device.
        A tensor is taken as such a batch already (frames decoded and resized on the device)."""
        if isinstance(images, torch.Tensor):
            x = images.to(self.device)
        else:
            x = to_tensor_batch([resize_image(img, self.image_size) for img in images]).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half)

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray]) -> torch.Tensor:
        """Images → (B, C, S, S) backbone features on the model's device (fp16 under autocast on a GPU)."""
        with self._autocast():
            return self.backbone(self.preprocess(images))

    @torch.inference_mode()
    def coarse_maps(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features → (B, S, S) float32 feature distances on the CPU (what the inference actor
        returns). The networks run on the model's device; the distance itself in fp32."""
        with self._autocast():
            target, recon = self.reconstructor(features.to(self.device))
        return feature_distance(target.float(), recon.float()).cpu()

    @torch.inference_mode()
    def score_features(self, features: torch.Tensor) -> Scores:
        return self.head.score(self.coarse_maps(features))

    @torch.inference_mode()
    def score_images(self, images: list[np.ndarray]) -> Scores:
        return self.score_features(self.embed(images))


def require_threshold(detector: AnomalyDetector) -> float:
    """The calibrated threshold; a model without one cannot decide (a CheckpointError: exit 2 in the CLI)."""
    if not detector.threshold:
        raise CheckpointError(f"model {detector.model_version} has no decision threshold: train it with "
                              "`adtr-edge train` (or `finetune`), which calibrates one on validation data")
    return float(detector.threshold)


def _manifest_config(model_dir: str | Path, manifest: dict[str, Any]) -> AdtrConfig:
    try:
        return AdtrConfig.model_validate(manifest["settings"])
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{model_dir}: manifest settings are invalid: {exc}") from exc


def load_detector(model_dir: str | Path, backbone: Backbone | None = None) -> AnomalyDetector:
    """Rebuild backbone and reconstructor from a checkpoint; refuses mismatches with a clear error.

    `backbone`: an already loaded one to reuse (a hot swap in the live agent) when its settings and
    weights are those the checkpoint was trained on; otherwise a new one is built.
    """
    model_dir = Path(model_dir)
    manifest, tensors = load_checkpoint(model_dir)
    cfg = _manifest_config(model_dir, manifest)
    expected_id = manifest.get("backbone", {}).get("weights_id")
    if backbone is None or backbone.cfg != cfg.backbone or (expected_id and backbone.weights_id != expected_id):
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
