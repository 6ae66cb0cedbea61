"""Pictures a person can look at: heatmap overlays with defect contours, and ROC curves (OpenCV only)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def heatmap_overlay(image_rgb: np.ndarray, amap: np.ndarray, vmax: float, mask: np.ndarray | None = None,
                    caption: str = "") -> np.ndarray:
    """BGR image: the frame blended with a JET heatmap scaled to [0, vmax], the true defect outlined
    in green. A fixed vmax (e.g. 2 × threshold) makes overlays comparable across images."""
    h, w = amap.shape
    base = cv2.cvtColor(cv2.resize(image_rgb, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
    scaled = np.clip(amap / max(vmax, 1e-12), 0.0, 1.0)
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(base, 0.55, heat, 0.45, 0.0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), 1)
    if caption:
        cv2.putText(out, caption, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([base, out], axis=1)


def roc_image(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, size: int = 480) -> None:
    """Draw ROC curves {name: (fpr, tpr, auroc)} with a chance diagonal into a PNG."""
    margin = 40
    canvas = np.full((size + 2 * margin, size + 2 * margin, 3), 255, np.uint8)

    def pt(x: float, y: float) -> tuple[int, int]:
        return int(margin + x * size), int(margin + (1 - y) * size)

    cv2.rectangle(canvas, pt(0, 0), pt(1, 1), (0, 0, 0), 1)
    cv2.line(canvas, pt(0, 0), pt(1, 1), (180, 180, 180), 1, cv2.LINE_AA)
    colors = [(200, 60, 20), (30, 120, 220), (40, 160, 40), (160, 40, 160)]
    for i, (name, (fpr, tpr, value)) in enumerate(curves.items()):
        poly = np.array([pt(x, y) for x, y in zip(fpr, tpr)], np.int32)
        color = colors[i % len(colors)]
        cv2.polylines(canvas, [poly], False, color, 2, cv2.LINE_AA)
        cv2.putText(canvas, f"{name}: AUROC {value:.3f}", (margin + 10, margin + size - 12 - 18 * i),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1, cv2.LINE_AA)
    cv2.putText(canvas, "false positive rate", (margin + size // 2 - 70, size + margin + 28),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "true positive rate", (4, margin - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)
