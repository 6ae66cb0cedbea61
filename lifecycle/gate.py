"""The promotion gate: a candidate model against the serving one, on the same held-back samples.

Both models score the same holdout normals (and labelled defects, when the store has any), each
deciding at its own threshold, as each would live. The candidate passes when it is not worse on any
measure the data allows:
- false alarms on holdout normals: not more than serving's + `max_far_increase`;
- with labelled defects: image AUROC ≥ serving's − `max_auroc_drop`, and recall at threshold not
  less than serving's − `max_recall_drop`.
Rates are compared image by image (both models decide the same images): a candidate is worse only if
it is worse by more than the tolerance AND significantly so, by McNemar's exact test on the images
the two disagree on (one-sided, `alpha`). On a 130-image holdout, 8 false alarms against 5 is not
evidence; on a small holdout a real regression must be large to show, which is why a normals-only
pass never promotes by itself.
Without labelled defects only normals can be checked (`mode: normals_only`): a model that learned
to call everything normal would pass, so such a pass must not promote by itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from adtr_edge.model.detector import AnomalyDetector
from adtr_edge.model.metrics import auroc
from adtr_edge.model.reconstructor import explained_variance
from adtr_edge.model.train import batched_scores


@dataclass(frozen=True)
class GateTolerances:
    max_far_increase: float = 0.01
    max_auroc_drop: float = 0.01
    max_recall_drop: float = 0.05
    min_holdout_normals: int = 5
    alpha: float = 0.05


@dataclass
class ModelEvaluation:
    version: str
    threshold: float
    false_alarm_rate: float | None
    recall: float | None
    auroc: float | None
    normals: int
    defects: int
    finite: bool
    normal_scores: list[float] = field(default_factory=list, repr=False)
    defect_scores: list[float] = field(default_factory=list, repr=False)
    # What the reconstructor explains of the holdout normals (1 − MSE(f, f̂) / MSE(f, mean)).
    explained_variance: float | None = None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("normal_scores", "defect_scores")}


@dataclass
class GateResult:
    passed: bool
    mode: str  # "full" (normals and labelled defects) or "normals_only"
    reasons: list[str]
    candidate: ModelEvaluation
    serving: ModelEvaluation | None

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "mode": self.mode, "reasons": self.reasons,
                "candidate": self.candidate.summary(),
                "serving": self.serving.summary() if self.serving else None}


def evaluate_model(detector: AnomalyDetector, normals: torch.Tensor, defects: torch.Tensor) -> ModelEvaluation:
    """Scores of cached holdout features; rates at the model's own threshold."""
    threshold = float(detector.threshold or math.inf)
    normal_scores, defect_scores = batched_scores(detector, normals), batched_scores(detector, defects)
    both = np.concatenate([normal_scores, defect_scores])
    labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(defect_scores))]
    return ModelEvaluation(
        version=detector.model_version, threshold=threshold,
        false_alarm_rate=float((normal_scores >= threshold).mean()) if len(normal_scores) else None,
        recall=float((defect_scores >= threshold).mean()) if len(defect_scores) else None,
        auroc=auroc(labels, both) if len(normal_scores) and len(defect_scores) else None,
        normals=len(normal_scores), defects=len(defect_scores),
        finite=bool(np.isfinite(both).all() and math.isfinite(threshold) and threshold > 0),
        explained_variance=explained_variance(detector.reconstructor, normals) if len(normals) >= 2 else None,
        normal_scores=normal_scores.tolist(), defect_scores=defect_scores.tolist())


def gate(candidate: ModelEvaluation, serving: ModelEvaluation | None, tol: GateTolerances) -> GateResult:
    reasons: list[str] = []
    mode = "full" if candidate.defects else "normals_only"
    if not candidate.finite:
        reasons.append("candidate scores or threshold are not finite")
    if candidate.normals < tol.min_holdout_normals:
        reasons.append(f"only {candidate.normals} holdout normals (need {tol.min_holdout_normals}) to judge it")
    if serving is not None and candidate.normals and len(serving.normal_scores) == candidate.normals:
        reason = worse_paired(np.asarray(candidate.normal_scores) >= candidate.threshold,
                              np.asarray(serving.normal_scores) >= serving.threshold, tol.max_far_increase, tol.alpha,
                              "false-alarm rate")
        if reason:
            reasons.append(reason)
    if serving is not None and mode == "full":
        if candidate.auroc is not None and serving.auroc is not None and \
                candidate.auroc < serving.auroc - tol.max_auroc_drop:
            reasons.append(f"AUROC {candidate.auroc:.3f} < serving {serving.auroc:.3f} - {tol.max_auroc_drop}")
        if len(serving.defect_scores) == candidate.defects:
            reason = worse_paired(np.asarray(candidate.defect_scores) < candidate.threshold,
                                  np.asarray(serving.defect_scores) < serving.threshold, tol.max_recall_drop,
                                  tol.alpha, "miss rate (1 - recall)")
            if reason:
                reasons.append(reason)
    return GateResult(not reasons, mode, reasons, candidate, serving)


def worse_paired(candidate_bad: np.ndarray, serving_bad: np.ndarray, tolerance: float, alpha: float,
                 what: str) -> str | None:
    """A reason when the candidate's rate of bad outcomes (false alarms, misses) on the same images is
    higher than serving's by more than `tolerance` and significantly (McNemar's exact one-sided test)."""
    from scipy.stats import binomtest

    n = len(candidate_bad)
    only_candidate = int((candidate_bad & ~serving_bad).sum())
    only_serving = int((serving_bad & ~candidate_bad).sum())
    excess = (only_candidate - only_serving) / n
    if excess <= tolerance:
        return None
    p = binomtest(only_candidate, only_candidate + only_serving, 0.5, alternative="greater").pvalue
    if p >= alpha:
        return None
    return (f"{what} {candidate_bad.mean():.3f} vs serving {serving_bad.mean():.3f} on the same {n} images "
            f"(worse on {only_candidate}, better on {only_serving}; McNemar p = {p:.3g} < {alpha})")
