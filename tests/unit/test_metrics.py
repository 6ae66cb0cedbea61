"""Metrics agree with references and never flip a bad AUROC."""
import numpy as np
from sklearn.metrics import roc_auc_score

from adtr_edge.model.metrics import aupro, auroc, precision_recall_f1


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(5000) < 0.2
    scores = np.round(rng.normal(size=5000) + labels, 1)  # many ties
    assert abs(auroc(labels, scores) - roc_auc_score(labels, scores)) < 1e-12


def test_auroc_below_half_is_not_flipped():
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auroc(np.zeros(4), np.arange(4.0)) is None


def test_aupro_perfect_and_uninformative_maps():
    masks = np.zeros((2, 32, 32), bool)
    masks[0, 4:8, 4:8] = True
    masks[0, 20:30, 20:30] = True
    perfect = masks.astype(float)
    assert aupro(masks, perfect) > 0.99
    rng = np.random.default_rng(0)
    noise = rng.random((2, 32, 32))
    # Random scores: PRO ≈ FPR, so the normalized area up to 0.3 is ≈ 0.15.
    assert 0.08 < aupro(masks, noise) < 0.22


def test_aupro_weights_regions_equally():
    masks = np.zeros((1, 64, 64), bool)
    masks[0, 0:40, 0:40] = True  # big region, found
    masks[0, 60:62, 60:62] = True  # small region, missed
    maps = np.zeros((1, 64, 64))
    maps[0, 0:40, 0:40] = 1.0
    # PRO is 0.5 at FPR 0 (one of two regions), rising linearly to 1 at FPR 1: the mean PRO
    # over FPR in [0, 0.3] is (0.5 + 0.65) / 2. Weighted by pixels it would be ≈ 1.
    assert abs(aupro(masks, maps) - 0.575) < 1e-6


def test_precision_recall_f1():
    m = precision_recall_f1(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)
