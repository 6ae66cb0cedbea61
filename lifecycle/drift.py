"""Score drift: is a camera's recent image-score distribution still the one the model was calibrated on?

The reference is the validation normals' score quantiles stored in the model's manifest; the live side
is a rolling window of one camera's scores. The measure is the population stability index over the
bins those quantiles cut,

    PSI = Σ_b (a_b − e_b) · ln(a_b / e_b),   e_b = the reference share of bin b, a_b = the live share.

Why PSI and not a KS test: the manifest keeps a few quantiles, not the validation scores, and PSI needs
only those; it is O(bins) per frame with a running histogram; it weighs shifts in the tails (where
the threshold sits) more than KS's largest CDF gap; and its conventional reading is stable across
window sizes (< 0.1 no shift, 0.1–0.25 moderate, > 0.25 significant), whereas a KS p-value on a
256-frame window flags trivial shifts on a line that runs for months.

Both sides are finite samples (a validation set of tens of images, a window of hundreds of frames),
so PSI has a noise floor even without drift: it is close to a χ² statistic with (bins − 1) degrees of
freedom scaled by (1/n_ref + 1/n_live). The alarm needs both: PSI above the practical threshold and
above the 99th percentile of that noise (measured: 76 validation scores against 96 frames of the same
line gave PSI 0.31 with no drift at all). Once raised, the alarm clears only when PSI falls below
CLEAR_FRACTION of that threshold: a window sitting on the threshold flipped it on and off at every
frame (two log lines a frame in the learning benchmark).
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import chi2

CLEAR_FRACTION = 0.8  # hysteresis: an alarm raised above the threshold clears below 0.8 × it

_SMOOTH = 0.5  # additive smoothing of live bin counts: an empty bin must not make the PSI infinite


MIN_TAIL = 2.0  # a quantile is an edge only if ≥ this many validation scores lie beyond it on its thin side


@dataclass(frozen=True)
class Reference:
    edges: list[float]  # bin edges: the validation quantiles kept
    expected: np.ndarray  # the reference share of each bin (len(edges) + 1)
    n: int  # how many validation scores the quantiles came from (0: unknown)


def reference_bins(validation_scores: dict[str, Any]) -> Reference | None:
    """The drift reference from a manifest's `validation_scores`; None without quantiles.

    A quantile the validation set cannot estimate (its 0.99 quantile from 70 scores, its quartiles from
    5) would make a bin whose expected share is a guess, and the PSI of a camera that is exactly like
    the validation set large: only quantiles with at least MIN_TAIL scores beyond them are used.
    """
    pairs = validation_scores.get("quantiles")
    if not pairs:  # older manifests keep only these
        pairs = [[p, validation_scores[k]] for p, k in ((0.5, "p50"), (0.9, "p90"), (0.95, "p95"), (0.99, "p99"))
                 if k in validation_scores]
    n = validation_scores.get("n")
    if n:
        pairs = [(p, v) for p, v in pairs if n * min(p, 1 - p) >= MIN_TAIL]
    edges: list[float] = []
    probs: list[float] = []
    for p, value in sorted(pairs):
        value = float(value)
        if not math.isfinite(value) or (edges and value <= edges[-1]):
            continue  # ties (a tiny validation set) merge into one bin
        edges.append(value)
        probs.append(float(p))
    if not edges:
        return None
    return Reference(edges, np.diff(np.r_[0.0, probs, 1.0]), int(n or 0))


def psi(expected: np.ndarray, counts: np.ndarray) -> float:
    actual = (counts + _SMOOTH) / (counts.sum() + _SMOOTH * len(counts))
    return float(np.sum((actual - expected) * np.log(actual / expected)))


MIN_EXPECTED = 5.0  # the live window must expect at least this many scores in every bin (χ² rule of thumb)


def coarsen(edges: list[float], expected: np.ndarray, window: int) -> tuple[list[float], np.ndarray]:
    """Merge bins, tails first, until each expects ≥ MIN_EXPECTED of `window` scores: a 48-frame window
    cannot estimate a 1 % tail bin, and its noise alone would read as drift."""
    edges = list(edges)
    probs: list[float] = list(expected)  # a list: merged bins are spliced in place
    while len(probs) > 2 and min(probs) * window < MIN_EXPECTED:
        i = int(np.argmin(probs))
        j = i - 1 if i == len(probs) - 1 or (i > 0 and probs[i - 1] <= probs[i + 1]) else i + 1
        lo, hi = min(i, j), max(i, j)
        probs[lo:hi + 1] = [probs[lo] + probs[hi]]
        del edges[lo]  # the edge between the two merged bins
    return edges, np.asarray(probs)


def noise_floor(bins: int, n_ref: int, n_live: int, quantile: float = 0.99) -> float:
    """The PSI two samples of one distribution exceed with probability 1 − quantile (χ² approximation)."""
    if n_ref <= 0 or n_live <= 0:
        return 0.0
    return float(chi2.ppf(quantile, max(1, bins - 1))) * (1.0 / n_ref + 1.0 / n_live)


class ScoreDrift:
    """Rolling PSI of one camera's last `window` scores against a reference from `reference_bins`."""

    def __init__(self, reference: Reference, window: int, min_samples: int, alarm_psi: float):
        edges, expected = coarsen(reference.edges, reference.expected, window)
        self.edges, self.expected, self.n_ref = edges, expected, reference.n
        self.window, self.min_samples, self.alarm_psi = window, min(min_samples, window), alarm_psi
        self.recent: deque[int] = deque(maxlen=window)
        self.counts = np.zeros(len(expected), np.int64)
        self.median_ref = float(np.interp(0.5, np.cumsum(expected)[:-1], edges)) if len(edges) > 1 else edges[0]
        self.scores: deque[float] = deque(maxlen=window)
        self.alarm = False

    def observe(self, score: float) -> None:
        if not math.isfinite(score):
            score = math.inf
        if len(self.recent) == self.window:
            self.counts[self.recent[0]] -= 1
        b = bisect.bisect_right(self.edges, score)
        self.recent.append(b)
        self.scores.append(score)
        self.counts[b] += 1

    def psi(self) -> float | None:
        return psi(self.expected, self.counts) if len(self.recent) >= self.min_samples else None

    def threshold(self) -> float:
        """The PSI above which this window's scores have drifted: practical and significant."""
        return max(self.alarm_psi, noise_floor(len(self.expected), self.n_ref, len(self.recent)))

    def state(self) -> dict[str, Any]:
        value = self.psi()
        median = float(np.median(self.scores)) if self.scores else None
        threshold = self.threshold()
        if value is None:
            self.alarm = False
        elif value > threshold:
            self.alarm = True
        elif value < CLEAR_FRACTION * threshold:
            self.alarm = False
        return {"n": len(self.recent), "psi": value, "threshold": threshold, "alarm": self.alarm, "median": median,
                "median_ratio": median / self.median_ref if median is not None and self.median_ref else None}
