"""Learning on the line, end to end with real parts: a real Ray cluster (the session's head node, with
Ray Jobs and token auth), real retrain jobs training with Ray Train, real ZeroMQ cameras, real images.

Each test reads as a promise: a job promotes a new version while a camera streams and no frame is
lost; a worse candidate never serves; a stopped retrain changes nothing; one retrain at a time;
rollback and shadow work live; drift is seen; the books survive an ingest crash.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import ray
import torch

from adtr_edge.actors.config import RetrainConfig
from adtr_edge.actors.jobs import job_info, submit_retrain
from adtr_edge.actors.retrain import RetrainBusy, retrain
from adtr_edge.agent.publisher import SourceFrame, frame_from_file
from adtr_edge.lifecycle.registry import Registry
from adtr_edge.lifecycle.samples import SampleStore
from adtr_edge.model.checkpoint import load_checkpoint

from conftest import MAGNETIC_TILE, ROOT
from live import (
    Decisions,
    Streamer,
    accounted,
    live_agent,
    registry_with_base,
    settled_totals,
    versions_in_order,
    wait_until,
)

pytestmark = [pytest.mark.usefixtures("magnetic_tile"), pytest.mark.usefixtures("ray_session"), pytest.mark.slow]
FAST = ["learning.retrain.epochs=3", "learning.retrain.start_timeout_s=60"]


@pytest.fixture(scope="module")
def test_frames(small_dataset):
    return [frame_from_file(s.path) for s in small_dataset.test[:30]]


@pytest.fixture(scope="module")
def extra_normals(small_dataset) -> list[Path]:
    """Magnetic Tile normals the small model never saw: what an operator accepts on the line."""
    known = {s.path for s in [*small_dataset.train, *small_dataset.val, *small_dataset.test]}
    return [p for p in sorted((MAGNETIC_TILE / "MT_Free" / "Imgs").glob("*.jpg")) if p not in known]


@pytest.fixture(scope="module")
def defect_images() -> list[Path]:
    out = []
    for kind in ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven"):
        out += sorted((MAGNETIC_TILE / kind / "Imgs").glob("*.jpg"))[:30]
    return out


@pytest.fixture
def registry(trained_model, tmp_path) -> Registry:
    return registry_with_base(trained_model, tmp_path / "registry", MAGNETIC_TILE)


def _namespace() -> str:
    return ray.get_runtime_context().namespace


def _wait_job(address: str, submission_id: str, timeout_s: float = 600) -> dict:
    terminal = ("SUCCEEDED", "FAILED", "STOPPED")
    assert wait_until(lambda: job_info(address, submission_id, 0)["status"] in terminal, timeout_s, 1.0), \
        job_info(address, submission_id, 60)
    return job_info(address, submission_id, 80)


def _accept(store: SampleStore, paths, origin: str, camera: str = "line") -> None:
    for path in paths:
        store.add(path.read_bytes(), origin, "operator:test", path.suffix, camera_id=camera)


def test_a_retrain_job_trains_with_ray_train_and_promotes_live_while_a_camera_streams(
        registry, tmp_path, test_frames, extra_normals):
    _accept(SampleStore(registry.store_dir), extra_normals[:60], "operator")
    v1 = registry.current()
    with live_agent(registry.root, tmp_path, learning={"guard": {"enabled": False}}) as agent:
        assert agent.jobs_address, "the agent found no Ray Jobs address"
        decisions = Decisions(agent.bound_results)
        camera = Streamer(agent.bound_ingest[0], "line", test_frames, fps=8)
        assert decisions.wait_for(10)
        job = submit_retrain(agent.jobs_address, registry.root, _namespace(), "test",
                             [*FAST, "learning.retrain.auto_without_defects=true",
                              "learning.retrain.gate.max_far_increase=0.2"])
        info = _wait_job(agent.jobs_address, job["submission_id"])
        assert info["status"] == "SUCCEEDED", "\n".join(info["log_tail"])
        outcome = json.loads(next((registry.root / "runs").glob("*/outcome.json")).read_text())
        # Refit first: the serving reconstructor with its scoring refitted, gated and promoted before training;
        # the trained candidate then serves only if the gate finds it better than that on the same holdout.
        refit, trained = outcome["refit"]["version"], outcome["version"]
        assert outcome["refit"]["action"] == "promoted" and outcome["refit"]["gate"]["passed"]
        expected = [v1, refit] + ([trained] if outcome["action"] == "promoted" else [])
        v2 = registry.current()
        assert v2 == expected[-1]
        assert wait_until(lambda: sum(d["model_version"] == v2 for d in list(decisions.by_key.values())) >= 10, 60)
        sent = camera.stop()
        totals = settled_totals(agent)["line"]
        assert decisions.wait_for(sent, 60)
        decisions.close()
    assert versions_in_order(decisions, "line") == expected  # each version from its swap on, nothing else
    assert totals["processed"] == sent == accounted(totals)
    assert not totals["dropped"] and not totals["invalid"], totals
    promoted = [e for e in registry.events() if e["version"] == v2]
    assert [e["event"] for e in promoted] == ["registered", "promoted"]
    assert all(job["submission_id"] in e["by"] for e in promoted)
    if outcome["action"] != "promoted":
        assert outcome["action"] == "rejected" and "refit-only candidate" in " ".join(outcome["gate"]["reasons"])
    assert registry.show(refit)["manifest"]["training"]["kind"] == "refit"
    manifest = registry.show(trained)["manifest"]
    assert manifest["parent_model_version"] == v1 and manifest["training"]["kind"] == "trained"
    assert manifest["training"]["workers"]["node_id"] and manifest["training"]["epochs"] == 3
    assert [r["epoch"] for r in manifest["training"]["history"]] == [1, 2, 3]
    assert all(-1.0 < r["val_explained_variance"] <= 1.0 for r in manifest["training"]["history"])
    assert registry.show(refit)["gate"]["passed"]
    # Both candidates' scoring terms were refitted on the run's own features, not inherited; the refit kept
    # the serving reconstructor's weights exactly.
    parent = registry.show(v1)["manifest"]["scoring_fit"]
    old_tensors = load_checkpoint(registry.version_dir(v1))[1]
    for version in (refit, trained):
        fit = registry.show(version)["manifest"]["scoring_fit"]
        assert fit["terms"] == parent["terms"] and fit["scales"] != parent["scales"]
        new_tensors = load_checkpoint(registry.version_dir(version))[1]
        fitted = [k for k in new_tensors if k.startswith("scorer.")]
        assert fitted and all(not torch.equal(old_tensors[k], new_tensors[k]) for k in fitted)
    refit_tensors = load_checkpoint(registry.version_dir(refit))[1]
    assert all(torch.equal(old_tensors[k], refit_tensors[k]) for k in old_tensors if not k.startswith("scorer."))
    assert outcome["refit"]["seconds_since_start"] < outcome["timings"]["total_s"]
    ordered = sorted(decisions.received_at.values())
    print(f"longest gap between decisions of the streaming camera: {max(np.diff(ordered)):.2f} s (camera at 8 fps); "
          f"refit-only candidate {outcome['refit']['seconds_since_start']} s after the job started, trained "
          f"candidate {outcome['action']}; retrain timings {outcome['timings']}")


def test_a_worse_candidate_is_rejected_by_the_gate_and_never_serves(registry, tmp_path, test_frames, defect_images):
    store = SampleStore(registry.store_dir)
    _accept(store, defect_images[::3], "confirmed_defect")  # labelled defects: the gate can check recall
    _accept(store, [p for i, p in enumerate(defect_images) if i % 3], "operator")  # defects "accepted as normal"
    v1 = registry.current()
    with live_agent(registry.root, tmp_path) as agent:
        decisions = Decisions(agent.bound_results)
        camera = Streamer(agent.bound_ingest[0], "line", test_frames, fps=5)
        cfg = RetrainConfig(epochs=3, policy="auto")
        outcome = retrain(registry.root, cfg, by="test", namespace=_namespace())
        sent = camera.stop()
        assert decisions.wait_for(sent, 60)
        inference = agent.snapshot()["inference"]
        decisions.close()
    # Defects accepted as normal poison the refitted statistics and the training alike: both candidates fail.
    assert outcome["refit"]["action"] == "rejected" and not outcome["refit"]["gate"]["passed"]
    assert outcome["action"] == "rejected" and not outcome["gate"]["passed"]
    assert outcome["gate"]["mode"] == "full"
    assert registry.current() == v1 and registry.pointers()["candidate"] is None
    rejected = [e for e in registry.events() if e["event"] == "rejected"]
    assert [e["version"] for e in rejected] == [outcome["refit"]["version"], outcome["version"]]
    for event in rejected:
        assert event["reason"].startswith("gate: ") and ("AUROC" in event["reason"] or "recall" in event["reason"])
    assert {d["model_version"] for d in decisions.by_key.values()} == {v1}
    assert inference["swaps"] == 0 and inference["shadow_version"] is None and not inference["staged"]


def test_one_retrain_at_a_time_and_a_stopped_one_leaves_only_its_gated_refit(registry, tmp_path, extra_normals,
                                                                              ray_cluster):
    store = SampleStore(registry.store_dir)
    _accept(store, extra_normals[:40], "operator")
    address = ray_cluster.dashboard
    before = (registry.pointers(), [v["version"] for v in registry.versions()], store.snapshot().fingerprint)
    slow = ["learning.retrain.epochs=500", "learning.retrain.max_minutes=0"]
    results: list = []

    def trigger():
        try:
            results.append(submit_retrain(address, registry.root, "no-agent", "test", slow))
        except RetrainBusy as exc:
            results.append(exc)

    threads = [threading.Thread(target=trigger) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, RetrainBusy)]
    assert len(jobs) == 1 and len(refused) == 1, results  # two triggers for the same data: one job
    submission = jobs[0]["submission_id"]
    run_root = registry.root / "runs" / "ray"
    # Wait until Ray Train has recorded a checkpoint (its manager's snapshot names one; the folder alone
    # appears before that, and a stop in between leaves nothing to resume from), then stop the job.
    def recorded() -> bool:
        return any("checkpoint_" in p.read_text() for p in run_root.rglob("checkpoint_manager_snapshot.json"))

    assert wait_until(recorded, 300, 1.0), job_info(address, submission, 60)
    with pytest.raises(RetrainBusy, match="retrain job"):
        submit_retrain(address, registry.root, "no-agent", "test", slow)
    with pytest.raises(RetrainBusy, match="already running"):  # the registry's own lock, without Ray Jobs
        retrain(registry.root, RetrainConfig(epochs=1), by="test")
    from ray.job_submission import JobSubmissionClient

    JobSubmissionClient(address).stop_job(submission)
    assert _wait_job(address, submission)["status"] == "STOPPED"
    run = next(p.name for p in (registry.root / "runs").iterdir() if p.name.startswith("retrain-"))
    refit = json.loads((registry.root / "runs" / run / "refit.json").read_text())
    after = (registry.pointers(), [v["version"] for v in registry.versions()], store.snapshot().fingerprint)
    # Nothing but the gated refit-only candidate it published before training (shadow without an agent: the
    # candidate pointer); no trained version, current and previous as they were, the store as it was.
    assert refit["action"] in ("shadow", "rejected")
    shadowed = refit["version"] if refit["action"] == "shadow" else None
    assert after == ({**before[0], "candidate": shadowed}, before[1] + [refit["version"]], before[2])
    # The next retrain succeeds: the stopped run, resumed by its name from its last checkpoint, keeps its refit.
    checkpoints = sorted((run_root / run).rglob("checkpoint_*"))
    outcome = retrain(registry.root, RetrainConfig(epochs=len(checkpoints) + 1, policy="register",
                                                   gate={"max_far_increase": 1.0}), run_name=run, by="test")
    assert outcome["run"] == run and outcome["refit"] == refit
    assert outcome["action"] in ("registered", "rejected")  # registered only when better than the refit
    assert registry.show(outcome["version"])["manifest"]["training"]["workers"]["resumed_from_epoch"] >= 1
    assert registry.pointers()["candidate"] == (outcome["version"] if outcome["action"] == "registered" else shadowed)
    assert len(registry.versions()) == len(before[1]) + 2


def test_a_trigger_that_lists_before_another_submits_is_refused_not_given_a_second_id(
        registry, extra_normals, ray_cluster, monkeypatch):
    """The interleaving a CI run hit: trigger B lists the jobs, trigger A submits, B goes on. B must be
    refused (it picks A's id and Ray says it exists), not handed `-2` to train beside A."""
    from ray.job_submission import JobSubmissionClient

    _accept(SampleStore(registry.store_dir), extra_normals[:5], "operator")
    address = ray_cluster.dashboard
    real = JobSubmissionClient.list_jobs
    first: list = []

    def list_then_let_another_submit(self):
        jobs = real(self)
        if not first:
            first.append(None)  # A's own listing goes straight through
            first[0] = submit_retrain(address, registry.root, "no-agent", "trigger A", ["learning.retrain.epochs=1"])
        return jobs

    monkeypatch.setattr(JobSubmissionClient, "list_jobs", list_then_let_another_submit)
    with pytest.raises(RetrainBusy, match="another trigger at the same time"):
        submit_retrain(address, registry.root, "no-agent", "trigger B", ["learning.retrain.epochs=1"])
    monkeypatch.undo()
    ids = [j.submission_id for j in JobSubmissionClient(address).list_jobs()
           if (j.submission_id or "").startswith(first[0]["submission_id"])]
    assert ids == [first[0]["submission_id"]]


def _http(url: str, method: str = "GET", body: dict | None = None, token: str | None = None):
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _copy_version(registry: Registry, name: str, threshold_factor: float = 1.0, damage: bool = False) -> str:
    import shutil

    src = registry.current_dir()
    dst = registry.root.parent / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("registered.json", "gate.json", "dataset.json"))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["model_version"] = name
    manifest["threshold"] *= threshold_factor
    (dst / "manifest.json").write_text(json.dumps(manifest))
    if damage:
        weights = dst / "reconstructor.safetensors"
        weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    return registry.add_version(dst, by="test")


def test_promote_rollback_and_shadow_through_the_token_protected_api_live(registry, tmp_path, test_frames):
    from adtr_edge.agent.http import start_http

    v1 = registry.current()
    v2 = _copy_version(registry, "v2-lower-threshold", threshold_factor=0.5)
    broken = _copy_version(registry, "v3-broken", damage=True)
    with live_agent(registry.root, tmp_path, http={"enabled": True, "port": 0},
                    learning={"guard": {"enabled": False}, "shadow": {"sample": 1.0}}) as agent:
        server = start_http(agent)
        token = server.token_file.read_text().strip()
        assert stat.S_IMODE(server.token_file.stat().st_mode) == 0o600
        api = f"{server.url}/v1"
        for method, path, body in (("POST", "/models/promote", {"version": v2}), ("POST", "/models/rollback", {}),
                                   ("POST", "/samples", {"camera_id": "line", "seq": 0}), ("POST", "/retrain", {}),
                                   ("GET", "/models", None)):
            assert _http(api + path, method, body)[0] == 401, path  # no token
            assert _http(api + path, method, body, token="not-the-token-0123456789")[0] == 401, path
        decisions = Decisions(agent.bound_results)
        camera = Streamer(agent.bound_ingest[0], "line", test_frames, fps=8)

        def seen(version: str, n: int = 5) -> bool:
            return sum(d["model_version"] == version for d in list(decisions.by_key.values())) >= n

        assert wait_until(lambda: seen(v1), 60)
        code, body = _http(api + "/models/promote", "POST", {"version": v2, "by": "ana"}, token)
        assert code == 200 and body["promoted"] == v2, body
        assert wait_until(lambda: seen(v2), 60)
        code, body = _http(api + "/models/rollback", "POST", {"by": "ana", "reason": "test"}, token)
        assert code == 200 and body["serving"] == v1, body

        def back_on_v1() -> int | None:  # the first seq served by v1 after v2's last (frames in flight keep v2)
            seen_now = list(decisions.by_key.items())
            last_v2 = max((k[1] for k, d in seen_now if d["model_version"] == v2), default=-1)
            return min((k[1] for k, d in seen_now if k[1] > last_v2 and d["model_version"] == v1), default=None)

        assert wait_until(lambda: back_on_v1() is not None, 60)
        mark = back_on_v1()
        code, body = _http(api + "/models/promote", "POST", {"version": broken, "by": "ana"}, token)
        assert code == 409 and "cannot be loaded" in body["error"], body
        code, body = _http(api + "/models/shadow", "POST", {"version": v2, "by": "ana"}, token)
        assert code == 200, body
        assert wait_until(lambda: any(s["frames"] >= 10 for s in agent.snapshot()["scoring"]["shadow"]), 60)
        sent = camera.stop()
        assert decisions.wait_for(sent, 60)
        metrics = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
        code, models = _http(api + "/models", token=token)
        server.shutdown()
        decisions.close()
    assert versions_in_order(decisions, "line") == [v1, v2, v1]  # never the broken one, never the shadow
    assert {d["model_version"] for k, d in decisions.by_key.items() if k[1] >= mark} == {v1}
    assert 'adtr_shadow_frames_total{camera="line",shadow_version="v2-lower-threshold"}' in metrics
    assert 'adtr_model_info{model_version="v2-lower-threshold",role="shadow"} 1.0' in metrics
    events = [(e["event"], e["version"], e["by"]) for e in registry.events()]
    assert ("promoted", v2, "operator:ana") in events and ("rolled_back", v1, "operator:ana") in events
    assert ("load_failed", broken, "operator:ana") in events
    assert ("promoted", broken, "operator:ana") not in events
    assert code == 200 and models["pointers"]["current"] == v1 and models["pointers"]["candidate"] == v2


def test_the_guard_rolls_back_by_itself_when_the_anomaly_rate_jumps(registry, tmp_path, small_dataset):
    normals = [frame_from_file(s.path) for s in small_dataset.test if s.label == 0]
    v1 = registry.current()
    jumpy = _copy_version(registry, "v2-flags-everything", threshold_factor=0.01)
    guard = {"enabled": True, "window": 60, "min_decisions": 15, "factor": 3.0, "margin": 0.2}
    with live_agent(registry.root, tmp_path, learning={"guard": guard}) as agent:
        decisions = Decisions(agent.bound_results)
        camera = Streamer(agent.bound_ingest[0], "line", normals, fps=10)
        assert wait_until(lambda: len(decisions.by_key) >= 20, 60)
        ray.get(agent.manager.promote.remote(jumpy, "test", "a bad threshold"), timeout=120)
        assert wait_until(lambda: registry.current() == v1, 120), registry.events()[-3:]
        assert wait_until(lambda: versions_in_order(decisions, "line")[-1:] == [v1], 60)
        camera.stop()
        decisions.close()
    rollback = registry.events()[-1]
    assert rollback["event"] == "rolled_back" and rollback["by"] == "guard"
    assert "anomaly rate" in rollback["reason"]
    assert versions_in_order(decisions, "line") == [v1, jumpy, v1]


def _brightened(path: Path, gain: float) -> SourceFrame:
    pixels = cv2.imread(str(path))
    return SourceFrame(path.name, pixels=np.clip(pixels.astype(np.float32) * gain, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def drift_model(tmp_path_factory, small_overrides):
    """The small model trained on more normals: a drift alarm needs a validation set of tens of images
    (with the session model's 5 the alarm's noise floor is above any shift; lifecycle/drift.py)."""
    from adtr_edge.agent.settings import load_settings
    from adtr_edge.model.data import load_dataset
    from adtr_edge.model.train import train_model

    cfg = load_settings(overrides={**small_overrides, "data": {**small_overrides["data"], "limit_per_class": 400}})
    out = tmp_path_factory.mktemp("drift-model")
    train_model(cfg, load_dataset(MAGNETIC_TILE, cfg.data), out, progress=False)
    return out, load_dataset(MAGNETIC_TILE, cfg.data)


def test_the_drift_alarm_fires_on_brightness_shifted_normals_and_not_on_the_calibration_set(tmp_path, drift_model):
    model, dataset = drift_model
    calibration = [frame_from_file(s.path) for s in dataset.val]  # what the threshold was fitted on
    unseen = [s.path for s in dataset.test if s.label == 0]
    window = 60
    drift = {"enabled": True, "window": window, "min_samples": window, "alarm_psi": 0.25}
    with live_agent(model, tmp_path, learning={"drift": drift}, ingest={"max_in_flight": 4}) as agent:
        decisions = Decisions(agent.bound_results)
        camera = Streamer(agent.bound_ingest[0], "calibration", calibration * 3, fps=20)
        assert wait_until(lambda: len(decisions.by_key) >= window, 120)
        camera.stop()
        quiet = settled_drift(agent, "calibration")
        shifted = [_brightened(p, 1.8) for p in unseen[:window]]
        camera = Streamer(agent.bound_ingest[0], "relit", shifted, fps=20)
        assert wait_until(lambda: sum(k[0] == "relit" for k in decisions.by_key) >= window, 120)
        camera.stop()
        loud = settled_drift(agent, "relit")
        decisions.close()
    print(f"PSI on the calibration set {quiet['psi']:.3f}, on relit normals {loud['psi']:.3f} "
          f"(alarm above {loud['threshold']:.2f}: the larger of 0.25 and the noise floor of "
          f"{len(dataset.val)} validation scores against {window} frames)")
    assert quiet["psi"] is not None and not quiet["alarm"]
    assert loud["alarm"] and loud["psi"] > loud["threshold"] and loud["median_ratio"] > 1.0


def settled_drift(agent, camera: str) -> dict:
    settled_totals(agent)
    return agent.snapshot()["scoring"]["drift"][camera]


def test_a_restarted_ingest_actor_keeps_the_books_closed(trained_model, tmp_path, test_frames):
    with live_agent(trained_model, tmp_path, output={"save_anomalies": False}) as agent:
        decisions = Decisions(agent.bound_results)
        camera = Streamer(agent.bound_ingest[0], "line", test_frames, fps=10)
        assert decisions.wait_for(15)
        pid = agent.snapshot()["ingest-0"]["pid"]
        time.sleep(1.0)  # at least one save of the books
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: agent.snapshot().get("ingest-0", {}).get("restarted"), 120)
        processed_at_restart = settled_totals(agent)["line"]["processed"]
        assert wait_until(lambda: settled_totals(agent)["line"]["processed"] > processed_at_restart + 10, 120)
        sent = camera.stop()
        totals = settled_totals(agent)["line"]
        decisions.close()
    print(f"ingest restart: sent {sent}, accounting {totals}")
    assert accounted(totals) == sent, totals
    assert set(totals["dropped"]) <= {"ingest_restart"}
    assert totals["processed"] >= len(decisions.by_key) - totals["dropped"].get("ingest_restart", 0)


def test_the_schedule_submits_a_retrain_after_enough_new_samples(registry, tmp_path, extra_normals, ray_cluster):
    schedule = {"enabled": True, "min_new_samples": 5, "min_interval_s": 0, "check_every_s": 1.0}
    with live_agent(registry.root, tmp_path, learning={"schedule": schedule, "retrain": {"epochs": 2}}):
        _accept(SampleStore(registry.store_dir), extra_normals[:6], "operator")
        assert wait_until(lambda: (registry.root / "schedule.json").is_file(), 60)
        job = json.loads((registry.root / "schedule.json").read_text())["job"]
        assert job["submission_id"].startswith("retrain-") and "schedule" in job["entrypoint"]
        assert "learning.retrain.epochs=2" in job["entrypoint"]  # the agent's own retrain settings
        info = _wait_job(ray_cluster.dashboard, job["submission_id"])
    assert info["status"] == "SUCCEEDED", "\n".join(info["log_tail"])


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adtr_edge.agent.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=kwargs.pop("timeout", 300), **kwargs)


def test_killing_the_agent_mid_retrain_loses_no_accepted_frame(registry, tmp_path, small_dataset, ray_cluster):
    """The agent as a user runs it (`adtr-edge run`, joined to the cluster), operators accept frames with
    `adtr-edge accept`, a retrain is submitted with `adtr-edge retrain --submit`; then the agent is killed."""
    out = tmp_path / "agent.out"
    anomalies = tmp_path / "anomalies"
    agent = subprocess.Popen(
        [sys.executable, "-m", "adtr_edge.agent.cli", "--log-json", "run", "--model", str(registry.root),
         "--ingest", "tcp://127.0.0.1:*", "--results", "tcp://127.0.0.1:*",
         "--set", f"ray.address={ray_cluster.address}",
         "--set", "http.port=0", "--set", f"output.dir={anomalies}", "--set", f"state_dir={tmp_path / 'state'}",
         "--set", "ray.namespace=killed-agent"],
        stdout=open(out, "w"), stderr=open(tmp_path / "agent.log", "w"), cwd=ROOT)
    try:
        assert wait_until(lambda: '"agent ready"' in out.read_text(), 180), (tmp_path / "agent.log").read_text()[-2000:]
        ready = json.loads(next(line for line in out.read_text().splitlines() if '"agent ready"' in line))
        from adtr_edge.agent.publisher import FramePublisher

        camera = FramePublisher(ready["bound_ingest"][0], "line")
        defects = [s for s in small_dataset.test if s.label][:40]
        for s in defects:
            camera.send(frame_from_file(s.path))
        camera.close()
        assert wait_until(lambda: len(list(anomalies.rglob("*.json"))) >= 10, 120)
        saved = sorted({int(p.stem.split("_")[-1]) for p in anomalies.glob("line/*.json")})[:10]
        accepted = []
        for seq in saved[:2]:  # one frame per call…
            result = _cli("accept", "--registry", str(registry.root), "--camera", "line", "--seq", str(seq),
                          "--by", "ana")
            assert result.returncode == 0, result.stderr[-2000:]
            accepted.append(json.loads(result.stdout))
        assert all(a["via"] == "agent" and a["added"] for a in accepted)
        # …and the rest in one call (bulk), plus a sequence number nothing was saved for: listed, not lost
        result = _cli("accept", "--registry", str(registry.root), "--camera", "line", "--by", "ana",
                      *[arg for seq in [*saved[2:], 999_999] for arg in ("--seq", str(seq))])
        assert result.returncode == 0, result.stderr[-2000:]
        bulk = json.loads(result.stdout)
        assert bulk["via"] == "agent" and bulk["point"] == "default" and bulk["filed"] == len(saved) - 2
        assert [m["what"] for m in bulk["missing"]] == [999_999] and all(i["added"] for i in bulk["items"])
        accepted += bulk["items"]
        result = _cli("points", "list", "--registry", str(registry.root))
        assert result.returncode == 0, result.stderr[-2000:]
        assert list(json.loads(result.stdout)["points"]) == ["default"]
        result = _cli("retrain", "--registry", str(registry.root), "--submit", "--set", "retrain.epochs=2")
        assert result.returncode == 0, result.stderr[-2000:]
        job = json.loads(result.stdout.strip().splitlines()[-1])
        assert wait_until(lambda: job_info(ray_cluster.dashboard, job["submission_id"], 0)["status"] == "RUNNING",
                          120)
        agent.send_signal(signal.SIGKILL)
        agent.wait(30)
        store = SampleStore(registry.store_dir)
        rows = {s.sha256: s for s in store.snapshot().samples}
        for a in accepted:
            assert rows[a["sha256"]].origin == "operator" and rows[a["sha256"]].path.is_file()
        info = _wait_job(ray_cluster.dashboard, job["submission_id"])
        assert info["status"] == "SUCCEEDED", "\n".join(info["log_tail"])  # the job outlives the agent
        outcome = json.loads(next((registry.root / "runs").glob("*/outcome.json")).read_text())
        assert outcome["samples"]["by_origin"]["operator"] == len(accepted)
    finally:
        if agent.poll() is None:
            agent.kill()
        _kill_actors("killed-agent")


@pytest.mark.timeout(1800)  # waits on real Ray jobs that train
def test_ray_job_submit_by_hand_runs_as_the_readme_and_status_say(registry, tmp_path):
    """`adtr-edge run` on a registry starts its own Ray head with Jobs on 8265 when that port is free;
    `adtr-edge status` prints the environment and the exact `ray job submit` line; that line, run in a
    shell, retrains."""
    import socket

    with socket.socket() as probe:
        free_8265 = probe.connect_ex(("127.0.0.1", 8265)) != 0
    out = tmp_path / "agent.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a fresh shell: no Ray settings
    agent = subprocess.Popen(
        [sys.executable, "-m", "adtr_edge.agent.cli", "--log-json", "run", "--model", str(registry.root),
         "--ingest", "tcp://127.0.0.1:*", "--results", "tcp://127.0.0.1:*", "--set", "http.port=0",
         "--set", "console.enabled=false", "--set", f"output.dir={tmp_path / 'anomalies'}",
         "--set", f"state_dir={tmp_path / 'state'}"],
        stdout=open(out, "w"), stderr=open(tmp_path / "agent.log", "w"), cwd=ROOT,
        env=dict(env, ADTR_EDGE_LEARNING__RETRAIN__EPOCHS="1"))  # the box's setting, inherited by its Ray jobs
    try:
        assert wait_until(lambda: '"agent ready"' in out.read_text(), 240), (tmp_path / "agent.log").read_text()[-2000:]
        result = _cli("status", "--registry", str(registry.root), env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        status = json.loads(result.stdout)
        assert status["running"] and status["shell_env"]["RAY_AUTH_MODE"] == "token"
        if free_8265:
            assert status["jobs"] == "http://127.0.0.1:8265"
        submit = subprocess.run(["bash", "-c", status["ray_job_submit"]], capture_output=True, text=True,
                                timeout=900, env=env, cwd=tmp_path)  # run as printed
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        assert "succeeded" in submit.stdout.lower()
        outcome = json.loads(next((registry.root / "runs").glob("*/outcome.json")).read_text())
        assert outcome["refit"]["gate"]["passed"] is not None and outcome["version"]
        bare = status["ray_job_submit"].split(" ", len(status["shell_env"]))[-1]  # the same line without the exports
        assert bare.split()[1:3] == ["job", "submit"]
        unauthenticated = subprocess.run(["bash", "-c", bare.replace(" job submit", " job submit --no-wait", 1)],
                                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert unauthenticated.returncode != 0  # without the token environment Ray refuses the submission
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(120)
        except subprocess.TimeoutExpired:
            agent.kill()


def _kill_actors(namespace: str) -> None:
    """A SIGKILLed agent leaves its actors (they belong to the cluster): clean them up."""
    for name in ("inference", "scoring", "ingest-0", "models"):
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:
            pass


def test_ray_token_auth_stays_on_and_its_token_file_is_private(ray_cluster, ray_home):
    token = Path(ray_home) / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE="disabled")
    probe = subprocess.run([sys.executable, "-c", (
        "from ray.job_submission import JobSubmissionClient\n"
        f"JobSubmissionClient({ray_cluster.dashboard!r}).list_jobs()")], capture_output=True, text=True, env=env,
        timeout=120)
    assert probe.returncode != 0 and ("401" in probe.stderr or "Unauthorized" in probe.stderr or
                                      "auth" in probe.stderr.lower()), probe.stderr[-1500:]


@pytest.mark.timeout(1800)  # waits on real Ray jobs that train
def test_on_a_two_node_cluster_training_runs_on_the_worker_node(registry, tmp_path, extra_normals):
    """`ray start --head` labelled edge + a worker node labelled trainer (each with its own temp dir, token mode on
    both); the agent joins with ray.address, its socket-binding actors pinned to the edge node and its inference
    to the other (ray.edge_labels, ray.inference_labels); the retrain job's Ray Train worker lands on the
    labelled node."""
    from adtr_edge.agent.rayhead import LocalHead, LocalWorker

    _accept(SampleStore(registry.store_dir), extra_normals[:30], "operator")
    head = LocalHead(num_cpus=1, labels={"adtr-role": "edge"})
    worker = LocalWorker(head.address, num_cpus=3, labels={"adtr-role": "trainer"})
    out = tmp_path / "agent.out"
    agent = None
    try:
        nodes_script = (f"import json, ray; ray.init(address={head.address!r}, log_to_driver=False); "
                        "print(json.dumps([{'id': n['NodeID'], 'labels': n.get('Labels', {}), 'alive': n['Alive']} "
                        "for n in ray.nodes()]))")

        def nodes() -> list[dict]:
            probe = subprocess.run([sys.executable, "-c", nodes_script], capture_output=True, text=True, timeout=120)
            return json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else []

        assert wait_until(lambda: sum(n["alive"] for n in nodes()) == 2, 180, 2.0), worker.log_path.read_text()[-2000:]
        trainer_node = next(n["id"] for n in nodes() if n["labels"].get("adtr-role") == "trainer")
        agent = subprocess.Popen(
            [sys.executable, "-m", "adtr_edge.agent.cli", "--log-json", "run", "--model", str(registry.root),
             "--ingest", "tcp://127.0.0.1:*", "--results", "tcp://127.0.0.1:*", "--set", f"ray.address={head.address}",
             "--set", "http.port=0", "--set", f"output.dir={tmp_path / 'anomalies'}",
             "--set", f"state_dir={tmp_path / 'state'}", "--set", 'ray.edge_labels={"adtr-role": "edge"}',
             "--set", 'ray.inference_labels={"adtr-role": "trainer"}', "--set", "inference.num_cpus=1"],
            stdout=open(out, "w"), stderr=open(tmp_path / "agent.log", "w"), cwd=ROOT)
        assert wait_until(lambda: '"agent ready"' in out.read_text(), 240), (tmp_path / "agent.log").read_text()[-3000:]
        ready = json.loads(next(line for line in out.read_text().splitlines() if '"agent ready"' in line))
        assert ready["jobs"], ready
        edge_node = next(n["id"] for n in nodes() if n["labels"].get("adtr-role") == "edge")
        assert ready["nodes"] == {"inference": trainer_node, "scoring": edge_node, "ingest-0": edge_node}, ready
        result = _cli("retrain", "--registry", str(registry.root), "--submit", "--wait",
                      "--set", 'retrain.label_selector={"adtr-role": "trainer"}', "--set", "retrain.epochs=2",
                      "--set", "retrain.policy=register", timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outcome = json.loads(next((registry.root / "runs").glob("*/outcome.json")).read_text())
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
        worker.stop()
        head.stop()
    print(f"two nodes: training on {outcome['node_id'][:12]} (the trainer node {trainer_node[:12]}), "
          f"timings {outcome['timings']}")
    assert outcome["node_id"] == trainer_node


def test_a_retrain_that_cannot_get_its_resources_fails_in_bounded_time_with_the_reason(registry, extra_normals):
    _accept(SampleStore(registry.store_dir), extra_normals[:30], "operator")
    cfg = RetrainConfig(epochs=1, label_selector={"adtr-role": "no-such-node"}, start_timeout_s=5,
                        max_start_attempts=1)
    started = time.monotonic()
    with pytest.raises(Exception) as failure:
        retrain(registry.root, cfg, by="test")
    seconds = time.monotonic() - started
    print(f"unplaceable training failed after {seconds:.0f} s: {failure.value}")
    assert "training failed" in str(failure.value)
    assert seconds < 180
    # Nothing published but the refit-only candidate, gated before training (shadowed, as no agent runs, or
    # rejected by the gate).
    events = [e["event"] for e in registry.events()]
    assert events[:3] == ["registered", "promoted", "registered"] and events[3:] in (["shadow"], ["rejected"])
