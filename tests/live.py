"""Helpers for tests of the running agent: an agent on loopback, a decision subscriber, accounting."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import zmq

from adtr_edge.actors.contract import parse_decision
from adtr_edge.agent.runner import Agent, totals
from adtr_edge.agent.settings import AgentSettings, load_settings
from adtr_edge.agent.waiting import wait_until
from adtr_edge.agent.watch import subscribe

ANY_PORT = "tcp://127.0.0.1:*"


def agent_config(tmp_path: Path, overrides: dict | None = None):
    base = {"http": {"enabled": False}, "output": {"dir": str(tmp_path / "anomalies")}, "drain_timeout_s": 20,
            "state_dir": str(tmp_path / "state")}
    for key, value in (overrides or {}).items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return load_settings(overrides=base, kind=AgentSettings)


@contextmanager
def live_agent(model_dir: Path, tmp_path: Path, endpoints: int = 1, **overrides):
    """A real agent (actors in the session's Ray) bound to free loopback ports."""
    agent = Agent(model_dir, [ANY_PORT] * endpoints, ANY_PORT, agent_config(tmp_path, overrides)).start()
    try:
        yield agent
    finally:
        agent.stop(drain=False)


class Decisions:
    """Subscribes to the results socket on a thread; decisions keyed by (camera_id, seq)."""

    def __init__(self, endpoint: str):
        self.by_key: dict[tuple[str, int], dict] = {}
        self.received_at: dict[tuple[str, int], float] = {}
        self.duplicates = 0
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = subscribe(self._context, endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            if self._socket.poll(100):
                parts = self._socket.recv_multipart()
                decision = parse_decision(parts)
                key = (decision["camera_id"], decision["seq"])
                self.duplicates += key in self.by_key
                self.by_key[key] = decision
                self.received_at[key] = time.time()

    def wait_for(self, count: int, timeout_s: float = 120.0) -> bool:
        return wait_until(lambda: len(self.by_key) >= count, timeout_s)

    def close(self):
        """Idempotent: the test's normal path and its clean-up on failure may both call it."""
        self._stop.set()
        self._thread.join(timeout=2)
        if not self._socket.closed:
            self._socket.close(linger=0)
            self._context.term()


def settled_totals(agent: Agent, timeout_s: float = 60.0) -> dict[str, dict]:
    """Per-camera totals once nothing is queued or in flight any more."""
    def current():
        snap = agent.snapshot(timeout_s=5)
        return totals([snap[k] for k in snap if k.startswith("ingest-") and snap[k]])

    wait_until(lambda: all(t["in_flight"] == 0 and t["queued"] == 0 for t in current().values()), timeout_s, 0.2)
    return current()


def accounted(t: dict) -> int:
    return t["processed"] + sum(t["dropped"].values()) + sum(t["invalid"].values())


class Streamer:
    """A camera on a thread: sends `frames` round-robin at `fps` until stopped; `sent` counts them."""

    def __init__(self, endpoint: str, camera: str, frames: list, fps: float = 10.0):
        from adtr_edge.agent.publisher import FramePublisher

        self.publisher = FramePublisher(endpoint, camera)
        self.frames, self.interval = frames, 1.0 / fps
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        i = 0
        while not self._stop.is_set():
            # never blocked for good: an agent that is gone (a failed test) must not keep this thread in a send
            # while stop() closes the socket; a frame not taken in time is offered again, and not counted sent
            if self.publisher.send(self.frames[i % len(self.frames)], timeout_ms=500) is not None:
                i += 1
            self._stop.wait(self.interval)

    @property
    def sent(self) -> int:
        return self.publisher.seq

    def stop(self) -> int:
        """Idempotent: the test's normal path and its clean-up on failure may both call it."""
        self._stop.set()
        self._thread.join(timeout=10)
        if not self._closed:
            self._closed = True
            self.publisher.close()
        return self.sent


def registry_with_base(model_dir: Path, root: Path, data):
    """A model registry serving `model_dir`, its training normals in the store as origin base."""
    from adtr_edge.agent.operate import import_base
    from adtr_edge.lifecycle.registry import Registry

    registry = Registry.create(root, model_dir, by="test")
    import_base(registry, str(data), "test")
    return registry


def versions_in_order(decisions: Decisions, camera: str) -> list[str]:
    """The model versions of a camera's decisions in seq order, runs collapsed: ["v1", "v2", "v1"]."""
    out: list[str] = []
    for key in sorted(k for k in decisions.by_key if k[0] == camera):
        version = decisions.by_key[key]["model_version"]
        if not out or out[-1] != version:
            out.append(version)
    return out
