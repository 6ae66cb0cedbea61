"""The model's one device-aware forward path: the CPU path here, the GPU path where a GPU exists."""
from __future__ import annotations

import pytest
import torch

from model.data import read_image
from model.detector import load_detector, resolve_device


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
    from model.data import read_image
    from model.detector import load_detector

    images = [read_image(s.path) for s in small_dataset.test[:8]]
    fp32 = load_detector(trained_model).to("cuda")
    fp16 = load_detector(trained_model).to("cuda", half=True, channels_last=True)
    a, b = fp32.coarse_maps(fp32.embed(images)), fp16.coarse_maps(fp16.embed(images))
    assert torch.allclose(a, b, rtol=2e-2, atol=1e-2 * float(a.abs().max()))
