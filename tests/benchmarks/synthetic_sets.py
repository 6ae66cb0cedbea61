"""Data the benchmark builds from what it has, never stored in the repository.

- `synthetic_defects`: defects painted onto VALIDATION normals (spots, scratches, pasted patches,
  smooth bands; with exact masks), so scoring choices are made without looking at the test set.
- `build_mosaic_set`: large images with small defects from Magnetic Tile: 2×2 mosaics of tiles at
  about their native resolution (640 px), one defect tile in each anomalous mosaic. The splits
  follow the Magnetic Tile protocol's own (no source image crosses from train to test).
"""
from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np

KINDS = ("spot", "scratch", "patch", "band")


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(mask, (0, 0), sigma)


def _shade(image: np.ndarray, weight: np.ndarray, delta: float) -> np.ndarray:
    return np.clip(image.astype(np.float32) + delta * weight[..., None], 0, 255).astype(np.uint8)


def _spot(image, rng, _other):
    h, w = image.shape[:2]
    r = rng.uniform(0.015, 0.05) * min(h, w)
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    mask = np.zeros((h, w), np.float32)
    axes = (max(1, int(r)), max(1, int(r * rng.uniform(0.6, 1.0))))
    cv2.ellipse(mask, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
    return _shade(image, _soft(mask, 1.0), rng.choice([-1, 1]) * rng.uniform(20, 60)), mask > 0.5


def _scratch(image, rng, _other):
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.float32)
    point = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.4) * min(h, w)
    points = [point.copy()]
    for _ in range(8):  # a wandering line, like a crack
        angle += rng.normal(0, 0.35)
        point = point + length / 8 * np.array([np.cos(angle), np.sin(angle)])
        points.append(point.copy())
    cv2.polylines(mask, [np.int32(points)], False, 1.0, int(rng.integers(1, 4)))
    return _shade(image, _soft(mask, 0.7), rng.choice([-1, 1]) * rng.uniform(20, 60)), mask > 0.5


def _patch(image, rng, other):
    h, w = image.shape[:2]
    ph, pw = int(rng.uniform(0.1, 0.3) * min(h, w)), int(rng.uniform(0.1, 0.3) * min(h, w))
    y, x = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
    oy, ox = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
    source = other[oy : oy + ph, ox : ox + pw]
    source = source[::-1] if rng.random() < 0.5 else source[:, ::-1]  # a mirrored piece of another part
    out = image.copy()
    out[y : y + ph, x : x + pw] = source
    mask = np.zeros((h, w), bool)
    mask[y : y + ph, x : x + pw] = True
    return out, mask


def _band(image, rng, _other):
    h, w = image.shape[:2]
    rh, rw = rng.uniform(0.15, 0.35) * h, rng.uniform(0.2, 0.5) * w
    cy, cx = rng.uniform(rh, h - rh), rng.uniform(rw, w - rw)
    mask = np.zeros((h, w), np.float32)
    cv2.ellipse(mask, (int(cx), int(cy)), (int(rw), int(rh)), rng.uniform(0, 180), 0, 360, 1.0, -1)
    weight = _soft(mask, 4.0)[..., None]
    blurred = cv2.GaussianBlur(image, (0, 0), rng.uniform(1.5, 3.0)).astype(np.float32)
    shift = rng.choice([-1, 1]) * rng.uniform(8, 20)  # duller texture, a little lighter or darker
    out = image.astype(np.float32) * (1 - weight) + (blurred + shift) * weight
    return np.clip(out, 0, 255).astype(np.uint8), mask > 0.5


def synthetic_defects(images: list[np.ndarray], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """One defect of each kind on every image (RGB uint8, one size) → [(image, mask, kind)]."""
    rng = np.random.default_rng(seed)
    painters = {"spot": _spot, "scratch": _scratch, "patch": _patch, "band": _band}
    out = []
    for i, image in enumerate(images):
        for kind in KINDS:
            other = images[(i + 1 + int(rng.integers(0, max(1, len(images) - 1)))) % len(images)]
            painted, mask = painters[kind](image, rng, other)
            out.append((painted, mask, kind))
    return out


def build_mosaic_set(dataset, out: Path, tile: int = 320, seed: int = 0) -> Path:
    """An MVTec-layout set of 2×2 mosaics (2·tile px a side) from a loaded Magnetic Tile dataset.

    train/good: mosaics of training+validation normals; test/good: mosaics of test normals;
    test/<type>: one defect image (its mask carried over) among three test normals.
    """
    from adtr_edge.model.data import read_image, read_mask

    if (out / "DONE").is_file():
        return out
    rng = random.Random(seed)

    def load(sample) -> np.ndarray:
        return cv2.resize(read_image(sample.path), (tile, tile), interpolation=cv2.INTER_AREA)

    def write(path: Path, tiles: list[np.ndarray], mask: np.ndarray | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
        cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        if mask is not None:
            m_path = out / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
            m_path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(m_path), mask.astype(np.uint8) * 255)

    train_pool = list(dataset.train) + list(dataset.val)
    test_normals = [s for s in dataset.test if s.label == 0]
    for i in range(len(train_pool)):
        write(out / "train" / "good" / f"{i:04d}.png", [load(s) for s in rng.sample(train_pool, 4)])
    for i in range(len(test_normals)):
        write(out / "test" / "good" / f"{i:04d}.png", [load(s) for s in rng.sample(test_normals, 4)])
    for i, sample in enumerate(s for s in dataset.test if s.label == 1 and s.mask_path is not None):
        slot = rng.randrange(4)
        tiles = [load(s) for s in rng.sample(test_normals, 3)]
        image = read_image(sample.path)
        defect = cv2.resize(read_mask(sample.mask_path, image.shape[:2]).astype(np.uint8), (tile, tile),
                            interpolation=cv2.INTER_NEAREST)
        tiles.insert(slot, cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA))
        mask = np.zeros((2 * tile, 2 * tile), bool)
        y, x = divmod(slot, 2)
        mask[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile] = defect > 0
        write(out / "test" / sample.defect_type / f"{i:04d}.png", tiles, mask)
    (out / "DONE").write_text("built by tests/benchmarks/synthetic_sets.py\n")
    return out
