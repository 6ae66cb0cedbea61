"""Offline prediction: an image or a folder → results.csv / results.json (+ heatmap overlays).

Unreadable files are skipped, counted and logged; they never stop the rest of the folder.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import structlog
from tqdm import tqdm

from .data import IMAGE_SUFFIXES, DataError, images_in, read_image
from .detector import AnomalyDetector, require_threshold
from .scoring import normalized_score
from .visualize import heatmap_overlay

log = structlog.get_logger(__name__)
FIELDS = ["path", "score", "normalized_score", "threshold", "is_anomaly", "model_version", "error"]


def image_paths(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return images_in(path)
    raise FileNotFoundError(f"no image or folder at {path}")


def predict_path(detector: AnomalyDetector, path: Path, out_dir: Path, batch_size: int = 8,
                 overlays: bool = True, progress: bool = False) -> dict[str, Any]:
    threshold = require_threshold(detector)
    paths = image_paths(path)
    if not paths:
        raise DataError(f"{path}: no images found (looked for {sorted(IMAGE_SUFFIXES)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    if overlays:
        (out_dir / "overlays").mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(paths), batch_size), disable=not progress, desc="predict"):
        batch, images = [], []
        for p in paths[start : start + batch_size]:
            try:
                images.append(read_image(p))
                batch.append(p)
            except DataError as exc:
                log.warning("skipping unreadable image", path=str(p), error=str(exc))
                rows.append({"path": str(p), "score": None, "normalized_score": None, "threshold": threshold,
                             "is_anomaly": None, "model_version": detector.model_version, "error": str(exc)})
        if not images:
            continue
        result = detector.score_images(images)
        for i, p in enumerate(batch):
            score = float(result.scores[i])
            rows.append({"path": str(p), "score": score, "normalized_score": normalized_score(score, threshold),
                         "threshold": threshold, "is_anomaly": bool(result.is_anomaly[i]),
                         "model_version": detector.model_version, "error": ""})
            if overlays:
                caption = f"{'ANOMALY' if result.is_anomaly[i] else 'ok'} {float(result.normalized[i]):.2f}x thr"
                picture = heatmap_overlay(images[i], result.maps[i].numpy(), 2 * threshold, None, caption)
                cv2.imwrite(str(out_dir / "overlays" / f"{p.stem}.png"), picture)
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
    errors = sum(1 for r in rows if r["error"])
    summary = {"images": len(rows), "scored": len(rows) - errors, "unreadable": errors,
               "anomalies": sum(1 for r in rows if r["is_anomaly"]), "out": str(out_dir),
               "model_version": detector.model_version}
    log.info("prediction done", **summary)
    return summary
