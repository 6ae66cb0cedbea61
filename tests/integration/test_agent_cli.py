"""The streaming commands as a user runs them: `adtr-edge run`, `publish`, `keys`, `demo`."""
from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest

from conftest import MAGNETIC_TILE, ROOT

pytestmark = pytest.mark.usefixtures("magnetic_tile")  # real data; skipped, and said, without it


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adtr_edge.agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args,expected", [
    (["run", "--model", "/no/such/model", "--ingest", "tcp://127.0.0.1:*", "--results", "tcp://127.0.0.1:*"],
     "/no/such/model"),
    (["run", "--model", "/no/such/model", "--ingest", "tcp://127.0.0.1:*", "--results", "tcp://127.0.0.1:*",
      "--set", "ingest.mode=sometimes"], "ingest.mode"),
    (["run", "--model", "/no/such/model", "--ingest", "x", "--results", "y", "--set", "inference.max_batch=0"],
     "inference.max_batch"),
    (["publish", "--source", "/no/such/folder", "--endpoint", "tcp://127.0.0.1:1", "--camera-id", "c"],
     "/no/such/folder"),
])
def test_bad_input_to_the_streaming_commands_exits_2_with_one_clear_line(args, expected):
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"adtr-edge {args[0]}: error:") and expected in lines[-1]


def test_keys_creates_a_curve_key_pair_with_a_private_secret(tmp_path):
    result = cli("keys", "--out", str(tmp_path), "--name", "camera-7")
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout)
    secret = tmp_path / "camera-7.key_secret"
    assert paths["secret"] == str(secret) and (tmp_path / "camera-7.key").is_file()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" in secret.read_text() and "secret-key" not in (tmp_path / "camera-7.key").read_text()


@pytest.mark.slow
def test_demo_runs_agent_and_camera_as_processes_and_every_frame_is_decided(trained_model, tmp_path):
    """`adtr-edge demo`: `adtr-edge run` + `adtr-edge publish` subprocesses, SIGTERM drain at the end."""
    result = cli("demo", "--model", str(trained_model), "--data", str(MAGNETIC_TILE), "--out", str(tmp_path),
                 timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + (tmp_path / "agent.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frames_sent"] == summary["frames_decided"] > 20
    camera = summary["agent_accounting"]["demo-cam"]
    assert camera["processed"] == summary["frames_sent"] and not camera["dropped"] and not camera["invalid"]
    assert summary["live_image_auroc"] > 0.6
    assert summary["inference"]["batch"] >= 1 and summary["inference"]["threads"] >= 1  # what it served with
    assert "live demo summary" in result.stdout and "#   0" in result.stdout
    assert f"inference: batch {summary['inference']['batch']} ×" in result.stdout
