"""Reconstructor: shapes, normalization, the auxiliary query, input noise only in training, the losses."""
import pytest
import torch

from adtr_edge.model.config import ReconstructorConfig
from adtr_edge.model.reconstructor import Reconstructor


def _model(**kw) -> Reconstructor:
    kw.setdefault("neighbor_mask", 0)
    cfg = ReconstructorConfig(hidden_dim=32, num_heads=4, ffn_dim=64, dropout=0.0, **kw)
    return Reconstructor(channels=12, feature_size=4, cfg=cfg)


def test_output_shapes_match_input():
    target, recon = _model()(torch.randn(3, 12, 4, 4))
    assert target.shape == recon.shape == (3, 12, 4, 4)


def test_zero_init_starts_at_the_mean_feature():
    model = _model(feature_norm="position").eval()
    feats = torch.randn(20, 12, 4, 4) * 3 + 1
    model.fit_normalization(feats)
    target, recon = model(feats)
    assert torch.count_nonzero(recon) == 0
    assert torch.allclose(target.mean(0), torch.zeros(12, 4, 4), atol=1e-5)
    assert torch.allclose(target.pow(2).mean(dim=(0, 2, 3)), torch.ones(12), atol=1e-4)


def test_channel_norm_uses_one_mean_per_channel():
    model = _model(feature_norm="channel")
    feats = torch.randn(10, 12, 4, 4)
    model.fit_normalization(feats)
    assert torch.allclose(model.feature_mean[0, :, 0, 0], feats.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(model.feature_mean[0, :, 1, 2], model.feature_mean[0, :, 0, 0])


def test_decoder_sees_tokens_only_through_attention():
    # With every attention's value path zeroed, the output cannot depend on the input at all:
    # there is no shortcut from a token to its own reconstruction.
    model = _model(zero_init_output=False).eval()
    for layer in model.decoder:
        torch.nn.init.zeros_(layer.cross_attn.in_proj_weight)
        torch.nn.init.zeros_(layer.cross_attn.in_proj_bias)
        torch.nn.init.zeros_(layer.cross_attn.out_proj.weight)
        torch.nn.init.zeros_(layer.cross_attn.out_proj.bias)
    _, a = model(torch.randn(1, 12, 4, 4))
    _, b = model(torch.randn(1, 12, 4, 4))
    assert torch.allclose(a, b)


@pytest.mark.parametrize("noise", [{"jitter_scale": 50.0}, {"input_dropout": 0.5}], ids=["jitter", "input_dropout"])
def test_input_noise_applies_in_training_only_and_never_to_the_target(noise):
    model = _model(zero_init_output=False, **noise)
    x = torch.randn(2, 12, 4, 4)
    model.eval()
    assert torch.equal(model(x)[1], model(x)[1])
    model.train()
    (t1, r1), (t2, r2) = model(x), model(x)
    assert not torch.equal(r1, r2)
    assert torch.equal(t1, t2)  # the target is the whole input, normalized


def test_wrong_grid_size_is_rejected():
    with pytest.raises(ValueError, match="built for"):
        _model()(torch.randn(1, 12, 8, 8))


def test_neighbor_mask_hides_the_window_around_each_position():
    from adtr_edge.model.reconstructor import neighbor_mask

    mask = neighbor_mask(4, 3)
    assert mask.shape == (16, 16) and mask.diagonal().all()
    assert mask[5, 0] and mask[5, 10] and not mask[5, 15] and not mask[0, 2]
    assert neighbor_mask(4, 0) is None
    model = _model(neighbor_mask=3, zero_init_output=False)
    _, recon = model(torch.randn(2, 12, 4, 4))
    assert torch.isfinite(recon).all()


def test_neighbor_mask_covering_the_grid_is_rejected():
    with pytest.raises(ValueError, match="whole"):
        _model(neighbor_mask=9)


def test_kept_decoder_queries_give_the_same_reconstruction_and_follow_the_weights():
    # At inference the first decoder layer's self-attention over the (image-independent) queries is
    # computed once and kept; it must equal the full computation and never outlive the weights.
    model = _model(zero_init_output=False, num_decoder_layers=2, neighbor_mask=3).eval()
    x = torch.randn(3, 12, 4, 4)
    with torch.no_grad():
        torch.nn.init.normal_(model.query_embed)  # queries that matter
    full = model(x)[1].detach()  # grad enabled: computed in full, nothing kept
    assert "_query_cache" not in model.__dict__
    with torch.inference_mode():
        assert torch.allclose(model(x)[1], full, atol=1e-6)
        kept = model.__dict__["_query_cache"]
        assert torch.allclose(model(x)[1], full, atol=1e-6) and model.__dict__["_query_cache"] is kept  # reused
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another precision: not the fp32 queries
            model(x)
            assert model.__dict__["_query_cache"] is not kept
            cast_key = model.__dict__["_query_cache"][0]
        model(x)
        assert model.__dict__["_query_cache"][0] != cast_key
    other = _model(zero_init_output=False, num_decoder_layers=2, neighbor_mask=3).eval()
    with torch.no_grad():
        torch.nn.init.normal_(other.query_embed)
    expected = other(x)[1].detach()
    model.load_state_dict(other.state_dict())  # in place: the kept queries are stale now
    with torch.inference_mode():
        assert torch.allclose(model(x)[1], expected, atol=1e-6)
    model.train().eval()  # training mode drops them, whatever wrote the weights
    assert "_query_cache" not in model.__dict__
    # Learning through an eval-mode model still reaches the queries (nothing kept is used with grad).
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(x)[1].pow(2).mean().backward()
    assert model.query_embed.grad is not None and model.query_embed.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        stepped = model(x)[1]
    assert not torch.allclose(stepped, expected, atol=1e-4)
    assert torch.allclose(stepped, model.train()(x)[1].detach(), atol=1e-6)  # training path: no dropout here


def test_hard_mining_loss_is_the_mse_of_each_images_worst_cells():
    from adtr_edge.model.reconstructor import hard_mining_loss, reconstruction_loss

    target = torch.zeros(2, 3, 2, 2, requires_grad=False)
    recon = torch.zeros(2, 3, 2, 2)
    recon[0, :, 0, 0] = 2.0  # image 0: one bad cell (per-cell MSE 4), image 1: cells of MSE 1, 0, 0, 0
    recon[1, :, 1, 1] = 1.0
    recon.requires_grad_(True)
    loss = hard_mining_loss(target, recon, 0.25)  # one cell of four per image
    assert torch.isclose(loss, torch.tensor((4.0 + 1.0) / 2))
    loss.backward()
    hit = recon.grad.abs().sum(dim=1) > 0  # only the worst cell of each image gets a gradient
    assert hit.sum() == 2 and hit[0, 0, 0] and hit[1, 1, 1]
    full = torch.randn(2, 3, 2, 2)
    assert torch.isclose(hard_mining_loss(target, full, 1.0), reconstruction_loss(target, full))
    assert torch.isclose(hard_mining_loss(target, full, 1e-9), full.pow(2).mean(1).flatten(1).amax(1).mean())


def test_explained_variance_is_zero_for_the_mean_and_follows_its_definition():
    from adtr_edge.model.reconstructor import explained_variance

    feats = torch.randn(30, 12, 4, 4) * 2 + 1
    model = _model(feature_norm="position").eval()
    model.fit_normalization(feats)
    # Untrained (zero-initialized output): each cell's training mean, which explains nothing of these features.
    assert explained_variance(model, feats) == pytest.approx(0.0, abs=1e-5)
    # On other features of the same kind, still ~0: the baseline is the training mean, not the new set's own
    # (which a handful of validation images would fit better than the training mean, reading negative).
    assert abs(explained_variance(model, torch.randn(5, 12, 4, 4) * 2 + 1)) < 0.5
    model = _model(feature_norm="position", zero_init_output=False).eval()
    model.fit_normalization(feats)
    with torch.no_grad():
        target, recon = model(feats)
    expected = 1 - float((target - recon).pow(2).sum()) / float(target.pow(2).sum())
    assert explained_variance(model, feats, batch=7) == pytest.approx(expected, abs=1e-5)
    # Without a per-position normalization there is no training mean per cell: these features' own.
    model = _model(feature_norm="channel", zero_init_output=False).eval()
    model.fit_normalization(feats)
    with torch.no_grad():
        target, recon = model(feats)
    expected = 1 - float((target - recon).pow(2).sum()) / float((target - target.mean(0)).pow(2).sum())
    assert explained_variance(model, feats, batch=7) == pytest.approx(expected, abs=1e-5)


def test_explained_variance_counts_a_worse_than_mean_reconstruction_as_negative():
    from adtr_edge.model.reconstructor import explained_variance

    model = _model(feature_norm="position", zero_init_output=False).eval()
    feats = torch.randn(30, 12, 4, 4)
    model.fit_normalization(feats)
    torch.nn.init.normal_(model.output_proj.bias, std=3.0)  # a constant offset: far worse than the mean
    assert explained_variance(model, feats) < -1.0


def test_defect_cells_with_a_larger_residual_raise_the_ratio():
    from adtr_edge.model.reconstructor import cell_masks, defect_residual_ratio, reconstruction_report

    model = _model(feature_norm="position").eval()
    normals = torch.randn(20, 12, 4, 4)
    model.fit_normalization(normals)
    defects = torch.randn(4, 12, 4, 4)
    defects[:, :, 1, 2] += 10.0  # one cell far off the normals
    masks = torch.zeros(24, 32, 32, dtype=torch.bool)
    masks[20:, 8:16, 16:24] = True  # the pixels of cell (1, 2) on a 4x4 grid
    assert cell_masks(masks, 4)[20:, 1, 2].all() and cell_masks(masks, 4).sum() == 4
    report = reconstruction_report(model, torch.cat([normals, defects]), [0] * 20 + [1] * 4, masks)
    assert report["normals"] == 20 and report["explained_variance"] == pytest.approx(0.0, abs=1e-5)
    assert report["defect_residual_ratio"] > 50
    assert defect_residual_ratio(torch.ones(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool),
                                 torch.ones(3, 4, 4)) is None


def test_an_untrained_reconstructor_skips_the_transformer_with_the_same_output():
    model = _model(feature_norm="position").eval()
    feats = torch.randn(6, 12, 4, 4)
    model.fit_normalization(feats)
    calls = []
    model.encoder[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        target, recon = model(feats)
    assert not calls and torch.count_nonzero(recon) == 0 and recon.shape == target.shape
    with torch.enable_grad():  # where something is learned, the transformer always runs
        model(feats)
    assert calls
    calls.clear()
    torch.nn.init.normal_(model.output_proj.bias, std=0.1)  # trained a little: the fast path is gone
    with torch.no_grad():
        _, recon = model(feats)
    assert calls and torch.count_nonzero(recon) > 0
