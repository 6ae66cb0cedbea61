"""Baseline for benchmarks: a nearest-neighbour patch memory (PatchCore without coreset).

Every training position's feature vector goes into a memory bank; a test position's anomaly value is
its L2 distance to the nearest bank entry. Same backbone features, same scoring as ADTR.
"""
from __future__ import annotations

import torch
from torch import Tensor

from adtr_edge.model.config import ScoringConfig
from adtr_edge.model.scoring import coarse_image_score, pool_kernel_px, upsample_map


class PatchMemory:
    def __init__(self, train_features: Tensor, max_patches: int = 0, seed: int = 0, chunk: int = 4096):
        bank = train_features.permute(0, 2, 3, 1).reshape(-1, train_features.shape[1])  # (N·S·S, C)
        if max_patches and bank.shape[0] > max_patches:
            keep = torch.randperm(bank.shape[0], generator=torch.Generator().manual_seed(seed))[:max_patches]
            bank = bank[keep]
        self.bank = bank.contiguous()
        self.chunk = chunk

    @torch.no_grad()
    def distance_map(self, features: Tensor) -> Tensor:
        """(B, C, S, S) → (B, S, S) distance of each position to its nearest memory entry."""
        b, c, s, _ = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(-1, c)
        best = torch.full((queries.shape[0],), float("inf"))
        for start in range(0, self.bank.shape[0], self.chunk):
            d = torch.cdist(queries, self.bank[start : start + self.chunk])
            best = torch.minimum(best, d.min(dim=1).values)
        return best.view(b, s, s)

    def score(self, features: Tensor, image_size: int, scoring: ScoringConfig) -> tuple[Tensor, Tensor]:
        """(maps (B, H, W), image scores (B,)) with the same map and score functions as ADTR."""
        coarse = self.distance_map(features)
        kernel = pool_kernel_px(scoring, image_size, features.shape[-1])
        return (upsample_map(coarse, image_size, scoring.blur_sigma),
                coarse_image_score(coarse, image_size, scoring.blur_sigma, kernel))
