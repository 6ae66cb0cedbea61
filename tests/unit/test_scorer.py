"""Fitted scoring terms on synthetic tensors: per-cell Mahalanobis, the per-cell memory, term scales,
fusion, the score head's two maps, the std floor, and the scorer's trip through a checkpoint."""
import numpy as np
import pytest
import torch

from adtr_edge.model.config import AdtrConfig, ReconstructorConfig
from adtr_edge.model.detector import ScoreHead
from adtr_edge.model.reconstructor import Reconstructor
from adtr_edge.model.scorer import FittedScorer, fit_scorer, used_terms
from adtr_edge.model.scoring import (
    cell_tokens,
    channel_major_memory,
    fit_cell_gaussians,
    fit_cell_memory,
    fit_channel_projection,
    fuse_terms,
    image_score,
    mahalanobis_distance,
    memory_distance,
    memory_norms,
    term_scale,
    upsample_map,
)


def _tokens(n=300, p=3, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(p, c, c, generator=gen)  # a different covariance at every cell
    return torch.einsum("npc,pcd->npd", torch.randn(n, p, c, generator=gen), mixing) + torch.arange(p)[:, None]


def _explicit_precision(x: torch.Tensor, delta: float) -> torch.Tensor:
    cov = torch.cov(x.T.double())
    return torch.linalg.inv(cov + delta * torch.eye(cov.shape[0], dtype=torch.float64))


def test_full_rank_mahalanobis_equals_the_shrunk_covariance_inverse():
    x = _tokens()
    shrinkage = 0.05
    fit = fit_cell_gaussians(x, rank=5, shrinkage=shrinkage)
    queries = _tokens(n=4, seed=1)
    got = mahalanobis_distance(queries, fit)
    delta = shrinkage * float(torch.stack([torch.cov(x[:, p].T).trace() for p in range(3)]).mean()) / 5
    for p in range(3):
        d = (queries[:, p] - x[:, p].mean(0)).double()
        expected = ((d @ _explicit_precision(x[:, p], delta)) * d).sum(1).sqrt()
        assert torch.allclose(got[:, p].double(), expected, rtol=1e-4), p


def test_low_rank_mahalanobis_whitens_the_leading_directions_and_pools_the_rest():
    x = _tokens(c=6)
    fit = fit_cell_gaussians(x, rank=2, shrinkage=0.01)
    assert fit["basis"].shape == (3, 6, 2) and fit["inv_eig"].shape == (3, 2)
    # Along the leading eigenvector of a cell, one std of training spread is ≈ distance 1.
    mean, v = fit["mean"][0], fit["basis"][0, :, 0]
    std_along = (x[:, 0] - mean) @ v
    query = torch.zeros(1, 3, 6)
    query[0] = fit["mean"]
    query[0, 0] = mean + v * std_along.std()
    assert mahalanobis_distance(query, fit)[0, 0].item() == pytest.approx(1.0, rel=0.02)
    assert mahalanobis_distance(fit["mean"][None], fit).abs().max() < 1e-3  # the mean is at 0


def test_shrinkage_bounds_the_distance_in_a_cell_that_never_varied():
    x = _tokens()
    x[:, 1] = 0.0  # a black border: the same value in every training image
    fit = fit_cell_gaussians(x, rank=3, shrinkage=0.1)
    query = torch.zeros(1, 3, 5)
    query[0, 1] = 1.0
    d = mahalanobis_distance(query, fit)[0, 1].item()
    delta = 0.1 * float(torch.stack([torch.cov(x[:, p].T).trace() for p in range(3)]).mean()) / 5
    assert np.isfinite(d) and d <= np.sqrt(5) / np.sqrt(delta) * (1 + 1e-4)  # |x − μ| / √δ


def test_cell_memory_is_a_nearest_neighbour_at_the_same_cell_only():
    x = _tokens(n=20)
    memory = fit_cell_memory(x, size=0)
    assert memory.shape == (3, 20, 5)
    queries = _tokens(n=4, seed=2)
    brute = torch.stack([torch.cdist(queries[:, p], x[:, p]).amin(1) for p in range(3)], dim=1)
    assert torch.allclose(memory_distance(queries, memory), brute, atol=1e-4)
    # A training token is at distance 0 at its own cell, but not when it shows up at another cell.
    moved = x[:1, [1, 1, 2]]
    d = memory_distance(moved, memory)[0]
    assert d[1] < 1e-2 and d[0] > 0.5


def test_channel_major_memory_is_the_same_memory_in_the_layout_the_distance_reads_fastest():
    x = _tokens(n=20)
    memory = fit_cell_memory(x, size=0)
    stored = channel_major_memory(memory)
    assert torch.equal(stored, memory) and stored.transpose(1, 2).is_contiguous()
    queries = _tokens(n=4, seed=2)
    torch.testing.assert_close(memory_distance(queries, stored, memory_norms(stored)),
                               memory_distance(queries, memory), rtol=1e-5, atol=1e-5)
    # The norms a caller keeps are read, never written: one image at a time (the live batch of 1) too.
    norms = memory_norms(stored)
    kept = norms.clone()
    one = [memory_distance(queries[i : i + 1], stored, norms) for i in range(4)]
    assert torch.equal(norms, kept)
    torch.testing.assert_close(torch.cat(one), memory_distance(queries, memory), rtol=1e-5, atol=1e-5)
    _, scorer, _, _ = _fitted(["mahalanobis"], ["memory"])
    assert scorer.memory.transpose(1, 2).is_contiguous()  # what the live scorer multiplies by
    assert scorer.checkpoint_tensors()["scorer.memory"].is_contiguous()  # what safetensors writes


def test_cell_memory_centroids_summarize_the_training_tokens():
    x = _tokens(n=200)
    memory = fit_cell_memory(x, size=16, seed=0)
    assert memory.shape == (3, 16, 5)
    full = memory_distance(x, fit_cell_memory(x, size=0))
    coarse = memory_distance(x, memory)
    assert (coarse >= full - 1e-4).all()  # fewer entries can only be farther
    spread = (x - x.mean(0)).norm(dim=2).mean()
    assert coarse.mean() < 0.6 * spread  # but k-means keeps them close to the data


def test_term_scale_is_the_quantile_spread_and_never_zero():
    maps = torch.arange(1001, dtype=torch.float32)
    assert term_scale(maps, (0.1, 0.9)) == pytest.approx(800.0)
    assert term_scale(torch.full((10,), 3.0), (0.1, 0.9)) > 0


def test_fuse_terms_adds_the_chosen_terms_each_over_its_scale():
    coarse = torch.stack([torch.full((2, 2), 2.0), torch.full((2, 2), 10.0), torch.full((2, 2), 7.0)])[None]
    fused = fuse_terms(coarse, [2.0, 5.0, 1.0], [0, 1])
    assert torch.allclose(fused, torch.full((1, 2, 2), 3.0))


def _head(threshold=None, localization_threshold=None):
    cfg = AdtrConfig.model_validate({
        "backbone": {"image_size": 32, "feature_size": 4},
        "scoring": {"image_terms": ["mahalanobis"], "localization_terms": ["memory"], "blur_sigma": 0.0},
    })
    fit = {"terms": ["mahalanobis", "memory"], "scales": [2.0, 1.0], "image": [0], "localization": [1]}
    if localization_threshold:
        fit["localization_threshold"] = localization_threshold
    return ScoreHead(cfg, threshold, "v", fit)


def test_score_head_takes_the_image_score_from_one_map_and_the_heatmap_from_the_other():
    coarse = torch.zeros(1, 2, 4, 4)
    coarse[0, 0] = 4.0  # image term: flat, 4 / scale 2 = 2 everywhere
    coarse[0, 1, 0, 0] = 5.0  # localization term: one hot cell
    scored = _head().score(coarse)
    assert scored.scores.item() == pytest.approx(2.0)
    assert scored.maps[0, :8, :8].mean() > scored.maps[0, 16:, 16:].mean() == 0.0


def test_heatmap_is_on_the_threshold_scale_and_an_anomaly_always_shows_above_it():
    head = _head(threshold=1.5, localization_threshold=10.0)
    coarse = torch.zeros(2, 2, 4, 4)
    coarse[:, 0] = 4.0  # both images: image score 2 ≥ 1.5, anomalous
    coarse[0, 1, 0, 0] = 100.0  # a strong spot: above its own threshold of 10
    coarse[1, 1, 3, 3] = 1.0  # a faint spot: far below it
    scored = head.score(coarse)
    assert scored.is_anomaly.all()
    # The strong spot is simply rescaled by 1.5 / 10; the faint one is raised to the threshold.
    assert scored.maps[0].max().item() == pytest.approx(100.0 * 1.5 / 10.0, rel=1e-4)
    assert image_score(scored.maps[1:], head.pool_kernel).item() == pytest.approx(1.5, rel=1e-4)
    assert scored.maps[1, 28:, 28:].min() == scored.maps[1].max() > 0  # still where the spot is


def test_score_head_refuses_maps_that_do_not_match_its_terms():
    with pytest.raises(ValueError, match="coarse maps"):
        _head().score(torch.zeros(1, 3, 4, 4))


def test_a_single_term_head_accepts_plain_maps():
    cfg = AdtrConfig.model_validate({"backbone": {"image_size": 32, "feature_size": 4},
                                     "scoring": {"blur_sigma": 0.0}})
    head = ScoreHead(cfg)  # no fit: the paper's L2 map, unscaled
    coarse = torch.rand(2, 4, 4)
    assert torch.allclose(head.score(coarse).scores, head.score(coarse[:, None]).scores)
    assert torch.equal(head.score(coarse).maps, upsample_map(coarse, 32, 0.0))


def test_std_floor_keeps_a_constant_cell_from_blowing_up_the_error():
    feats = torch.randn(30, 4, 3, 3)
    feats[:, :, 0, 0] = 0.0  # never varies in training
    model = Reconstructor(4, 3, ReconstructorConfig(hidden_dim=8, num_heads=2, ffn_dim=16, neighbor_mask=0,
                                                     std_floor=0.1))
    model.fit_normalization(feats)
    channel_std = feats.std(dim=0, unbiased=False).pow(2).mean(dim=(1, 2)).sqrt()
    assert torch.all(model.feature_std[0, :, 0, 0] >= 0.1 * channel_std * (1 - 1e-5))
    shifted = feats[:1].clone()
    shifted[:, :, 0, 0] = 1.0
    assert model.normalize(shifted).abs().max() < 100


def _fitted(terms_image, terms_loc):
    cfg = AdtrConfig.model_validate({"scoring": {"image_terms": terms_image, "localization_terms": terms_loc,
                                                 "mahalanobis_rank": 4, "memory_size": 8}})
    model = Reconstructor(6, 3, ReconstructorConfig(hidden_dim=8, num_heads=2, ffn_dim=16, neighbor_mask=0))
    train, val = torch.randn(40, 6, 3, 3), torch.randn(10, 6, 3, 3)
    model.fit_normalization(train)
    return model, *fit_scorer(cfg.scoring, model, train, val), val


def test_fit_scorer_orders_terms_once_and_records_their_scales():
    model, scorer, fit, val = _fitted(["mahalanobis", "memory"], ["l2_raw", "memory"])
    assert fit["terms"] == ["l2_raw", "mahalanobis", "memory"] == used_terms(
        AdtrConfig.model_validate({"scoring": {"localization_terms": ["l2_raw", "memory"]}}).scoring)
    assert fit["image"] == [1, 2] and fit["localization"] == [0, 2]
    assert all(s > 0 for s in fit["scales"])
    maps = scorer(val, *model(val), model.feature_std)
    assert maps.shape == (10, 3, 3, 3) and torch.isfinite(maps).all()


def test_fitted_scorer_survives_a_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    model, scorer, fit, val = _fitted(["mahalanobis"], ["memory"])
    save_file(scorer.checkpoint_tensors(), str(tmp_path / "s.safetensors"))
    loaded = FittedScorer.from_checkpoint(fit["terms"], load_file(str(tmp_path / "s.safetensors")))
    before = scorer(val, *model(val), model.feature_std)
    after = loaded(val, *model(val), model.feature_std)
    assert torch.equal(before, after)  # the fit's own scorer already holds the stored precision


def test_a_scorer_without_its_tensors_is_refused():
    with pytest.raises(ValueError, match="memory"):
        FittedScorer(["memory"], {})
    with pytest.raises(ValueError, match="unknown"):
        FittedScorer(["cosine"])


def test_cell_tokens_layout():
    f = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    t = cell_tokens(f)
    assert t.shape == (2, 4, 3) and torch.equal(t[1, 3], f[1, :, 1, 1])


@pytest.mark.parametrize("terms", [["l2"], ["l2_raw"], ["mahalanobis"], ["memory"], ["mahalanobis", "memory"]])
def test_a_cell_that_never_varied_in_training_keeps_normalized_scores_below_100x(terms):
    """A black background: one cell is constant in every training and validation image. A test image
    that changes there by three standard deviations of the other cells must stand out, but not score
    thousands of times the threshold (without the std floor the paper's l2 map read ~400,000× at one)."""
    from adtr_edge.model.detector import AnomalyDetector
    from adtr_edge.model.train import fit_scoring, new_reconstructor

    torch.manual_seed(0)
    train, val = torch.randn(60, 6, 4, 4), torch.randn(20, 6, 4, 4)
    train[:, :, 0, 0] = val[:, :, 0, 0] = 0.0
    cfg = AdtrConfig.model_validate({
        "backbone": {"image_size": 32, "feature_size": 4},
        "reconstructor": {"hidden_dim": 8, "num_heads": 2, "ffn_dim": 16, "neighbor_mask": 0},
        "scoring": {"image_terms": terms, "localization_terms": terms, "mahalanobis_rank": 4, "memory_size": 8}})
    detector = AnomalyDetector(cfg, None, new_reconstructor(cfg, 6, train))  # features given: no backbone
    fit_scoring(detector, train, val, np.zeros(len(val), int))
    shifted = val[:4].clone()
    shifted[:, :, 0, 0] = 3.0
    normalized = detector.score_features(torch.cat([val, shifted])).normalized
    assert torch.isfinite(normalized).all() and normalized.max() < 100
    assert normalized[len(val):].min() > normalized[: len(val)].median()  # and the change still shows


def test_channel_projection_keeps_the_leading_principal_axes_orthonormal():
    gen = torch.Generator().manual_seed(0)
    # Variance 9 along channel 2, 4 along channel 0, 1e-2 elsewhere: the axes come out in that order.
    x = torch.randn(300, 3, 5, generator=gen) * torch.tensor([2.0, 0.1, 3.0, 0.1, 0.1])
    w = fit_channel_projection(x, 2)
    assert w.shape == (5, 2)
    torch.testing.assert_close(w.T @ w, torch.eye(2), atol=1e-5, rtol=0)
    assert w[2, 0].abs() > 0.99 and w[0, 1].abs() > 0.99
    full = fit_channel_projection(x, 5)  # every axis: a rotation, so distances are unchanged
    memory = fit_cell_memory(x[:100], size=0)
    queries = x[100:110]
    torch.testing.assert_close(memory_distance(queries @ full, memory @ full), memory_distance(queries, memory),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="1..5"):
        fit_channel_projection(x, 6)


def test_memory_in_principal_channels_is_fitted_stored_and_loaded_with_its_projection(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = AdtrConfig.model_validate({"scoring": {"image_terms": ["memory"], "localization_terms": ["memory"],
                                                 "memory_size": 8, "memory_dims": 4}})
    model = Reconstructor(6, 3, ReconstructorConfig(hidden_dim=8, num_heads=2, ffn_dim=16, neighbor_mask=0))
    train, val = torch.randn(40, 6, 3, 3), torch.randn(10, 6, 3, 3)
    model.fit_normalization(train)
    scorer, fit = fit_scorer(cfg.scoring, model, train, val)
    assert scorer.memory_projection.shape == (6, 4) and scorer.memory.shape == (9, 8, 4)
    # The distance is the one in the projected channels, to the memory fitted there.
    expected = memory_distance(cell_tokens(val) @ scorer.memory_projection, scorer.memory)
    torch.testing.assert_close(scorer(val, *model(val), model.feature_std)[:, 0].flatten(1), expected)
    save_file(scorer.checkpoint_tensors(), str(tmp_path / "s.safetensors"))
    stored = load_file(str(tmp_path / "s.safetensors"))
    loaded = FittedScorer.from_checkpoint(fit["terms"], stored)
    assert torch.equal(loaded(val, *model(val), model.feature_std), scorer(val, *model(val), model.feature_std))
    # A projection that does not match its memory is refused with both sizes named.
    stored["scorer.memory_projection"] = stored["scorer.memory_projection"][:, :3].contiguous()
    with pytest.raises(ValueError, match="4 channels.*gives 3"):
        FittedScorer.from_checkpoint(fit["terms"], stored)
    stored["scorer.memory_projection"] = torch.zeros(6, 2, 4)
    with pytest.raises(ValueError, match="must be \\(channels, dims\\)"):
        FittedScorer.from_checkpoint(fit["terms"], stored)
    # memory_dims 0 (or ≥ the channels) keeps every channel, without a projection.
    every = AdtrConfig.model_validate({"scoring": {"image_terms": ["memory"], "localization_terms": ["memory"],
                                                   "memory_size": 8, "memory_dims": 0}})
    plain, _ = fit_scorer(every.scoring, model, train, val)
    assert not hasattr(plain, "memory_projection") and plain.memory.shape == (9, 8, 6)
