"""Training: cached backbone features → reconstructor (normal-only), then checkpoint + threshold.

One loop, readable top to bottom: AdamW, linear warm-up, lr × 0.1 at `lr_drop_at`, gradient
clipping, validation loss per epoch, resumable from `train_state.pt` in the output folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from tqdm import tqdm

from .backbone import Backbone
from .checkpoint import data_fingerprint, save_checkpoint
from .config import AdtrConfig, TrainConfig
from .data import BadFiles, Dataset
from .detector import AnomalyDetector, resolve_device
from .features import FeatureCache
from .reconstructor import Reconstructor, explained_variance, hard_mining_loss, reconstruction_loss
from .scorer import fit_scorer
from .scoring import threshold_f1_optimal, threshold_from_normals
from .sizing import sized_for_defects, small_defect_check

log = structlog.get_logger(__name__)
STATE_FILE = "train_state.pt"
# The model: a Reconstructor, or the DistributedDataParallel wrapper around one (Ray Train, several workers).
LossFn = Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def normal_loss_for(tcfg: TrainConfig) -> LossFn:
    """The normal-only training loss `tcfg.loss` names."""

    def normal_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        target, recon = model(batch[0])
        if tcfg.loss == "hard_mining":
            return hard_mining_loss(target, recon, tcfg.hard_fraction)
        return reconstruction_loss(target, recon)

    return normal_loss


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    resumed_from_epoch: int = 0  # > 0 when a saved train state was continued


def _settings_hash(cfg: AdtrConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


def fit(
    model: torch.nn.Module,
    train_data: tuple[torch.Tensor, ...],
    val_data: tuple[torch.Tensor, ...] | None,
    tcfg: TrainConfig,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    loss_fn: LossFn | None = None,
    state_path: Path | None = None,
    state_tag: str = "",
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train `model` (a Reconstructor, or DistributedDataParallel around one) on tensors whose first
    dimension is the sample; returns the loss history. The loss is `loss_fn`, or the normal-only loss
    `tcfg.loss` names."""
    loss_fn = loss_fn or normal_loss_for(tcfg)
    epochs = tcfg.epochs if epochs is None else epochs
    lr = lr or tcfg.lr
    device = next(model.parameters()).device  # batches follow the model (the data may stay on the CPU)
    n = train_data[0].shape[0]
    steps_per_epoch = math.ceil(n / tcfg.batch_size)
    drop_step = int(tcfg.lr_drop_at * epochs) * steps_per_epoch
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=tcfg.weight_decay
    )

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / tcfg.warmup_steps) if tcfg.warmup_steps else 1.0
        return warm * (0.1 if step >= drop_step else 1.0)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    result, start_epoch = FitResult(), 0
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("tag") == state_tag:
            unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, result.history = state["epoch"], json.loads(state["history"])
            result.resumed_from_epoch = start_epoch
            torch.set_rng_state(state["rng"])
            log.info("resuming training", from_epoch=start_epoch, path=str(state_path))
        else:
            log.warning("ignoring train state from other settings", path=str(state_path))

    t0 = time.monotonic()
    bar = tqdm(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               disable=not progress, desc="train", unit="step")
    for epoch in range(start_epoch, epochs):
        model.train()
        t_epoch, losses = time.monotonic(), []
        # Each epoch's order depends on (seed, epoch) only, so a resumed run sees the same batches.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(tcfg.seed * 1_000_003 + epoch))
        for i in range(0, n, tcfg.batch_size):
            idx = order[i : i + tcfg.batch_size]
            loss = loss_fn(model, tuple(t[idx].to(device) for t in train_data))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                  "seconds": time.monotonic() - t_epoch}
        if val_data is not None:
            record["val_loss"] = evaluate_loss(model, val_data, loss_fn, tcfg.batch_size)
            # What the loss cannot say across settings: the share of the normals' variation predicted.
            record["val_explained_variance"] = explained_variance(unwrap_reconstructor(model), val_data[0],
                                                                  tcfg.batch_size)
        result.history.append(record)
        log.info("epoch done", **{k: round(v, 5) for k, v in record.items()})
        if state_path is not None:
            save_train_state(state_path, state_tag, epoch + 1, model, optimizer, scheduler, result.history)
        if on_epoch is not None:  # after the state is saved: a callback may ship it (Ray Train checkpoints)
            on_epoch(record)
        if tcfg.max_minutes and time.monotonic() - t0 > tcfg.max_minutes * 60 and epoch + 1 < epochs:
            log.warning("time budget reached; stopping early", epoch=epoch + 1, max_minutes=tcfg.max_minutes)
            result.stopped_early = True
            break
    bar.close()
    result.seconds = time.monotonic() - t0
    model.eval()
    return result


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself under a DistributedDataParallel wrapper (Ray Train with several workers)."""
    return getattr(model, "module", model)


def unwrap_reconstructor(model: torch.nn.Module) -> Reconstructor:
    """`unwrap` for what `fit` trains, which must be a Reconstructor."""
    inner = unwrap(model)
    if not isinstance(inner, Reconstructor):
        raise TypeError(f"expected a Reconstructor (or DistributedDataParallel around one), got {type(inner).__name__}")
    return inner


def save_train_state(path: Path, tag: str, epoch: int, model, optimizer, scheduler, history) -> None:
    """Everything a resumed run needs; written to a temp file and renamed, so a crash never leaves half."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({
        "tag": tag, "epoch": epoch, "model": {k: v.cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "history": json.dumps(history), "rng": torch.get_rng_state(),
    }, tmp)
    tmp.replace(path)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: tuple[torch.Tensor, ...], loss_fn: LossFn, batch_size: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    n, total = data[0].shape[0], 0.0
    for i in range(0, n, batch_size):
        batch = tuple(t[i : i + batch_size].to(device) for t in data)
        total += loss_fn(model, batch).item() * batch[0].shape[0]
    model.train()
    return total / n


# Quantiles of the validation normals' image scores kept in the manifest: the live agent's drift
# monitor compares each camera's recent scores against them.
SCORE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def score_stats(scores: np.ndarray) -> dict[str, Any]:
    q = np.quantile(scores, [0.5, 0.9, 0.95, 0.99])
    return {"n": int(scores.size), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "max": float(scores.max()),
            "p50": float(q[0]), "p90": float(q[1]), "p95": float(q[2]), "p99": float(q[3]),
            "quantiles": [[p, float(v)] for p, v in zip(SCORE_QUANTILES, np.quantile(scores, SCORE_QUANTILES))]}


def batched_scores(detector: AnomalyDetector, features: torch.Tensor, batch: int = 32) -> np.ndarray:
    """Image scores of cached features, a batch at a time."""
    return np.concatenate([detector.score_features(features[i : i + batch]).scores.numpy()
                           for i in range(0, len(features), batch)]) if len(features) else np.zeros(0)


def calibrate_threshold(detector: AnomalyDetector, features: torch.Tensor,
                        labels: np.ndarray) -> tuple[float, str, np.ndarray]:
    """Normals only → high quantile; labelled anomalies present → F1-optimal. Validation data only."""
    scores = batched_scores(detector, features)
    if labels.max() > 0 and labels.min() == 0:
        return threshold_f1_optimal(scores, labels), "f1_optimal", scores
    quantile = threshold_from_normals(scores[labels == 0], detector.cfg.threshold.normal_quantile)
    return quantile, "normal_quantile", scores


def calibrate_localization(detector: AnomalyDetector, val_normal: torch.Tensor) -> dict[str, Any]:
    """The localization map's own threshold (same quantile of validation normals as the image
    score's), which puts it on the image score's scale; stored in, and returned as, the scoring fit."""
    fit = dict(detector.head.fit)
    if fit["localization"] != fit["image"]:
        peaks = np.concatenate([detector.head.localization_peaks(detector.coarse_maps(val_normal[i : i + 32])).numpy()
                                for i in range(0, len(val_normal), 32)])
        fit["localization_threshold"] = threshold_from_normals(peaks, detector.cfg.threshold.normal_quantile)
    detector.set_scorer(detector.scorer, fit)
    return fit


@dataclass
class Calibration:
    threshold: float
    method: str
    val_scores: np.ndarray  # every validation image's score, in the order given
    val_labels: np.ndarray
    scoring_fit: dict[str, Any]

    @property
    def val_normal_scores(self) -> np.ndarray:
        return self.val_scores[self.val_labels == 0]


def fit_scoring(detector: AnomalyDetector, train_features: torch.Tensor, val_features: torch.Tensor,
                val_labels: np.ndarray) -> Calibration:
    """Everything after the networks are trained, the same for `train`, ADTR+ and a retrain: the
    scoring terms fitted on the training features (per-cell Gaussians of the residual, per-cell
    memory), their fusion scales on the validation normals, then the image threshold and the
    localization map's threshold. A changed reconstructor ships stale statistics without this.
    Sets scorer, fit and threshold on `detector`; `checkpoint_tensors(detector)` is what to save."""
    t0 = time.monotonic()
    cfg = detector.cfg
    val_normal = val_features[torch.from_numpy(np.asarray(val_labels) == 0)]
    scorer, fit = fit_scorer(cfg.scoring, detector.reconstructor, train_features, val_normal, cfg.train.seed)
    detector.set_scorer(scorer, fit)
    threshold, method, scores = calibrate_threshold(detector, val_features, val_labels)
    fit = calibrate_localization(detector, val_normal)
    fit["seconds"] = time.monotonic() - t0
    detector.threshold = threshold
    return Calibration(threshold, method, scores, np.asarray(val_labels), fit)


def checkpoint_tensors(detector: AnomalyDetector) -> dict[str, torch.Tensor]:
    """The reconstructor's weights and the fitted scorer's tensors: one checkpoint."""
    return {**detector.reconstructor.state_dict(), **detector.scorer.checkpoint_tensors()}


def new_reconstructor(cfg: AdtrConfig, channels: int, train_features: torch.Tensor) -> Reconstructor:
    """A fresh reconstructor whose feature normalization is fitted on the training features."""
    model = Reconstructor(channels, cfg.backbone.feature_size, cfg.reconstructor)
    model.fit_normalization(train_features)
    return model


def model_manifest(cfg: AdtrConfig, backbone: Backbone, calibration: Calibration,
                   data: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a new model: what loading, scoring, drift monitoring and auditing need."""
    return {
        "created_at": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "settings": json.loads(cfg.model_dump_json()),
        "backbone": {"name": cfg.backbone.name, "weights": cfg.backbone.weights,
                     "weights_id": backbone.weights_id, "channels": backbone.out_channels,
                     "strides": backbone.strides},
        "normalization": backbone.normalization,
        "image_size": cfg.backbone.image_size,
        "feature_shape": [backbone.out_channels, cfg.backbone.feature_size, cfg.backbone.feature_size],
        "threshold": calibration.threshold,
        "threshold_method": calibration.method,
        "validation_scores": score_stats(calibration.val_normal_scores),
        "scoring_fit": calibration.scoring_fit,
        "data": data,
        "training": training,
        "metrics": {},
    }


def train_model(cfg: AdtrConfig, dataset: Dataset, out_dir: Path, progress: bool = True,
                cache: FeatureCache | None = None,
                on_epoch: Callable[[Reconstructor, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Normal-only ADTR training on `dataset.train`, threshold on `dataset.val`; writes the checkpoint."""
    seed_everything(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = BadFiles()
    cfg, sizing = sized_for_defects(cfg, dataset.train, bad)
    if sizing is not None:
        (log.warning if sizing.capped else log.info)(
            "input size chosen for the smallest defect" + (": capped, the defect stays under half a cell"
                                                            if sizing.capped else ""),
            min_defect_px=cfg.backbone.min_defect_px, **sizing.as_dict())
        if cache is not None and cache.backbone.cfg.image_size != sizing.image_size:
            raise ValueError(f"the feature cache's backbone reads {cache.backbone.cfg.image_size} px, "
                             f"but min_defect_px asks for {sizing.image_size} px")
    backbone = (cache.backbone if cache else Backbone(cfg.backbone)).to(device)
    cache = cache or FeatureCache(backbone, cfg.data.cache_dir)
    t0 = time.monotonic()
    batch = cfg.train.feature_batch_size
    train = cache.extract(dataset.train, bad, cfg.data.bad_files, batch, progress, "train features")
    val = cache.extract(dataset.val, bad, cfg.data.bad_files, batch, progress, "val features")
    feature_seconds = time.monotonic() - t0

    model = new_reconstructor(cfg, backbone.out_channels, train.features).to(device)
    val_normal = val.features[[s.label == 0 for s in val.samples]]
    fitted = fit(model, (train.features,), (val_normal,), cfg.train,
                 state_path=out_dir / STATE_FILE, state_tag=_settings_hash(cfg), progress=progress,
                 on_epoch=(lambda record: on_epoch(model, record)) if on_epoch else None)

    detector = AnomalyDetector(cfg, backbone, model).to(device)
    calibration = fit_scoring(detector, train.features, val.features, np.array([s.label for s in val.samples]))
    threshold = calibration.threshold
    training = {"history": fitted.history, "seconds": fitted.seconds, "device": str(device),
                "feature_seconds": feature_seconds, "stopped_early": fitted.stopped_early,
                "val_explained_variance": explained_variance(model, val_normal) if len(val_normal) >= 2 else None}
    if sizing is not None:
        training["sizing"] = {**sizing.as_dict(), "check": small_defect_check(
            detector, [s for s in dataset.val if s.label == 0], cfg.backbone.min_defect_px, bad,
            cfg.data.bad_files, cfg.train.seed)}
    manifest = model_manifest(
        cfg, backbone, calibration,
        data={"name": dataset.name, "root": dataset.root, "layout": dataset.layout,
              "fingerprint": data_fingerprint(train.digests), **dataset.summary(), "skipped_files": bad.items},
        training=training)
    manifest = save_checkpoint(out_dir, checkpoint_tensors(detector), manifest)
    (out_dir / STATE_FILE).unlink(missing_ok=True)
    log.info("model saved", path=str(out_dir), threshold=round(threshold, 5),
             model_version=manifest["model_version"], seconds=round(fitted.seconds, 1))
    return manifest
