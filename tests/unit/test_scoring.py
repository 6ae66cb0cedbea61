"""Scoring math on hand-made maps: one implementation for train, eval, predict and live."""
import numpy as np
import pytest
import torch

from adtr_edge.model.config import ScoringConfig
from adtr_edge.model.scoring import (
    anomaly_map,
    coarse_image_score,
    gaussian_blur,
    image_score,
    normalized_score,
    pool_kernel_px,
    threshold_f1_optimal,
    threshold_from_normals,
    upsample_map,
)


def test_anomaly_map_is_l2_norm_over_channels():
    target = torch.zeros(1, 2, 2, 2)
    recon = torch.zeros(1, 2, 2, 2)
    recon[0, 0, 0, 0], recon[0, 1, 0, 0] = 3.0, 4.0  # ||(3, 4)|| = 5 at (0, 0)
    amap = anomaly_map(target, recon, out_size=2, blur_sigma=0.0)
    assert amap.shape == (1, 2, 2)
    assert torch.allclose(amap, torch.tensor([[[5.0, 0.0], [0.0, 0.0]]]))


def test_anomaly_map_upsamples_bilinearly_to_image_size():
    target, recon = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    amap = anomaly_map(target, recon, out_size=64)
    assert amap.shape == (1, 64, 64)
    assert torch.allclose(amap, torch.ones(1, 64, 64))


def test_blur_keeps_a_constant_map_and_spreads_a_peak():
    flat = torch.full((1, 32, 32), 2.0)
    assert torch.allclose(gaussian_blur(flat, 4.0), flat, atol=1e-5)
    peak = torch.zeros(1, 33, 33)
    peak[0, 16, 16] = 1.0
    blurred = gaussian_blur(peak, 2.0)
    assert abs(blurred.sum().item() - 1.0) < 1e-4
    assert blurred[0, 16, 16] < 1.0 and blurred[0, 16, 18] > 0
    assert gaussian_blur(peak, 0.0) is peak


@pytest.mark.parametrize("size,out,sigma", [(16, 256, 4.0), (16, 256, 0.0), (4, 32, 2.0), (8, 20, 9.0)])
def test_upsample_map_is_bilinear_upsampling_then_the_blur(size, out, sigma):
    # The map is computed as U · coarse · Uᵀ; it must be the same numbers as doing the two steps on
    # the full-size map (bilinear, align_corners=False, then the reflect-padded separable blur).
    coarse = torch.rand(3, size, size, generator=torch.Generator().manual_seed(size))
    direct = torch.nn.functional.interpolate(coarse[:, None], size=(out, out), mode="bilinear", align_corners=False)
    direct = gaussian_blur(direct[:, 0], sigma)
    assert torch.allclose(upsample_map(coarse, out, sigma), direct, atol=1e-5)


def test_image_score_is_max_of_average_pooled_map():
    amap = torch.zeros(1, 8, 8)
    amap[0, 0, 0] = 8.0  # a single hot pixel: pooled 2×2 → 2.0
    amap[0, 4:6, 4:6] = 1.5  # a 2×2 blob: pooled → 1.5
    assert image_score(amap, 2).item() == 2.0
    assert image_score(amap, 1).item() == 8.0
    assert image_score(amap, 100).item() == pytest.approx(amap.mean().item())


@pytest.mark.parametrize("size,out,sigma,kernel", [(16, 256, 4.0, 16), (16, 256, 0.0, 16), (4, 32, 2.0, 3),
                                                    (8, 20, 9.0, 100), (8, 20, 9.0, 1), (16, 512, 4.0, 32)])
def test_coarse_image_score_is_the_image_score_of_the_upsampled_map(size, out, sigma, kernel):
    # The pooled operator folds upsampling, blur and box mean into one matrix per axis; it must give
    # the score of the full-size map (kernel clamped to the map's side as image_score does).
    coarse = torch.rand(3, size, size, generator=torch.Generator().manual_seed(out)) * 5
    coarse[1, size // 2, size // 3] += 40.0  # one hot cell: the max sits where the peak is
    direct = image_score(upsample_map(coarse, out, sigma), kernel)
    assert torch.allclose(coarse_image_score(coarse, out, sigma, kernel), direct, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        coarse_image_score(coarse[:, :, :-1], out, sigma, kernel)


def test_pool_kernel_defaults_to_one_feature_cell():
    assert pool_kernel_px(ScoringConfig(pool_kernel=0), 256, 16) == 16
    assert pool_kernel_px(ScoringConfig(pool_kernel=5), 256, 16) == 5


def test_thresholds():
    normals = np.arange(101, dtype=float)
    assert threshold_from_normals(normals, 0.99) == pytest.approx(99.0)
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1])
    t = threshold_f1_optimal(scores, labels)
    assert 0.3 < t <= 0.8
    with pytest.raises(ValueError):
        threshold_f1_optimal(scores, np.zeros(5))
    assert normalized_score(2.0, 4.0) == 0.5


def test_patch_memory_baseline_matches_brute_force():
    from benchmarks.patch_memory import PatchMemory

    rng = torch.Generator().manual_seed(0)
    train = torch.randn(5, 6, 3, 3, generator=rng)
    test = torch.randn(2, 6, 3, 3, generator=rng)
    memory = PatchMemory(train, chunk=7)
    bank = train.permute(0, 2, 3, 1).reshape(-1, 6)
    queries = test.permute(0, 2, 3, 1).reshape(-1, 6)
    brute = torch.cdist(queries, bank).min(dim=1).values.view(2, 3, 3)
    assert torch.allclose(memory.distance_map(test), brute, atol=1e-5)
    assert torch.allclose(memory.distance_map(train[:1]), torch.zeros(1, 3, 3), atol=1e-3)
    maps, scores = memory.score(test, 12, ScoringConfig(blur_sigma=0.0))
    assert maps.shape == (2, 12, 12) and scores.shape == (2,)
