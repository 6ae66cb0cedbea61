"""Feature cache: computed once per image, reused from RAM and disk, damaged entries recomputed."""
import shutil

import pytest
import torch

from adtr_edge.model.backbone import Backbone
from adtr_edge.model.data import BadFiles, DataError, Sample
from adtr_edge.model.features import FeatureCache

from conftest import MAGNETIC_TILE

pytestmark = pytest.mark.usefixtures("magnetic_tile")  # real data; skipped, and said, without it


@pytest.fixture(scope="module")
def backbone(small_config):
    return Backbone(small_config.backbone)


def _samples(n=3):
    paths = sorted((MAGNETIC_TILE / "MT_Free" / "Imgs").glob("*.jpg"))[:n]
    return [Sample(p, 0, "good") for p in paths]


def test_disk_cache_is_reused_and_equal(backbone, tmp_path):
    first = FeatureCache(backbone, tmp_path)
    a = first.extract(_samples(), BadFiles())
    assert first.misses == 3 and first.hits == 0
    second = FeatureCache(backbone, tmp_path)
    b = second.extract(_samples(), BadFiles())
    assert second.hits == 3 and second.misses == 0
    assert torch.equal(a.features, b.features)
    assert a.features.shape == (3, backbone.out_channels, 8, 8)


def test_cache_key_changes_with_image_size(small_config, tmp_path):
    other = Backbone(small_config.backbone.model_copy(update={"image_size": 96}))
    assert FeatureCache(other, tmp_path).key != FeatureCache(Backbone(small_config.backbone), tmp_path).key


def test_damaged_cache_entry_is_recomputed(backbone, tmp_path):
    cache = FeatureCache(backbone, tmp_path)
    good = cache.extract(_samples(1), BadFiles()).features
    for entry in cache.dir.rglob("*.npy"):
        entry.write_bytes(b"garbage")
    again = FeatureCache(backbone, tmp_path)
    assert torch.equal(again.extract(_samples(1), BadFiles()).features, good)
    assert again.misses == 1


def test_same_content_under_two_names_is_computed_once(backbone, tmp_path):
    src = _samples(1)[0].path
    copy = tmp_path / "copy.jpg"
    shutil.copy(src, copy)
    cache = FeatureCache(backbone, None)
    out = cache.extract([Sample(src, 0, "good"), Sample(copy, 0, "good")], BadFiles())
    assert cache.misses == 1 and torch.equal(out.features[0], out.features[1])


def test_unreadable_images_are_skipped_and_counted_or_fail(backbone, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    samples = _samples(2) + [Sample(broken, 0, "good")]
    bad = BadFiles()
    out = FeatureCache(backbone, None).extract(samples, bad, policy="skip")
    assert len(out.samples) == 2 and len(bad) == 1 and "broken.jpg" in bad.items[0][0]
    with pytest.raises(DataError, match="broken.jpg"):
        FeatureCache(backbone, None).extract(samples, BadFiles(), policy="fail")
