"""Dataset readers on generated trees and the real data, and every bad-data case."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from adtr_edge.model.config import DataConfig
from adtr_edge.model.data import (
    NORMAL_TYPE,
    BadFiles,
    DataError,
    load_dataset,
    read_image,
    read_mask,
)

from conftest import MAGNETIC_TILE, write_png

pytestmark = pytest.mark.usefixtures("magnetic_tile")  # real data; skipped, and said, without it


def _img(seed: int, shape=(40, 50, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def make_mvtec(root: Path, n_train=10, n_good=3, n_defect=4) -> Path:
    for i in range(n_train):
        write_png(root / "train" / "good" / f"{i:03d}.png", _img(i))
    for i in range(n_good):
        write_png(root / "test" / "good" / f"{i:03d}.png", _img(100 + i))
    for i in range(n_defect):
        write_png(root / "test" / "scratch" / f"{i:03d}.png", _img(200 + i))
        mask = np.zeros((40, 50), np.uint8)
        mask[5:10, 5:10] = 255
        write_png(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


def make_folder(root: Path, n_normal=10, n_defect=3, beside_png=False) -> Path:
    for i in range(n_normal):
        write_png(root / "OK_parts" / f"n{i:03d}.png", _img(i))
    for i in range(n_defect):
        if beside_png:  # Magnetic Tile style: image.jpg + image.png mask
            (root / "dent").mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / "dent" / f"d{i:03d}.jpg"), _img(50 + i))
            write_png(root / "dent" / f"d{i:03d}.png", np.full((40, 50), 255, np.uint8))
        else:
            write_png(root / "dent" / f"d{i:03d}.png", _img(50 + i))
            write_png(root / "dent" / f"d{i:03d}_mask.png", np.full((40, 50), 255, np.uint8))
    return root


def test_mvtec_layout_is_detected_and_split(tmp_path):
    ds = load_dataset(make_mvtec(tmp_path / "mv"), DataConfig(val_fraction=0.2))
    assert ds.layout == "mvtec"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8, 2, 7)
    defects = [s for s in ds.test if s.label]
    assert len(defects) == 4 and all(s.mask_path and s.mask_path.name.endswith("_mask.png") for s in defects)
    assert {s.defect_type for s in ds.test} == {NORMAL_TYPE, "scratch"}


def test_splits_are_deterministic_and_disjoint(tmp_path):
    root = make_folder(tmp_path / "f", n_normal=30)
    a, b = load_dataset(root, DataConfig(seed=3)), load_dataset(root, DataConfig(seed=3))
    assert [s.path for s in a.train] == [s.path for s in b.train]
    c = load_dataset(root, DataConfig(seed=4))
    assert [s.path for s in a.train] != [s.path for s in c.train]
    paths = [s.path for s in a.train] + [s.path for s in a.val] + [s.path for s in a.test]
    assert len(paths) == len(set(paths)) == 33


@pytest.mark.parametrize("beside_png", [False, True])
def test_folder_layout_finds_masks_and_skips_mask_files(tmp_path, beside_png):
    ds = load_dataset(make_folder(tmp_path / "f", beside_png=beside_png), DataConfig())
    assert ds.layout == "folder"
    defects = [s for s in ds.test if s.label]
    assert len(defects) == 3 and all(s.mask_path is not None for s in defects)
    assert all("mask" not in s.path.stem for s in ds.train + ds.val + ds.test)
    assert sum(1 for s in ds.test if not s.label) == 2  # 20% of 10 normals


def test_magnetic_tile_loads_through_the_folder_layout_unconverted():
    ds = load_dataset(MAGNETIC_TILE, DataConfig())
    counts = {t: sum(1 for s in ds.test if s.defect_type == t) for t in {s.defect_type for s in ds.test}}
    assert counts == {NORMAL_TYPE: 190, "MT_Blowhole": 115, "MT_Break": 85, "MT_Crack": 57,
                      "MT_Fray": 32, "MT_Uneven": 103}
    assert len(ds.train) + len(ds.val) == 952 - 190
    assert all(s.mask_path is not None and s.mask_path.suffix == ".png" for s in ds.test if s.label)


def test_elpv_reader_separates_probabilities():
    ds = load_dataset("elpv:mono", DataConfig())
    types = {s.defect_type for s in ds.test}
    assert types == {NORMAL_TYPE, "p=1", "p=2/3", "p=1/3"}
    assert all(s.label == 0 for s in ds.train + ds.val)
    assert read_image(ds.train[0].path).shape == (300, 300, 3)
    with pytest.raises(DataError, match="mono or poly"):
        load_dataset("elpv:amorphous", DataConfig())


def test_labelled_fraction_moves_defects_out_of_test(tmp_path):
    root = make_mvtec(tmp_path / "mv", n_defect=10)
    ds = load_dataset(root, DataConfig(labelled_fraction=0.5, labelled_val_share=0.4))
    assert len(ds.train_anomalous) == 3 and sum(s.label for s in ds.val) == 2
    assert sum(s.label for s in ds.test) == 5
    assert not {s.path for s in ds.train_anomalous} & {s.path for s in ds.test}


def test_gray_color_alpha_and_16bit_images_read_as_rgb(tmp_path):
    gray = write_png(tmp_path / "g.png", _img(1, (20, 30)))
    alpha = write_png(tmp_path / "a.png", _img(2, (20, 30, 4)))
    deep = write_png(tmp_path / "d.png", (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100))
    for p in (gray, alpha, deep):
        img = read_image(p)
        assert img.shape == (20, 30, 3) and img.dtype == np.uint8


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found: .*nowhere"):
        load_dataset(tmp_path / "nowhere", DataConfig())


def test_folder_without_normals_is_a_clear_error(tmp_path):
    write_png(tmp_path / "ds" / "dent" / "a.png", _img(0))
    with pytest.raises(DataError, match="no normal folder"):
        load_dataset(tmp_path / "ds", DataConfig())


def test_empty_split_names_the_split(tmp_path):
    write_png(tmp_path / "ds" / "good" / "a.png", _img(0))
    with pytest.raises(DataError, match="split is empty"):
        load_dataset(tmp_path / "ds", DataConfig())


def test_mvtec_without_test_folder(tmp_path):
    write_png(tmp_path / "mv" / "train" / "good" / "a.png", _img(0))
    with pytest.raises(DataError, match="test folder"):
        load_dataset(tmp_path / "mv", DataConfig())


def test_unreadable_image_names_the_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        read_image(bad)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.jpg"):
        read_image(empty)


def test_mask_size_mismatch_names_both_sizes(tmp_path):
    mask = write_png(tmp_path / "m.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match=r"m.png: mask size \(12, 10\) != image size \(50, 40\)"):
        read_mask(mask, (40, 50))


def test_bad_file_policy_skip_counts_and_fail_raises(tmp_path):
    bad = BadFiles()
    bad.record(tmp_path / "x.png", "corrupt", "skip")
    assert len(bad) == 1 and bad.items[0][1] == "corrupt"
    with pytest.raises(DataError, match="x.png: corrupt"):
        bad.record(tmp_path / "x.png", "corrupt", "fail")
