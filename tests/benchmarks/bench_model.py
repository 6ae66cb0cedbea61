"""Model benchmarks (`make bench`): ADTR against the training-free baselines that share its features,
on Magnetic Tile (several training seeds), ELPV and large mosaics with small defects; AUROC against
training minutes; ablations; cost (training time, images/s, size on disk, peak memory). Writes
results.json and docs/results.md.

Every choice (the scoring defaults, the baselines' own settings) is made on VALIDATION data: the
validation normals and synthetic defects painted on them (`synthetic_sets.py`), never the test set;
the tables show validation and test side by side. Ratios are measured within this one run (the
machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import structlog
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_sets import build_mosaic_set, synthetic_defects

from adtr_edge.agent.settings import load_settings, merge
from adtr_edge.model.backbone import Backbone
from adtr_edge.model.config import AdtrConfig
from adtr_edge.model.data import BadFiles, Dataset, load_dataset, read_image, resize_image, to_tensor_batch
from adtr_edge.model.detector import AnomalyDetector, ScoreHead, load_detector
from adtr_edge.model.evaluate import evaluate, load_masks, score_feature_set
from adtr_edge.model.features import FeatureCache
from adtr_edge.model.metrics import aupro, auroc
from adtr_edge.model.reconstructor import Reconstructor, reconstruction_loss, reconstruction_report
from adtr_edge.model.train import fit_scoring, train_model

from baselines import LABELS, METHODS, coarse_map, fit_baseline, save_baseline
from results_table import update_readme

log = structlog.get_logger("bench")
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.name.endswith(".pt")) / 2**20


def mean_std(rows: list[dict], keys=METRICS) -> dict:
    out = {}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        if values:
            out[k] = float(np.mean(values))
            out[k + "_std"] = float(np.std(values))
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.base = load_settings(overrides=args.set)
        if self.base.train.num_threads:  # scoring and baselines too, not only training
            torch.set_num_threads(self.base.train.num_threads)
        self.caches: dict[str, FeatureCache] = {}
        self.sets: dict[tuple, dict] = {}
        self.results: dict = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", "tests/benchmarks/bench_model.py", *sys.argv[1:]]),
            "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                        "load_average": os.getloadavg()[0],
                        "torch": torch.__version__},
            "settings": json.loads(self.base.model_dump_json()),
        }

    # ---------------------------------------------------------------- data

    def cache_for(self, cfg: AdtrConfig) -> FeatureCache:
        key = cfg.backbone.model_dump_json()
        if key not in self.caches:
            self.caches[key] = FeatureCache(Backbone(cfg.backbone), cfg.data.cache_dir)
        return self.caches[key]

    def features(self, cfg: AdtrConfig, samples, desc: str):
        return self.cache_for(cfg).extract(samples, BadFiles(), desc=desc).features

    def test_set(self, cfg: AdtrConfig, dataset: Dataset) -> dict:
        """Cached test features, labels, defect types and pixel masks for one backbone and dataset."""
        key = ("test", cfg.backbone.model_dump_json(), dataset.name, len(dataset.test))
        if key not in self.sets:
            bad = BadFiles()
            test = self.cache_for(cfg).extract(dataset.test, bad, desc="test features")
            masks, usable = load_masks(test.samples, cfg.backbone.image_size, bad, "skip")
            self.sets[key] = {"features": test.features, "masks": masks, "usable": usable,
                              "labels": np.array([x.label for x in test.samples]),
                              "types": np.array([x.defect_type for x in test.samples])}
        return self.sets[key]

    def val_set(self, cfg: AdtrConfig, dataset: Dataset) -> dict:
        """Validation normals + synthetic defects painted on them: what choices are made on."""
        key = ("val", cfg.backbone.model_dump_json(), dataset.name, len(dataset.val))
        if key not in self.sets:
            size = cfg.backbone.image_size
            normals = [s for s in dataset.val if s.label == 0]
            images = [resize_image(read_image(s.path), size) for s in normals]
            painted = synthetic_defects(images, seed=0)
            backbone = self.cache_for(cfg).backbone
            feats = torch.cat([backbone(to_tensor_batch([p for p, _, _ in painted[i : i + 16]]))
                               for i in range(0, len(painted), 16)])
            n = len(normals)
            self.sets[key] = {
                "features": torch.cat([self.features(cfg, normals, "val features"), feats]),
                "masks": np.concatenate([np.zeros((n, size, size), bool), np.stack([m for _, m, _ in painted])]),
                "usable": np.ones(n + len(painted), bool),
                "labels": np.r_[np.zeros(n, int), np.ones(len(painted), int)],
                "types": np.array(["good"] * n + [k for _, _, k in painted]),
            }
        return self.sets[key]

    @staticmethod
    def metrics(t: dict, maps: np.ndarray, scores: np.ndarray) -> dict:
        masks, usable = t["masks"], t["usable"]
        pixel = masks.any()
        return {"image_auroc": auroc(t["labels"], scores),
                "pixel_auroc": auroc(masks[usable], maps[usable]) if pixel else None,
                "aupro": aupro(masks[usable], maps[usable]) if pixel else None}

    def score_set(self, detector: AnomalyDetector, t: dict) -> dict:
        maps, scores = score_feature_set(detector, t["features"])
        out = self.metrics(t, maps, scores)
        # What the reconstructor explains of this set's normals, and its residual on defect cells over normal ones.
        reconstruction = reconstruction_report(detector.reconstructor, t["features"], t["labels"],
                                               t["masks"] if t["masks"].any() else None)
        out.update({k: reconstruction[k] for k in ("explained_variance", "defect_residual_ratio")})
        if detector.threshold:
            normalized = scores / detector.threshold
            out["max_normalized_score"] = float(np.max(normalized)) if np.isfinite(normalized).all() else float("inf")
        return out

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))

    # ---------------------------------------------------------------- ADTR

    def train_and_score(self, name: str, cfg: AdtrConfig, dataset: Dataset, curve: bool = False) -> dict:
        """Train with `cfg` (the product's `train_model`), reload the checkpoint, score val and test."""
        t = self.test_set(cfg, dataset)
        points: list[dict] = []
        t0 = time.monotonic()
        every = max(1, cfg.train.epochs // max(1, self.args.curve_points))

        def on_epoch(model: Reconstructor, record: dict) -> None:
            if not curve or (record["epoch"] % every and record["epoch"] != cfg.train.epochs):
                return
            t_eval = time.monotonic()
            train_seconds = t_eval - t0 - sum(p["eval_seconds"] for p in points)
            detector = self.fitted(cfg, model, dataset)
            maps, scores = score_feature_set(detector, t["features"])
            model.train()
            masks, usable = t["masks"], t["usable"]
            # The curve's pixel AUROC uses every 4th pixel each way (1/16): fast, and close to the full one.
            v = self.val_set(cfg, dataset)
            val_scores = score_feature_set(detector, v["features"])[1]
            points.append({"epoch": record["epoch"], "train_minutes": round(train_seconds / 60, 2),
                           "validation_image_auroc": auroc(v["labels"], val_scores),
                           "image_auroc": auroc(t["labels"], scores),
                           "pixel_auroc": auroc(masks[usable][:, ::4, ::4], maps[usable][:, ::4, ::4])
                           if masks.any() else None,
                           "eval_seconds": time.monotonic() - t_eval})
            log.info("curve point", run=name, **{k: v for k, v in points[-1].items() if v is not None})

        manifest = train_model(cfg, dataset, self.out / name, progress=False, cache=self.cache_for(cfg),
                               on_epoch=on_epoch)
        detector = load_detector(self.out / name)
        history = manifest["training"]["history"]
        row = {
            "run": name, "seed": cfg.train.seed,
            **self.score_set(detector, t),
            "validation": self.score_set(detector, self.val_set(cfg, dataset)),
            # Training time only: the curve's evaluations ran inside the loop and are taken out.
            "train_seconds": round(manifest["training"]["seconds"] - sum(p["eval_seconds"] for p in points), 1),
            "scoring_fit_seconds": round(manifest["scoring_fit"]["seconds"], 1),
            "epochs": len(history), "final_train_loss": history[-1]["train_loss"],
            "model_mb": round(dir_mb(self.out / name), 1),
        }
        if curve:
            row["curve"] = points
        log.info("trained", **{k: v for k, v in row.items() if not isinstance(v, (dict, list))})
        return row

    def fitted(self, cfg: AdtrConfig, model: Reconstructor, dataset: Dataset) -> AnomalyDetector:
        """`model` with the scorer of `cfg.scoring` fitted and thresholds calibrated, as `train` does."""
        train = self.features(cfg, dataset.train, "train features")
        val_normal = self.features(cfg, [s for s in dataset.val if s.label == 0], "val features")
        detector = AnomalyDetector(cfg, self.cache_for(cfg).backbone, model)
        fit_scoring(detector, train, val_normal, np.zeros(len(val_normal), int))
        return detector

    def untrained(self, cfg: AdtrConfig, dataset: Dataset) -> dict:
        """ADTR before training (it outputs each cell's mean feature), with the default scoring:
        what the scoring alone achieves, so the difference is what training adds."""
        model = Reconstructor(self.cache_for(cfg).backbone.out_channels, cfg.backbone.feature_size, cfg.reconstructor)
        model.fit_normalization(self.features(cfg, dataset.train, "train features"))
        detector = self.fitted(cfg, model, dataset)
        return {"run": "untrained ADTR (mean reconstruction), default scoring",
                **self.score_set(detector, self.test_set(cfg, dataset)),
                "validation": self.score_set(detector, self.val_set(cfg, dataset))}

    # ---------------------------------------------------------------- baselines

    def baselines(self, cfg: AdtrConfig, dataset: Dataset, tag: str, methods=METHODS,
                  rows: dict | None = None) -> dict:
        """Each training-free baseline on val and test; PaDiM's shrinkage picked on validation.
        `rows` (if given) is filled and saved method by method."""
        train = self.features(cfg, dataset.train, "train features")
        head = ScoreHead(cfg)  # one term, same upsampling, blur and pooling as ADTR
        sets = {"test": self.test_set(cfg, dataset), "validation": self.val_set(cfg, dataset)}
        rows = {} if rows is None else rows
        for method in methods:
            candidates = self.args.padim_shrinkage if method == "padim" else [None]
            best = None
            for shrinkage in candidates:
                t0 = time.monotonic()
                tensors = fit_baseline(method, train, shrinkage=shrinkage or 0.1)
                fit_seconds = time.monotonic() - t0
                row = {"run": LABELS[method], "method": method, "fit_seconds": round(fit_seconds, 1)}
                if shrinkage is not None:
                    row["shrinkage"] = shrinkage
                for split, t in sets.items():
                    out = [head.score(coarse_map(method, tensors, t["features"][i : i + 16]))
                           for i in range(0, len(t["features"]), 16)]
                    maps = torch.cat([o.maps for o in out]).numpy()
                    scores = torch.cat([o.scores for o in out]).numpy()
                    metrics = self.metrics(t, maps, scores)
                    if split == "test":
                        row.update(metrics)
                    else:
                        row["validation"] = metrics
                if best is None or _val_key(row) > _val_key(best):
                    best, best_tensors = row, tensors
                log.info("baseline", tag=tag, **{k: v for k, v in row.items() if not isinstance(v, dict)})
            best["size_mb"] = round(save_baseline(self.out / "baselines" / f"{tag}-{method}.safetensors", method,
                                                  best_tensors, cfg) / 2**20, 1)
            rows[method] = best
            self.save()
        return rows

    # ---------------------------------------------------------------- cost

    def inference_cost(self, cfg: AdtrConfig, dataset: Dataset, model_dir: Path | None = None,
                       baseline: Path | None = None) -> dict:
        """images/s at batch 1 and 8 and peak memory, each method in its own fresh process."""
        images = self.out / f"speed-images-{cfg.backbone.image_size}.npy"
        if not images.is_file():
            np.save(images, np.stack([resize_image(read_image(s.path), cfg.backbone.image_size)
                                      for s in dataset.test[:32]]))
        cmd = [sys.executable, str(Path(__file__).with_name("infer_cost.py")), "--images", str(images)]
        cmd += ["--model", str(model_dir)] if model_dir else ["--baseline", str(baseline)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    # ---------------------------------------------------------------- sections

    def magnetic_tile(self) -> None:
        cfg = self.base
        ds = load_dataset(self.args.data, cfg.data)
        runs = []
        for seed in self.args.seeds:
            run_cfg = merge(cfg, [f"train.seed={seed}"])
            name = "adtr-edge" if seed == self.args.seeds[0] else f"adtr-edge-seed{seed}"
            curve = seed == self.args.seeds[0] and self.args.curve_points > 0
            runs.append(self.train_and_score(name, run_cfg, ds, curve=curve))
            self.results["magnetic_tile"] = {"adtr_runs": runs}
            self.save()
        main_dir = self.out / "adtr-edge"
        report = evaluate(load_detector(main_dir), ds, self.out / "adtr-edge-pictures",
                          cache=self.cache_for(cfg), progress=False)
        adtr = {"run": "ADTR, edge default", **mean_std(runs), "seeds": self.args.seeds,
                "validation": mean_std([r["validation"] for r in runs]),
                "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
                "epochs": runs[0]["epochs"], "model_mb": runs[0]["model_mb"],
                "max_normalized_score": max(r["max_normalized_score"] for r in runs),
                **{k: report[k] for k in ("f1", "precision", "recall", "threshold", "false_positive_rate")},
                "per_type": {k: v["image_auroc"] for k, v in report["per_type"].items()},
                "per_type_pixel": {k: v["pixel_auroc"] for k, v in report["per_type"].items()},
                **self.inference_cost(cfg, ds, model_dir=main_dir)}
        section = self.results["magnetic_tile"] = {"adtr": adtr, "adtr_runs": runs, "summary": ds.summary()}
        self.save()  # each part lands as soon as it is measured (a shared machine may stop a long run)
        baselines = section["baselines"] = self.baselines(cfg, ds, "mt")
        self.save()
        self.baseline_costs(cfg, ds, baselines)
        section["untrained"] = self.untrained(cfg, ds)
        self.save()
        if self.args.adtr_plus:
            section["adtr_plus"] = self.adtr_plus(cfg, ds)
            self.save()

    def magnetic_tile_baselines(self) -> None:
        """The Magnetic Tile baselines and the untrained ADTR alone (`--only mt-baselines`): the same
        rows `mt` measures after its ADTR runs, for a second process on a machine short of time."""
        cfg = self.base
        ds = load_dataset(self.args.data, cfg.data)
        section = self.results.setdefault("magnetic_tile", {})
        baselines = section["baselines"] = {}
        # Cheapest first, each saved when measured; the full memory (the slowest by far) last.
        self.baselines(cfg, ds, "mt", ("local_memory", "padim"), baselines)
        section["untrained"] = self.untrained(cfg, ds)
        self.save()
        self.baselines(cfg, ds, "mt", ("full_memory",), baselines)
        self.baseline_costs(cfg, ds, baselines)

    def magnetic_tile_cost(self) -> None:
        """Inference cost again (`--only cost`), for the Magnetic Tile model and the baselines that `mt`
        saved: images/s and peak memory, each in a fresh process, on a quieter machine than the run had."""
        cfg = self.base
        ds = load_dataset(self.args.data, cfg.data)
        section = self.results.get("magnetic_tile") or {}
        if "adtr" not in section:
            raise SystemExit("--only cost re-measures what `--only mt` wrote: run that first")
        section["adtr"].update(self.inference_cost(cfg, ds, model_dir=self.out / "adtr-edge"))
        self.save()
        self.baseline_costs(cfg, ds, section.get("baselines", {}))

    def baseline_costs(self, cfg: AdtrConfig, ds: Dataset, baselines: dict) -> None:
        """Each Magnetic Tile baseline's inference cost (from the file `baselines` saved), saved as measured."""
        for method, row in baselines.items():
            row.update(self.inference_cost(cfg, ds, baseline=self.out / "baselines" / f"mt-{method}.safetensors"))
            self.save()

    def adtr_plus(self, cfg: AdtrConfig, dataset: Dataset) -> dict:
        """ADTR+ with synthetic confetti anomalies only (the test split stays untouched)."""
        from adtr_edge.model.adtr_plus import finetune_adtr_plus

        t0 = time.monotonic()
        finetune_adtr_plus(self.out / "adtr-edge", dataset, self.out / "adtr-plus", progress=False, cfg=cfg)
        seconds = time.monotonic() - t0
        return {"run": f"ADTR+ (confetti, {cfg.adtr_plus.epochs} epochs) on top",
                **self.score_set(load_detector(self.out / "adtr-plus"), self.test_set(cfg, dataset)),
                "finetune_seconds": round(seconds, 1)}

    def elpv(self) -> None:
        out = {}
        for cell in ("mono", "poly"):
            cfg = self.base
            ds = load_dataset(f"elpv:{cell}", cfg.data)
            only_p1 = [s for s in ds.test if s.defect_type in ("good", "p=1")]
            ds_p1 = Dataset(ds.name, ds.layout, ds.root, ds.train, ds.val, only_p1)
            runs = [self.train_and_score(f"elpv-{cell}" + ("" if seed == self.args.seeds[0] else f"-seed{seed}"),
                                         merge(cfg, [f"train.seed={seed}"]), ds_p1)
                    for seed in self.args.seeds[: self.args.elpv_seeds]]
            base = self.baselines(cfg, ds_p1, f"elpv-{cell}")
            report = evaluate(load_detector(self.out / f"elpv-{cell}"), ds, None, cache=self.cache_for(cfg),
                              progress=False)
            normalized = [x["normalized_score"] for x in report["scores"]]
            out[cell] = {"adtr": {**mean_std(runs, ("image_auroc",)), "seeds": len(runs),
                                  "validation": mean_std([r["validation"] for r in runs])},
                         "baselines": {m: {"image_auroc": b["image_auroc"], "validation": b["validation"]}
                                       for m, b in base.items()},
                         "adtr_by_probability": {k: v["image_auroc"] for k, v in report["per_type"].items()},
                         "max_normalized_score": float(max(normalized)),
                         "train_seconds": float(np.mean([r["train_seconds"] for r in runs]))}
            log.info("elpv", cell=cell, adtr=out[cell]["adtr"], baselines=out[cell]["baselines"])
            self.results["elpv"] = out
            self.save()

    def ablations(self) -> None:
        ds = load_dataset(self.args.data, self.base.data)
        detector = load_detector(self.out / "adtr-edge")
        cfg = detector.cfg
        test, val = self.test_set(cfg, ds), self.val_set(cfg, ds)

        def row(name: str, det: AnomalyDetector, **extra) -> dict:
            r = {"run": name, **self.score_set(det, test), "validation": self.score_set(det, val), **extra}
            log.info("ablation", **{k: v for k, v in r.items() if not isinstance(v, dict)})
            return r

        scoring = [row("default scoring", detector)]
        for blur in (0.0, 8.0):  # the head only: no refit (this is what the old benchmark got wrong)
            det = load_detector(self.out / "adtr-edge")
            det.reconfigure(merge(cfg, [f"scoring.blur_sigma={blur}"]))
            scoring.append(row(f"blur sigma {blur:g} (default 4)", det))
        for name, overrides in SCORING_VARIANTS.items():
            det = self.fitted(merge(cfg, overrides), load_detector(self.out / "adtr-edge").reconstructor, ds)
            scoring.append(row(name, det))
            self.results["ablations"] = {"scoring": scoring}
            self.save()
        training = []
        for name, overrides in (TRAINING_VARIANTS.items() if self.args.training_ablations else ()):
            run_cfg = merge(self.base, [f"train.max_minutes={self.args.ablation_minutes}"] + overrides)
            slug = "ablation-" + "".join(c for c in name if c.isalnum())
            training.append(self.train_and_score(slug, run_cfg, ds) | {"run": name})
            self.results["ablations"] = {"scoring": scoring, "training": training}
            self.save()

    def highres(self) -> None:
        """Small defects on large images: 640 px mosaics, the default (256 px) against the
        high-resolution configuration (configs/highres.yaml), same recipe otherwise."""
        source = load_dataset(self.args.data, self.base.data)
        root = build_mosaic_set(source, self.out / "mosaic-magnetic-tile")
        rows = []
        for name, config in (("default, 256 px", None), ("high resolution (configs/highres.yaml)",
                                                          ROOT / "configs" / "highres.yaml")):
            cfg = load_settings(config, self.args.set)
            ds = load_dataset(root, cfg.data)
            slug = "mosaic-" + ("default" if config is None else "highres")
            r = self.train_and_score(slug, cfg, ds)
            cost = self.inference_cost(cfg, ds, model_dir=self.out / slug)
            rows.append({**r, "run": name, "image_size": cfg.backbone.image_size, **cost})
            self.results["highres"] = {"rows": rows, "summary": ds.summary()}
            self.save()

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
        images = to_tensor_batch([resize_image(read_image(s.path), cfg.backbone.image_size) for s in ds.test[:32]])
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, 32, 16):
                cache.backbone(images[i : i + 16])
        backbone_rate = 32 / (time.perf_counter() - t)
        self.results["speed"] = {
            "train_seconds_per_epoch_cached": cached / n_steps * steps_per_epoch,
            "train_seconds_per_epoch_uncached": uncached / n_steps * steps_per_epoch,
            "cache_speedup": uncached / cached,
            "backbone_images_per_second": backbone_rate,
            "peak_rss_mb": peak_rss_mb(),
        }
        log.info("speed", **self.results["speed"])
        self.save()


def _val_key(row: dict) -> float:
    """The validation score a baseline setting is picked by: mean of its three validation metrics."""
    v = row["validation"]
    return float(np.mean([v[k] for k in METRICS if v.get(k) is not None]))


# Rescoring one trained model (no retraining): each variant refits the scorer on training data and
# its thresholds on validation normals, as `train` would.
SCORING_VARIANTS = {
    "paper scoring: l2 for image and heatmap": ["scoring.image_terms=[l2]", "scoring.localization_terms=[l2]"],
    "l2_raw for image and heatmap": ["scoring.image_terms=[l2_raw]", "scoring.localization_terms=[l2_raw]"],
    "mahalanobis for image and heatmap": ["scoring.localization_terms=[mahalanobis]"],
    "memory for image and heatmap": ["scoring.image_terms=[memory]"],
    "previous default: image mahalanobis + memory, heatmap l2_raw + memory, 64 centroids, shrinkage 0.1":
        ["scoring.image_terms=[mahalanobis, memory]", "scoring.localization_terms=[l2_raw, memory]",
         "scoring.memory_size=64", "scoring.memory_dims=0", "scoring.shrinkage=0.1"],
    "image from mahalanobis + memory": ["scoring.image_terms=[mahalanobis, memory]"],
    "heatmap from l2_raw + memory": ["scoring.localization_terms=[l2_raw, memory]"],
    "memory: every training image (no k-means)": ["scoring.memory_size=0"],
    "memory: 128 centroids per cell": ["scoring.memory_size=128"],
    "memory: 512 centroids per cell": ["scoring.memory_size=512"],
    "memory: every channel (memory_dims 0)": ["scoring.memory_dims=0"],
    "memory: 128 principal channels": ["scoring.memory_dims=128"],
    "memory: 256 principal channels": ["scoring.memory_dims=256"],
    "previous memory: every channel, 128 centroids per cell": ["scoring.memory_dims=0", "scoring.memory_size=128"],
    "mahalanobis rank 32": ["scoring.mahalanobis_rank=32"],
    "mahalanobis rank 128": ["scoring.mahalanobis_rank=128"],
    "shrinkage 0.1": ["scoring.shrinkage=0.1"],
    "shrinkage 0.3": ["scoring.shrinkage=0.3"],
}
# Training variants, each with the same time budget (--ablation-minutes) unless it sets its own, default scoring.
TRAINING_VARIANTS = {
    "40 epochs (the previous default), no time limit": ["train.epochs=40", "train.max_minutes=0"],
    "levels 1-4": ["backbone.levels=[1,2,3,4]"],
    "neighbour mask off": ["reconstructor.neighbor_mask=0"],
    "2+2 layers": ["reconstructor.num_encoder_layers=2", "reconstructor.num_decoder_layers=2"],
    "hidden 128, FFN 512": ["reconstructor.hidden_dim=128", "reconstructor.ffn_dim=512"],
    "no std floor": ["reconstructor.std_floor=0"],
    "hard-mining loss (worst 10 % of cells)": ["train.loss=hard_mining", "train.hard_fraction=0.1"],
    "noisy bottleneck (input dropout 0.2)": ["reconstructor.input_dropout=0.2"],
    "hard-mining loss + noisy bottleneck, 40 epochs": ["train.loss=hard_mining", "reconstructor.input_dropout=0.2",
                                                       "train.epochs=40", "train.max_minutes=0"],
}


# What a step rewrites when it runs: `mt` writes the whole Magnetic Tile section, baselines and cost too.
REWRITES = {"mt": {"mt", "mt-baselines", "cost"}}


def _sections(command: str) -> set[str]:
    """The steps a recorded bench command ran (its `--only`, read by this script's own parser)."""
    only = _parser().parse_known_args(shlex.split(command)[2:])[0].only
    return set().union(*(REWRITES.get(step, {step}) for step in only))


def _sources(commands: list[str]) -> list[str]:
    """The commands, oldest first, that still wrote some section: one whose sections later commands all
    rewrote is no longer the source of any number. Applied once a run has finished every step."""
    kept, later = [], set()
    for command in reversed(commands):
        sections = _sections(command)
        if not sections <= later:
            kept.append(command)
        later |= sections
    return kept[::-1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--set", action="append", default=[], help="override a setting for every run")
    p.add_argument("--only", nargs="*", default=["mt", "speed", "elpv", "ablations", "highres"],
                   choices=["mt", "mt-baselines", "cost", "speed", "elpv", "ablations", "highres"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (MT)")
    p.add_argument("--elpv-seeds", type=int, default=3, help="how many of --seeds ELPV trains with")
    p.add_argument("--padim-shrinkage", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                   help="PaDiM shrinkage candidates, picked on validation")
    p.add_argument("--curve-points", type=int, default=10, help="curve evaluations (seed 0); 0 = no curve")
    p.add_argument("--no-adtr-plus", dest="adtr_plus", action="store_false", help="skip the ADTR+ row")
    p.add_argument("--ablation-minutes", type=float, default=3.0, help="training budget per ablation run")
    p.add_argument("--no-training-ablations", dest="training_ablations", action="store_false",
                   help="ablations: only rescore the trained model (no training variants)")
    p.add_argument("--speed-steps", type=int, default=6)
    p.add_argument("--no-readme", action="store_true")
    return p


def main() -> None:
    p = _parser()
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    bench = Bench(args)
    previous = bench.out / "results.json"
    if previous.is_file():  # partial reruns (--only) keep the other sections, and every command that wrote them
        old = json.loads(previous.read_text())
        commands = old.get("commands") or ([old["command"]] if old.get("command") else [])
        bench.results = {**old, **{k: bench.results[k] for k in ("date", "command", "machine", "settings")},
                         "commands": [c for c in commands if c != bench.results["command"]]
                         + [bench.results["command"]]}
    steps = {"mt": bench.magnetic_tile, "mt-baselines": bench.magnetic_tile_baselines, "cost": bench.magnetic_tile_cost,
             "speed": bench.training_speed, "elpv": bench.elpv,
             "ablations": bench.ablations, "highres": bench.highres}
    for name in args.only:
        steps[name]()
    if "commands" in bench.results:
        bench.results["commands"] = _sources(bench.results["commands"])
        bench.save()
    if not args.no_readme:
        update_readme(ROOT / "docs" / "results.md", bench.results)
    print(json.dumps(bench.results, indent=2)[:4000])


if __name__ == "__main__":
    main()
