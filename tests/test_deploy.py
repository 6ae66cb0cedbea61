"""What deploy/ ships, checked against the tools that will run it (no Docker engine or systemd here)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from agent.cli import build_parser
from agent.settings import AgentSettings, load_settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT = DEPLOY / "adtr-edge.service"


def _unit() -> dict[str, list[str]]:
    """The [Service] section: key → values, continuation lines joined."""
    text = UNIT.read_text().replace("\\\n", " ")
    section, out = None, {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_systemd_unit_rates_at_most_3_in_systemd_analyze_security(tmp_path):
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is needed to check the unit (Debian: apt install systemd)"
    copy = tmp_path / UNIT.name  # --offline reads the file as given
    copy.write_text(UNIT.read_text())
    result = subprocess.run([tool, "security", "--offline=true", str(copy)], capture_output=True, text=True,
                            timeout=60)
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert level, result.stdout[-2000:] + result.stderr[-2000:]
    assert float(level.group(1)) <= 3.0, result.stdout


def test_the_unit_drains_and_runs_the_registry_backed_agent_with_settings_that_exist(monkeypatch):
    unit = _unit()
    assert unit["KillMode"] == ["mixed"]  # SIGTERM to the agent alone: it drains, then stops its Ray head
    assert int(unit["TimeoutStopSec"][0]) > 30  # more than the agent's drain_timeout_s
    argv = shlex.split(unit["ExecStart"][0])
    assert argv[0].endswith("/adtr-edge")
    args = build_parser().parse_args(argv[1:])  # every flag the unit passes is one the CLI has
    assert args.command == "run" and str(args.model).endswith("/registry")
    for env in unit["Environment"]:
        key, _, value = env.partition("=")
        monkeypatch.setenv(key, value)
    cfg = load_settings(kind=AgentSettings)  # every ADTR_EDGE_ variable it sets is a setting
    assert str(cfg.state_dir) == "/var/lib/adtr-edge/state" and str(cfg.output.dir).startswith("/var/lib/adtr-edge")
    assert all(p.startswith("/var/lib/adtr-edge") for p in unit["ReadWritePaths"])
