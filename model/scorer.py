"""The fitted scoring terms of a model: backbone features + their reconstruction → per-cell maps.

Fitted in closed form after training (`fit_scorer`, seconds), stored in the checkpoint as tensors
named `scorer.*` beside the reconstructor's, and run on the inference side
(`AnomalyDetector.coarse_maps`), because the Mahalanobis term and the memory need the features.
What leaves the inference side is one small (S, S) map per term; `ScoreHead` fuses them with the
per-term scales stored in the manifest (`scoring_fit`). The math lives in `scoring`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .config import ScoringConfig
from .reconstructor import Reconstructor
from .scoring import (
    cell_tokens,
    channel_major_memory,
    fit_cell_gaussians,
    fit_cell_memory,
    fit_channel_projection,
    mahalanobis_distance,
    memory_distance,
    memory_norms,
    term_scale,
)

PREFIX = "scorer."
# l2: the paper's ||f − f̂||₂ in the reconstructor's normalized space; l2_raw: the same residual in
# the backbone's own units; mahalanobis: that raw-unit residual whitened per grid cell (measured:
# whitening in raw units beats whitening the normalized residual, whose shrinkage then weighs every
# channel alike); memory: distance of the raw feature to the nearest training feature at that cell
# (in the training features' leading principal channels when `memory_dims` asks for them).
TERMS = ("l2", "l2_raw", "mahalanobis", "memory")
# What a checkpoint written before fitted scoring existed means: the paper's map, unscaled.
LEGACY_FIT: dict[str, Any] = {"terms": ["l2"], "scales": [1.0], "image": [0], "localization": [0]}


def used_terms(cfg: ScoringConfig) -> list[str]:
    """The terms a scoring config needs, in one fixed order (the order of the coarse maps)."""
    wanted = set(cfg.image_terms) | set(cfg.localization_terms)
    return [t for t in TERMS if t in wanted]


def reconstructor_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's tensors without the scorer's: the reconstructor's state dict."""
    return {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}


class FittedScorer(nn.Module):
    """Per-cell maps for each term: (features, target, reconstruction) → (B, K, S, S)."""

    # Buffers, each registered only when its term is fitted (`hasattr` tells): declared for the type checker.
    gauss_mean: Tensor
    gauss_basis: Tensor
    gauss_inv_eig: Tensor
    gauss_inv_rest: Tensor
    memory: Tensor
    memory_projection: Tensor
    memory_sq: Tensor

    def __init__(self, terms: list[str], tensors: dict[str, Tensor] | None = None):
        super().__init__()
        unknown = sorted(set(terms) - set(TERMS))
        if unknown or not terms:
            raise ValueError(f"unknown or no scoring terms {terms}; choose from {list(TERMS)}")
        self.terms = list(terms)
        for name, value in (tensors or {}).items():
            value = value.float()
            self.register_buffer(name, channel_major_memory(value) if name == "memory" else value)
        need = {"mahalanobis": ("gauss_mean", "gauss_basis", "gauss_inv_eig", "gauss_inv_rest"),
                "memory": ("memory",)}
        missing = [n for t in self.terms for n in need.get(t, ()) if not hasattr(self, n)]
        if missing:
            raise ValueError(f"the scorer needs fitted tensors {missing} for terms {self.terms}")
        if hasattr(self, "memory_projection") and hasattr(self, "memory"):
            if self.memory_projection.dim() != 2:
                raise ValueError(f"the memory's projection must be (channels, dims), got "
                                 f"{tuple(self.memory_projection.shape)}")
            if self.memory_projection.shape[-1] != self.memory.shape[-1]:
                raise ValueError(f"the memory holds {self.memory.shape[-1]} channels, its projection gives "
                                 f"{self.memory_projection.shape[-1]}")
        if "memory" in self.terms:  # derived once here, never saved (the checkpoint holds the memory)
            self.register_buffer("memory_sq", memory_norms(self.memory), persistent=False)

    @classmethod
    def from_checkpoint(cls, terms: list[str], tensors: dict[str, Tensor]) -> FittedScorer:
        return cls(terms, {k.removeprefix(PREFIX): v for k, v in tensors.items() if k.startswith(PREFIX)})

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """The fitted tensors under their checkpoint names; the bulky ones (basis, memory) in fp16."""
        bulky = {"gauss_basis", "memory"}
        return {PREFIX + name: (buf.half() if name in bulky else buf).contiguous()
                for name, buf in self.state_dict().items()}

    def memory_tokens(self, features: Tensor) -> Tensor:
        """(B, C, S, S) features → the (B, P, D) tokens the memory searches: the fitted principal
        channels when the memory was fitted on them, else every channel."""
        tokens = cell_tokens(features)
        projection = getattr(self, "memory_projection", None)
        return tokens if projection is None else tokens @ projection.to(tokens.dtype)

    @torch.no_grad()
    def forward(self, features: Tensor, target: Tensor, reconstruction: Tensor, feature_std: Tensor) -> Tensor:
        b, _, s, _ = features.shape
        residual = target - reconstruction  # (B, C, S, S), the reconstructor's normalized space
        raw = residual * feature_std  # the same residual in backbone units
        maps = []
        for term in self.terms:
            if term == "l2":
                m = residual.pow(2).sum(dim=1)
                maps.append(m.sqrt())
            elif term == "l2_raw":
                maps.append(raw.pow(2).sum(dim=1).sqrt())
            elif term == "mahalanobis":
                fit = {"mean": self.gauss_mean, "basis": self.gauss_basis,
                       "inv_eig": self.gauss_inv_eig, "inv_rest": self.gauss_inv_rest}
                maps.append(mahalanobis_distance(cell_tokens(raw), fit).view(b, s, s))
            else:
                maps.append(memory_distance(self.memory_tokens(features), self.memory, self.memory_sq).view(b, s, s))
        return torch.stack(maps, dim=1)  # (B, K, S, S)


@torch.no_grad()
def _reconstruct(reconstructor: Reconstructor, features: Tensor) -> tuple[Tensor, Tensor]:
    """(target, reconstruction) on the CPU, whichever device the reconstructor sits on."""
    device = reconstructor.feature_std.device
    target, recon = reconstructor(features.to(device))
    return target.float().cpu(), recon.float().cpu()


@torch.no_grad()
def _residual_tokens(reconstructor: Reconstructor, features: Tensor, batch: int) -> Tensor:
    std = reconstructor.feature_std.cpu()
    out = []
    for i in range(0, len(features), batch):
        target, recon = _reconstruct(reconstructor, features[i : i + batch])
        out.append(cell_tokens((target - recon) * std))
    return torch.cat(out)  # (N, P, C), backbone units


@torch.no_grad()
def fit_scorer(cfg: ScoringConfig, reconstructor: Reconstructor, train_features: Tensor,
               val_features: Tensor, seed: int = 0, batch: int = 32) -> tuple[FittedScorer, dict[str, Any]]:
    """Fit the terms on training features, their scales on validation normals.

    Returns the scorer (tensors for the checkpoint) and `scoring_fit` for the manifest: the terms
    in coarse-map order, each term's scale, and which terms make the image and localization maps.
    """
    if len(val_features) == 0:
        raise ValueError("fitting the score needs validation normals (for the term scales)")
    was_training = reconstructor.training
    reconstructor.eval()
    terms = used_terms(cfg)
    tensors: dict[str, Tensor] = {}
    if "mahalanobis" in terms:
        fit = fit_cell_gaussians(_residual_tokens(reconstructor, train_features, batch),
                                 cfg.mahalanobis_rank, cfg.shrinkage)
        tensors.update({f"gauss_{k}": v for k, v in fit.items()})
    if "memory" in terms:
        tokens = cell_tokens(train_features.float().cpu())
        if 0 < cfg.memory_dims < tokens.shape[-1]:
            tensors["memory_projection"] = fit_channel_projection(tokens, cfg.memory_dims)
            tokens = tokens @ tensors["memory_projection"]
        tensors["memory"] = fit_cell_memory(tokens, cfg.memory_size, seed)
    scorer = FittedScorer(terms, tensors)
    # Scales from the tensors as the checkpoint will hold them (fp16 basis and memory).
    scorer = FittedScorer.from_checkpoint(terms, scorer.checkpoint_tensors())
    val_maps = torch.cat([
        scorer(val_features[i : i + batch].float().cpu(), *_reconstruct(reconstructor, val_features[i : i + batch]),
               reconstructor.feature_std.cpu())
        for i in range(0, len(val_features), batch)
    ])  # (N, K, S, S)
    reconstructor.train(was_training)
    quantiles = (cfg.fusion_quantiles[0], cfg.fusion_quantiles[1])  # [low, high]: the config checks the length
    scales = [term_scale(val_maps[:, j], quantiles) for j in range(len(terms))]
    return scorer, {
        "terms": terms, "scales": scales, "quantiles": list(cfg.fusion_quantiles),
        "image": [terms.index(t) for t in cfg.image_terms],
        "localization": [terms.index(t) for t in cfg.localization_terms],
    }
