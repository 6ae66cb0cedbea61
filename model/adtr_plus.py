"""ADTR+ (method §3): fine-tune a normal-only model with labelled and/or synthetic anomalies.

Labelled anomalies with pixel masks use the push-pull pixel loss; those with image labels only use
the top-k image loss. Synthetic anomalies are FCDD-style "confetti noise": random coloured patches
pasted onto normal training images, with their exact masks.
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog
import torch
import torch.nn.functional as F

from .checkpoint import save_checkpoint
from .config import AdtrConfig
from .data import BadFiles, DataError, Dataset, read_image, resize_image
from .detector import AnomalyDetector, load_detector
from .evaluate import load_masks
from .features import FeatureCache
from .losses import image_topk_loss, pixel_push_pull_loss, pseudo_huber_distance
from .train import checkpoint_tensors, fit, fit_scoring, score_stats, seed_everything

log = structlog.get_logger(__name__)


def confetti_noise(image: np.ndarray, rng: np.random.Generator, max_patches: int = 4,
                   min_frac: float = 0.03, max_frac: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Paste 1..max_patches random-coloured rectangles (side = frac × image side). → (image, mask)."""
    out, mask = image.copy(), np.zeros(image.shape[:2], bool)
    h, w = image.shape[:2]
    for _ in range(int(rng.integers(1, max_patches + 1))):
        ph = max(2, int(rng.uniform(min_frac, max_frac) * h))
        pw = max(2, int(rng.uniform(min_frac, max_frac) * w))
        y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        out[y : y + ph, x : x + pw] = rng.integers(0, 256, size=3, dtype=np.uint8)
        mask[y : y + ph, x : x + pw] = True
    return out, mask


def cell_fraction(masks: np.ndarray, feature_size: int) -> torch.Tensor:
    """Pixel masks (N, H, W) → fraction of each feature cell that is defect, (N, S, S) in [0, 1]."""
    t = torch.from_numpy(masks.astype(np.float32)).unsqueeze(1)
    return F.adaptive_avg_pool2d(t, feature_size).squeeze(1)


def plus_loss(alpha: float, top_k: int):
    def loss_fn(model, batch):
        features, cell_masks, labels, has_mask = batch
        target, recon = model(features)
        phi = pseudo_huber_distance(target, recon)  # (B, S, S)
        total = phi.new_zeros(())
        if has_mask.any():
            total = total + pixel_push_pull_loss(phi[has_mask], cell_masks[has_mask], alpha) * has_mask.sum()
        if (~has_mask).any():
            total = total + image_topk_loss(phi[~has_mask], labels[~has_mask], alpha, top_k) * (~has_mask).sum()
        return total / features.shape[0]
    return loss_fn


def _synthetic(detector: AnomalyDetector, dataset: Dataset, fraction: float, seed: int, bad: BadFiles,
               policy: str) -> tuple[torch.Tensor, np.ndarray]:
    size = detector.image_size
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(dataset.train))[: int(round(fraction * len(dataset.train)))]
    feats, masks = [], []
    for start in range(0, len(chosen), 16):
        images, batch_masks = [], []
        for i in chosen[start : start + 16]:
            try:
                image = resize_image(read_image(dataset.train[i].path), size)
            except DataError as exc:
                bad.record(dataset.train[i].path, str(exc).split(": ", 1)[-1], policy)
                continue
            noised, mask = confetti_noise(image, rng)
            images.append(noised)
            batch_masks.append(mask)
        if images:
            feats.append(detector.embed(images).float().cpu())
            masks += batch_masks
    if not feats:
        return torch.empty(0), np.zeros((0, size, size), bool)
    return torch.cat(feats), np.stack(masks)


def _labelled(cache: FeatureCache, dataset: Dataset, size: int, bad: BadFiles, policy: str):
    """Features, pixel masks and which samples have a usable mask, for the labelled anomalies."""
    fs = cache.extract(dataset.train_anomalous, bad, policy, desc="labelled anomalies")
    masks, has_mask = load_masks(fs.samples, size, bad, policy)
    return fs.features, masks, has_mask


def finetune_adtr_plus(model_dir: Path, dataset: Dataset, out_dir: Path, progress: bool = True,
                       cfg: AdtrConfig | None = None) -> dict[str, Any]:
    """Load a normal-only model from `model_dir`, fine-tune with ADTR+ losses, save to `out_dir`.

    `cfg` may change training-side settings (adtr_plus.*, train.*, data.*, threshold.*); the
    architecture always comes from the checkpoint.
    """
    detector = load_detector(model_dir)
    if cfg is not None:
        detector.cfg = detector.cfg.model_copy(update={
            k: getattr(cfg, k) for k in ("adtr_plus", "train", "data", "threshold")})
    cfg, plus = detector.cfg, detector.cfg.adtr_plus
    detector.to(cfg.train.device)
    if plus.confetti_fraction == 0 and not (plus.use_labelled and dataset.train_anomalous):
        raise DataError("ADTR+ needs anomalies: set adtr_plus.confetti_fraction > 0 or data.labelled_fraction > 0")
    seed_everything(cfg.train.seed)
    policy = cfg.data.bad_files
    bad = BadFiles()
    cache = FeatureCache(detector.backbone, cfg.data.cache_dir)
    s = cfg.backbone.feature_size
    normal = cache.extract(dataset.train, bad, policy, desc="train features").features
    parts_f = [normal]
    parts_m = [torch.zeros(len(normal), s, s)]
    parts_y = [torch.zeros(len(normal))]
    parts_h = [torch.ones(len(normal), dtype=torch.bool)]
    n_synthetic = n_labelled = 0
    if plus.confetti_fraction > 0:
        feats, masks = _synthetic(detector, dataset, plus.confetti_fraction, cfg.train.seed, bad, policy)
        n_synthetic = len(feats)
        if n_synthetic:
            parts_f.append(feats)
            parts_m.append(cell_fraction(masks, s))
            parts_y.append(torch.ones(n_synthetic))
            parts_h.append(torch.ones(n_synthetic, dtype=torch.bool))
    if plus.use_labelled and dataset.train_anomalous:
        feats, masks, has_mask = _labelled(cache, dataset, detector.image_size, bad, policy)
        n_labelled = len(feats)
        parts_f.append(feats)
        parts_m.append(cell_fraction(masks, s))
        parts_y.append(torch.ones(n_labelled))
        parts_h.append(torch.from_numpy(has_mask))
    if n_synthetic + n_labelled == 0:
        raise DataError("ADTR+ found no usable anomalies (all synthetic or labelled ones were unreadable)")
    train_data = (torch.cat(parts_f), torch.cat(parts_m), torch.cat(parts_y), torch.cat(parts_h))
    model = detector.reconstructor
    for p in model.parameters():
        p.requires_grad_(True)
    fitted = fit(model, train_data, None, cfg.train, epochs=plus.epochs, lr=plus.lr,
                 loss_fn=plus_loss(plus.alpha, plus.top_k), progress=progress)
    val = cache.extract(dataset.val, bad, policy, desc="val features")
    labels = np.array([x.label for x in val.samples])
    # The reconstruction changed, so did the residual statistics: refit the scorer, then the thresholds.
    calibration = fit_scoring(detector, normal, val.features, labels)
    manifest = dict(detector.manifest)
    for key in ("weights_sha256", "model_version"):
        manifest.pop(key, None)
    manifest.update({
        "created_at": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "settings": json.loads(cfg.model_dump_json()),
        "parent_model_version": detector.model_version,
        "threshold": calibration.threshold, "threshold_method": calibration.method,
        "scoring_fit": calibration.scoring_fit, "validation_scores": score_stats(calibration.val_normal_scores),
        "adtr_plus": {"synthetic": n_synthetic, "labelled": n_labelled, "history": fitted.history,
                      "seconds": fitted.seconds, "skipped_files": bad.items},
        "metrics": {},
    })
    manifest = save_checkpoint(out_dir, checkpoint_tensors(detector), manifest)
    log.info("ADTR+ model saved", path=str(out_dir), synthetic=n_synthetic, labelled=n_labelled,
             threshold=round(calibration.threshold, 5))
    return manifest


# ------------------------------------------------------------------ ADTR+ from operators' labels (the retrain job)
def label_cell_masks(labels: list[tuple[Path, list[int] | None, Path | None]],
                     feature_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per labelled defect (image path, box [x, y, w, h] in frame pixels or None, mask PNG or None):
    the fraction of each feature cell that is defect, (N, S, S), and whether the sample has a pixel-level
    label, (N,). A mask (nonzero = defect, the frame's size) wins over a box; a defect with neither has
    only its image label (the top-k loss). A mask or box that does not fit the frame is a DataError."""
    from PIL import Image

    cells, has = [], []
    for image, box, mask_path in labels:
        with Image.open(image) as im:
            width, height = im.size
        mask = None
        if mask_path is not None:
            pixels = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            if pixels is None:
                raise DataError(f"{mask_path}: the defect mask cannot be read")
            if pixels.shape != (height, width):
                raise DataError(f"{mask_path}: mask is {pixels.shape[1]}x{pixels.shape[0]}, its frame {image} is "
                                f"{width}x{height}")
            mask = pixels > 0
        elif box is not None:
            x, y, w, h = (int(v) for v in box)
            if w < 1 or h < 1 or x < 0 or y < 0 or x >= width or y >= height:
                raise DataError(f"{image}: box {box} is outside the {width}x{height} frame")
            mask = np.zeros((height, width), bool)
            mask[y : min(height, y + h), x : min(width, x + w)] = True
        if mask is not None and mask.any():
            cells.append(cell_fraction(mask[None], feature_size)[0])
            has.append(True)
        else:
            cells.append(torch.zeros(feature_size, feature_size))
            has.append(False)
    if not cells:
        return torch.zeros(0, feature_size, feature_size), torch.zeros(0, dtype=torch.bool)
    return torch.stack(cells), torch.tensor(has, dtype=torch.bool)


def plus_training_data(normals: torch.Tensor, defects: torch.Tensor, cell_masks: torch.Tensor,
                       has_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (features, cell masks, labels, has_mask) tuple `plus_loss` trains on: normals as all-normal
    pixel-labelled samples (pull only), defects with their masks (push-pull) or image labels (top-k)."""
    s = normals.shape[-1]
    return (torch.cat([normals, defects]),
            torch.cat([torch.zeros(len(normals), s, s), cell_masks.float()]),
            torch.cat([torch.zeros(len(normals)), torch.ones(len(defects))]),
            torch.cat([torch.ones(len(normals), dtype=torch.bool), has_mask.bool()]))
