"""Detection metrics: image AUROC, pixel AUROC, AUPRO (FPR ≤ limit), precision/recall/F1.

AUROC below 0.5 is reported as is, never flipped (method §6).
"""
from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import roc_curve


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Exact ROC AUC (Mann-Whitney U with average ranks for ties); None when one class is absent.

    Equal to sklearn's roc_auc_score, but one sort of float32 keeps tens of millions of pixels fast.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores)  # ties are grouped below, so stability is irrelevant
    ranked = scores[order]
    starts = np.r_[0, np.flatnonzero(ranked[1:] != ranked[:-1]) + 1]
    ends = np.r_[starts[1:], ranked.size]
    positives = np.add.reduceat(labels[order].astype(np.int64), starts)
    rank_sum = float((positives * (starts + ends + 1) / 2.0).sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(np.uint8), scores)
    return fpr, tpr


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, bins: int = 2000) -> float | None:
    """Area under the per-region-overlap curve up to `fpr_limit`, normalized to [0, 1].

    `masks` (N, H, W) bool, `maps` (N, H, W) float. Each connected defect region counts once, whatever
    its size; the FPR is over all defect-free pixels. Thresholds are `bins` quantiles of the scores.
    """
    masks = np.asarray(masks, dtype=bool)
    if not masks.any() or masks.all():
        return None
    maps = np.asarray(maps, dtype=np.float32)
    edges = np.unique(np.quantile(maps, np.linspace(0.0, 1.0, bins + 1)))
    # bin b holds scores in [edges[b], edges[b+1]); "above threshold edges[t]" = bins >= t.
    nb = len(edges)
    neg_bins = np.searchsorted(edges, maps[~masks], side="right") - 1
    neg_counts = np.bincount(neg_bins, minlength=nb)
    fpr = neg_counts[::-1].cumsum()[::-1] / max(1, neg_counts.sum())
    overlaps = []
    for mask, amap in zip(masks, maps):
        if not mask.any():
            continue
        n_regions, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        for r in range(1, n_regions):
            region = labels == r
            counts = np.bincount(np.searchsorted(edges, amap[region], side="right") - 1, minlength=nb)
            overlaps.append(counts[::-1].cumsum()[::-1] / region.sum())
    pro = np.mean(overlaps, axis=0)
    # fpr and pro fall as the threshold rises; integrate pro over fpr in [0, fpr_limit].
    order = np.argsort(fpr, kind="stable")
    fpr, pro = fpr[order], pro[order]
    keep = fpr <= fpr_limit
    f, p = fpr[keep], pro[keep]
    if f.size == 0 or f[-1] < fpr_limit:
        nxt = np.searchsorted(fpr, fpr_limit)
        if nxt < len(fpr):
            p_end = np.interp(fpr_limit, [f[-1] if f.size else 0.0, fpr[nxt]], [p[-1] if p.size else 0.0, pro[nxt]])
            f, p = np.append(f, fpr_limit), np.append(p, p_end)
    return float(np.trapezoid(p, f) / fpr_limit)


def precision_recall_f1(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    labels, predictions = np.asarray(labels).astype(bool), np.asarray(predictions).astype(bool)
    tp = int((labels & predictions).sum())
    fp = int((~labels & predictions).sum())
    fn = int((labels & ~predictions).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn,
            "tn": int((~labels & ~predictions).sum())}
