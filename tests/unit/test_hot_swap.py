"""Version swaps inside the actors, driven directly (the actor classes are plain Python objects).

The inference actor labels every result with the model that really produced it, even when a swap
lands during the pass; it refuses a version that cannot load and keeps serving; the scoring actor
thresholds each map with its own version's threshold.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import zmq

from adtr_edge.actors.config import InferenceConfig, LearningConfig, OutputConfig
from adtr_edge.actors.inference import InferenceActor, InferenceResult, ModelLoadError
from adtr_edge.actors.scoring import ScoringActor
from adtr_edge.agent.watch import subscribe
from adtr_edge.lifecycle.registry import Registry
from adtr_edge.model.data import read_image, resize_image


def _second_version(registry: Registry, model_dir, tmp_path, name="v2", threshold_factor=1.0):
    """Same networks, another version and threshold (what a retrain publishes)."""
    dst = tmp_path / name
    shutil.copytree(model_dir, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["model_version"] = name
    manifest["threshold"] *= threshold_factor
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return registry.add_version(dst, by="test")


@pytest.fixture
def registry(trained_model, tmp_path) -> Registry:
    return Registry.create(tmp_path / "registry", trained_model, by="test")


@pytest.fixture(scope="module")
def frames(small_dataset):
    return [resize_image(read_image(s.path), 128) for s in small_dataset.test[:6]]


def test_a_swap_during_a_forward_pass_never_mislabels_its_results(registry, trained_model, tmp_path, frames):
    v1 = registry.current()
    v2 = _second_version(registry, trained_model, tmp_path)
    actor = InferenceActor(str(registry.root), InferenceConfig(max_batch=8, max_wait_ms=1, torch_threads=1))
    entered, release = threading.Event(), threading.Event()
    forward = actor._forward

    def slow_forward(serving, shadow, batch):  # hold the pass open until the swap has happened
        entered.set()
        release.wait(30)
        return forward(serving, shadow, batch)

    actor._forward = slow_forward

    async def scenario():
        first = asyncio.ensure_future(actor.infer_batch(frames[:3]))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        await actor.prepare(v2)
        swapped = await actor.activate(v2)
        release.set()
        before = await first
        entered.clear()
        after = await actor.infer_batch(frames[3:])
        return swapped, before, after

    swapped, before, after = asyncio.run(scenario())
    assert swapped["changed"] and swapped["previous"] == v1
    assert {r.model_version for r in before} == {v1}  # the pass began under v1
    assert {r.model_version for r in after} == {v2}
    assert all(np.isfinite(r.coarse).all() for r in before + after)


def test_a_version_that_fails_to_load_is_refused_and_serving_goes_on(registry, trained_model, tmp_path, frames):
    v1 = registry.current()
    bad = _second_version(registry, trained_model, tmp_path, "broken")
    weights = registry.version_dir(bad) / "reconstructor.safetensors"
    weights.write_bytes(b"\0" * 100)
    actor = InferenceActor(str(registry.root), InferenceConfig(torch_threads=1))

    async def scenario():
        with pytest.raises(ModelLoadError, match="broken"):
            await actor.activate(bad)
        return await actor.infer_batch(frames[:2])

    results = asyncio.run(scenario())
    assert {r.model_version for r in results} == {v1} and actor.load_failures == 1


def test_a_restarted_actor_whose_current_version_is_damaged_serves_the_previous_one(registry, trained_model,
                                                                                      tmp_path):
    v1 = registry.current()
    v2 = _second_version(registry, trained_model, tmp_path)
    registry.promote(v2, by="test")
    (registry.version_dir(v2) / "reconstructor.safetensors").write_bytes(b"damaged after promotion")
    actor = InferenceActor(str(registry.root), InferenceConfig(torch_threads=1))
    assert actor.serving.version == v1


def test_the_shadow_reuses_the_serving_backbone_and_is_labelled_apart(registry, trained_model, tmp_path, frames):
    v1 = registry.current()
    v2 = _second_version(registry, trained_model, tmp_path)
    actor = InferenceActor(str(registry.root), InferenceConfig(torch_threads=1), shadow_sample=1.0)

    async def scenario():
        prepared = await actor.prepare(v2)
        await actor.activate(v2, "shadow")
        return prepared, await actor.infer_batch(frames[:3])

    prepared, results = asyncio.run(scenario())
    assert prepared["shares_backbone"]
    for r in results:
        assert r.model_version == v1 and r.shadow_version == v2
        assert np.allclose(r.coarse, r.shadow_coarse)  # same weights: same maps


def _scoring_with_subscriber(registry: Registry):
    """A scoring actor (as a plain object) on a free port, and a subscriber to what it publishes."""
    actor = ScoringActor(str(registry.root), "tcp://127.0.0.1:*", OutputConfig(save_anomalies=False),
                         LearningConfig())
    context = zmq.Context()
    return actor, context, subscribe(context, actor.bound)


def _flat_maps(registry: Registry, version: str, image_score: float) -> np.ndarray:
    """(K, 8, 8) per-term coarse maps, constant, whose fused image map is `image_score` everywhere."""
    fit = registry.show(version)["manifest"]["scoring_fit"]
    return np.stack([np.full((8, 8), image_score * scale / len(fit["image"]), np.float32)
                     for scale in fit["scales"]])


def test_scoring_thresholds_each_map_with_its_own_versions_threshold(registry, trained_model, tmp_path):
    v1 = registry.current()
    v2 = _second_version(registry, trained_model, tmp_path, threshold_factor=1000.0)  # v2 flags nothing
    actor, context, sub = _scoring_with_subscriber(registry)
    threshold = registry.show(v1)["manifest"]["threshold"]
    coarse = _flat_maps(registry, v1, 10.0 * threshold)  # far above v1's threshold, far below v2's
    header = {"camera_id": "cam", "ts": time.time(), "encoding": "jpeg", "width": 128, "height": 128}
    results = [InferenceResult(coarse, v1, 2, 1.0), InferenceResult(coarse, v2, 2, 1.0)]
    out = asyncio.run(actor.score_batch([dict(header, seq=0), dict(header, seq=1)], results, [b"", b""],
                                        [time.time()] * 2))
    published = [json.loads(sub.recv_multipart()[1]) for _ in range(2)]
    sub.close(linger=0)
    context.term()
    schema = json.loads((Path(__file__).resolve().parents[2] / "docs" / "decision.schema.json").read_text())
    for decision in published:  # what subscribers get is what docs/decision.schema.json says
        jsonschema.validate(decision, schema)
    assert [d["is_anomaly"] for d in out] == [True, False]
    assert [(d["model_version"], d["is_anomaly"]) for d in published] == [(v1, True), (v2, False)]
    assert published[1]["threshold"] == pytest.approx(1000.0 * threshold)
    rates = asyncio.run(actor.anomaly_rates())
    assert rates["cam"] == {v1: [1, 1], v2: [1, 0]}


def test_shadow_maps_are_compared_never_published(registry, trained_model, tmp_path):
    v1 = registry.current()
    v2 = _second_version(registry, trained_model, tmp_path, threshold_factor=1000.0)
    actor, context, sub = _scoring_with_subscriber(registry)
    threshold = registry.show(v1)["manifest"]["threshold"]
    rng = np.random.default_rng(0)
    results, headers = [], []
    for seq in range(20):
        coarse = _flat_maps(registry, v1, 1.0) * rng.uniform(0.2, 3.0, (8, 8)).astype(np.float32) * threshold
        results.append(InferenceResult(coarse, v1, 1, 1.0, v2, coarse))
        headers.append({"camera_id": "cam", "seq": seq, "ts": time.time(), "encoding": "jpeg", "width": 128,
                        "height": 128})
    asyncio.run(actor.score_batch(headers, results, [b""] * 20, [time.time()] * 20))
    published = []
    while sub.poll(500):
        published.append(json.loads(sub.recv_multipart()[1]))
    sub.close(linger=0)
    context.term()
    assert len(published) == 20 and {d["model_version"] for d in published} == {v1}
    shadow = asyncio.run(actor.stats())["shadow"]
    assert len(shadow) == 1 and shadow[0]["frames"] == 20 and shadow[0]["shadow_version"] == v2
    assert shadow[0]["shadow_anomaly_rate"] == 0.0 and shadow[0]["serving_anomaly_rate"] > 0
    assert shadow[0]["agreement"] == pytest.approx(1 - shadow[0]["serving_anomaly_rate"])
    assert shadow[0]["score_correlation"] == pytest.approx(1.0)
