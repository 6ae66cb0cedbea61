"""The model's one device-aware forward path: the CPU path here, the GPU path where a GPU exists."""
from __future__ import annotations

import pytest
import torch

from adtr_edge.model.data import read_image
from adtr_edge.model.detector import load_detector, resolve_device


def test_asking_for_a_gpu_that_is_not_there_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_embed_then_coarse_maps_is_score_images(trained_model, small_dataset):
    """The actor's split path (embed on the device, distance in fp32 on the CPU) is the offline one."""
    images = [read_image(s.path) for s in small_dataset.test[:4]]
    detector = load_detector(trained_model).to("auto")
    coarse = detector.coarse_maps(detector.embed(images))
    assert coarse.device.type == "cpu" and coarse.dtype == torch.float32
    assert torch.equal(detector.head.score(coarse).scores, detector.score_images(images).scores)


def test_fp16_and_channels_last_on_a_gpu_match_fp32(trained_model, small_dataset):
    if not torch.cuda.is_available():
        pytest.skip("no GPU here: the fp16 path is checked by tests/benchmarks/gpu_bench.sh on a GPU machine")
    from adtr_edge.model.data import read_image
    from adtr_edge.model.detector import load_detector

    images = [read_image(s.path) for s in small_dataset.test[:8]]
    fp32 = load_detector(trained_model).to("cuda")
    fp16 = load_detector(trained_model).to("cuda", half=True, channels_last=True)
    a, b = fp32.coarse_maps(fp32.embed(images)), fp16.coarse_maps(fp16.embed(images))
    assert torch.allclose(a, b, rtol=2e-2, atol=1e-2 * float(a.abs().max()))


def test_jpeg_frames_decoded_on_the_gpu_score_like_frames_decoded_by_the_ingest(trained_model, small_dataset):
    """inference.jpeg_decode=device on a GPU: nvJPEG, batched, then the resize on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU here: tests/unit/test_tuning.py runs the same path on the CPU")
    import asyncio

    import numpy as np

    from adtr_edge.actors.config import InferenceConfig
    from adtr_edge.actors.inference import InferenceActor
    from adtr_edge.model.data import resize_image

    paths = [s.path for s in small_dataset.test[:16] if s.path.suffix.lower() == ".jpg"]
    size = load_detector(trained_model).image_size
    actor = InferenceActor(str(trained_model), InferenceConfig(device="cuda", half=False, max_batch=16,
                                                               torch_threads=1))
    host = asyncio.run(actor.infer_batch([resize_image(read_image(p), size) for p in paths]))
    device = asyncio.run(actor.infer_batch([p.read_bytes() for p in paths] + [b"\xff\xd8junk"]))
    for a, b in zip(host, device):
        assert np.abs(a.coarse - b.coarse).max() <= 0.05 * np.abs(a.coarse).max()
    assert device[-1].refused


def test_on_a_gpu_the_tuner_serves_the_best_batch_within_the_budget(trained_model):
    if not torch.cuda.is_available():
        pytest.skip("no GPU here")
    from adtr_edge.actors.config import InferenceConfig
    from adtr_edge.actors.inference import InferenceActor
    from adtr_edge.actors.tuning import best_point

    actor = InferenceActor(str(trained_model), InferenceConfig(device="cuda", tune_seconds=0.1))
    table = actor.tuned["table"]
    assert actor.tuned["state"] == "tuned" and len({r["threads"] for r in table}) == 1  # threads: not a GPU knob
    assert actor.max_batch == best_point(table, actor.cfg.latency_budget_ms)["batch"]


def test_training_on_a_gpu_follows_the_model_and_matches_the_cpu(trained_model, small_config, small_dataset):
    """fit() moves each batch to the model's device: the same seed trains to the same weights on either."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU here: training on the GPU is checked by tests/benchmarks/gpu_bench.sh on a GPU machine")
    import numpy as np

    from adtr_edge.model.train import fit, new_reconstructor, seed_everything

    features = load_detector(trained_model).to("cpu").embed([read_image(s.path) for s in small_dataset.train[:16]])
    tcfg = small_config.train.model_copy(update={"epochs": 2, "max_minutes": 0.0})
    weights = {}
    for device in ("cpu", "cuda"):
        seed_everything(0)
        model = new_reconstructor(small_config, features.shape[1], features).to(device)
        result = fit(model, (features,), None, tcfg, progress=False)
        assert all(p.device.type == device for p in model.parameters())
        assert all(np.isfinite(h["train_loss"]) for h in result.history)
        weights[device] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, cpu in weights["cpu"].items():
        assert torch.allclose(cpu, weights["cuda"][name], rtol=1e-2, atol=1e-3), name
