"""Does `backbone.min_defect_px` earn its setting? Small painted defects, default input against the sized one.

For each smallest-defect size D (camera pixels) and each data set: two statistics-only models
(`train.epochs=0`, the detector every trained variant matched, docs/reconstructor.md) are built
exactly as `train` builds them: (a) the configured input size (256 px), (b) `min_defect_px=D`,
which raises the input so a D-pixel defect covers half a grid cell. Both are then checked the way
`train` checks (b): validation normals with and without one painted disc of D camera pixels
(`model.sizing.small_defect_check`): recall and false alarms at each model's calibrated threshold,
image AUROC. Validation data only.

    python tests/benchmarks/defect_size_study.py --sets mt elpv:mono --sizes 4 8

Writes runs/study/defect_size.json and prints one table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adtr_edge.agent.settings import load_settings
from adtr_edge.model.data import BadFiles, load_dataset
from adtr_edge.model.detector import load_detector
from adtr_edge.model.sizing import small_defect_check
from adtr_edge.model.train import train_model

SETS = {"mt": str(ROOT.parent / "shared" / "data" / "magnetic-tile"), "elpv:mono": "elpv:mono",
        "elpv:poly": "elpv:poly"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", nargs="+", default=["mt"], choices=sorted(SETS))
    ap.add_argument("--sizes", nargs="+", type=float, default=[4, 8])
    ap.add_argument("--limit-per-class", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "study" / "defect_size.json")
    args = ap.parse_args()
    rows = []
    for name in args.sets:
        base = load_settings(overrides=[f"data.limit_per_class={args.limit_per_class}", "train.epochs=0"])
        dataset = load_dataset(SETS[name], base.data)
        for d in args.sizes:
            for variant, extra in (("configured", []), ("sized", [f"backbone.min_defect_px={d}"])):
                cfg = load_settings(overrides=[f"data.limit_per_class={args.limit_per_class}", "train.epochs=0",
                                               *extra])
                t0 = time.monotonic()
                with tempfile.TemporaryDirectory() as tmp:
                    manifest = train_model(cfg, dataset, Path(tmp), progress=False)
                    detector = load_detector(Path(tmp))
                    check = small_defect_check(detector, [s for s in dataset.val if s.label == 0], d,
                                               BadFiles(), "skip", seed=1)
                row = {"set": name, "min_defect_px": d, "variant": variant, "image_size": manifest["image_size"],
                       "feature_size": manifest["feature_shape"][1], "seconds": round(time.monotonic() - t0, 1),
                       **check}
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print("\n| set | defect px | input | grid | recall | false alarms | AUROC |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['min_defect_px']:g} | {r['image_size']} ({r['variant']}) | {r['feature_size']} "
              f"| {r['recall']:.3f} | {r['false_alarms']:.3f} | {r['auroc']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
