"""The operator's commands on a model registry: `adtr-edge models …`, `accept`, `retrain`.

When an agent serves from the registry (it announces itself in `<registry>/agent.json`), promotions,
rollbacks, accepts and retrain submissions go through its HTTP API with its token, so the live actors
switch at once. With no agent running they act on the registry and the store directly; an agent
started later serves the registry's `current`.
"""
from __future__ import annotations

import getpass
import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from adtr_edge.actors.config import RetrainConfig
from adtr_edge.actors.jobs import job_info, submit_retrain
from adtr_edge.lifecycle.registry import Registry
from adtr_edge.lifecycle.samples import SampleStore, set_journal_mode
from adtr_edge.model.checkpoint import read_manifest
from adtr_edge.model.config import AdtrConfig
from adtr_edge.model.data import load_dataset

from .errors import AgentError
from .learning import accept_frame, accept_many, find_saved_frame
from .runner import AGENT_FILE


def default_by() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "cli"


class AgentClient:
    """The running agent's learning API (token from the file the agent wrote)."""

    def __init__(self, url: str, token: str, timeout_s: float = 300.0, point: str | None = None):
        self.url, self.token, self.timeout_s, self.point = url.rstrip("/"), token, timeout_s, point

    @classmethod
    def for_registry(cls, registry: Registry) -> AgentClient | None:
        """The agent serving this registry, if one announced itself and answers."""
        path = registry.root / AGENT_FILE
        if not path.is_file():
            return None
        info = json.loads(path.read_text())
        if not info.get("http") or not info.get("token_file"):
            return None
        try:
            urllib.request.urlopen(f"{info['http']}/healthz", timeout=2).read()
        except (OSError, urllib.error.URLError):
            return None  # announced but gone (killed): act on the registry directly
        return cls(info["http"], Path(info["token_file"]).read_text().strip(), point=info.get("point"))

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """One call about this client's inspection point (the registry's, as the agent announced it): the HTTP
        status and the JSON answer; a refusal (4xx, 5xx) is an answer too."""
        if self.point:
            body = {"point": self.point, **(body or {})}
            path += ("&" if "?" in path else "?") + f"point={self.point}"
        request = urllib.request.Request(
            f"{self.url}{path}", method=method, data=json.dumps(body or {}).encode() if method != "GET" else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"{}")
            except (json.JSONDecodeError, ValueError):
                return exc.code, {"error": str(exc.reason)}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """`request`, for a caller that needs success: a refusal becomes an AgentError saying why."""
        code, answer = self.request(method, path, body)
        if code >= 400:
            raise AgentError(f"the agent refused: {answer.get('error', 'no reason given')} (HTTP {code})")
        return answer


def agent_info(registry: Registry) -> dict[str, Any]:
    path = registry.root / AGENT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def agent_status(registry: Registry) -> dict[str, Any]:
    """Whether an agent serves this registry, and how to reach its Ray Jobs API from a shell by hand."""
    info = agent_info(registry)
    if not info:
        raise AgentError(f"no agent serves {registry.root} (it writes {AGENT_FILE} there when it starts)")
    try:
        os.kill(int(info["pid"]), 0)
        alive = True
    except (OSError, ValueError, KeyError):
        alive = False
    out: dict[str, Any] = {"registry": str(registry.root), "running": alive, **info}
    if info.get("jobs"):
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": info.get("ray_token_file")}
        out["shell_env"] = {k: v for k, v in env.items() if v}
        exports = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in out["shell_env"].items())
        bin_dir = Path(sys.executable).parent  # this install's own CLIs: no activated venv needed
        ray_cli = bin_dir / "ray"
        out["ray_job_submit"] = (f"{exports} {shlex.quote(str(ray_cli)) if ray_cli.exists() else 'ray'} job submit "
                                 f"--address {info['jobs']} -- {shlex.quote(str(bin_dir / 'adtr-edge'))} retrain "
                                 f"--registry {shlex.quote(str(registry.root))} --namespace "
                                 f"{shlex.quote(info.get('namespace') or 'adtr-edge')}")
    return out


# ------------------------------------------------------------------ adtr-edge models
def models_init(registry_path: Path, model: Path, base_data: str | None, by: str,
                store_journal: str = "wal") -> dict[str, Any]:
    registry = Registry.create(registry_path, model, by)
    set_journal_mode(registry.store_dir, store_journal)  # before anything opens the store's index
    out: dict[str, Any] = {"registry": str(registry.root), "current": registry.current(),
                           "store_journal": store_journal}
    if base_data:
        out["base_samples"] = import_base(registry, base_data, by)
    return out


def import_base(registry: Registry, data: str, by: str) -> int:
    """The current model's own training data as origin `base`: what a retrain keeps knowing."""
    cfg = AdtrConfig.model_validate(read_manifest(registry.current_dir())["settings"])
    dataset = load_dataset(data, cfg.data)
    store = SampleStore(registry.store_dir)
    added = 0
    for sample in [*dataset.train, *dataset.val]:
        if sample.label == 0:
            added += store.add(sample.path.read_bytes(), "base", by, sample.path.suffix.lower() or ".png",
                               source=str(sample.path)).added
    return added


def models_list(registry: Registry) -> list[dict[str, Any]]:
    return registry.versions()


def models_promote(registry: Registry, version: str, by: str, reason: str) -> dict[str, Any]:
    client = AgentClient.for_registry(registry)
    if client is not None:
        return dict(client.call("POST", "/v1/models/promote", {"version": version, "by": by, "reason": reason}),
                    via="agent")
    return {"pointers": registry.promote(version, by, reason), "via": "registry"}


def models_rollback(registry: Registry, by: str, reason: str) -> dict[str, Any]:
    client = AgentClient.for_registry(registry)
    if client is not None:
        return dict(client.call("POST", "/v1/models/rollback", {"by": by, "reason": reason}), via="agent")
    return {"pointers": registry.rollback(by, reason), "via": "registry"}


# ------------------------------------------------------------------ adtr-edge accept
def accept(registry: Registry, camera_id: str | None, seq: int | None, file: str | None, label: str,
           box: list[int] | None, by: str, anomalies: Path | None, note: str | None) -> dict[str, Any]:
    client = AgentClient.for_registry(registry)
    body = {"camera_id": camera_id, "seq": seq, "file": file, "label": label, "box": box, "by": by, "note": note}
    if client is not None:
        return dict(client.call("POST", "/v1/samples", {k: v for k, v in body.items() if v is not None}), via="agent")
    folder = anomalies or Path(agent_info(registry).get("anomalies") or "runs/agent/anomalies")
    if file is not None and Path(file).is_file() and camera_id is None:
        payload = Path(file)
        decision: dict[str, Any] = {}
        try:  # a file inside the anomaly folder keeps its decision; any other image is taken as it is
            payload, decision = find_saved_frame(folder, file=file)
        except LookupError:
            pass
    else:
        payload, decision = find_saved_frame(folder, camera_id, seq, file)
    return dict(accept_frame(SampleStore(registry.store_dir), payload, decision, label, by, box, note),
                via="store")


def accept_bulk(registry: Registry, request: dict[str, Any], by: str, anomalies: Path | None) -> dict[str, Any]:
    """Several saved frames in one call (see agent.learning.accept_many): through the running agent, else
    straight into the store."""
    client = AgentClient.for_registry(registry)
    body = {k: v for k, v in dict(request, by=by).items() if v is not None}
    if client is not None:
        return dict(client.call("POST", "/v1/samples", body), via="agent")
    folder = anomalies or Path(agent_info(registry).get("anomalies") or "runs/agent/anomalies")
    return dict(accept_many(SampleStore(registry.store_dir), folder, body, by), via="store")


# ------------------------------------------------------------------ adtr-edge retrain
def retrain_submit(registry: Registry, address: str | None, namespace: str | None, by: str,
                   overrides: list[str]) -> dict[str, Any]:
    client = AgentClient.for_registry(registry)
    if client is not None and address is None:
        return dict(client.call("POST", "/v1/retrain", {"by": by, "overrides": overrides}), via="agent")
    info = agent_info(registry)
    address = address or info.get("jobs")
    if not address:
        raise AgentError("no Ray Jobs address: start the agent on this registry, or pass --address "
                         "http://HEAD:8265 (a Ray head's dashboard)")
    return dict(submit_retrain(address, registry.root, namespace or info.get("namespace") or "adtr-edge", by,
                               overrides), via="ray")


def retrain_wait(address: str | None, submission_id: str, poll_s: float = 2.0, printer=print) -> dict[str, Any]:
    """Follow a retrain job until it ends, printing new log lines; returns its final info. `address`: the Ray
    Jobs address; None leaves it to Ray (RAY_ADDRESS, else a running cluster it finds)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    shown = 0
    while True:
        logs = client.get_job_logs(submission_id).splitlines()
        for line in logs[shown:]:
            printer(line)
        shown = len(logs)
        info = job_info(address, submission_id, log_tail=0)
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return info
        time.sleep(poll_s)


def retrain_overrides(overrides: list[str]) -> list[str]:
    """`retrain.epochs=3` is short for `learning.retrain.epochs=3`."""
    return [f"learning.{o}" if o.startswith("retrain.") else o for o in overrides]


def retrain_config(overrides: list[str]) -> RetrainConfig:
    from .settings import AgentSettings, load_settings

    return load_settings(overrides=retrain_overrides(overrides), kind=AgentSettings).learning.retrain
