"""A local Ray head node started with `ray start`, for an agent that needs Ray Jobs (retraining).

Why not `ray.init()`: Ray Jobs go through the head's dashboard agent, which `ray.init()` always binds
to port 52365; with a second Ray on the machine holding that port (another agent, a test run, a
notebook), job submission fails with "No available agent to submit job". `ray start --head
--dashboard-agent-listen-port=0` picks a free port instead. Token authentication stays on: a token file
is created (mode 0600) when there is none, since `ray start` enables token mode only if one exists.

The head runs in its own process group and gets SIGTERM when the agent process dies (PDEATHSIG), so
a killed agent leaves no cluster behind; `stop()` ends it by its group, never with `ray stop` (which
would stop every Ray on the machine).
"""
from __future__ import annotations

import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from .errors import AgentError
from .private import create_private

_PR_SET_PDEATHSIG = 1


def ensure_token() -> Path:
    """The Ray auth token file (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), created 0600 when missing."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    create_private(path, secrets.token_hex(32))
    os.chmod(path, 0o600)  # a token file Ray wrote itself is world-readable
    os.environ["RAY_AUTH_MODE"] = "token"  # clients (SDK, jobs) send the token only with this set
    _refresh_ray_auth()
    return path


def _refresh_ray_auth() -> None:
    """Ray reads RAY_AUTH_MODE and the token once, when first used; make this process see them now (what
    `ray.init()` itself does when it turns token mode on for a new local cluster)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # not in _raylet.pyi
    except ImportError:  # a Ray without token auth: nothing to refresh
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def free_port(preferred: int = 0) -> int:
    """`preferred` when nothing on this box listens there, else a free port the OS picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def memory_monitor_env(threshold: float) -> dict[str, str]:
    """What a raylet reads at start: the share of the node's memory above which Ray's memory monitor kills
    workers; 1.0 turns the monitor off."""
    env = {"RAY_memory_usage_threshold": str(threshold)}
    if threshold >= 1.0:
        env["RAY_memory_monitor_refresh_ms"] = "0"
    return env


def _stop_group(process: subprocess.Popen[bytes], log: IO[str], timeout_s: float) -> None:
    """Stop a `ray start --block` child: its process group (its own session, see _die_with_parent), killed
    if it outlives `timeout_s`; then close its log."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    log.close()


class LocalHead:
    """`ray start --head --block` as a child; `address` (GCS) and `dashboard` (Jobs API) once it is up."""

    def __init__(self, num_cpus: int | None = None, num_gpus: int | None = None, timeout_s: float = 120.0,
                 labels: dict[str, str] | None = None, object_store_bytes: int | None = None,
                 memory_usage_threshold: float | None = None, dashboard_port: int = 0):
        self.token_path = ensure_token()
        self.temp_dir = tempfile.mkdtemp(prefix="adtr-ray-")  # short: Ray's socket paths have a length limit
        self.log_path = Path(self.temp_dir) / "head.log"
        # Ray Jobs' usual port (8265, what `ray job submit` docs and users assume) when it is free here, else
        # any free one: `adtr-edge status --registry REG` prints the one in use.
        self.dashboard_port = free_port(dashboard_port)
        self.preferred_port = dashboard_port
        ray_cli = str(Path(sys.executable).with_name("ray"))
        args = [ray_cli if Path(ray_cli).exists() else "ray", "start", "--head", "--block", "--port=0",
                f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", "--dashboard-agent-listen-port=0",
                "--disable-usage-stats"]
        if num_cpus is not None:
            args.append(f"--num-cpus={num_cpus}")
        if num_gpus is not None:
            args.append(f"--num-gpus={num_gpus}")
        if object_store_bytes is not None:
            args.append(f"--object-store-memory={object_store_bytes}")
        if labels:
            args.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        self.log = open(self.log_path, "w")
        env = dict(os.environ, RAY_AUTH_MODE="token")
        if memory_usage_threshold is not None:
            env.update(memory_monitor_env(memory_usage_threshold))
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                        env=env)
        self.address = self._wait_for_address(timeout_s)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def _wait_for_address(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            found = re.search(r"--address='([^']+)'", text)
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise AgentError(f"`ray start --head` exited with code {self.process.returncode}: "
                                 f"{text.strip().splitlines()[-1] if text.strip() else 'no output'}")
            time.sleep(0.2)
        self.stop()
        raise AgentError(f"the Ray head did not start within {timeout_s:.0f} s (log: {self.log_path})")

    def stop(self, timeout_s: float = 30.0) -> None:
        _stop_group(self.process, self.log, timeout_s)


class LocalWorker:
    """A worker node joining a head on this machine (`ray start --address … --block`): how the tests
    build a two-node cluster on one box, and a recipe for adding a node by hand."""

    def __init__(self, head_address: str, num_cpus: int, labels: dict[str, str] | None = None):
        ensure_token()
        self.temp_dir = tempfile.mkdtemp(prefix="adtr-ray-w-")
        self.log_path = Path(self.temp_dir) / "worker.log"
        ray_cli = str(Path(sys.executable).with_name("ray"))
        args = [ray_cli if Path(ray_cli).exists() else "ray", "start", f"--address={head_address}", "--block",
                f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}", "--dashboard-agent-listen-port=0",
                "--disable-usage-stats"]
        if labels:
            args.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                        env=dict(os.environ, RAY_AUTH_MODE="token"))

    def stop(self, timeout_s: float = 30.0) -> None:
        _stop_group(self.process, self.log, timeout_s)  # as the head's: its process group, never `ray stop`
