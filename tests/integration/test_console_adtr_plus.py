"""ADTR+ from the operators' labels: a retrain (Ray Train on the session's cluster) with confirmed defects in
the store fine-tunes with the ADTR+ losses on those in the training split (pixel push-pull for a box or a
mask, top-k for an image label only) and gates on those in the holdout split."""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest

from adtr_edge.actors.config import GateConfig, RetrainConfig, RetrainPlusConfig
from adtr_edge.actors.retrain import retrain
from adtr_edge.lifecycle.samples import SampleStore, split_for

from conftest import MAGNETIC_TILE
from live import registry_with_base

pytestmark = [pytest.mark.usefixtures("magnetic_tile"), pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def test_confirmed_defects_feed_adtr_plus_in_the_retrain_and_the_gate(trained_model, tmp_path, small_dataset):
    registry = registry_with_base(trained_model, tmp_path / "registry", MAGNETIC_TILE)
    store = SampleStore(registry.store_dir)
    known = {s.path for s in [*small_dataset.train, *small_dataset.val]}
    defects = [p for kind in ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray")
               for p in sorted((MAGNETIC_TILE / kind / "Imgs").glob("*.jpg"))[:4] if p not in known]
    expected = {"pixel": 0, "image": 0, "holdout": 0}
    for i, path in enumerate(defects):
        data = path.read_bytes()
        height, width = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE).shape
        kind = ("box", "mask", "none")[i % 3]
        mask = None
        if kind == "mask":
            pixels = np.zeros((height, width), np.uint8)
            pixels[height // 3: height // 2, width // 3: width // 2] = 255
            mask = cv2.imencode(".png", pixels)[1].tobytes()
        store.add(data, "confirmed_defect", "console:ana", ".jpg", camera_id="line", seq=i,
                  box=[2, 3, width // 2, height // 2] if kind == "box" else None, mask=mask)
        split = split_for(hashlib.sha256(data).hexdigest(), 1)
        if split == "holdout":
            expected["holdout"] += 1
        else:
            expected["image" if kind == "none" else "pixel"] += 1
    assert expected["holdout"] and expected["pixel"] and expected["image"], expected  # every path is exercised
    cfg = RetrainConfig(epochs=1, policy="register", adtr_plus=RetrainPlusConfig(epochs=2),
                        gate=GateConfig(max_far_increase=1.0, max_auroc_drop=1.0, max_recall_drop=1.0))
    outcome = retrain(registry.root, cfg, by="test")
    plus = outcome["adtr_plus"]
    assert plus["used"] and plus["defects"] == expected["pixel"] + expected["image"]
    assert plus["pixel_labelled"] == expected["pixel"] and plus["image_labelled"] == expected["image"]
    assert outcome["gate"]["mode"] == "full" and outcome["gate"]["candidate"]["defects"] == expected["holdout"]
    manifest = registry.show(outcome["version"])["manifest"]
    history = manifest["training"]["history"]
    assert [h.get("phase") for h in history] == [None, "adtr+", "adtr+"]
    assert manifest["training"]["adtr_plus"] == plus
    run = registry.root / "runs" / outcome["run"]
    assert not list(run.glob("plus_*.npy"))  # the run's inputs are cleaned up

    off = retrain(registry.root, cfg.model_copy(update={"adtr_plus": RetrainPlusConfig(enabled=False)}), by="test")
    assert not off["adtr_plus"]["used"]
    assert all("phase" not in h for h in registry.show(off["version"])["manifest"]["training"]["history"])
