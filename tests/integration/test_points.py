"""Inspection points: several cameras' models on one box, one backbone, one batch.

Each point has its own model (registry), threshold, promotions and statistics; frames of every point
share the backbone's forward pass; nothing done to one point changes another's decisions.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from contextlib import ExitStack

import numpy as np
import pytest
import ray

from adtr_edge.actors.config import DEFAULT_POINT, InferenceConfig, LearningConfig, OutputConfig
from adtr_edge.actors.inference import InferenceActor, InferenceResult
from adtr_edge.actors.protocol import UNKNOWN_CAMERA
from adtr_edge.actors.scoring import ScoringActor
from adtr_edge.agent.errors import AgentError
from adtr_edge.agent.publisher import FramePublisher, SourceFrame, frame_from_file
from adtr_edge.agent.runner import Agent
from adtr_edge.agent.settings import SettingsError
from adtr_edge.lifecycle.registry import Registry
from adtr_edge.lifecycle.samples import SampleStore
from adtr_edge.model.data import read_image, resize_image

from console_live import add_users
from live import ANY_PORT, Decisions, agent_config, settled_totals, wait_until

pytestmark = pytest.mark.usefixtures("magnetic_tile")  # real data; skipped, and said, without it


def _remove_over_http(agent: Agent, name: str) -> dict:
    """DELETE /v1/points/NAME on the agent's own API (in-process): the first point and a point from the settings
    are refused, an unknown name too, without a token nothing happens; then the point goes."""
    from adtr_edge.agent.collector import SnapshotCache
    from adtr_edge.agent.http import TokenCheck, create_app

    token, cache = "t" * 32, SnapshotCache(agent, 0.2)  # its thread snapshots the agent while the point goes
    try:
        client = create_app(agent, cache, TokenCheck(token)).test_client()
        auth = {"Authorization": f"Bearer {token}"}
        assert client.delete(f"/v1/points/{name}").status_code == 401 and name in agent.points
        first = next(iter(agent.points))
        refused = client.delete(f"/v1/points/{first}", headers=auth)
        assert refused.status_code == 409 and "settings" in refused.get_json()["error"], refused.get_json()
        assert client.delete("/v1/points/nowhere", headers=auth).status_code == 409
        answer = client.delete(f"/v1/points/{name}", headers=auth, json={"by": "test"})
        assert answer.status_code == 200, answer.get_json()
        assert name not in agent.points and name not in client.get("/v1/points", headers=auth).get_json()["points"]
        return answer.get_json()
    finally:
        cache.stop.set()


def _variant(model_dir, dst, version: str, threshold_factor: float):
    """The same networks as another model version with its own threshold (another point's calibration)."""
    shutil.copytree(model_dir, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["model_version"] = version
    manifest["threshold"] *= threshold_factor
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture
def two_registries(trained_model, tmp_path):
    top = Registry.create(tmp_path / "reg-top", trained_model, by="test")
    side_model = _variant(trained_model, tmp_path / "side-model", "side-v1", 1e-3)  # flags every frame
    side = Registry.create(tmp_path / "reg-side", side_model, by="test")
    return top, side


@pytest.fixture(scope="module")
def frames(small_dataset):
    return [resize_image(read_image(s.path), 128) for s in small_dataset.test[:6]]


def test_frames_of_two_points_share_one_forward_pass_and_each_gets_its_points_model(two_registries, frames):
    top, side = two_registries
    actor = InferenceActor({"default": str(top.root), "side": str(side.root)},
                           InferenceConfig(max_batch=8, max_wait_ms=200, torch_threads=1))
    alone = InferenceActor(str(top.root), InferenceConfig(max_batch=8, torch_threads=1))

    async def scenario():
        both = await asyncio.gather(actor.infer_batch(frames[:3]), actor.infer_batch(frames[3:], "side"))
        return both, await alone.infer_batch(frames)

    (top_results, side_results), reference = asyncio.run(scenario())
    assert {(r.point, r.model_version) for r in top_results} == {("default", top.current())}
    assert {(r.point, r.model_version) for r in side_results} == {("side", "side-v1")}
    assert {r.batch_size for r in top_results + side_results} == {6}  # one pass for both points
    for r, ref in zip(top_results + side_results, reference):  # same networks, same maps as alone
        assert np.allclose(r.coarse, ref.coarse, atol=1e-5)
    stats = asyncio.run(actor.stats())
    assert stats["points"]["side"]["shares_backbone"]
    with pytest.raises(ValueError, match="no inspection point 'nope'"):
        asyncio.run(actor.infer_batch(frames[:1], "nope"))


def test_a_version_activated_on_one_point_leaves_the_other_serving_what_it_served(two_registries, trained_model,
                                                                                  tmp_path, frames):
    top, side = two_registries
    v2 = side.add_version(_variant(trained_model, tmp_path / "side-v2", "side-v2", 1.0), by="test")
    actor = InferenceActor({"default": str(top.root), "side": str(side.root)}, InferenceConfig(torch_threads=1))

    async def scenario():
        await actor.activate(v2, "serving", "side")
        return await actor.infer_batch(frames[:2]), await actor.infer_batch(frames[:2], "side")

    top_results, side_results = asyncio.run(scenario())
    assert {r.model_version for r in top_results} == {top.current()}
    assert {r.model_version for r in side_results} == {v2}
    assert asyncio.run(actor.ping("side")) == v2 and asyncio.run(actor.ping("default")) == top.current()


def test_scoring_decides_each_point_with_its_own_threshold_and_counts_each_point_apart(two_registries):
    top, side = two_registries
    actor = ScoringActor({"default": str(top.root), "side": str(side.root)}, "tcp://127.0.0.1:*",
                         OutputConfig(save_anomalies=False), LearningConfig())
    fit = top.show(top.current())["manifest"]["scoring_fit"]
    threshold = top.show(top.current())["manifest"]["threshold"]
    coarse = np.stack([np.full((8, 8), 0.5 * threshold * s / len(fit["image"]), np.float32) for s in fit["scales"]])
    header = {"camera_id": "cam-top", "ts": time.time(), "encoding": "jpeg", "width": 128, "height": 128}
    results = [InferenceResult(coarse, top.current(), 2, 1.0, point="default"),
               InferenceResult(coarse, "side-v1", 2, 1.0, point="side")]
    headers = [dict(header, seq=0), dict(header, camera_id="cam-side", seq=0)]
    out = asyncio.run(actor.score_batch(headers, results, [b"", b""], [time.time()] * 2))
    assert [d["is_anomaly"] for d in out] == [False, True]  # same map: half the top threshold, 500x side's
    stats = asyncio.run(actor.stats())["points"]
    assert stats["default"]["decisions"] == stats["side"]["decisions"] == 1
    assert (stats["default"]["flag_rate"], stats["side"]["flag_rate"]) == (0.0, 1.0)
    manifest = top.show(top.current())["manifest"]
    quantile, n = manifest["settings"]["threshold"]["normal_quantile"], manifest["validation_scores"]["n"]
    # what n validation normals can support: never below 1 / (n + 1), whatever the quantile asked
    assert stats["default"]["false_alarm_promise"] == pytest.approx(max(1 - quantile, 1 / (n + 1)))
    assert asyncio.run(actor.anomaly_rates("side")) == {"cam-side": {"side-v1": [1, 1]}}
    assert set(asyncio.run(actor.anomaly_rates())) == {"cam-top", "cam-side"}


def test_point_settings_are_checked(trained_model, tmp_path):
    with pytest.raises(SettingsError, match="two inspection points"):
        agent_config(tmp_path, {"points": {"a": {"model": str(trained_model), "cameras": ["c1"]},
                                           "b": {"model": str(trained_model), "cameras": ["c1"]}}})
    with pytest.raises(SettingsError, match="point name"):
        agent_config(tmp_path, {"points": {"Bad Name": {"model": str(trained_model), "cameras": ["c1"]}}})
    with pytest.raises(SettingsError, match="lists no cameras"):
        agent_config(tmp_path, {"points": {"a": {"model": str(trained_model)}}})
    with pytest.raises(AgentError, match="same registry"):
        registry = Registry.create(tmp_path / "reg", trained_model, by="test")
        cfg = agent_config(tmp_path, {"points": {"a": {"model": str(registry.root), "cameras": ["c1"]}}})
        Agent(registry.root, [ANY_PORT], ANY_PORT, cfg)


@pytest.mark.usefixtures("ray_session")
def test_two_points_stream_together_and_a_promotion_on_one_changes_only_its_cameras(
        two_registries, trained_model, tmp_path, test_images):
    """A real agent with no default point: camera top → registry A, camera side → registry B, a camera in
    no point refused and counted; then a new version promoted on B through B's model manager."""
    top, side = two_registries
    cfg = agent_config(tmp_path, {"points": {"top": {"model": str(top.root), "cameras": ["cam-top"]},
                                             "side": {"model": str(side.root), "cameras": ["cam-side"]}},
                                  "learning": {"guard": {"enabled": False}}, "console": {"port": 0}})
    agent = Agent(None, [ANY_PORT], ANY_PORT, cfg).start()
    add_users(top.root)
    try:
        decisions = Decisions(agent.bound_results)
        publishers = {camera: FramePublisher(agent.bound_ingest[0], camera) for camera in
                      ("cam-top", "cam-side", "stranger")}
        for path in test_images[:6]:
            for publisher in publishers.values():
                publisher.send(frame_from_file(path))
        assert decisions.wait_for(12)
        first = dict(decisions.by_key)
        assert {d["point"] for k, d in first.items() if k[0] == "cam-top"} == {"top"}
        assert {(d["point"], d["model_version"]) for k, d in first.items() if k[0] == "cam-side"} == \
            {("side", "side-v1")}
        assert all(d["is_anomaly"] for k, d in first.items() if k[0] == "cam-side")
        assert not any(k[0] == "stranger" for k in first)
        totals = settled_totals(agent)
        assert "stranger" not in totals  # a camera in no point claims no label of its own
        assert totals[UNKNOWN_CAMERA]["invalid"] == {"unknown_camera": 6}

        v2 = side.add_version(_variant(trained_model, tmp_path / "side-v2", "side-v2", 1.0), by="test")
        _promote_in_the_console(agent, top, "side", v2)
        assert side.current() == v2 and top.current() != v2
        for _seq, path in enumerate(test_images[:6], start=6):
            for camera in ("cam-top", "cam-side"):
                publishers[camera].send(frame_from_file(path))
        assert decisions.wait_for(24)
        later = {k: d for k, d in decisions.by_key.items() if k[1] >= 6}
        assert {d["model_version"] for k, d in later.items() if k[0] == "cam-side"} == {v2}
        assert {d["model_version"] for k, d in later.items() if k[0] == "cam-top"} == {top.current()}
        for k, d in later.items():  # the same frame decides the same on the point that did not change
            if k[0] == "cam-top":
                assert d["score"] == pytest.approx(first[(k[0], k[1] - 6)]["score"], rel=1e-5)
        points = agent.snapshot()["scoring"]["points"]
        assert points["top"]["decisions"] == 12 and points["side"]["decisions"] == 12
        assert wait_until(lambda: agent.snapshot()["models-side"]["serving"] == v2, 30)
        assert agent.snapshot()["models-top"]["serving"] == top.current()
        for publisher in publishers.values():
            publisher.close()
        decisions.close()
    finally:
        agent.stop(drain=False)


def _promote_in_the_console(agent: Agent, first: Registry, point: str, version: str) -> None:
    """The console's models page of each point, and a promotion there that reaches that point's manager only."""
    from adtr_edge.agent.console import start_console

    from console_live import OPERATOR, Client

    console = start_console(agent)
    assert console is not None
    try:
        client = Client(console.url)
        assert client.login(*OPERATOR) == 302
        status, _, page = client.get(f"/models?point={point}")
        assert status == 200 and f'data-point="{point}"'.encode() in page and version.encode() in page
        assert b"Inspection point:" in page
        status, _, page = client.get("/models")  # the first point's page by default
        assert status == 200 and f'data-point="{next(iter(agent.points))}"'.encode() in page
        assert version.encode() not in page
        assert client.get("/models?point=nowhere")[0] == 404
        client.page_token(f"/models?point={point}")
        assert client.post_json("/api/models/promote", {"version": version, "point": "nowhere"})[0] == 404
        assert client.post_json("/api/models/promote", {"version": version})[0] == 400  # not the first point's
        code, answer = client.post_json("/api/models/promote", {"version": version, "point": point})
        assert code == 200 and answer["promoted"] == version, answer
        audit = [json.loads(line) for line in (first.root / "console" / "audit.jsonl").read_text().splitlines()]
        assert [(e["action"], e["ok"], e.get("point")) for e in audit if e["action"] == "promote"][-1] == \
            ("promote", True, point)
    finally:
        console.shutdown()


@pytest.mark.usefixtures("ray_session")
def test_a_retrain_of_one_point_goes_to_that_points_manager_and_leaves_the_other_point_alone(
        trained_model, tmp_path, test_images):
    """A real Ray job for point `side`: its refit-only candidate is gated on side's own holdout and shadowed
    by side's model manager; the default point serves and shadows nothing new."""
    from adtr_edge.actors.jobs import job_info

    from conftest import MAGNETIC_TILE
    from live import registry_with_base

    top = Registry.create(tmp_path / "reg-top", trained_model, by="test")
    side = registry_with_base(_variant(trained_model, tmp_path / "side-model", "side-v1", 1e-3),
                              tmp_path / "reg-side", MAGNETIC_TILE)
    cfg = agent_config(tmp_path, {"points": {"side": {"model": str(side.root), "cameras": ["cam-side"]}},
                                  "learning": {"guard": {"enabled": False}}})
    agent = Agent(top.root, [ANY_PORT], ANY_PORT, cfg).start()
    try:
        agent.announce(None, None)  # what `adtr-edge run` does once it serves: the CLI finds each point's agent
        assert json.loads((side.root / "agent.json").read_text())["point"] == "side"
        assert json.loads((top.root / "agent.json").read_text())["point"] == "default"
        job = ray.get(agent.points["side"].manager.submit_retrain.remote(
            "test", ["learning.retrain.epochs=1", "learning.retrain.policy=shadow"]), timeout=60)
        terminal = ("SUCCEEDED", "FAILED", "STOPPED")
        assert wait_until(lambda: job_info(agent.jobs_address, job["submission_id"], 0)["status"] in terminal,
                          600, 1.0)
        info = job_info(agent.jobs_address, job["submission_id"], 80)
        assert info["status"] == "SUCCEEDED", "\n".join(info["log_tail"])
        outcome = json.loads(next((side.root / "runs").glob("*/outcome.json")).read_text())
        refit = outcome["refit"]["version"]
        assert outcome["refit"]["gate"]["passed"] and outcome["refit"]["action"] == "shadow"
        shadowed = side.pointers()["candidate"]
        assert shadowed in (refit, outcome["version"])
        snap = agent.snapshot()
        assert snap["inference"]["points"]["side"]["shadow_version"] == shadowed
        assert snap["inference"]["points"]["default"]["shadow_version"] is None
        assert snap["models"]["serving"] == top.current() and top.pointers()["candidate"] is None
        assert not (top.root / "runs").exists() or not any((top.root / "runs").iterdir())
    finally:
        agent.stop(drain=False)


def _new_product(path) -> SourceFrame:
    """A product the agent's model never saw: Magnetic Tile inverted (dark grain on bright), as a JPEG."""
    import cv2

    image = 255 - cv2.imread(str(path))
    return SourceFrame(path.name, encoded=cv2.imencode(".jpg", image)[1].tobytes(), encoding="jpeg")


@pytest.mark.timeout(1800)  # waits on real Ray jobs that train
@pytest.mark.usefixtures("ray_session")
def test_a_new_camera_is_taught_on_the_box_from_its_first_frames_while_another_camera_streams(
        trained_model, tmp_path, test_images):
    """Cold start, end to end: `points add` → the new camera's frames are recorded (published, not inspected)
    until the operator ends the recording → a real Ray job refits and trains its first model → shadowed →
    promoted → its decisions are inspected,
    with far fewer false alarms on its normals than the template model; the other camera never stops."""
    from adtr_edge.actors.jobs import job_info
    from adtr_edge.model.detector import load_detector

    from conftest import MAGNETIC_TILE
    from live import Streamer, accounted, registry_with_base

    normals = sorted((MAGNETIC_TILE / "MT_Free" / "Imgs").glob("*.jpg"))[-120:]
    recorded, later = normals[:80], normals[80:110]
    top = registry_with_base(trained_model, tmp_path / "reg-top", MAGNETIC_TILE)
    cfg = agent_config(tmp_path, {"learning": {"guard": {"enabled": False},
                                               "cold_start": {"epochs": 1, "frames": 500}},
                                  "points_dir": str(tmp_path / "points")})
    agent = Agent(top.root, [ANY_PORT], ANY_PORT, cfg).start()
    cleanup = ExitStack()  # on a failure too: a camera thread or a socket left open can hang a later test
    try:
        decisions = Decisions(agent.bound_results)
        cleanup.callback(decisions.close)
        other = Streamer(agent.bound_ingest[0], "cam-top", [frame_from_file(p) for p in test_images], fps=5)
        cleanup.callback(other.stop)
        assert decisions.wait_for(5)
        started = time.monotonic()
        added = agent.add_point("new", ["cam-new"], "test")
        assert added["frames"] == 500 and (tmp_path / "points" / "new" / "cold_start.json").is_file()
        new_cam = FramePublisher(agent.bound_ingest[0], "cam-new")
        cleanup.callback(new_cam.close)
        def decided_new() -> int:
            return sum(k[0] == "cam-new" for k in decisions.by_key)

        for start in range(0, len(recorded), 16):  # at a camera's pace: each burst decided before the next
            for path in recorded[start:start + 16]:
                new_cam.send(_new_product(path))
            assert wait_until(lambda n=start: decided_new() >= min(n + 16, len(recorded)), 120), decided_new()
        taught = [d for k, d in decisions.by_key.items() if k[0] == "cam-new"]
        assert all(d["point"] == "new" and not d["inspected"] and not d["is_anomaly"] for d in taught)
        new = Registry(tmp_path / "points" / "new")
        manager = agent.points["new"].manager
        def recorded_all() -> bool:  # every frame offered is stored, or shed and counted (a full queue)
            r = agent.snapshot()["scoring"]["points"]["new"]["cold_start"]["recording"]
            return r["queued"] == 0 and r["written"] + r["shed"] + r["duplicates"] == r["offered"] == len(recorded)

        assert wait_until(recorded_all, 60)
        stored = sum(SampleStore(new.store_dir).counts()["by_origin"].values())
        recording = agent.snapshot()["scoring"]["points"]["new"]["cold_start"]["recording"]
        assert stored >= 40, recording
        assert agent.snapshot()["models-new"]["cold_start"]["state"] == "recording"  # of 500
        ended = ray.get(manager.finish_recording.remote("operator:test"), timeout=60)  # "this run is enough"
        assert ended["frames"] == stored
        assert wait_until(lambda: (agent.snapshot()["models-new"]["cold_start"] or {}).get("state") == "candidate",
                          600, 1.0), agent.snapshot()["models-new"]
        cold = agent.snapshot()["models-new"]["cold_start"]  # the refit is out; the job may still train
        candidate = new.pointers()["candidate"]
        assert agent.snapshot()["inference"]["points"]["new"]["shadow_version"] == candidate
        ray.get(agent.points["new"].manager.promote.remote(candidate, "operator:test"), timeout=120)
        taught_s = time.monotonic() - started
        assert agent.snapshot()["models-new"]["cold_start"] is None
        seq0 = new_cam.seq
        for path in later:
            new_cam.send(_new_product(path))
        assert wait_until(lambda: sum(k[0] == "cam-new" and k[1] >= seq0 for k in decisions.by_key) >= len(later),
                          120)
        inspected = [d for k, d in decisions.by_key.items() if k[0] == "cam-new" and k[1] >= seq0]
        assert all(d["inspected"] and d["model_version"] == candidate for d in inspected)
        rate = sum(d["is_anomaly"] for d in inspected) / len(inspected)
        terminal = ("SUCCEEDED", "FAILED", "STOPPED")
        assert wait_until(lambda: job_info(agent.jobs_address, cold["job"], 0)["status"] in terminal, 600, 1.0)
        info = job_info(agent.jobs_address, cold["job"], 80)
        assert info["status"] == "SUCCEEDED", "\n".join(info["log_tail"])
        removed = _remove_over_http(agent, "new")
        assert removed["cameras"] == ["cam-new"] and removed["cameras_now_go_to"] == DEFAULT_POINT
        assert removed["decided"]["decisions"] == len(later) and not removed["stopped_jobs"]  # recorded: not decided
        assert new.root.is_dir() and new.current() == candidate  # the registry stays, untouched
        assert "new" not in json.loads((tmp_path / "state" / "points.json").read_text())
        assert "models-new" not in agent.snapshot() and not (new.root / "agent.json").exists()
        seq1 = new_cam.seq
        for path in later[:8]:  # the camera now goes to the default point, its model and threshold
            new_cam.send(_new_product(path))
        assert wait_until(lambda: sum(k[0] == "cam-new" and k[1] >= seq1 for k in decisions.by_key) >= 8, 120)
        after = [d for k, d in decisions.by_key.items() if k[0] == "cam-new" and k[1] >= seq1]
        assert {(d["point"], d["model_version"]) for d in after} == {(DEFAULT_POINT, top.current())}
        sent = other.stop()
        totals = settled_totals(agent)
        assert totals["cam-new"]["processed"] == accounted(totals["cam-new"]) == new_cam.seq
        assert not totals["cam-new"]["dropped"] and not totals["cam-new"]["invalid"]
    finally:
        cleanup.close()  # last in, first out: the new camera, the other camera, the subscriber
        agent.stop(drain=False)
    template = load_detector(trained_model)
    import cv2

    frames = [cv2.cvtColor(255 - cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in later]
    from adtr_edge.model.data import resize_image

    template_rate = float((template.score_images([resize_image(f, template.image_size) for f in frames]).scores
                           > template.threshold).float().mean())
    print(f"cold start: first frame → promoted {taught_s:.0f} s (job {cold['job']}); false alarms on the new "
          f"camera's later normals {rate:.2f} (template model {template_rate:.2f}); other camera {sent} frames sent")
    assert rate <= 0.2 < template_rate
    assert totals["cam-top"]["processed"] == sent == accounted(totals["cam-top"])
    assert not totals["cam-top"]["dropped"] and not totals["cam-top"]["invalid"]
    versions = {d["model_version"] for k, d in decisions.by_key.items() if k[0] == "cam-top"}
    assert versions == {top.current()} and all(d["inspected"] for k, d in decisions.by_key.items() if k[0] == "cam-top")
