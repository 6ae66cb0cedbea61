"""Checkpoints: exact round trip; truncated, damaged or mismatched ones fail with a clear message."""
import json
import shutil

import pytest
import torch

from adtr_edge.model.checkpoint import CheckpointError, load_checkpoint, read_manifest
from adtr_edge.model.config import AdtrConfig
from adtr_edge.model.data import read_image
from adtr_edge.model.detector import load_detector


def test_round_trip_is_exact(trained_model, small_dataset):
    a, b = load_detector(trained_model), load_detector(trained_model)
    for key, value in a.reconstructor.state_dict().items():
        assert torch.equal(value, b.reconstructor.state_dict()[key])
    images = [read_image(s.path) for s in small_dataset.test[:3]]
    assert torch.equal(a.score_images(images).scores, b.score_images(images).scores)
    assert a.threshold == b.threshold > 0


def test_manifest_records_what_a_deployment_needs(trained_model):
    m = read_manifest(trained_model)
    for key in ("settings", "backbone", "normalization", "image_size", "threshold", "validation_scores",
                "data", "metrics", "model_version", "weights_sha256"):
        assert key in m, key
    assert m["backbone"]["weights_id"].startswith("sha256:")
    assert len(m["data"]["fingerprint"]) == 64
    assert m["training"]["history"][-1]["val_loss"] > 0


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_fail_clearly(trained_model, tmp_path):
    model = _copy(trained_model, tmp_path)
    weights = model / "reconstructor.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(model)


def test_truncated_manifest_fails_clearly(trained_model, tmp_path):
    model = _copy(trained_model, tmp_path)
    manifest = model / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_detector(model)


def test_missing_model_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_detector(tmp_path)


def _copy_with_manifest(src, tmp_path, edit):
    """A copy of the model whose manifest `edit` (a function of the manifest dict) has changed."""
    model = _copy(src, tmp_path)
    m = json.loads((model / "manifest.json").read_text())
    edit(m)
    (model / "manifest.json").write_text(json.dumps(m))
    return model


def test_other_backbone_weights_are_refused(trained_model, tmp_path):
    model = _copy_with_manifest(trained_model, tmp_path,
                                lambda m: m["backbone"].update(weights_id="sha256:" + "0" * 64))
    with pytest.raises(CheckpointError, match="trained on backbone weights"):
        load_detector(model)


def test_other_channel_count_is_refused(trained_model, tmp_path):
    def fewer_levels(m):
        m["settings"]["backbone"]["levels"] = [1, 2, 3]  # 80 channels, not what the weights were trained on
        m["backbone"].pop("channels")

    model = _copy_with_manifest(trained_model, tmp_path, fewer_levels)
    with pytest.raises(CheckpointError, match="shape"):
        load_detector(model)


def test_unknown_format_is_refused(trained_model, tmp_path):
    model = _copy_with_manifest(trained_model, tmp_path, lambda m: m.update(format="something-else/9"))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_detector(model)


def test_the_fitted_scorer_travels_in_the_checkpoint(trained_model):
    manifest, tensors = load_checkpoint(trained_model)
    fit = manifest["scoring_fit"]
    assert fit["terms"] and len(fit["scales"]) == len(fit["terms"]) and all(s > 0 for s in fit["scales"])
    scorer_tensors = {k for k in tensors if k.startswith("scorer.")}
    if "memory" in fit["terms"]:
        assert "scorer.memory" in scorer_tensors
        # the memory's channel projection travels with it whenever it was fitted on fewer channels
        dims, channels = manifest["settings"]["scoring"]["memory_dims"], manifest["backbone"]["channels"]
        assert ("scorer.memory_projection" in scorer_tensors) == (0 < dims < channels)
        if 0 < dims < channels:
            assert tuple(tensors["scorer.memory_projection"].shape) == (channels, dims)
            assert tensors["scorer.memory"].shape[-1] == dims
    if "mahalanobis" in fit["terms"]:
        assert {"scorer.gauss_mean", "scorer.gauss_basis", "scorer.gauss_inv_eig"} <= scorer_tensors
    detector = load_detector(trained_model)
    coarse = detector.coarse_maps(torch.zeros(1, detector.reconstructor.channels, 8, 8))
    assert coarse.shape == (1, len(fit["terms"]), 8, 8)


def test_a_scoring_fit_that_does_not_match_its_tensors_is_refused(trained_model, tmp_path):
    model = _copy_with_manifest(trained_model, tmp_path, lambda m: m["scoring_fit"].update(scales=[1.0]))
    with pytest.raises(CheckpointError, match="fitted scorer"):
        load_detector(model)
    model = _copy_with_manifest(trained_model, tmp_path / "b", lambda m: m["scoring_fit"].update(terms=["cosine"]))
    with pytest.raises(CheckpointError, match="fitted scorer"):
        load_detector(model)


def test_a_checkpoint_from_before_fitted_scoring_scores_with_the_paper_map(trained_model, tmp_path):
    """Old models (no scoring_fit, no scorer tensors) keep working: the paper's L2 map, unscaled."""
    from adtr_edge.model.checkpoint import save_checkpoint

    manifest, tensors = load_checkpoint(trained_model)
    old = _copy(trained_model, tmp_path)
    manifest.pop("scoring_fit")
    for key in ("weights_sha256", "model_version"):
        manifest.pop(key)
    save_checkpoint(old, {k: v for k, v in tensors.items() if not k.startswith("scorer.")}, manifest)
    detector = load_detector(old)
    assert detector.cfg.scoring.image_terms == detector.cfg.scoring.localization_terms == ["l2"]
    features = torch.randn(2, detector.reconstructor.channels, 8, 8)
    target, recon = detector.reconstructor(features)
    expected = (target - recon).pow(2).sum(dim=1).sqrt()
    assert torch.allclose(detector.coarse_maps(features)[:, 0], expected, atol=1e-5)


def test_a_checkpoint_from_before_the_memory_projection_keeps_every_channel_on_a_refit(trained_model, tmp_path):
    """Its settings never named memory_dims: loading reads 0 (what it was fitted with), not today's
    default, so a retrain or ADTR+ refit from it keeps searching every channel."""
    old = _copy_with_manifest(trained_model, tmp_path, lambda m: m["settings"]["scoring"].pop("memory_dims"))
    assert load_detector(old).cfg.scoring.memory_dims == 0
    assert load_detector(trained_model).cfg.scoring.memory_dims == AdtrConfig().scoring.memory_dims


def test_a_memory_projection_that_does_not_fit_the_backbone_is_refused(trained_model, tmp_path):
    from adtr_edge.model.checkpoint import save_checkpoint

    manifest, tensors = load_checkpoint(trained_model)
    if "scorer.memory_projection" not in tensors:
        pytest.fail("the test model should search its memory in principal channels (memory_dims < channels)")
    bad = _copy(trained_model, tmp_path)
    tensors["scorer.memory_projection"] = tensors["scorer.memory_projection"][:-1].contiguous()  # a channel short
    for key in ("weights_sha256", "model_version"):
        manifest.pop(key)
    save_checkpoint(bad, tensors, manifest)
    with pytest.raises(CheckpointError, match="memory_projection has shape"):
        load_detector(bad)
