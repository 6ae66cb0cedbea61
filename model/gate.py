"""The promotion gate: a candidate model against the serving one, on the same held-back samples.

Both models score the same holdout normals (and labelled defects, when the store has any), each
deciding at its own threshold, as each would live. The candidate passes when it is not worse on any
measure the data allows:
- false-alarm rate on holdout normals ≤ serving's + `max_far_increase` (at least one frame's worth);
- with labelled defects: image AUROC ≥ serving's − `max_auroc_drop` and recall at threshold ≥
  serving's − `max_recall_drop` (at least one defect's worth).
Without labelled defects only normals can be checked (`mode: normals_only`): a model that learned
to call everything normal would pass, so such a pass must not promote by itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .detector import AnomalyDetector
from .metrics import auroc
from .train import batched_scores


@dataclass(frozen=True)
class GateTolerances:
    max_far_increase: float = 0.01
    max_auroc_drop: float = 0.01
    max_recall_drop: float = 0.05
    min_holdout_normals: int = 5


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
        normal_scores=normal_scores.tolist(), defect_scores=defect_scores.tolist())


def gate(candidate: ModelEvaluation, serving: ModelEvaluation | None, tol: GateTolerances) -> GateResult:
    reasons: list[str] = []
    mode = "full" if candidate.defects else "normals_only"
    if not candidate.finite:
        reasons.append("candidate scores or threshold are not finite")
    if candidate.normals < tol.min_holdout_normals:
        reasons.append(f"only {candidate.normals} holdout normals (need {tol.min_holdout_normals}) to judge it")
    # "Not worse" within what the holdout can resolve: one more false alarm (or one more miss) than the
    # serving model is noise on a small set, never more than that.
    if serving is not None and candidate.false_alarm_rate is not None and serving.false_alarm_rate is not None:
        allowed = max(tol.max_far_increase, 1.0 / candidate.normals)
        if candidate.false_alarm_rate > serving.false_alarm_rate + allowed + 1e-12:
            reasons.append(f"false-alarm rate {candidate.false_alarm_rate:.3f} > serving {serving.false_alarm_rate:.3f}"
                           f" + {allowed:.3f}")
    if serving is not None and mode == "full":
        if candidate.auroc is not None and serving.auroc is not None and \
                candidate.auroc < serving.auroc - tol.max_auroc_drop:
            reasons.append(f"AUROC {candidate.auroc:.3f} < serving {serving.auroc:.3f} - {tol.max_auroc_drop}")
        allowed = max(tol.max_recall_drop, 1.0 / candidate.defects)
        if candidate.recall is not None and serving.recall is not None and \
                candidate.recall < serving.recall - allowed - 1e-12:
            reasons.append(f"recall {candidate.recall:.3f} < serving {serving.recall:.3f} - {allowed:.3f}")
    return GateResult(not reasons, mode, reasons, candidate, serving)
