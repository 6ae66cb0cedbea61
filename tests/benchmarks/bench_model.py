"""Model benchmarks (`make bench`): ADTR vs a patch-memory baseline on Magnetic Tile and ELPV,
ablations, AUROC against training minutes, and speed. Writes results.json and the README table.

Every ratio is measured within this one run (the machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import structlog
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.settings import load_settings, merge  # noqa: E402
from model.backbone import Backbone  # noqa: E402
from model.config import AdtrConfig  # noqa: E402
from model.data import BadFiles, load_dataset, read_image, resize_image, to_tensor_batch  # noqa: E402
from model.detector import AnomalyDetector, load_detector  # noqa: E402
from model.evaluate import load_masks, evaluate, score_feature_set  # noqa: E402
from model.features import FeatureCache  # noqa: E402
from model.metrics import aupro, auroc  # noqa: E402
from model.patch_memory import PatchMemory  # noqa: E402
from model.reconstructor import Reconstructor, reconstruction_loss  # noqa: E402
from model.train import train_model  # noqa: E402

from readme_table import update_readme  # noqa: E402

log = structlog.get_logger("bench")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.base = load_settings(overrides=args.set)
        self.caches: dict[str, FeatureCache] = {}
        self.test_sets: dict[tuple, dict] = {}
        self.results: dict = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                        "torch": torch.__version__},
            "settings": json.loads(self.base.model_dump_json()),
        }

    def cache_for(self, cfg: AdtrConfig) -> FeatureCache:
        key = cfg.backbone.model_dump_json()
        if key not in self.caches:
            self.caches[key] = FeatureCache(Backbone(cfg.backbone), cfg.data.cache_dir)
        return self.caches[key]

    def test_set(self, cfg: AdtrConfig, dataset) -> dict:
        """Cached test features, labels and pixel masks for one backbone setting and dataset."""
        key = (cfg.backbone.model_dump_json(), dataset.name, len(dataset.test))
        if key not in self.test_sets:
            bad = BadFiles()
            test = self.cache_for(cfg).extract(dataset.test, bad, desc="test features")
            masks, usable = load_masks(test.samples, cfg.backbone.image_size, bad, "skip")
            self.test_sets[key] = {"features": test.features, "masks": masks, "usable": usable,
                                   "labels": np.array([x.label for x in test.samples])}
        return self.test_sets[key]

    @staticmethod
    def metrics(t: dict, maps: np.ndarray, scores: np.ndarray) -> dict:
        masks, usable = t["masks"], t["usable"]
        pixel = masks.any()
        return {"image_auroc": auroc(t["labels"], scores),
                "pixel_auroc": auroc(masks[usable], maps[usable]) if pixel else None,
                "aupro": aupro(masks[usable], maps[usable]) if pixel else None}

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))

    # ---------------------------------------------------------------- accuracy

    def train_and_score(self, name: str, cfg: AdtrConfig, dataset, curve: bool = False) -> dict:
        """Train with `cfg`, then image/pixel AUROC and AUPRO on the test split (features cached)."""
        cache = self.cache_for(cfg)
        t = self.test_set(cfg, dataset)
        labels, masks, usable = t["labels"], t["masks"], t["usable"]
        points: list[dict] = []
        t0 = time.monotonic()

        def on_epoch(model: Reconstructor, record: dict) -> None:
            if not curve:
                return
            train_seconds = time.monotonic() - t0 - sum(p["eval_seconds"] for p in points)
            t_eval = time.monotonic()
            det = AnomalyDetector(cfg, cache.backbone, model.eval())
            maps, scores = score_feature_set(det, t["features"])
            model.train()
            # The curve's pixel AUROC uses every 4th pixel each way (1/16): fast, and close to the full one.
            points.append({"epoch": record["epoch"], "train_minutes": round(train_seconds / 60, 2),
                           "image_auroc": auroc(labels, scores),
                           "pixel_auroc": auroc(masks[usable][:, ::4, ::4], maps[usable][:, ::4, ::4])
                           if masks.any() else None,
                           "eval_seconds": time.monotonic() - t_eval})
            log.info("curve point", run=name, **{k: v for k, v in points[-1].items() if v is not None})

        manifest = train_model(cfg, dataset, self.out / name, progress=False, cache=cache, on_epoch=on_epoch)
        detector = load_detector(self.out / name)
        row = {
            "run": name,
            **self.metrics(t, *score_feature_set(detector, t["features"])),
            # Training time only: the curve's evaluations ran inside the loop and are taken out.
            "train_seconds": round(manifest["training"]["seconds"] - sum(p["eval_seconds"] for p in points), 1),
            "epochs": len(manifest["training"]["history"]),
            "final_train_loss": manifest["training"]["history"][-1]["train_loss"],
        }
        if curve:
            row["curve"] = points
        log.info("trained", **{k: v for k, v in row.items() if k != "curve"})
        return row

    def adtr_plus(self, cfg: AdtrConfig, dataset) -> dict:
        """ADTR+ with synthetic confetti anomalies only (the test split stays untouched)."""
        from model.adtr_plus import finetune_adtr_plus

        t0 = time.monotonic()
        finetune_adtr_plus(self.out / "adtr-edge", dataset, self.out / "adtr-plus", progress=False, cfg=cfg)
        seconds = time.monotonic() - t0
        t = self.test_set(cfg, dataset)
        return {"run": f"ADTR+ (confetti, {cfg.adtr_plus.epochs} epochs)",
                **self.metrics(t, *score_feature_set(load_detector(self.out / "adtr-plus"), t["features"])),
                "finetune_seconds": round(seconds, 1)}

    def baseline(self, cfg: AdtrConfig, dataset) -> dict:
        train = self.cache_for(cfg).extract(dataset.train, BadFiles(), desc="train features")
        t = self.test_set(cfg, dataset)
        memory = PatchMemory(train.features)
        out = [memory.score(t["features"][i : i + 16], cfg.backbone.image_size, cfg.scoring)
               for i in range(0, len(t["features"]), 16)]
        maps = torch.cat([m for m, _ in out]).numpy()
        scores = torch.cat([s for _, s in out]).numpy()
        return {"run": "patch-memory baseline", "memory_patches": int(memory.bank.shape[0]),
                **self.metrics(t, maps, scores)}

    def magnetic_tile(self) -> None:
        cfg = self.base
        ds = load_dataset(self.args.data, cfg.data)
        main = self.train_and_score("adtr-edge", cfg, ds, curve=True)
        report = evaluate(load_detector(self.out / "adtr-edge"), ds, self.out / "adtr-edge-pictures",
                          cache=self.cache_for(cfg), progress=False)
        main.update({k: report[k] for k in ("f1", "precision", "recall", "threshold", "false_positive_rate")})
        main["per_type"] = {k: v["image_auroc"] for k, v in report["per_type"].items()}
        plus = self.adtr_plus(cfg, ds)
        base = self.baseline(cfg, ds)
        speed = self.inference_speed(cfg, ds, load_detector(self.out / "adtr-edge"))
        main["images_per_second"] = speed["adtr"]
        base["images_per_second"] = speed["baseline"]
        self.results["magnetic_tile"] = {"adtr": main, "adtr_plus": plus, "baseline": base, "summary": ds.summary()}
        self.save()

    def elpv(self) -> None:
        out = {}
        for cell in ("mono", "poly"):
            cfg = self.base
            ds = load_dataset(f"elpv:{cell}", cfg.data)
            only_p1 = ds.test.__class__(s for s in ds.test if s.defect_type in ("good", "p=1"))
            ds_p1 = ds.__class__(ds.name, ds.layout, ds.root, ds.train, ds.val, only_p1)
            row = self.train_and_score(f"elpv-{cell}", cfg, ds_p1)
            base = self.baseline(cfg, ds_p1)
            report = evaluate(load_detector(self.out / f"elpv-{cell}"), ds, None, cache=self.cache_for(cfg),
                              progress=False)
            out[cell] = {"adtr_image_auroc": row["image_auroc"], "baseline_image_auroc": base["image_auroc"],
                         "adtr_by_probability": {k: v["image_auroc"] for k, v in report["per_type"].items()},
                         "train_seconds": row["train_seconds"]}
            log.info("elpv", cell=cell, **{k: v for k, v in out[cell].items() if not isinstance(v, dict)})
        self.results["elpv"] = out
        self.save()

    def ablations(self) -> None:
        ds = load_dataset(self.args.data, self.base.data)
        variants = {
            "levels 1-4": ["backbone.levels=[1,2,3,4]"],
            "feature jitter on (20)": ["reconstructor.jitter_scale=20"],
            "neighbour mask off": ["reconstructor.neighbor_mask=0"],
            "2+2 layers": ["reconstructor.num_encoder_layers=2", "reconstructor.num_decoder_layers=2"],
            "4+4 layers": ["reconstructor.num_encoder_layers=4", "reconstructor.num_decoder_layers=4"],
            "image 320 (20x20 grid)": ["backbone.image_size=320", "backbone.feature_size=20"],
            "image 128 (8x8 grid, mask 3)": ["backbone.image_size=128", "backbone.feature_size=8",
                                              "reconstructor.neighbor_mask=3"],
        }
        rows = []
        main = self.results.get("magnetic_tile", {}).get("adtr")
        if main:
            rows.append({**{k: main[k] for k in ("image_auroc", "pixel_auroc", "aupro", "train_seconds", "epochs")},
                         "run": "default (levels 1-5, jitter off, neighbour mask 7, blur 4, 1+1, 256 px), 40 epochs"})
            det = load_detector(self.out / "adtr-edge")
            t = self.test_set(det.cfg, ds)
            for blur in (0.0, 8.0):
                det.cfg = merge(det.cfg, [f"scoring.blur_sigma={blur}"])
                rows.append({"run": f"blur sigma {blur:g} (same model)",
                             **self.metrics(t, *score_feature_set(det, t["features"]))})
        for name, overrides in variants.items():
            cfg = merge(self.base, overrides + [f"train.max_minutes={self.args.ablation_minutes}"])
            rows.append(self.train_and_score("ablation-" + "".join(c for c in name if c.isalnum()), cfg, ds) | {"run": name})
            self.results["ablations"] = rows
            self.save()
        self.results["ablations"] = rows
        self.save()

    # ---------------------------------------------------------------- speed

    def inference_speed(self, cfg: AdtrConfig, ds, detector: AnomalyDetector) -> dict:
        images = [resize_image(read_image(s.path), cfg.backbone.image_size) for s in ds.test[:32]]
        batch = to_tensor_batch(images)
        cache = self.cache_for(cfg)
        memory = PatchMemory(cache.extract(ds.train, BadFiles()).features)

        def rate(fn, bs: int, repeats: int = 2) -> float:
            fn(batch[:bs])  # warm-up
            t = time.perf_counter()
            n = 0
            for _ in range(repeats):
                for i in range(0, 32, bs):
                    fn(batch[i : i + bs])
                    n += batch[i : i + bs].shape[0]
            return n / (time.perf_counter() - t)

        with torch.no_grad():
            adtr = rate(lambda x: detector.score_features(detector.backbone(x)), 8)
            baseline = rate(lambda x: memory.score(detector.backbone(x), cfg.backbone.image_size, cfg.scoring), 8)
            by_batch = {str(bs): rate(lambda x: detector.score_features(detector.backbone(x)), bs) for bs in (1, 8, 32)}
            backbone_rate = rate(detector.backbone, 16)
        return {"adtr": adtr, "baseline": baseline, "by_batch": by_batch, "backbone": backbone_rate}

    def training_speed(self) -> None:
        """Seconds per epoch with cached features vs computing backbone features every step."""
        cfg = self.base
        ds = load_dataset(self.args.data, cfg.data)
        cache = self.cache_for(cfg)
        samples = ds.train[: cfg.train.batch_size * self.args.speed_steps]
        feats = cache.extract(samples, BadFiles()).features
        model = Reconstructor(cache.backbone.out_channels, cfg.backbone.feature_size, cfg.reconstructor)
        model.fit_normalization(feats)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        bs = cfg.train.batch_size

        def step(x):
            target, recon = model(x)
            loss = reconstruction_loss(target, recon)
            opt.zero_grad()
            loss.backward()
            opt.step()

        t = time.perf_counter()
        for i in range(0, len(samples), bs):
            step(feats[i : i + bs])
        cached = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(0, len(samples), bs):
            imgs = [resize_image(read_image(s.path), cfg.backbone.image_size) for s in samples[i : i + bs]]
            step(cache.backbone(to_tensor_batch(imgs)))
        uncached = time.perf_counter() - t
        steps_per_epoch = -(-len(ds.train) // bs)
        n_steps = -(-len(samples) // bs)
        ds_main = self.results.get("magnetic_tile", {})
        speed = self.inference_speed(cfg, ds, load_detector(self.out / "adtr-edge")) if ds_main else {}
        self.results["speed"] = {
            "train_seconds_per_epoch_cached": cached / n_steps * steps_per_epoch,
            "train_seconds_per_epoch_uncached": uncached / n_steps * steps_per_epoch,
            "cache_speedup": uncached / cached,
            "backbone_images_per_second": speed.get("backbone"),
            "inference_images_per_second_by_batch": speed.get("by_batch"),
            "peak_rss_mb": peak_rss_mb(),
        }
        log.info("speed", **{k: v for k, v in self.results["speed"].items() if not isinstance(v, dict)})
        self.save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--set", action="append", default=[], help="override a setting for every run")
    p.add_argument("--only", nargs="*", default=["mt", "speed", "elpv", "ablations"],
                   choices=["mt", "speed", "elpv", "ablations"])
    p.add_argument("--ablation-minutes", type=float, default=3.0, help="training budget per ablation run")
    p.add_argument("--speed-steps", type=int, default=6)
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    bench = Bench(args)
    previous = bench.out / "results.json"
    if previous.is_file():  # partial reruns (--only) keep the other sections
        bench.results = {**json.loads(previous.read_text()), **{k: bench.results[k] for k in ("date", "machine", "settings")}}
    steps = {"mt": bench.magnetic_tile, "speed": bench.training_speed, "elpv": bench.elpv, "ablations": bench.ablations}
    for name in args.only:
        steps[name]()
    if not args.no_readme:
        update_readme(ROOT / "README.md", bench.results)
    print(json.dumps(bench.results, indent=2)[:4000])


if __name__ == "__main__":
    main()
