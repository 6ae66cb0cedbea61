"""What does the reconstructor learn, and does it help? Trained against untrained, several sets, validation only.

For each data set (Magnetic Tile, ELPV mono and poly by default) and each reconstructor/training variant
(JSON overrides of the settings), for each seed: train the reconstructor on cached features exactly as
`train` does (`model.train.fit`), then report on VALIDATION data only (validation normals + synthetic
defects painted on them, `synthetic_sets.py`):
- explained variance of the validation normals' features (1 − MSE(f, f̂) / MSE(f, mean)), per epoch too;
- the residual energy of defect cells over normal cells (synthetic defects' masks on the feature grid);
- image AUROC, pixel AUROC, AUPRO with the variant's scoring refitted, beside the same variant untrained
  (zero epochs: the reconstruction is each cell's training mean) with the same scoring refitted.

    python tests/benchmarks/reconstructor_study.py --sets mt elpv:mono elpv:poly --seeds 0 1 2 \\
        --variants '{"default": [], "mask 3, 60 epochs": ["reconstructor.neighbor_mask=3", "train.epochs=60"]}'

Writes runs/study/<name>.json (every row, as measured) and prints one table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import structlog
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import Bench

from adtr_edge.agent.settings import load_settings, merge
from adtr_edge.model.data import Dataset, load_dataset
from adtr_edge.model.evaluate import score_feature_set
from adtr_edge.model.metrics import auroc
from adtr_edge.model.reconstructor import reconstruction_report
from adtr_edge.model.train import fit, new_reconstructor, seed_everything

log = structlog.get_logger("study")


def dataset_for(spec: str, data_root: str, cfg) -> tuple[Dataset, list[tuple[str, int]]]:
    """The set a spec names ("mt", "elpv:mono", …, or several joined by "+": one model for all, the products
    mixed) and its parts: (name, validation normals) in validation order."""
    if "+" in spec:
        sets = [dataset_for(part, data_root, cfg)[0] for part in spec.split("+")]
        joined = Dataset(spec, "mixed", "", [s for d in sets for s in d.train], [s for d in sets for s in d.val],
                         [s for d in sets for s in d.test])
        return joined, [(part, sum(s.label == 0 for s in d.val)) for part, d in zip(spec.split("+"), sets)]
    ds = load_dataset(data_root if spec == "mt" else spec, cfg.data)
    if spec.startswith("elpv"):  # as bench_model: p=0 against p=1 (1/3 and 2/3 are reported apart there)
        ds = Dataset(ds.name, ds.layout, ds.root, ds.train, ds.val,
                     [s for s in ds.test if s.defect_type in ("good", "p=1")])
    return ds, [(spec, sum(s.label == 0 for s in ds.val))]


def part_of_each(val: dict, parts: list[tuple[str, int]]) -> np.ndarray:
    """Which part each validation item comes from: normals in order, then four painted defects per normal."""
    normals = np.concatenate([[name] * n for name, n in parts])
    return np.concatenate([normals, np.repeat(normals, int((val["labels"] == 1).sum()) // len(normals))])


def reconstruction_stats(model, val: dict) -> dict:
    """Explained variance of the validation normals, defect/normal residual ratio on the synthetic defects."""
    report = reconstruction_report(model, val["features"], val["labels"], val["masks"])
    return {k: report[k] for k in ("explained_variance", "defect_residual_ratio")}


UNTRAINED: dict[str, dict] = {}  # untrained rows by what they depend on (see main)
TRAINED: dict[str, dict] = {}  # a trained reconstructor's state by everything that shaped it: variants that
# differ only in scoring rescore the same network instead of training it again


def run_variant(bench: Bench, cfg, spec: str, ds: Dataset, parts: list[tuple[str, int]], seed: int,
                epochs_override: int | None = None) -> dict:
    cfg = merge(cfg, [f"train.seed={seed}"])
    seed_everything(seed)
    train = bench.features(cfg, ds.train, "train features")
    val = bench.val_set(cfg, ds)
    val_normal = val["features"][torch.from_numpy(val["labels"] == 0)]
    model = new_reconstructor(cfg, train.shape[1], train)
    epochs = cfg.train.epochs if epochs_override is None else epochs_override
    key = json.dumps([spec, epochs, cfg.backbone.model_dump(), cfg.reconstructor.model_dump(),
                      cfg.train.model_dump()], sort_keys=True)
    t0 = time.monotonic()
    if key in TRAINED:
        model.load_state_dict(TRAINED[key]["state"])
        curve, train_seconds = TRAINED[key]["curve"], TRAINED[key]["seconds"]
    else:
        curve = []
        if epochs:
            def on_epoch(record):
                if record["epoch"] in (1, 2, 5) or record["epoch"] % 10 == 0 or record["epoch"] == epochs:
                    curve.append({"epoch": record["epoch"], "val_loss": record.get("val_loss"),
                                  "explained_variance": record.get("val_explained_variance")})
            fit(model, (train,), (val_normal,), cfg.train, epochs=epochs, progress=False, on_epoch=on_epoch)
        train_seconds = time.monotonic() - t0
        TRAINED[key] = {"state": {k: v.clone() for k, v in model.state_dict().items()}, "curve": curve,
                        "seconds": train_seconds}
        if bench.args.save_models:
            folder = Path(bench.args.out) / "models"
            folder.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha256(key.encode()).hexdigest()[:12]
            torch.save({"key": key, "state": TRAINED[key]["state"]}, folder / f"{name}.pt")
    model.eval()
    stats = reconstruction_stats(model, val)
    detector = bench.fitted(cfg, model, ds)
    maps, image_scores = score_feature_set(detector, val["features"])
    scores = bench.metrics(val, maps, image_scores)
    normal = val["types"] == "good"
    by_kind = {kind: auroc(val["labels"][normal | (val["types"] == kind)],
                           image_scores[normal | (val["types"] == kind)])
               for kind in sorted(set(val["types"]) - {"good"})}
    row = {"seed": seed, "epochs": epochs, "train_seconds": round(train_seconds, 1), **stats,
           "validation": {k: scores[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
           "image_auroc_by_kind": by_kind, "curve": curve}
    if len(parts) > 1:  # one model for several products: each product's own numbers too
        which = part_of_each(val, parts)
        row["by_part"] = {}
        for name, _ in parts:
            sel = which == name
            sub = {k: val[k][sel] for k in ("labels", "masks", "usable")}
            rec = reconstruction_report(model, val["features"][torch.from_numpy(sel)], sub["labels"], sub["masks"])
            row["by_part"][name] = {**bench.metrics(sub, maps[sel], image_scores[sel]),
                                    **{k: rec[k] for k in ("explained_variance", "defect_residual_ratio")}}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/magnetic-tile"))
    p.add_argument("--sets", nargs="+", default=["mt", "elpv:mono", "elpv:poly"])
    p.add_argument("--variants", default='{"default": []}', help="JSON: name -> list of --set overrides")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--untrained", action="store_true", help="also each variant untrained (the control)")
    p.add_argument("--set", action="append", default=[], help="an override for every variant")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--name", default="study")
    p.add_argument("--save-models", action="store_true", help="keep each trained state under OUT/models")
    args = p.parse_args()
    bench = Bench(argparse.Namespace(out=args.out, set=args.set, save_models=args.save_models))
    variants = json.loads(args.variants)
    out_path = Path(args.out) / f"{args.name}.json"
    rows = []
    for spec in args.sets:
        for name, overrides in variants.items():
            cfg = merge(load_settings(overrides=args.set), overrides)
            ds, parts = dataset_for(spec, args.data, cfg)
            kinds = [("trained", None)] + ([("untrained", 0)] if args.untrained else [])
            for kind, epochs in kinds:
                for seed in args.seeds:
                    # An untrained model is each cell's mean whatever its architecture: one with the same
                    # normalization and scoring was measured already when only the training differs.
                    same = json.dumps([spec, seed, cfg.backbone.model_dump(), cfg.scoring.model_dump(),
                                       cfg.reconstructor.feature_norm, cfg.reconstructor.std_floor])
                    if kind == "untrained" and same in UNTRAINED:
                        result = UNTRAINED[same]
                    else:
                        result = run_variant(bench, cfg, spec, ds, parts, seed, epochs)
                        if kind == "untrained":
                            UNTRAINED[same] = result
                    row = {"set": spec, "variant": name, "kind": kind, **result}
                    rows.append(row)
                    log.info("study row", **{k: v for k, v in row.items() if k != "curve"})
                    out_path.write_text(json.dumps(rows, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| set | variant | kind | seeds | explained var. | defect/normal residual | val img / px / PRO "
             "| train s |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    parts = [{**r, "set": f"{r['set']} › {name}", "validation": part, **{k: part[k] for k in
              ("explained_variance", "defect_residual_ratio")}}
             for r in rows for name, part in (r.get("by_part") or {}).items()]
    for r in rows + parts:
        groups.setdefault((r["set"], r["variant"], r["kind"]), []).append(r)
    for (spec, name, kind), group in groups.items():
        def m(key, sub=None, group=group):
            values = [(g[sub] if sub else g)[key] for g in group]
            values = [v for v in values if v is not None]
            if not values:
                return "—"
            return f"{np.mean(values):.3f}" + (f"±{np.std(values):.3f}" if len(values) > 1 else "")
        lines.append(f"| {spec} | {name} | {kind} | {len(group)} | {m('explained_variance')} | "
                     f"{m('defect_residual_ratio')} | {m('image_auroc', 'validation')} / "
                     f"{m('pixel_auroc', 'validation')} / {m('aupro', 'validation')} | "
                     f"{np.mean([g['train_seconds'] for g in group]):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
