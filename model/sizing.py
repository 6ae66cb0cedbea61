"""The smallest defect a user cares about → the model's input size, and a check that it is seen.

Every image is resized to `image_size` × `image_size` and read on a grid of `feature_size` cells a
side. A defect `d` camera pixels wide on an image whose longer side is `W` pixels covers
`d · image_size / W` input pixels, i.e. `d · feature_size / W` cells. Below about half a cell, the
per-cell statistics average it away. `input_size_for` picks the smallest input (multiple of 32,
never below the configured one) on which the smallest defect covers `CELL_SHARE` of a cell at the
backbone's stride of 16, and says when even the largest size allowed (MAX_IMAGE_SIZE) cannot reach
that: `train` then warns.

`small_defect_check` paints discs of that diameter at the camera's resolution onto validation
normals and reports how many the calibrated model flags: the number a user reads before trusting
the setting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import AdtrConfig
from .data import BadFiles, DataError, Sample, read_image, resize_image
from .metrics import auroc

CELL_STRIDE = 16     # input pixels per grid cell at the default 256 px / 16 cells
CELL_SHARE = 0.5     # the smallest defect must cover this fraction of a cell's side
# The largest input it picks: 512 px (a 32 × 32 grid) is what configs/highres.yaml measured on this CPU
# box; at 768 px (48 × 48) fitting the scorer on Magnetic Tile's 686 training images held 15 GB and had
# not finished in 12 minutes. A smaller defect is reported `capped` (tile the camera image, or train
# on a GPU box with a larger cap).
MAX_IMAGE_SIZE = 512
SIZE_STEP = 32
NATIVE_SAMPLE = 32   # images read to find the camera's resolution


@dataclass(frozen=True)
class InputSize:
    image_size: int
    feature_size: int
    native_side: int       # the camera image's longer side (median over the images read)
    defect_cells: float    # the smallest defect's width in grid cells at this size
    capped: bool           # True: even MAX_IMAGE_SIZE leaves the defect below CELL_SHARE of a cell

    def as_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "feature_size": self.feature_size,
                "native_side": self.native_side, "defect_cells": round(self.defect_cells, 3),
                "capped": self.capped}


def input_size_for(min_defect_px: float, native_side: int, floor: int,
                   cap: int = MAX_IMAGE_SIZE) -> InputSize:
    """The input size (and grid) on which a `min_defect_px` defect covers CELL_SHARE of a cell."""
    if min_defect_px <= 0 or native_side <= 0:
        raise ValueError(f"min_defect_px and native_side must be positive, got {min_defect_px}, {native_side}")
    needed = CELL_SHARE * CELL_STRIDE * native_side / min_defect_px
    size = max(floor, SIZE_STEP * math.ceil(needed / SIZE_STEP))
    capped = size > cap
    size = min(size, max(cap, floor))
    feature_size = max(2, size // CELL_STRIDE)
    return InputSize(size, feature_size, native_side, min_defect_px * feature_size / native_side, capped)


def native_side(samples: list[Sample], bad: BadFiles, policy: str, limit: int = NATIVE_SAMPLE) -> int:
    """Median longer side of up to `limit` readable images (the camera's resolution)."""
    sides = []
    for sample in samples[:limit]:
        try:
            sides.append(max(read_image(sample.path).shape[:2]))
        except DataError as exc:
            bad.record(sample.path, str(exc).split(": ", 1)[-1], policy)
    if not sides:
        raise DataError("no readable training image to measure the camera's resolution from")
    return int(np.median(sides))


def sized_for_defects(cfg: AdtrConfig, samples: list[Sample], bad: BadFiles) -> tuple[AdtrConfig, InputSize | None]:
    """`cfg` with image_size / feature_size set from `backbone.min_defect_px` (unchanged when 0).

    A larger grid has more cells, and the scorer keeps its eigenvectors and memory centroids per cell:
    as `configs/highres.yaml` does by hand, they shrink with the grid (eigenvectors with its side,
    centroids with its area, neither below 16) so the scorer's memory stays near the configured grid's,
    and the neighbour mask grows with the grid's side (it hides the same part of the image)."""
    px = cfg.backbone.min_defect_px
    if not px:
        return cfg, None
    size = input_size_for(px, native_side(samples, bad, cfg.data.bad_files), cfg.backbone.image_size)
    grow = size.feature_size / cfg.backbone.feature_size
    backbone = cfg.backbone.model_copy(update={"image_size": size.image_size, "feature_size": size.feature_size})
    update: dict = {"backbone": backbone}
    if grow > 1:
        sc, rc = cfg.scoring, cfg.reconstructor
        update["scoring"] = sc.model_copy(update={
            "mahalanobis_rank": max(16, min(sc.mahalanobis_rank, round(sc.mahalanobis_rank / grow))),
            "memory_size": sc.memory_size and max(16, min(sc.memory_size, round(sc.memory_size / grow ** 2)))})
        if rc.neighbor_mask:
            mask = 2 * round(rc.neighbor_mask * grow / 2) + 1
            update["reconstructor"] = rc.model_copy(update={"neighbor_mask": mask})
    return cfg.model_copy(update=update), size


def paint_disc(image: np.ndarray, diameter: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged disc of `diameter` pixels, darker or lighter than its surroundings by 40–80 grey
    levels, at a random place away from the border → (image, mask)."""
    h, w = image.shape[:2]
    r = max(1.0, diameter / 2)
    cy, cx = rng.uniform(r, max(r + 1, h - r)), rng.uniform(r, max(r + 1, w - r))
    yy, xx = np.mgrid[:h, :w]
    dist = np.hypot(yy - cy, xx - cx)
    weight = np.clip(r + 0.5 - dist, 0.0, 1.0)[..., None]
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(40, 80)
    out = np.clip(image.astype(np.float32) + shift * weight, 0, 255).astype(np.uint8)
    return out, weight[..., 0] > 0.5


def small_defect_check(detector, normals: list[Sample], min_defect_px: float, bad: BadFiles,
                       policy: str, seed: int = 0, limit: int = 64) -> dict[str, Any] | None:
    """Validation normals with and without one painted disc of `min_defect_px` (camera pixels):
    the share of painted images flagged at the calibrated threshold, the clean ones flagged, and
    the image AUROC between the two. None without readable normals."""
    rng = np.random.default_rng(seed)
    clean, painted = [], []
    for sample in normals[:limit]:
        try:
            image = read_image(sample.path)
        except DataError as exc:
            bad.record(sample.path, str(exc).split(": ", 1)[-1], policy)
            continue
        clean.append(resize_image(image, detector.image_size))
        painted.append(resize_image(paint_disc(image, min_defect_px, rng)[0], detector.image_size))
    if not clean:
        return None
    def scores_of(images: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([detector.score_images(images[i : i + 16]).scores.numpy()
                               for i in range(0, len(images), 16)])

    scores = np.concatenate([scores_of(clean), scores_of(painted)])
    labels = np.repeat([0, 1], len(clean))
    flagged = scores > detector.threshold
    return {"min_defect_px": min_defect_px, "images": len(clean),
            "recall": float(flagged[labels == 1].mean()),
            "false_alarms": float(flagged[labels == 0].mean()),
            "auroc": auroc(labels, scores)}
