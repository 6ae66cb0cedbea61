"""Which warm-start retrain setting adapts best to a shifted line? A sweep over the loop demo's store.

After `make demo-loop`, its registry holds the original model, the base normals and the relit normals the
operator accepted. For each setting this trains the serving reconstructor on that store's training split
exactly as the retrain job does (actors/retrain.py: warm start, operator normals repeated, the scoring
terms and thresholds refitted on the store's training and validation normals), then counts false alarms
on relit normals the demo streams after its retrain, and recall on relit defects, plus both on the
original lighting (nothing may get worse there). The first row is the control: the serving reconstructor
untouched, only the scoring refitted on the same snapshot. One seed; minutes on a GPU, hours on 2 busy
cores.

    python tests/benchmarks/retrain_sweep.py --registry runs/demo/loop/registry \
        --configs '[{"epochs": 12, "lr": 0.3, "rep": 4}, {"epochs": 24, "lr": 0.3, "rep": 4}]'
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adtr_edge.agent.demo_loop import GAIN, phase_images, relit
from adtr_edge.lifecycle.registry import Registry
from adtr_edge.lifecycle.samples import SampleStore
from adtr_edge.model.checkpoint import load_checkpoint
from adtr_edge.model.data import BadFiles, Sample, load_dataset, read_image, to_rgb8
from adtr_edge.model.detector import AnomalyDetector, load_detector
from adtr_edge.model.features import FeatureCache
from adtr_edge.model.reconstructor import Reconstructor, explained_variance
from adtr_edge.model.scorer import reconstructor_tensors
from adtr_edge.model.train import fit, fit_scoring, seed_everything

DEFAULT = [{"epochs": e, "lr": 0.3, "rep": 4} for e in (12, 24, 30)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", default="runs/demo/loop/registry")
    p.add_argument("--version", help="the model the retrain starts from (default: the registry's first version)")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/magnetic-tile"))
    p.add_argument("--configs", default=json.dumps(DEFAULT))
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    reg = Registry(args.registry)
    version = args.version or reg.versions()[0]["version"]
    serving = load_detector(reg.version_dir(version)).to(args.device)
    snapshot = SampleStore(reg.store_dir).snapshot()
    cache = FeatureCache(serving.backbone, tempfile.mkdtemp(), use_disk=False)

    def features(rows):
        return cache.extract([Sample(s.path, s.label, s.origin) for s in rows], BadFiles(), "skip", batch_size=32)

    train_fs = features(snapshot.select(label=0, split="train"))
    val = features(snapshot.select(label=0, split="val")).features
    before, _, after, defects = phase_images(load_dataset(args.data, serving.cfg.data).test)  # the demo's draw

    def embed(images):
        with torch.no_grad():
            return torch.cat([serving.embed(images[i:i + 32]).float().cpu() for i in range(0, len(images), 32)])

    sets = {"relit_normals": embed([to_rgb8(relit(p, GAIN).pixels) for p in after]),
            "relit_defects": embed([to_rgb8(relit(p, GAIN).pixels) for p in defects]),
            "normals": embed([read_image(p) for p in before]), "defects": embed([read_image(p) for p in defects])}

    def flagged(det: AnomalyDetector) -> dict[str, float]:
        return {k: round(float((det.score_features(v).scores.numpy() >= det.threshold).mean()), 3)
                for k, v in sets.items()}

    print(json.dumps({"model": version, "threshold": round(serving.threshold, 3), **flagged(serving),
                      "train": len(train_fs.samples),
                      "operator": sum(s.defect_type == "operator" for s in train_fs.samples)}), flush=True)
    # The control first: the serving reconstructor unchanged, only its scoring refitted on the same store
    # snapshot (what a retrain at lr ~0 gives); a trained row must beat it to show that training helps.
    # Operator frames repeated as the job repeats them for its own refit (retrain.operator_repeat, 4).
    for c in [{"epochs": 0, "lr": 0.0, "rep": 4, "control": "refit only"}] + json.loads(args.configs):
        seed_everything(0)
        reps = [c["rep"] if s.defect_type == "operator" else 1 for s in train_fs.samples]
        train = train_fs.features.repeat_interleave(torch.tensor(reps), dim=0)
        model = Reconstructor(train.shape[1], serving.cfg.backbone.feature_size, serving.cfg.reconstructor)
        model.load_state_dict(reconstructor_tensors(load_checkpoint(reg.version_dir(version))[1]))
        model.to(serving.device)
        t0 = time.monotonic()
        if c["epochs"]:
            tcfg = serving.cfg.train.model_copy(update={"epochs": c["epochs"], "lr": serving.cfg.train.lr * c["lr"],
                                                        "max_minutes": 0.0})
            fit(model, (train,), None, tcfg, progress=False)
        det = AnomalyDetector(serving.cfg, serving.backbone, model)
        det.device = serving.device
        # As the retrain job does: the scoring terms, their scales and the thresholds refitted on the snapshot.
        fit_scoring(det, train, val, np.zeros(len(val), int))
        print(json.dumps({**c, **flagged(det), "threshold": round(det.threshold, 3),
                          "explained_variance_relit": round(explained_variance(model, sets["relit_normals"]), 3),
                          "train_seconds": round(time.monotonic() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
