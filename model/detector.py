"""A trained ADTR model ready to score images: backbone + reconstructor + scoring settings + threshold.

The one forward path (device, fp16 autocast and channels-last resolved once, in `AnomalyDetector.to`)
used by `eval`, `predict`, training's feature extraction, the retrain job and the live pipeline, which
splits it at `coarse_maps`: the inference actor runs the networks, the scoring actor `ScoreHead.score`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .backbone import Backbone
from .checkpoint import CheckpointError, load_checkpoint, load_into, read_manifest
from .config import AdtrConfig
from .data import resize_image, to_tensor_batch
from .reconstructor import Reconstructor, channels_last
from .scorer import LEGACY_FIT, FittedScorer, reconstructor_tensors
from .scoring import coarse_image_score, fuse_terms, normalized_score, pool_kernel_px, upsample_map


@dataclass
class Scores:
    maps: torch.Tensor  # (B, H, W) at image_size: the localization map, on the image score's scale
    scores: torch.Tensor  # (B,)
    normalized: torch.Tensor  # (B,) score / threshold
    is_anomaly: torch.Tensor  # (B,) bool


class ScoreHead:
    """Coarse per-term maps → pixel maps, image scores and decisions.

    Needs only the manifest (scoring settings and fitted term scales, sizes, threshold), not the
    networks: the live scoring actor uses it on maps the inference actor computed, offline scoring
    uses it in-process.
    """

    def __init__(self, cfg: AdtrConfig, threshold: float | None = None, model_version: str = "untrained",
                 fit: dict[str, Any] | None = None):
        self.cfg, self.threshold, self.model_version = cfg, threshold, model_version
        # Without a fit (an untrained model, an old checkpoint), the paper's L2 map, whatever cfg asks.
        self.fit = _fit_for(cfg, fit) if fit else dict(LEGACY_FIT)
        self.image_size = cfg.backbone.image_size
        self.pool_kernel = pool_kernel_px(cfg.scoring, self.image_size, cfg.backbone.feature_size)

    @property
    def decision_threshold(self) -> float:
        """The threshold decisions use: without a calibrated one, nothing is anomalous."""
        return float(self.threshold) if self.threshold else float("inf")

    @torch.no_grad()
    def score(self, coarse: torch.Tensor) -> Scores:
        """(B, K, S, S) per-term maps (or (B, S, S) for one term) → Scores at the model's image size.

        The image score is the max of the pooled image map. The returned map is the localization map
        on the image score's scale (× threshold / its own validation threshold), and in an image
        judged anomalous it is raised, if need be, until its pooled peak reaches the threshold: the
        decision and the heatmap never contradict each other.
        """
        coarse = self._checked(coarse)
        separate = self.fit["localization"] != self.fit["image"]
        image = self._fused(coarse, self.fit["image"])
        located = self._fused(coarse, self.fit["localization"]) if separate else image
        scores = self._pooled_peak(image)
        maps = self._full_map(located)
        threshold = self.decision_threshold
        if separate and math.isfinite(threshold) and self.fit.get("localization_threshold"):
            gain = threshold / self.fit["localization_threshold"]
            peak = self._pooled_peak(located) * gain
            lift = torch.where((scores >= threshold) & (peak < threshold), threshold / peak.clamp_min(1e-12), 1.0)
            maps = maps * (gain * lift.to(maps.dtype))[:, None, None]
        return Scores(maps, scores, normalized_score(scores, threshold), scores >= threshold)

    @torch.no_grad()
    def localization_peaks(self, coarse: torch.Tensor) -> torch.Tensor:
        """Max of the pooled localization map before any rescaling, (B,): what its threshold is fitted on."""
        return self._pooled_peak(self._fused(self._checked(coarse), self.fit["localization"]))

    def _checked(self, coarse: torch.Tensor) -> torch.Tensor:
        coarse = coarse.unsqueeze(1) if coarse.dim() == 3 else coarse
        if coarse.shape[1] != len(self.fit["terms"]):
            raise ValueError(f"got {coarse.shape[1]} coarse maps per image, the model scores with {self.fit['terms']}")
        return coarse

    def _fused(self, coarse: torch.Tensor, use: list[int]) -> torch.Tensor:
        """(B, K, S, S) per-term maps → the (B, S, S) map of the terms in `use`."""
        return fuse_terms(coarse, self.fit["scales"], use)

    def _full_map(self, fused: torch.Tensor) -> torch.Tensor:
        return upsample_map(fused, self.image_size, self.cfg.scoring.blur_sigma)

    def _pooled_peak(self, fused: torch.Tensor) -> torch.Tensor:
        """`image_score` of `_full_map(fused)`, computed on the coarse map (no full-size map)."""
        return coarse_image_score(fused, self.image_size, self.cfg.scoring.blur_sigma, self.pool_kernel)


def _fit_for(cfg: AdtrConfig, fit: dict[str, Any]) -> dict[str, Any]:
    """The fitted terms with the image/localization selection of `cfg` (any subset of them)."""
    terms = fit["terms"]
    missing = sorted((set(cfg.scoring.image_terms) | set(cfg.scoring.localization_terms)) - set(terms))
    if missing:
        raise ValueError(f"scoring terms {missing} were not fitted for this model (it has {terms}); "
                         "train with them to use them")
    return {**fit, "image": [terms.index(t) for t in cfg.scoring.image_terms],
            "localization": [terms.index(t) for t in cfg.scoring.localization_terms]}


def load_score_head(model_dir: str | Path) -> ScoreHead:
    """The scoring half of a checkpoint: settings and threshold from the manifest, no tensors."""
    manifest = read_manifest(Path(model_dir))
    return ScoreHead(_manifest_config(model_dir, manifest), manifest.get("threshold"),
                     str(manifest.get("model_version", "untrained")), manifest.get("scoring_fit"))


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
                 threshold: float | None = None, manifest: dict[str, Any] | None = None,
                 scorer: FittedScorer | None = None):
        """Without a fitted `scorer` (and `manifest["scoring_fit"]`), scores with the paper's L2 map."""
        self.cfg, self.backbone, self.reconstructor = cfg, backbone, reconstructor.eval()
        self.manifest = manifest or {}
        self.scorer = scorer or FittedScorer(LEGACY_FIT["terms"])
        self.head = ScoreHead(cfg, threshold, str(self.manifest.get("model_version", "untrained")),
                              self.manifest.get("scoring_fit"))
        self.image_size = cfg.backbone.image_size
        self.device, self.half, self.channels_last = torch.device("cpu"), False, False

    def to(self, device: str | torch.device = "auto", half: bool = False, channels_last: bool = False,
           cpu_graph: bool = True) -> AnomalyDetector:
        """Move the networks to a device once. fp16 autocast and channels-last apply on a GPU only (on
        this CPU they are slower or unsupported); the distance map is always computed in fp32.
        `cpu_graph`: on the CPU, the backbone's frozen oneDNN graph (see `Backbone`); False = eager."""
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        gpu = self.device.type == "cuda"
        self.half, self.channels_last = half and gpu, channels_last and gpu
        self.backbone.cpu_graph = cpu_graph
        self.backbone.to(self.device)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.reconstructor.to(self.device)
        self.scorer.to(self.device)
        return self

    def reconfigure(self, cfg: AdtrConfig) -> None:
        """New settings (e.g. --set scoring.blur_sigma=8) for the same networks, fit and threshold."""
        self.cfg = cfg
        self.head = ScoreHead(cfg, self.head.threshold, self.head.model_version, self.head.fit)

    def set_scorer(self, scorer: FittedScorer, fit: dict[str, Any]) -> None:
        """A newly fitted scorer (after training or fine-tuning); the threshold must be recalibrated."""
        self.scorer, self.manifest = scorer.to(self.device), {**self.manifest, "scoring_fit": fit}
        self.head = ScoreHead(self.cfg, self.head.threshold, self.head.model_version, fit)

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
        return channels_last(x) if self.channels_last else x

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half)

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """Images (as `preprocess` takes them) → (B, C, S, S) backbone features on the model's device (fp16
        under autocast on a GPU)."""
        with self._autocast():
            return self.backbone(self.preprocess(images))

    @torch.inference_mode()
    def coarse_maps(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features → (B, K, S, S) float32 per-term maps on the CPU (what the inference actor
        returns). The networks run on the model's device; the scoring terms in fp32."""
        features = channels_last(features.to(self.device))  # the layout the per-cell work reads fastest
        with self._autocast():
            target, recon = self.reconstructor(features)
        return self.scorer(features.float(), target.float(), recon.float(), self.reconstructor.feature_std).cpu()

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
        settings = manifest["settings"]
        scoring = settings.get("scoring") if isinstance(settings, dict) else None
        if isinstance(scoring, dict) and "memory_dims" not in scoring:
            # Written before the memory had a channel projection: it searched every channel, and a refit
            # from this model (retrain, ADTR+) must not switch to the newer default.
            settings = {**settings, "scoring": {**scoring, "memory_dims": 0}}
        cfg = AdtrConfig.model_validate(settings)
    except Exception as exc:
        raise CheckpointError(f"{model_dir}: manifest settings are invalid: {exc}") from exc
    if "scoring_fit" not in manifest:  # written before fitted scoring: the paper's L2 map
        legacy = cfg.scoring.model_copy(update={"image_terms": ["l2"], "localization_terms": ["l2"]})
        cfg = cfg.model_copy(update={"scoring": legacy})
    return cfg


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
    load_into(reconstructor, reconstructor_tensors(tensors), model_dir)
    scorer = _load_scorer(model_dir, manifest, tensors, backbone.out_channels, cfg.backbone.feature_size)
    return AnomalyDetector(cfg, backbone, reconstructor, manifest.get("threshold"), manifest, scorer)


def _load_scorer(model_dir: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                 channels: int, feature_size: int) -> FittedScorer | None:
    fit = manifest.get("scoring_fit")
    if fit is None:
        return None
    try:
        scorer = FittedScorer.from_checkpoint(fit["terms"], tensors)
        if len(fit["scales"]) != len(fit["terms"]):
            raise ValueError(f"{len(fit['scales'])} scales for {len(fit['terms'])} terms")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{model_dir}: the fitted scorer does not fit its manifest: {exc}") from exc
    cells = feature_size * feature_size
    projection = getattr(scorer, "memory_projection", None)
    memory_channels = channels if projection is None else projection.shape[-1]
    expected = {"gauss_mean": (cells, channels), "gauss_basis": (cells, channels),
                "memory": (cells, None, memory_channels), "memory_projection": (channels, None),
                "gauss_inv_eig": (cells,), "gauss_inv_rest": (cells,)}
    for name, buf in scorer.named_buffers():
        want = expected.get(name, ())
        got = tuple(buf.shape[: len(want)])
        if any(w is not None and w != g for w, g in zip(want, got)) or len(got) < len(want):
            raise CheckpointError(f"{model_dir}: scorer tensor {name} has shape {tuple(buf.shape)}, "
                                  f"the model has {cells} cells of {channels} channels")
    return scorer
