"""The smallest-defect setting: input size arithmetic, the painted defects, and `train` using both."""
from __future__ import annotations

import json

import numpy as np
import pytest

from adtr_edge.model.sizing import CELL_SHARE, MAX_IMAGE_SIZE, input_size_for, paint_disc


def test_the_input_grows_until_the_smallest_defect_covers_half_a_cell():
    size = input_size_for(16, native_side=1024, floor=256)
    # 16 px of 1024 must become 8 input px (half a 16 px cell): 512 px, 32 cells, 0.5 cell wide
    assert (size.image_size, size.feature_size, size.capped) == (512, 32, False)
    assert size.defect_cells == pytest.approx(CELL_SHARE)
    # a larger defect needs less: rounded up to a multiple of 32, never below the configured size
    assert input_size_for(20, 1024, 256).image_size == 416
    assert input_size_for(200, 1024, 256).image_size == 256
    sizes = [input_size_for(d, 1000, 128).image_size for d in (40, 30, 20, 16)]
    assert sizes == sorted(sizes) and all(s % 32 == 0 for s in sizes)
    for d in (40, 30, 20, 16):
        assert input_size_for(d, 1000, 128).defect_cells >= CELL_SHARE


def test_a_defect_too_small_for_the_largest_input_says_so():
    size = input_size_for(2, native_side=4000, floor=256)
    assert size.image_size == MAX_IMAGE_SIZE and size.capped and size.defect_cells < CELL_SHARE
    assert input_size_for(2, 4000, 256, cap=2048).image_size == 2048  # a larger cap where memory allows
    with pytest.raises(ValueError, match="positive"):
        input_size_for(0, 1000, 256)


def test_a_painted_disc_has_the_asked_diameter_and_changes_only_its_pixels():
    image = np.full((300, 500, 3), 128, np.uint8)
    painted, mask = paint_disc(image, 20, np.random.default_rng(0))
    ys, xs = np.nonzero(mask)
    assert 18 <= xs.max() - xs.min() + 1 <= 22 and 18 <= ys.max() - ys.min() + 1 <= 22
    changed = np.abs(painted.astype(int) - image).max(axis=2) > 0
    assert changed[mask].all() and changed.sum() <= mask.sum() * 1.3
    assert abs(int(painted[mask].mean()) - 128) >= 35


def test_train_sizes_the_input_for_the_smallest_defect_and_reports_how_many_it_flags(
        small_config, small_dataset, tmp_path):
    from adtr_edge.model.data import BadFiles
    from adtr_edge.model.detector import load_detector
    from adtr_edge.model.sizing import native_side
    from adtr_edge.model.train import train_model

    native = native_side(small_dataset.train, BadFiles(), "skip")
    backbone = small_config.backbone.model_copy(update={"min_defect_px": 16.0})
    train = small_config.train.model_copy(update={"epochs": 0})
    cfg = small_config.model_copy(update={"backbone": backbone, "train": train})
    manifest = train_model(cfg, small_dataset, tmp_path / "sized", progress=False)

    expected = input_size_for(16.0, native, small_config.backbone.image_size)
    assert expected.image_size > small_config.backbone.image_size  # the setting changed something
    assert manifest["image_size"] == expected.image_size
    assert manifest["feature_shape"][1:] == [expected.feature_size] * 2
    sizing = manifest["training"]["sizing"]
    print(json.dumps(sizing))
    assert sizing["native_side"] == native and sizing["image_size"] == expected.image_size
    check = sizing["check"]
    assert check["images"] >= 5 and 0.0 <= check["recall"] <= 1.0 and 0.0 <= check["false_alarms"] <= 1.0
    assert check["auroc"] > 0.5  # painted discs score above the same images without them
    detector = load_detector(tmp_path / "sized")
    assert detector.image_size == expected.image_size


def test_a_larger_grid_keeps_the_scorer_near_the_configured_grids_memory(small_config, small_dataset):
    from adtr_edge.model.data import BadFiles
    from adtr_edge.model.sizing import sized_for_defects

    cfg = small_config.model_copy(update={"backbone": small_config.backbone.model_copy(update={"min_defect_px": 8.0})})
    sized, size = sized_for_defects(cfg, small_dataset.train, BadFiles())
    grow = size.feature_size / small_config.backbone.feature_size
    assert grow >= 2
    s, c = sized.scoring, small_config.scoring
    assert s.mahalanobis_rank == max(16, round(c.mahalanobis_rank / grow))
    assert s.memory_size == max(16, round(c.memory_size / grow ** 2))
    assert sized.reconstructor.neighbor_mask > small_config.reconstructor.neighbor_mask
    assert sized.reconstructor.neighbor_mask % 2 == 1
    unchanged, none = sized_for_defects(small_config, small_dataset.train, BadFiles())
    assert unchanged is small_config and none is None
