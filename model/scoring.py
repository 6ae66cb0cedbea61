"""The one place for the scoring math: anomaly map, image score, thresholds, normalized score.

Training, evaluation, offline prediction and the live pipeline all call these functions, so a frame
scores the same everywhere.
"""
from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ScoringConfig


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, H, W) maps, kernel truncated at 4σ, reflect padding."""
    if sigma <= 0:
        return maps
    radius = _blur_radius(sigma, min(maps.shape[-1], maps.shape[-2]))
    kernel = _gaussian_kernel(radius, sigma, maps.dtype, maps.device)
    out = maps.unsqueeze(1)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def anomaly_map(target: Tensor, reconstruction: Tensor, out_size: int, blur_sigma: float = 0.0) -> Tensor:
    """s(u) = ||f(:,u) − f̂(:,u)||₂ → bilinear upsample to out_size → optional blur. (B, H, W)."""
    return upsample_map(feature_distance(target, reconstruction), out_size, blur_sigma)


def feature_distance(target: Tensor, reconstruction: Tensor) -> Tensor:
    """The per-cell L2 distance ||f(:,u) − f̂(:,u)||₂ on the feature grid: (B, C, S, S) → (B, S, S).

    The live pipeline ships this small map from the inference actor to the scoring actor, which
    finishes it with `upsample_map`; `anomaly_map` is exactly that composition.
    """
    return (target - reconstruction).pow(2).sum(dim=1).sqrt()


def upsample_map(coarse: Tensor, out_size: int, blur_sigma: float = 0.0) -> Tensor:
    """A (B, S, S) feature-grid map → (B, out_size, out_size): bilinear, then optional blur.

    Both steps are linear and separable, so the pair is one (out_size, S) matrix U per axis and the
    map is U · coarse · Uᵀ: two small matrix products instead of a full-size interpolation and two
    33-tap convolutions per map (measured: 10 ms → well under 1 ms per 256 px map on one CPU thread).
    U is built by running the 1-D linear interpolation and `gaussian_blur`'s kernel and padding on the
    unit impulses, so it is the same arithmetic, not an approximation of it (tests/unit/test_scoring.py).
    """
    u = _axis_operator(_square_side(coarse), out_size, float(blur_sigma)).to(device=coarse.device, dtype=coarse.dtype)
    return u @ coarse @ u.T


def coarse_image_score(coarse: Tensor, out_size: int, blur_sigma: float, kernel: int) -> Tensor:
    """`image_score(upsample_map(coarse, out_size, blur_sigma), kernel)` without the full-size map. (B,).

    Upsampling, blur and the box mean are all linear and separable, so the pooled map is Q · coarse · Qᵀ
    with Q = (box mean along one axis) · U, an (out_size − k + 1, S) matrix: a few small float64
    products on the (S, S) map instead of a float64 summed-area table of the (out_size, out_size) map
    (measured: 0.54 → 0.05 ms per 256 px map on one CPU thread). The same numbers to float32 rounding
    of the full map (tests/unit/test_scoring.py).
    """
    q = _pooled_axis_operator(_square_side(coarse), out_size, float(blur_sigma), kernel).to(coarse.device)
    return (q @ coarse.double() @ q.T).flatten(1).amax(dim=1).to(coarse.dtype)


def _square_side(coarse: Tensor) -> int:
    if coarse.shape[-1] != coarse.shape[-2]:
        raise ValueError(f"expected square maps, got {tuple(coarse.shape[-2:])}")
    return coarse.shape[-1]


@functools.lru_cache(maxsize=32)
def _axis_operator(size: int, out_size: int, blur_sigma: float) -> Tensor:
    """(out_size, size) float32: `_axis_operator64`, kept in the maps' precision."""
    return _axis_operator64(size, out_size, blur_sigma).float()


@functools.lru_cache(maxsize=32)
def _axis_operator64(size: int, out_size: int, blur_sigma: float) -> Tensor:
    """(out_size, size): bilinear upsampling (align_corners=False) then the reflect-padded Gaussian blur
    along one axis, as a float64 matrix."""
    eye = torch.eye(size, dtype=torch.float64)  # column j = the unit impulse at cell j
    line = F.interpolate(eye.unsqueeze(0), size=out_size, mode="linear", align_corners=False)[0]  # (size, out)
    if blur_sigma > 0:
        radius = _blur_radius(blur_sigma, out_size)
        kernel = _gaussian_kernel(radius, blur_sigma, torch.float64)
        line = F.conv1d(F.pad(line.unsqueeze(1), (radius, radius), mode="reflect"), kernel.view(1, 1, -1))[:, 0]
    return line.T.contiguous()


@functools.lru_cache(maxsize=32)
def _pooled_axis_operator(size: int, out_size: int, blur_sigma: float, kernel: int) -> Tensor:
    """(out_size − k + 1, size) float64: `_axis_operator64` followed by the k-wide mean at stride 1,
    with `image_score`'s clamp of k to the map's side."""
    kernel = max(1, min(kernel, out_size))
    u = _axis_operator64(size, out_size, blur_sigma)  # (out, size)
    return F.avg_pool1d(u.T.unsqueeze(1), kernel, stride=1)[:, 0].T.contiguous()


def _blur_radius(sigma: float, size: int) -> int:
    """The blur kernel's half-width: 4σ, at least 1, and less than the map's side (reflect padding)."""
    return min(max(1, int(math.ceil(4.0 * sigma))), size - 1)


def _gaussian_kernel(radius: int, sigma: float, dtype: torch.dtype, device=None) -> Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def pool_kernel_px(cfg: ScoringConfig, image_size: int, feature_size: int) -> int:
    """The image-score pooling kernel in pixels; 0 in the config means one feature cell."""
    return cfg.pool_kernel or max(1, image_size // feature_size)


def image_score(maps: Tensor, kernel: int) -> Tensor:
    """Max of the (B, H, W) maps average-pooled with a kernel×kernel window at stride 1. (B,).

    The definition, for any full-size map; the model scores with `coarse_image_score`, the same
    number computed from the feature-grid map it upsamples."""
    kernel = max(1, min(kernel, maps.shape[-1], maps.shape[-2]))
    return box_mean(maps, kernel).flatten(1).amax(dim=1).to(maps.dtype)


def box_mean(maps: Tensor, kernel: int) -> Tensor:
    """Mean over every kernel×kernel window at stride 1: (B, H, W) → (B, H−k+1, W−k+1), float64.

    Summed-area tables in float64 (exact to ~1e-12 here): the same numbers as `avg_pool2d`, at a
    cost independent of the kernel.
    """
    table = F.pad(maps.double().cumsum(dim=1), (0, 0, 1, 0))
    rows = table[:, kernel:] - table[:, :-kernel]
    table = F.pad(rows.cumsum(dim=2), (1, 0))
    return (table[:, :, kernel:] - table[:, :, :-kernel]) / (kernel * kernel)


def normalized_score(score, threshold: float):
    """score / threshold: 1.0 is the decision boundary."""
    return score / threshold


def threshold_from_normals(scores: np.ndarray, quantile: float) -> float:
    """Normals only: a high quantile of validation normal image scores."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no validation scores to calibrate a threshold on")
    return float(np.quantile(scores, quantile))


def threshold_f1_optimal(scores: np.ndarray, labels: np.ndarray) -> float:
    """With labelled anomalies: the threshold that maximizes F1 (decision: score >= threshold)."""
    from sklearn.metrics import precision_recall_curve

    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        raise ValueError("F1-optimal threshold needs both normal and anomalous validation samples")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
    return float(thresholds[int(np.argmax(f1))])


def defect_regions(amap: np.ndarray, threshold: float, frame_size: tuple[int, int] | None = None,
                   min_area_px: int = 1, max_regions: int = 20) -> list[dict]:
    """Connected components (8-neighbour, OpenCV) of `amap >= threshold` on one (H, W) anomaly map.

    Each region: `box` [x, y, w, h] and `area` in frame pixels (scaled from the map when
    `frame_size` = (width, height) is given), `peak` score and `peak_normalized` (peak / threshold).
    The largest peaks first; at most `max_regions`.
    """
    if not math.isfinite(threshold):
        return []
    mask = (amap >= threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    height, width = amap.shape
    sx, sy = (frame_size[0] / width, frame_size[1] / height) if frame_size else (1.0, 1.0)
    regions = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area_px:
            continue
        peak = float(amap[labels == label].max())
        regions.append({
            "box": [round(x * sx), round(y * sy), max(1, round(w * sx)), max(1, round(h * sy))],
            "area": round(area * sx * sy),
            "peak": peak,
            "peak_normalized": peak / threshold,
        })
    regions.sort(key=lambda r: r["peak"], reverse=True)
    return regions[:max_regions]


# ---------------------------------------------------------------- fitted per-cell scoring terms
# Closed-form fits on training features (seconds), applied on the inference side to (B, P, C)
# tokens, P = S·S grid cells. Each returns a (B, P) distance; `fuse_terms` combines the maps.


def cell_tokens(features: Tensor) -> Tensor:
    """(B, C, S, S) → (B, P, C) with P = S·S, the layout the per-cell terms work in."""
    return features.flatten(2).transpose(1, 2)


def fit_cell_gaussians(tokens: Tensor, rank: int, shrinkage: float, chunk: int = 32) -> dict[str, Tensor]:
    """Per grid cell: mean and a low-rank + isotropic precision of (N, P, C) training tokens.

    Σ_u ≈ V diag(λ) Vᵀ + ρ (I − V Vᵀ): the `rank` leading eigenpairs of cell u's covariance and the
    average of the rest (probabilistic PCA). Every variance gets + δ, δ = `shrinkage` × the mean
    channel variance over ALL cells, so a cell that never varies in training (a black border) cannot
    get a near-infinite precision. Stores O(P·C·rank) numbers instead of O(P·C²).
    """
    n, p, c = tokens.shape
    if n < 2:
        raise ValueError("fitting a per-cell Gaussian needs at least 2 training images")
    k = max(1, min(rank, c, n - 1))
    mean = tokens.mean(dim=0)  # (P, C)
    centred = (tokens - mean).transpose(0, 1)  # (P, N, C)
    total = centred.pow(2).sum(dim=(1, 2)) / (n - 1)  # (P,) trace of each cell's covariance
    delta = shrinkage * float(total.mean()) / c + 1e-12
    bases, eigs = [], []
    for start in range(0, p, chunk):
        # Right singular vectors of the centred data = covariance eigenvectors, largest first.
        _, s, vh = torch.linalg.svd(centred[start : start + chunk].double(), full_matrices=False)
        bases.append(vh[:, :k].transpose(1, 2).float())  # (chunk, C, k)
        eigs.append((s[:, :k].pow(2) / (n - 1)).float())  # (chunk, k)
    basis, eig = torch.cat(bases), torch.cat(eigs)
    rest = ((total - eig.sum(dim=1)) / max(1, c - k)).clamp_min(0.0)  # (P,) mean leftover variance
    # With a full basis nothing is left over; a zero weight keeps rounding noise out of the distance.
    inv_rest = 1.0 / (rest + delta) if k < c else torch.zeros_like(rest)
    return {"mean": mean, "basis": basis, "inv_eig": 1.0 / (eig + delta), "inv_rest": inv_rest}


def mahalanobis_distance(tokens: Tensor, fit: dict[str, Tensor]) -> Tensor:
    """√((x − μ_u)ᵀ Σ_u⁻¹ (x − μ_u)) per cell with a `fit_cell_gaussians` fit: (B, P, C) → (B, P)."""
    d = tokens - fit["mean"]  # (B, P, C)
    # One matrix product per cell on contiguous operands (the einsum form ran as single-threaded
    # per-cell products: measured 5.3 → 1.9 ms at batch 4 on two threads, the same numbers).
    proj = torch.bmm(d.transpose(0, 1).contiguous(), fit["basis"].to(d.dtype)).transpose(0, 1)  # (B, P, k)
    inside = proj.pow(2)
    outside = (d.pow(2).sum(dim=2) - inside.sum(dim=2)).clamp_min(0.0)  # the part off the basis
    squared = (inside * fit["inv_eig"]).sum(dim=2) + outside * fit["inv_rest"]
    return squared.clamp_min(0.0).sqrt()


def fit_cell_memory(tokens: Tensor, size: int, seed: int = 0, iterations: int = 10) -> Tensor:
    """Per grid cell, a memory of training tokens: (N, P, C) → (P, M, C).

    `size` 0 (or ≥ N) keeps every training image's token at that cell; otherwise M = `size`
    k-means centroids per cell (Lloyd's algorithm from a seeded random start, all cells at once).
    """
    n = tokens.shape[0]
    bank = tokens.transpose(0, 1).contiguous()  # (P, N, C)
    if size <= 0 or size >= n:
        return bank
    gen = torch.Generator().manual_seed(seed)
    centroids = bank[:, torch.randperm(n, generator=gen)[:size]].clone()  # (P, M, C)
    for _ in range(iterations):
        assign = _squared_distances(bank, centroids).argmin(dim=2)  # (P, N)
        one_hot = F.one_hot(assign, size).to(bank.dtype)  # (P, N, M)
        counts = one_hot.sum(dim=1)  # (P, M)
        sums = one_hot.transpose(1, 2) @ bank  # (P, M, C)
        # A centroid that lost all its members keeps its place rather than collapsing to zero.
        centroids = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centroids)
    return centroids


def fit_channel_projection(tokens: Tensor, dims: int, chunk: int = 64) -> Tensor:
    """The `dims` leading principal axes of (N, P, C) training tokens, all cells pooled: (C, dims),
    orthonormal columns, largest variance first.

    The memory searches `tokens @ projection` instead of the C raw channels: distances between
    projections are distances within the subspace that holds most of the normal variation, and the
    memory read per frame shrinks by C / dims. Covariance accumulated in float64, `chunk` images at a time.
    """
    n, _, c = tokens.shape
    if not 0 < dims <= c:
        raise ValueError(f"a projection keeps 1..{c} channels, got {dims}")
    total = torch.zeros(c, dtype=torch.float64)
    second = torch.zeros(c, c, dtype=torch.float64)
    count = 0
    for start in range(0, n, chunk):
        x = tokens[start : start + chunk].reshape(-1, c).double()
        total += x.sum(dim=0)
        second += x.T @ x
        count += x.shape[0]
    mean = total / count
    cov = second / count - torch.outer(mean, mean)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vectors.flip(1)[:, :dims].float().contiguous()


def memory_distance(tokens: Tensor, memory: Tensor, memory_sq: Tensor | None = None) -> Tensor:
    """Distance of each cell's token to its nearest memory entry AT THE SAME CELL: (B, P, C) → (B, P).

    `memory_sq` = `memory_norms(memory)`, computed once by a caller that scores many batches: without
    it every call re-reads the whole memory just for its norms (measured: 18 of 20 ms per frame).
    A memory stored as `channel_major_memory` gives the matrix product its contiguous (P, C, M)
    operand (measured: 4.1 → 3.0 ms per frame); any layout gives the same distances."""
    a = tokens.transpose(0, 1)  # (P, B, C)
    # min over entries of |m|² − 2 a·m, then + |a|², the same for every entry of a cell.
    nearest = _entry_terms(a, memory.to(tokens.dtype), memory_sq).amin(dim=2)  # (P, B)
    return (nearest + a.pow(2).sum(-1)).clamp_min(0.0).sqrt().transpose(0, 1)


def channel_major_memory(memory: Tensor) -> Tensor:
    """(P, M, C) memory with (P, C, M) storage: the same values and shape, the layout `memory_distance`
    reads fastest (it multiplies by memory.transpose(1, 2), which is then contiguous)."""
    return memory.transpose(1, 2).contiguous().transpose(1, 2)


def memory_norms(memory: Tensor) -> Tensor:
    """(P, M, C) memory → (P, M) squared norms of its entries, for `memory_distance`."""
    return memory.pow(2).sum(-1)


def _squared_distances(a: Tensor, b: Tensor, b_sq: Tensor | None = None) -> Tensor:
    """Batched squared L2 distances: (P, X, C), (P, Y, C) → (P, X, Y), as one matrix product per cell."""
    return _entry_terms(a, b, b_sq) + a.pow(2).sum(-1, keepdim=True)


def _entry_terms(a: Tensor, b: Tensor, b_sq: Tensor | None = None) -> Tensor:
    """|b|² − 2 a·b for every pair, (P, X, Y): the squared distance less |a|², which ranks b's entries
    alike for each a. One batched matrix product per cell."""
    b_sq = memory_norms(b) if b_sq is None else b_sq.to(a.dtype)
    # Both operands contiguous and the added term materialized: with a transposed `a` or a broadcast
    # `b_sq`, the CPU baddbmm falls back to one single-threaded addmm per cell (measured at batch 4:
    # 7.4 → 2.8 ms per call on two threads, 8.0 → 6.0 on one).
    init = b_sq.unsqueeze(1).expand(-1, a.shape[1], -1).contiguous()
    return torch.baddbmm(init, a.contiguous(), b.transpose(1, 2), alpha=-2.0)


def term_scale(val_maps: Tensor, quantiles: tuple[float, float]) -> float:
    """How much one term varies on validation normals: q_hi − q_lo of all their cells (EfficientAD's
    normalization), so terms in different units can be added. Never zero."""
    values = val_maps.flatten().double()
    if values.numel() > 1_000_000:  # torch.quantile's input limit; a strided subsample is plenty
        values = values[:: values.numel() // 1_000_000 + 1]
    lo, hi = torch.quantile(values, torch.tensor(quantiles, dtype=torch.float64)).tolist()
    return max(hi - lo, 1e-6 * max(abs(hi), 1.0), 1e-12)


def fuse_terms(coarse: Tensor, scales: list[float], use: list[int]) -> Tensor:
    """Σ over the terms in `use` of coarse[:, j] / scales[j]: (B, K, S, S) → (B, S, S)."""
    if not use:  # the config's validator requires a term; an empty sum would be the int 0
        raise ValueError("fuse_terms needs at least one term")
    first, rest = use[0], use[1:]
    return sum((coarse[:, j] / scales[j] for j in rest), coarse[:, first] / scales[first])
