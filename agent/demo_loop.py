"""`adtr-edge demo --loop`: the learning loop as a story a user can watch, with real parts throughout.

A real agent (`adtr-edge run` on a model registry; it starts its own Ray head with Ray Jobs), a camera
replaying Magnetic Tile test images, and this process playing the operator through the agent's HTTP API:

1. before: normals under the original lighting (few false alarms, no drift), then defects (the
   recall to keep).
2. the lamp is re-aimed: the same kind of normals, 80 % brighter; false alarms climb; the drift alarm
   fires (/readyz).
3. the operator accepts those false alarms as normal (POST /v1/samples).
4. a retrain is submitted as a Ray job (POST /v1/retrain): Ray Train fits a new version, the gate
   compares it with the serving one, and (no labelled defects: normals-only gate) it goes to shadow.
5. shadow: the candidate runs beside the serving model on new relit normals; its decisions are counted,
   never published.
6. the operator promotes it (POST /v1/models/promote); new relit normals and relit defects stream:
   false alarms fall, defects are still found (compared with the same defects in step 1, under the
   original lighting and the original model).
The summary prints each step's numbers and the model versions; it is also written to summary.json.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from adtr_edge.actors.contract import parse_decision
from adtr_edge.lifecycle.registry import Registry, is_registry
from adtr_edge.model.checkpoint import read_manifest
from adtr_edge.model.config import AdtrConfig
from adtr_edge.model.data import load_dataset

from .demo import _cli, _event, _wait_ready, stop_agent
from .errors import AgentError
from .operate import AgentClient, import_base
from .publisher import FramePublisher, SourceFrame, frame_from_file
from .waiting import wait_until
from .watch import subscribe

GAIN = 1.8  # the re-aimed lamp


def relit(path: Path, gain: float) -> SourceFrame:
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise AgentError(f"{path}: not a readable image")
    brighter = np.clip(pixels.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return SourceFrame(f"{path.name}@x{gain}", pixels=brighter)


class Phase:
    """Send frames, collect their decisions (by seq), report what an operator would see."""

    def __init__(self, name: str, camera: FramePublisher, sub: zmq.Socket):
        self.name, self.camera, self.sub = name, camera, sub
        self.decisions: dict[int, dict] = {}

    def run(self, frames: list[SourceFrame], labels: list[int], timeout_s: float = 600.0) -> dict[str, Any]:
        seqs: list[int] = []
        for frame in frames:
            seq = self.camera.send(frame, encoding="auto" if frame.encoded else "jpeg")
            if seq is None:  # only a send with a timeout gives up
                raise AgentError("the demo camera could not send a frame")
            seqs.append(seq)
            self._drain(0)
        progress = time.monotonic()
        while len(self.decisions) < len(seqs) and time.monotonic() - progress < timeout_s:
            if self._drain(500):
                progress = time.monotonic()
        self.labels = dict(zip(seqs, labels))
        return self.report(seqs)

    def _drain(self, wait_ms: int) -> bool:
        got = False
        while self.sub.poll(wait_ms):
            d = parse_decision(self.sub.recv_multipart())
            self.decisions[d["seq"]] = d
            got, wait_ms = True, 0
        return got

    def report(self, seqs: list[int]) -> dict[str, Any]:
        ds = [self.decisions[s] for s in seqs if s in self.decisions]
        normal = [d for d in ds if self.labels[d["seq"]] == 0]
        defect = [d for d in ds if self.labels[d["seq"]] == 1]
        versions = sorted({d["model_version"] for d in ds})
        out = {"phase": self.name, "frames": len(seqs), "decided": len(ds), "versions": versions,
               "false_alarms": sum(d["is_anomaly"] for d in normal), "normals": len(normal),
               "false_alarm_rate": float(np.mean([d["is_anomaly"] for d in normal])) if normal else None,
               "defects": len(defect),
               "recall": float(np.mean([d["is_anomaly"] for d in defect])) if defect else None}
        print(f"── {self.name}: {out['decided']}/{out['frames']} decided by {', '.join(versions)}; false alarms "
              f"{out['false_alarms']}/{out['normals']}" + (f"; defects found {sum(d['is_anomaly'] for d in defect)}/"
                                                           f"{len(defect)}" if defect else ""), flush=True)
        return out


def phase_images(test: list, normals_per_phase: int = 48, defects: int = 40) -> tuple[list, list, list, list]:
    """The demo's draw from the test split (seeded): normals before the lamp moves, relit normals to
    accept, relit normals after the retrain, and the defects."""
    rng = random.Random(0)
    normals = [s.path for s in test if s.label == 0]
    rng.shuffle(normals)
    # The relit phase is the larger one: the drift window covers it, and the larger the window, the
    # lower the drift alarm's noise floor (lifecycle/drift.py).
    sizes = [normals_per_phase, 4 * normals_per_phase // 3, normals_per_phase]
    if len(normals) < sum(sizes):
        sizes = [int(len(normals) * f) for f in (0.3, 0.4, 0.3)]
    before, accept, after = (normals[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(3))
    defect_paths = [s.path for s in test if s.label == 1]
    rng.shuffle(defect_paths)
    return before, accept, after, defect_paths[:defects]


def run_loop_demo(model_dir: Path, data: str, out: Path, overrides: list[str] | None = None,
                  normals_per_phase: int = 48, defects: int = 40, epochs: int = 24) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    registry_dir = out / "registry"
    if is_registry(model_dir):
        registry = Registry(model_dir)
    elif is_registry(registry_dir):
        registry = Registry(registry_dir)
    else:
        print(f"creating the model registry {registry_dir} from {model_dir}; its training normals go to the "
              "sample store as origin base …", flush=True)
        registry = Registry.create(registry_dir, model_dir, by="demo-loop")
        import_base(registry, data, "demo-loop")
    cfg = AdtrConfig.model_validate(read_manifest(registry.current_dir())["settings"])
    before_set, accept_set, after_set, defect_paths = phase_images(load_dataset(data, cfg.data).test,
                                                                   normals_per_phase, defects)

    from .rayhead import free_port

    ingest, results, http = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", free_port()
    settings = ["--set", f"output.dir={out / 'anomalies'}", "--set", f"http.port={http}",
                "--set", f"state_dir={out / 'state'}", "--set", f"learning.drift.window={len(accept_set)}",
                "--set", f"learning.drift.min_samples={len(before_set)}", "--set", "learning.shadow.sample=1.0",
                "--set", "learning.retrain.policy=shadow", "--set", f"learning.retrain.epochs={epochs}",
                "--set", "learning.auto_sample.enabled=false"]
    for o in overrides or []:
        settings += ["--set", o]
    agent_log, agent_out = open(out / "agent.log", "w"), open(out / "agent.out", "w")
    agent = subprocess.Popen(_cli("--log-json", "run", "--model", str(registry.root), "--ingest", ingest,
                                  "--results", results, *settings),
                             stdout=agent_out, stderr=agent_log, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    steps: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        print(f"starting the agent on registry {registry.root} (it starts a Ray head with Ray Jobs) …", flush=True)
        _wait_ready(agent, out / "agent.out", 600)
        token = (registry.root / "api_token").read_text().strip()
        operator = AgentClient(f"http://127.0.0.1:{http}", token, timeout_s=600)
        context = zmq.Context()
        sub = subscribe(context, results)
        camera = FramePublisher(ingest, "line-1")
        v1 = registry.current()
        print(f"agent ready, serving {v1}", flush=True)

        step = Phase("1. original lighting: normals", camera, sub).run([frame_from_file(p) for p in before_set],
                                                                        [0] * len(before_set))
        step["drift"] = _settled_drift(operator)
        steps.append(step)
        steps.append(Phase("1b. original lighting: defects", camera, sub).run(
            [frame_from_file(p) for p in defect_paths], [1] * len(defect_paths)))

        phase = Phase(f"2. lamp re-aimed (x{GAIN} brightness)", camera, sub)
        step = phase.run([relit(p, GAIN) for p in accept_set], [0] * len(accept_set))
        step["drift"] = _settled_drift(operator)
        step["hint"] = operator.request("GET", "/readyz")[1].get("hint")
        steps.append(step)
        print(f"   drift: {json.dumps(step['drift'])}\n   {step['hint']}", flush=True)

        accepted = 0
        for seq, d in sorted(phase.decisions.items()):
            if d["is_anomaly"]:
                code, body = operator.request("POST", "/v1/samples", {"camera_id": "line-1", "seq": seq,
                                                                   "label": "normal", "by": "demo-operator"})
                accepted += int(code in (200, 201) and body.get("added", False))
        steps.append({"phase": "3. operator accepts the false alarms as normal", "accepted": accepted})
        print(f"── 3. the operator accepted {accepted} false alarms as normal", flush=True)

        submitted_at = time.monotonic()
        code, job = operator.request("POST", "/v1/retrain", {"by": "demo-operator"})
        if code != 200:
            raise AgentError(f"retrain was not submitted: {job}")
        print(f"── 4. retrain submitted as Ray job {job['submission_id']} …", flush=True)
        info = _wait_for_job(operator, job["submission_id"], registry=registry)
        candidate = registry.pointers()["candidate"]
        gate = registry.show(candidate)["gate"] if candidate else None
        steps.append({"phase": "4. retrain (Ray job, Ray Train)", "job": job["submission_id"],
                      "status": info["status"], "seconds": round(time.monotonic() - submitted_at, 1),
                      "candidate": candidate, "gate": gate and {k: gate[k] for k in ("passed", "mode", "reasons")}})
        print(f"   job {info['status']} in {steps[-1]['seconds']} s; candidate {candidate}; gate "
              f"{json.dumps(steps[-1]['gate'])}", flush=True)
        refit, trained = _retrain_rows(registry)
        appeared = info.get("versions_appeared_after_s", {})
        for row in (refit, trained):
            if row:  # submit → this candidate published (gated), measured from outside the job
                row["submit_to_published_s"] = appeared.get(row["version"])
        steps[-1].update(refit=refit, trained=trained)
        if refit:  # the control beside the claim: what a refit of the scoring alone gave, before any training
            print(f"   refit-only candidate {refit['version']}: {refit['action']} {refit['submit_to_published_s']} s "
                  f"after the submission; trained candidate {trained['version']}: {trained['action']} after "
                  f"{trained['submit_to_published_s']} s"
                  + (f" ({'; '.join(trained['reasons'])})" if trained["reasons"] else ""), flush=True)
        if not candidate:
            raise AgentError("the retrain produced no candidate (see the job log in agent.log / the registry events)")
        assert_shadow = wait_until(lambda: operator.request("GET", "/v1/models")[1].get("status", {}).get("shadow")
                                   == candidate, 60, 0.5)

        half = len(after_set) // 2
        step = Phase("5. shadow on new relit normals", camera, sub).run([relit(p, GAIN) for p in after_set[:half]],
                                                                         [0] * half)
        wait_until(lambda: (_shadow_stats(operator, candidate) or {}).get("frames_total", 0) >= half, 30, 0.5)
        shadow = _shadow_stats(operator, candidate)
        step.update(shadow=shadow, shadowing=assert_shadow)
        steps.append(step)
        print(f"   shadow {candidate}: {json.dumps(shadow)}", flush=True)

        code, body = operator.request("POST", "/v1/models/promote", {"version": candidate, "by": "demo-operator",
                                                                  "reason": "shadow shows fewer false alarms"})
        steps.append({"phase": "6. operator promotes the candidate", "result": body, "code": code})
        print(f"── 6. promoted: {json.dumps(body)[:200]}", flush=True)
        rest = after_set[half:]
        frames = [relit(p, GAIN) for p in rest] + [relit(p, GAIN) for p in defect_paths]
        step = Phase("7. after the promotion: new relit normals and defects", camera, sub).run(
            frames, [0] * len(rest) + [1] * len(defect_paths))
        steps.append(step)
        camera.close()
        sub.close(linger=0)
        context.term()
    finally:
        stop_agent(agent, agent_log, agent_out)
    stopped = _event(out / "agent.out", "agent stopped")
    summary = {"steps": steps, "versions": {"before": v1, "after": registry.current()},
               "events": registry.events(20), "agent_accounting": stopped["cameras"] if stopped else None,
               "seconds": round(time.monotonic() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary)
    return summary


def _settled_drift(operator: AgentClient) -> dict | None:
    """The camera's drift state once /readyz's stats snapshot (refreshed every second) has seen the
    phase's last decisions."""
    time.sleep(3.0)
    return operator.request("GET", "/readyz")[1].get("drift", {}).get("line-1")


def _wait_for_job(operator: AgentClient, submission_id: str, stall_s: float = 900.0,
                  registry: Registry | None = None) -> dict:
    """Until the job ends; gives up only if its log has not moved for `stall_s`. With `registry`, the
    returned info also says when (seconds after this call) each version the job published appeared."""
    last, moved, start = None, time.monotonic(), time.monotonic()
    known = {v["version"] for v in registry.versions()} if registry else set()
    appeared: dict[str, float] = {}
    while True:
        if registry:
            for v in registry.versions():
                if v["version"] not in known and v["version"] not in appeared:
                    appeared[v["version"]] = round(time.monotonic() - start, 1)
        code, info = operator.request("GET", f"/v1/retrain/{submission_id}")
        if code == 200 and info:
            info = {**info, "versions_appeared_after_s": appeared}
        if code == 200 and info and info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            if info["status"] != "SUCCEEDED":
                raise AgentError(f"retrain job {submission_id} {info['status']}: " + "\n".join(info["log_tail"][-10:]))
            return info
        tail = (info or {}).get("log_tail")
        if tail != last:
            last, moved = tail, time.monotonic()
        if time.monotonic() - moved > stall_s:
            raise AgentError(f"retrain job {submission_id} made no progress for {stall_s:.0f} s")
        time.sleep(2.0)


def _shadow_stats(operator: AgentClient, candidate: str) -> dict | None:
    """The shadow comparison as /metrics shows it (agreement, anomaly rate by model, score correlation)."""
    try:
        with urllib.request.urlopen(f"{operator.url}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("shadow_version") == candidate and s.labels.get("camera") == "line-1":
                key = s.name.removeprefix("adtr_shadow_") + (f"_{s.labels['model']}" if "model" in s.labels else "")
                out[key] = s.value
    return out


def _retrain_rows(registry: Registry) -> tuple[dict | None, dict]:
    """The newest retrain's refit-only candidate (None when it had none) and its trained candidate, each
    with its action and its holdout false-alarm rate, from the run's outcome."""
    outcome = json.loads(max((registry.root / "runs").glob("*/outcome.json"), key=lambda p: p.stat().st_mtime)
                         .read_text())
    def row(entry: dict) -> dict:
        gate = entry["gate"]
        return {"version": entry["version"], "action": entry["action"], "reasons": gate["reasons"],
                "holdout_false_alarm_rate": gate["candidate"]["false_alarm_rate"],
                "explained_variance": gate["candidate"].get("explained_variance"),
                **({"seconds_since_start": entry["seconds_since_start"]} if "seconds_since_start" in entry else {})}
    return (row(outcome["refit"]) if outcome.get("refit") else None), row(outcome)


def _print_summary(s: dict) -> None:
    print("\n── learning-loop demo summary " + "─" * 40)
    for step in s["steps"]:
        if "false_alarm_rate" in step:
            fa = step["false_alarm_rate"]
            line = f"{step['phase']}: {step['decided']} frames by {', '.join(step['versions'])}"
            if step["normals"]:
                line += f", false alarms {step['false_alarms']}/{step['normals']} ({fa:.0%})"
            if step["defects"]:
                line += f", defects found {step['recall']:.0%} of {step['defects']}"
            if step.get("drift"):
                line += f", drift PSI {step['drift']['psi']:.2f} alarm {step['drift']['alarm']}"
            if step.get("shadow"):
                sh = step["shadow"]
                line += (f"; shadow: agreement {sh.get('agreement', float('nan')):.2f}, anomaly rate serving "
                         f"{sh.get('anomaly_rate_serving', float('nan')):.2f} vs candidate "
                         f"{sh.get('anomaly_rate_shadow', float('nan')):.2f}")
            print(line)
        else:
            print(f"{step['phase']}: " + json.dumps({k: v for k, v in step.items() if k != 'phase'})[:300])
    print(f"versions: before {s['versions']['before']}, after {s['versions']['after']}; {s['seconds']} s in all")
    print(f"agent accounting: {json.dumps(s['agent_accounting'])}")
