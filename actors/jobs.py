"""Retrain submissions as Ray jobs: one entrypoint, deterministic ids, one retrain at a time.

Used by `adtr-edge retrain --submit`, the agent's HTTP API and its schedule. The submission id is
`retrain-<store fingerprint>`: two triggers for the same data at once produce the same id, and Ray
refuses the second ("already exists"); a retry of a finished one gets `-2`, `-3`, …. A trigger while
any retrain job is pending or running is refused with its id; the job itself also takes the
registry's retrain lock, which catches the rest.
"""
from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adtr_edge.lifecycle.samples import SampleStore

from .retrain import RetrainBusy

ACTIVE = ("PENDING", "RUNNING")


def retrain_entrypoint(registry: str | Path, namespace: str, by: str, overrides: Sequence[str] = (),
                       python: str = sys.executable) -> str:
    """The job's shell command: this interpreter (a job's shell may not have the venv's `python`)."""
    args = [python, "-m", "adtr_edge.agent.cli", "--log-json", "retrain", "--registry", str(Path(registry).resolve()),
            "--namespace", namespace, "--by", by]
    for override in overrides:
        args += ["--set", override]
    return shlex.join(args)


def _status(job) -> str:
    return str(getattr(job.status, "value", job.status)).rsplit(".", 1)[-1]


def active_retrains(jobs) -> list[Any]:
    return [j for j in jobs if (j.submission_id or "").startswith("retrain-") and _status(j) in ACTIVE]


def submit_retrain(address: str, registry: str | Path, namespace: str, by: str,
                   overrides: Sequence[str] = ()) -> dict[str, Any]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    # One listing decides both questions. Two listings (active jobs, then taken ids) let a trigger that
    # listed before another's submission and took its ids after it pick `-2` beside a running job.
    jobs = client.list_jobs()
    running = active_retrains(jobs)
    if running:
        raise RetrainBusy(f"retrain job {running[0].submission_id} is {_status(running[0]).lower()}; "
                          "one retrain at a time (see `ray job status` / `adtr-edge retrain --status`)")
    store = SampleStore(Path(registry) / "store")
    base = f"retrain-{store.snapshot().fingerprint[:12]}"
    taken = {j.submission_id for j in jobs}
    submission_id, attempt = base, 1
    while submission_id in taken:
        attempt += 1
        submission_id = f"{base}-{attempt}"
    entrypoint = retrain_entrypoint(registry, namespace, f"{by} (job {submission_id})", list(overrides))
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                          metadata={"by": by, "registry": str(Path(registry).resolve())},
                          runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    except RuntimeError as exc:
        if "already exists" in str(exc):
            raise RetrainBusy(f"retrain {submission_id} was submitted by another trigger at the same time") from None
        raise
    return {"submission_id": submission_id, "entrypoint": entrypoint, "address": address}


def stop_retrains(address: str, registry: str | Path) -> list[str]:
    """Stop the active retrain jobs of one registry (its inspection point is removed); their ids."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    root = str(Path(registry).resolve())
    ours = [j.submission_id for j in active_retrains(client.list_jobs()) if (j.metadata or {}).get("registry") == root]
    for submission_id in ours:
        client.stop_job(submission_id)
    return ours


def job_info(address: str | None, submission_id: str, log_tail: int = 40) -> dict[str, Any]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    info = client.get_job_info(submission_id)
    logs = client.get_job_logs(submission_id).splitlines()
    return {"submission_id": submission_id, "status": _status(info), "message": info.message,
            "start_time": info.start_time, "end_time": info.end_time, "log_tail": logs[-log_tail:]}
