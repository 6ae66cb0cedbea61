"""Frozen multi-scale CNN embedding (method §1): chosen levels resized to one grid and concatenated."""
from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import structlog
import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureInfo
from torch import nn

from .config import BackboneConfig
from .weights import (
    WeightsError,
    convert_lite_state_dict,
    file_sha256,
    package_weights_path,
    read_state_dict,
    state_dict_sha256,
)

log = structlog.get_logger(__name__)

# Tracing is rare (once per backbone) and `warnings.catch_warnings` is process-wide: one trace at a time.
_TRACE_LOCK = threading.Lock()


class Backbone(nn.Module):
    """timm `features_only` model → (B, C, S, S) features; input is RGB in [0, 1], (B, 3, H, W).

    Frozen and always in eval mode: `train()` is a no-op so BatchNorm statistics never move.

    On the CPU, fp32 batches at the model's own image size run through a traced, frozen graph with
    BatchNorm folded into the convolutions and oneDNN kernels (`torch.jit.optimize_for_inference`):
    1.4-1.7x faster at batch 1 on a 2-core box, the same features within 1e-4, built on first use
    (~0.3 s). `cpu_graph = False` (a runtime switch, not a model setting: `inference.cpu_graph` in the
    agent) keeps the eager forward; a tracing failure does too, with one warning.
    """

    # Buffers (`register_buffer` below): declared so the type checker sees tensors, not `Tensor | Module`.
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        probe = timm.create_model(cfg.name, features_only=True, pretrained=False)
        reductions = _feature_info(probe).reduction()
        wanted = [2**level for level in cfg.levels]
        missing = [r for r in wanted if r not in reductions]
        if missing:
            raise ValueError(
                f"backbone {cfg.name} has strides {reductions}; levels {cfg.levels} need {wanted}"
            )
        out_indices = [reductions.index(r) for r in wanted]
        try:
            self.body = timm.create_model(
                cfg.name, features_only=True, out_indices=out_indices, pretrained=cfg.weights == "hub"
            )
        except Exception as exc:  # hub download failures come in many types
            if cfg.weights == "hub":
                raise WeightsError(
                    f"could not fetch hub weights for {cfg.name} (no network?): {exc}; "
                    "use weights: package:efficientnet-lite0 or file:PATH offline"
                ) from exc
            raise
        self.weights_id = self._load_weights()
        self.channels: list[int] = _feature_info(self.body).channels()
        self.strides: list[int] = _feature_info(self.body).reduction()
        cfg_norm = cast(dict[str, Any], self.body.pretrained_cfg)  # timm types the model as a plain Module
        self.register_buffer("mean", torch.tensor(cfg_norm["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg_norm["std"], dtype=torch.float32).view(1, 3, 1, 1))
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        self.cpu_graph = True
        # (H, W) -> the frozen CPU graph, or None where tracing failed (eager then). Only the model's own
        # size is ever traced, so the cache holds one entry whatever sizes callers pass.
        self._graphs: dict[tuple[int, int], torch.jit.ScriptModule | None] = {}

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickling for Ray) rebuilds its graph on first use; it is derived data.
        return {**self.__dict__, "_graphs": {}}

    def _apply(self, fn, recurse: bool = True):
        """.to(), .half(), .cuda(): the graph holds copies of the weights, so a real move drops it. A
        no-op move (`.to("cpu")` of a CPU model, as every hot swap that reuses the backbone does) keeps it."""
        before = self._placement()
        out = super()._apply(fn, recurse)
        if self._placement() != before:
            self._graphs = {}
        return out

    @property
    def graph_state(self) -> str:
        """What the CPU forward runs: "graph", "pending" (built on the next forward at the model's size),
        "failed" (tracing failed: eager), "off" (cpu_graph False) or "not_cpu" (eager on a GPU)."""
        if not self.cpu_graph:
            return "off"
        if self.mean.device.type != "cpu":
            return "not_cpu"
        size = (self.cfg.image_size, self.cfg.image_size)
        if size not in self._graphs:
            return "pending"
        return "graph" if self._graphs[size] is not None else "failed"

    def _placement(self) -> set[tuple[torch.device, torch.dtype]]:
        return {(t.device, t.dtype) for t in [*self.parameters(), *self.buffers()]}

    @property
    def out_channels(self) -> int:
        return sum(self.channels)

    @property
    def normalization(self) -> dict[str, list[float]]:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def train(self, mode: bool = True) -> Backbone:  # frozen by design: `mode` is ignored
        return super().train(False)

    def _load_weights(self) -> str:
        source = self.cfg.weights
        if source == "hub":
            return "hub:" + state_dict_sha256(self.body.state_dict())
        if source == "none":
            log.warning(
                "backbone has RANDOM weights (weights: none): features are meaningless; "
                "use only for tests", backbone=self.cfg.name,
            )
            return "none"
        if source.startswith("package:"):
            path = package_weights_path(source.removeprefix("package:"))
        else:
            path = Path(source.removeprefix("file:")).expanduser()
        state = read_state_dict(path)
        if any(k.startswith("_conv_stem") for k in state):
            # Only EfficientNet-style bodies (a Sequential of Sequential stages) come with lite weights.
            layout = [len(stage) for stage in cast(Iterable[nn.Sequential], self.body.blocks)]
            state = convert_lite_state_dict(state, layout)
        try:
            result = self.body.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise WeightsError(f"weights {source} do not fit backbone {self.cfg.name}: {str(exc)[:300]}") from exc
        if result.missing_keys:
            raise WeightsError(
                f"weights {source} do not fit backbone {self.cfg.name}: "
                f"{len(result.missing_keys)} missing keys, e.g. {result.missing_keys[:3]}"
            )
        return f"sha256:{file_sha256(path)}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.cfg.image_size, self.cfg.image_size)
        if (self.cpu_graph and images.device.type == "cpu" and images.dtype == torch.float32
                and tuple(images.shape[-2:]) == size):
            graph = self._graph(images)
            if graph is not None:
                return graph(images)
        return self.features(images)

    def _graph(self, images: torch.Tensor) -> torch.jit.ScriptModule | None:
        """The frozen, BatchNorm-folded oneDNN graph for this input size, traced on first use (by one
        thread: another that asks meanwhile waits for it rather than tracing again).

        TorchScript is deprecated in recent torch. Its replacement, torch.compile (inductor, freezing),
        ran about as fast here (14.3 against 24.2 ms eager, measured under load) but compiled for ~21 s
        per model and needs a C++ compiler on the box. Where tracing fails: eager, with a warning.
        """
        size = (int(images.shape[-2]), int(images.shape[-1]))
        graphs = self._graphs  # one read: a concurrent move may swap in a fresh dict
        if size in graphs:
            return graphs[size]
        with _TRACE_LOCK:
            if size in graphs:
                return graphs[size]
            try:
                with warnings.catch_warnings():
                    # TracerWarnings (the level-size checks are constants for one input size) and the
                    # deprecation notices: the graph is checked against eager in tests/unit/test_backbone.py.
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(_Features(self), images[:1], check_trace=False)
                    graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            except Exception as exc:  # noqa: BLE001 - any tracing failure means: stay eager
                log.warning("backbone cpu graph unavailable; running eager", size=size, error=str(exc)[:300])
                graph = None
            graphs[size] = graph
        return graph

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The eager forward: normalize, run the body, resize the levels to one grid and concatenate."""
        x = (images - self.mean) / self.std
        size = (self.cfg.feature_size, self.cfg.feature_size)
        maps = []
        for fmap in self.body(x):
            if fmap.shape[-2:] != size:
                # antialias averages when shrinking a fine level instead of sampling it.
                down = fmap.shape[-1] > size[-1]
                fmap = F.interpolate(fmap, size=size, mode="bilinear", align_corners=False, antialias=down)
            maps.append(fmap)
        return torch.cat(maps, dim=1)  # (B, C, S, S)


def _feature_info(model: nn.Module) -> FeatureInfo:
    """A timm `features_only` model's table of levels (timm types `create_model` as a plain Module)."""
    return cast(FeatureInfo, model.feature_info)


class _Features(nn.Module):
    """`Backbone.features` as a module of its own, for tracing (forward would dispatch to the graph)."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(images)
