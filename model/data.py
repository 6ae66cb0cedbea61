"""Dataset readers (MVTec AD layout, a folder layout, ELPV) with seeded splits, and image loading.

Every reader returns a `Dataset` of `Sample`s split into train / val (normals only) / test.
Missing folders and empty splits raise `DataError` naming the path. A file that cannot be read (or a
mask that does not fit its image) is, by `DataConfig.bad_files`, skipped with a warning and counted
in `BadFiles`, or raised.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import structlog

from .config import DataConfig

log = structlog.get_logger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
NORMAL_TYPE = "good"


class DataError(RuntimeError):
    """A dataset that cannot be used as given: the message names the path and what is wrong."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # NORMAL_TYPE for normals
    mask_path: Path | None = None


@dataclass
class Dataset:
    name: str
    layout: str
    root: str
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    train_anomalous: list[Sample] = field(default_factory=list)  # labelled anomalies for ADTR+

    def summary(self) -> dict[str, int]:
        return {
            "train": len(self.train), "val": len(self.val), "test": len(self.test),
            "test_anomalous": sum(s.label for s in self.test),
            "train_anomalous": len(self.train_anomalous), "val_anomalous": sum(s.label for s in self.val),
        }


@dataclass
class BadFiles:
    """Files skipped under `bad_files: skip`, with the reason for each."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def record(self, path: Path, reason: str, policy: str) -> None:
        if policy == "fail":
            raise DataError(f"{path}: {reason}")
        self.items.append((str(path), reason))
        log.warning("skipping bad file", path=str(path), reason=reason)

    def __len__(self) -> int:
        return len(self.items)


# ---------------------------------------------------------------- images


def read_image(path: Path) -> np.ndarray:
    """Any gray/colour/alpha, 8- or 16-bit image file → RGB uint8 (H, W, 3). Raises DataError."""
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    return decode_image(path.read_bytes(), str(path))


def decode_image(raw: bytes, what: str = "image") -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, BMP, TIFF) → RGB uint8 (H, W, 3). Raises DataError."""
    data = np.frombuffer(raw, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise DataError(f"{what}: not a readable image (corrupt or unsupported format)")
    return to_rgb8(image, what)


def to_rgb8(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Decoded pixels in any common layout → RGB uint8 (H, W, 3)."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DataError(f"{what}: unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise DataError(f"{what}: unsupported image shape {image.shape}")


def read_mask(path: Path, image_shape: tuple[int, int]) -> np.ndarray:
    """Mask file → bool (H, W); > 127 is defect. Raises DataError if it does not fit the image."""
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data is not None and data.size else None
    if mask is None:
        raise DataError(f"{path}: mask not readable")
    if mask.shape != tuple(image_shape):
        raise DataError(f"{path}: mask size {mask.shape[::-1]} != image size {tuple(image_shape)[::-1]}")
    return mask > 127


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):  # the live pipeline resizes once, at ingest
        return image
    interp = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Masks are resized nearest-neighbour (method §6)."""
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


def to_tensor_batch(images: list[np.ndarray]):
    """RGB uint8 (H, W, 3) images of one size → float tensor (B, 3, H, W) in [0, 1]."""
    import torch

    array = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- readers


def load_dataset(spec: str | Path, cfg: DataConfig) -> Dataset:
    """`elpv:mono` / `elpv:poly` (installed package), an MVTec-layout root, or a folder-layout root."""
    text = str(spec)
    if text.startswith("elpv"):
        cell_type = text.partition(":")[2] or "mono"
        return _read_elpv(cell_type, cfg)
    root = Path(text).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    if (root / "train" / "good").is_dir():
        return _read_mvtec(root, cfg)
    return _read_folder(root, cfg)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _limit(items: list, cfg: DataConfig) -> list:
    return items[: cfg.limit_per_class] if cfg.limit_per_class else items


def _shuffled(items: list, seed: int) -> list:
    items = sorted(items, key=lambda s: str(s.path))
    random.Random(seed).shuffle(items)
    return items


def _split_off(items: list, fraction: float) -> tuple[list, list]:
    """(rest, held_out) with round(fraction * n) held out, at least one of each when n >= 2."""
    n_out = min(max(1, round(fraction * len(items))), len(items) - 1) if len(items) >= 2 else 0
    return items[n_out:], items[:n_out]


def _hold_out_labelled(val: list, test: list, cfg: DataConfig) -> tuple[list, list, list]:
    """Move `labelled_fraction` of each defect type from test to (train_anomalous, val)."""
    if not cfg.labelled_fraction:
        return [], val, test
    kept, labelled_train, labelled_val = [], [], []
    for kind in sorted({s.defect_type for s in test if s.label}):
        items = _shuffled([s for s in test if s.defect_type == kind], cfg.seed)
        n_take = round(cfg.labelled_fraction * len(items))
        n_val = round(cfg.labelled_val_share * n_take)
        labelled_val += items[:n_val]
        labelled_train += items[n_val:n_take]
        kept += items[n_take:]
    return labelled_train, val + labelled_val, [s for s in test if not s.label] + kept


def _finish(name: str, layout: str, root: str, train: list, val: list, test: list, cfg: DataConfig) -> Dataset:
    train_anomalous, val, test = _hold_out_labelled(val, test, cfg)
    for split, items in (("train", train), ("validation", val), ("test", test)):
        if not items:
            raise DataError(f"{root}: the {split} split is empty")
    if not any(s.label for s in test):
        log.warning("test split has no anomalous images: AUROC is undefined", root=root)
    ds = Dataset(name, layout, root, train, val, test, train_anomalous)
    log.info("dataset loaded", name=name, layout=layout, **ds.summary())
    return ds


def _read_mvtec(root: Path, cfg: DataConfig) -> Dataset:
    normals = [Sample(p, 0, NORMAL_TYPE) for p in _limit(_images_in(root / "train" / "good"), cfg)]
    if not normals:
        raise DataError(f"{root / 'train' / 'good'}: no training images")
    train, val = _split_off(_shuffled(normals, cfg.seed), cfg.val_fraction)
    test_root = root / "test"
    if not test_root.is_dir():
        raise DataError(f"MVTec layout without a test folder: {test_root}")
    test: list[Sample] = []
    for type_dir in sorted(d for d in test_root.iterdir() if d.is_dir()):
        kind = type_dir.name
        for p in _limit(_images_in(type_dir), cfg):
            if kind == NORMAL_TYPE:
                test.append(Sample(p, 0, NORMAL_TYPE))
                continue
            mask = root / "ground_truth" / kind / f"{p.stem}_mask.png"
            test.append(Sample(p, 1, kind, mask if mask.is_file() else None))
    return _finish(root.name, "mvtec", str(root), train, val, test, cfg)


def _mask_beside(path: Path) -> Path | None:
    for candidate in (path.with_name(f"{path.stem}_mask.png"), path.with_suffix(".png")):
        if candidate != path and candidate.is_file():
            return candidate
    return None


def _is_mask_file(path: Path, siblings: set[Path]) -> bool:
    if path.stem.endswith("_mask"):
        return True
    # A same-name .png beside a non-png image is that image's mask (Magnetic Tile's convention).
    return path.suffix.lower() == ".png" and any(
        path.with_suffix(s) in siblings for s in IMAGE_SUFFIXES if s != ".png"
    )


def images_in(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive), leaving out mask files."""
    files = _images_in(folder)
    siblings = set(files)
    return [p for p in files if not _is_mask_file(p, siblings)]


def _read_folder(root: Path, cfg: DataConfig) -> Dataset:
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class folders (expected normal and defect folders, or train/good)")
    tokens = [t.lower() for t in cfg.normal_names]
    normals: list[Sample] = []
    defects: list[Sample] = []
    for folder in folders:
        images = _limit(images_in(folder), cfg)
        if any(t in folder.name.lower() for t in tokens):
            normals += [Sample(p, 0, NORMAL_TYPE) for p in images]
        else:
            defects += [Sample(p, 1, folder.name, _mask_beside(p)) for p in images]
    if not normals:
        raise DataError(
            f"{root}: no normal folder found (a folder whose name contains one of {cfg.normal_names})"
        )
    rest, test_normals = _split_off(_shuffled(normals, cfg.seed), cfg.test_fraction)
    train, val = _split_off(rest, cfg.val_fraction)
    return _finish(root.name, "folder", str(root), train, val, test_normals + defects, cfg)


def _elpv_root() -> Path:
    try:
        import elpv_dataset
    except ImportError as exc:
        raise DataError("ELPV needs the elpv-dataset package: pip install elpv-dataset") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def _read_elpv(cell_type: str, cfg: DataConfig) -> Dataset:
    """ELPV: train on p=0 cells of one type; test p=0 vs p=1, with p=1/3 and 2/3 as their own types."""
    if cell_type not in ("mono", "poly"):
        raise DataError(f"ELPV cell type must be mono or poly, got {cell_type!r}")
    root = _elpv_root()
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DataError(f"ELPV labels not found: {labels}")
    by_prob: dict[str, list[Sample]] = {}
    with open(labels, newline="") as fh:
        for row in csv.reader(fh, delimiter=" ", skipinitialspace=True):
            if len(row) < 3 or row[2] != cell_type:
                continue
            prob = round(float(row[1]) * 3)  # 0, 1, 2, 3 thirds
            kind = {0: NORMAL_TYPE, 1: "p=1/3", 2: "p=2/3", 3: "p=1"}[prob]
            by_prob.setdefault(kind, []).append(Sample(root / row[0], int(prob > 0), kind))
    normals = _limit(by_prob.get(NORMAL_TYPE, []), cfg)
    rest, test_normals = _split_off(_shuffled(normals, cfg.seed), cfg.test_fraction)
    train, val = _split_off(rest, cfg.val_fraction)
    test = test_normals + [s for k in ("p=1", "p=2/3", "p=1/3") for s in _limit(by_prob.get(k, []), cfg)]
    return _finish(f"elpv-{cell_type}", "elpv", str(root), train, val, test, cfg)
