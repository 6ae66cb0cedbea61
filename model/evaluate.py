"""Offline evaluation on a dataset's test split: metrics, per-defect-type breakdown, overlays, ROC.

Pixel metrics are computed at the model's input resolution (image_size × image_size), with masks
resized nearest-neighbour.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog
import torch

from .data import NORMAL_TYPE, BadFiles, DataError, Dataset, read_image, read_mask, resize_mask
from .detector import AnomalyDetector, require_threshold
from .features import FeatureCache
from .metrics import aupro, auroc, precision_recall_f1, roc_points
from .reconstructor import reconstruction_report
from .scoring import normalized_score
from .visualize import heatmap_overlay, roc_image

log = structlog.get_logger(__name__)


def score_feature_set(detector: AnomalyDetector, features: torch.Tensor,
                      batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, H, W), scores (N,)) for cached features."""
    out = [detector.score_features(features[i : i + batch]) for i in range(0, len(features), batch)]
    return torch.cat([o.maps for o in out]).numpy(), torch.cat([o.scores for o in out]).numpy()


def load_masks(samples, size: int, bad: BadFiles, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """(masks (N, size, size) bool, usable (N,) bool): usable = the sample has pixel ground truth."""
    masks = np.zeros((len(samples), size, size), bool)
    usable = np.zeros(len(samples), bool)
    for i, s in enumerate(samples):
        if s.label == 0:
            usable[i] = True
            continue
        if s.mask_path is None:
            continue
        try:
            shape = read_image(s.path).shape[:2]
            masks[i] = resize_mask(read_mask(s.mask_path, shape), size)
            usable[i] = True
        except DataError as exc:
            bad.record(s.mask_path, str(exc).split(": ", 1)[-1], policy)
    return masks, usable


def _pixel_metrics(masks: np.ndarray, maps: np.ndarray, usable: np.ndarray) -> tuple[float | None, float | None]:
    if not usable.any() or not masks[usable].any():
        return None, None
    return auroc(masks[usable], maps[usable]), aupro(masks[usable], maps[usable])


def evaluate(detector: AnomalyDetector, dataset: Dataset, out_dir: Path | None = None,
             cache: FeatureCache | None = None, progress: bool = True, overlays_per_group: int = 4) -> dict[str, Any]:
    cfg = detector.cfg
    threshold = require_threshold(detector)
    cache = cache or FeatureCache(detector.backbone, cfg.data.cache_dir)
    bad = BadFiles()
    t0 = time.monotonic()
    test = cache.extract(dataset.test, bad, cfg.data.bad_files, cfg.train.feature_batch_size, progress, "test features")
    maps, scores = score_feature_set(detector, test.features)
    score_seconds = time.monotonic() - t0
    samples = test.samples
    labels = np.array([s.label for s in samples])
    types = np.array([s.defect_type for s in samples])
    masks, usable = load_masks(samples, detector.image_size, bad, cfg.data.bad_files)
    predicted = scores >= threshold
    pixel_auroc, pixel_aupro = _pixel_metrics(masks, maps, usable)

    per_type: dict[str, Any] = {}
    normal = types == NORMAL_TYPE
    for kind in sorted(set(types) - {NORMAL_TYPE}):
        sel = types == kind
        both = sel | normal
        px_auroc, px_aupro = _pixel_metrics(masks[both], maps[both], usable[both] & (sel[both] | normal[both]))
        per_type[kind] = {
            "count": int(sel.sum()),
            "image_auroc": auroc(labels[both], scores[both]),
            "pixel_auroc": px_auroc, "aupro": px_aupro,
            "recall": float(predicted[sel].mean()),
            "mean_normalized_score": float(normalized_score(scores[sel], threshold).mean()),
        }
    prf = precision_recall_f1(labels, predicted)
    report: dict[str, Any] = {
        "dataset": dataset.name, "layout": dataset.layout,
        "model_version": detector.model_version,
        "image_auroc": auroc(labels, scores),
        "pixel_auroc": pixel_auroc,
        "aupro": pixel_aupro,
        "aupro_fpr_limit": 0.3,
        "pixel_resolution": detector.image_size,
        "threshold": threshold,
        "precision": prf["precision"], "recall": prf["recall"], "f1": prf["f1"],
        "confusion": {k: prf[k] for k in ("tp", "fp", "fn", "tn")},
        "false_positive_rate": float(predicted[labels == 0].mean()) if (labels == 0).any() else None,
        "counts": {"test": len(samples), "anomalous": int(labels.sum()), "normal": int((labels == 0).sum()),
                   "with_pixel_masks": int((usable & (labels == 1)).sum())},
        "per_type": per_type,
        # What the reconstructor explains of the test normals, and how much more it misses on defect cells.
        "reconstruction": reconstruction_report(detector.reconstructor, test.features, labels,
                                                masks if (usable & (labels == 1)).any() else None),
        "skipped_files": bad.items,
        "images_per_second": len(samples) / max(score_seconds, 1e-9),
        "scores": [
            {"path": str(s.path), "defect_type": s.defect_type, "label": int(s.label),
             "score": float(sc), "normalized_score": normalized_score(float(sc), threshold), "is_anomaly": bool(p)}
            for s, sc, p in zip(samples, scores, predicted)
        ],
    }
    if out_dir is not None:
        _write_pictures(out_dir, samples, maps, scores, masks, labels, threshold, report, overlays_per_group)
    return report


def _write_pictures(out_dir: Path, samples, maps, scores, masks, labels, threshold, report, k) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {}
    if report["image_auroc"] is not None:
        fpr, tpr = roc_points(labels, scores)
        curves["image"] = (fpr, tpr, report["image_auroc"])
    roc_image(curves, out_dir / "roc.png")
    anomalous, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    groups = {
        "missed-defect": anomalous[np.argsort(scores[anomalous])][:k],  # lowest-scoring defects
        "false-alarm": normal[np.argsort(-scores[normal])][:k],  # highest-scoring normals
        "caught-defect": anomalous[np.argsort(-scores[anomalous])][:k],
        "clean-normal": normal[np.argsort(scores[normal])][:k],
    }
    overlay_dir = out_dir / "overlays"
    overlay_dir.mkdir(exist_ok=True)
    written = []
    for group, indices in groups.items():
        for rank, i in enumerate(indices):
            s = samples[i]
            caption = f"{s.defect_type} score {scores[i] / threshold:.2f}x thr"
            picture = heatmap_overlay(read_image(s.path), maps[i], 2 * threshold, masks[i], caption)
            path = overlay_dir / f"{group}-{rank}-{s.defect_type}-{s.path.stem}.png"
            cv2.imwrite(str(path), picture)
            written.append(str(path))
    report["overlays"] = written
    report["roc_curve"] = str(out_dir / "roc.png")


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
