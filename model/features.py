"""Backbone features computed once per image and cached: in RAM, and on disk keyed by the backbone,
its weights, the image size, the levels, the grid, and the image file's content."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from tqdm import tqdm

from .backbone import Backbone
from .data import BadFiles, DataError, Sample, decode_image, resize_image, to_tensor_batch

log = structlog.get_logger(__name__)
_FORMAT = 1


@dataclass
class FeatureSet:
    features: torch.Tensor  # (N, C, S, S) float32
    samples: list[Sample]  # the samples that were readable, in order
    digests: list[str]  # sha256 of each sample's file content


class FeatureCache:
    def __init__(self, backbone: Backbone, cache_dir: str | Path | None, use_disk: bool = True):
        self.backbone = backbone
        cfg = backbone.cfg
        identity = {
            "format": _FORMAT, "backbone": cfg.name, "weights": backbone.weights_id,
            "image_size": cfg.image_size, "levels": cfg.levels, "feature_size": cfg.feature_size,
        }
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(cache_dir).expanduser() / self.key if (cache_dir and use_disk) else None
        self.ram: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def _disk_path(self, digest: str) -> Path | None:
        return self.dir / digest[:2] / f"{digest}.npy" if self.dir else None

    def _from_disk(self, digest: str) -> torch.Tensor | None:
        path = self._disk_path(digest)
        if path is None or not path.is_file():
            return None
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
            log.warning("feature cache entry unreadable; recomputing", path=str(path), error=str(exc))
            return None

    def _to_disk(self, digest: str, feature: torch.Tensor) -> None:
        path = self._disk_path(digest)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, feature.numpy())
        tmp.replace(path)  # atomic: a crash never leaves a half-written entry under the real name

    def extract(
        self, samples: list[Sample], bad: BadFiles, policy: str = "skip",
        batch_size: int = 16, progress: bool = False, desc: str = "features",
    ) -> FeatureSet:
        """Features for every readable sample; unreadable ones go to `bad` (or raise, by policy)."""
        size = self.backbone.cfg.image_size
        digests: list[str] = []
        kept: list[Sample] = []
        pending: list[tuple[str, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            batch = to_tensor_batch([img for _, img in pending]).to(self.backbone.mean.device)
            feats = self.backbone(batch).float().cpu()  # the cache lives on the CPU, in fp32
            for (digest, _), feat in zip(pending, feats):
                feat = feat.clone()
                self.ram[digest] = feat
                self._to_disk(digest, feat)
            pending.clear()

        for sample in tqdm(samples, desc=desc, disable=not progress, leave=False):
            try:
                raw = sample.path.read_bytes()
            except OSError as exc:
                bad.record(sample.path, f"cannot read file: {exc}", policy)
                continue
            digest = hashlib.sha256(raw).hexdigest()
            if digest not in self.ram:
                cached = self._from_disk(digest)
                if cached is not None:
                    self.ram[digest] = cached
                    self.hits += 1
                elif all(d != digest for d, _ in pending):
                    try:
                        image = decode_image(raw, str(sample.path))
                    except DataError as exc:
                        bad.record(sample.path, str(exc).split(": ", 1)[-1], policy)
                        continue
                    self.misses += 1
                    pending.append((digest, resize_image(image, size)))
                    if len(pending) >= batch_size:
                        flush()
            else:
                self.hits += 1
            digests.append(digest)
            kept.append(sample)
        flush()
        if not kept:
            raise DataError(f"no readable images among {len(samples)} for {desc}")
        return FeatureSet(torch.stack([self.ram[d] for d in digests]), kept, digests)
