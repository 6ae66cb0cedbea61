"""What deploy/ ships, checked against the tools that will run it (no Docker engine or systemd here)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from adtr_edge.agent.cli import build_parser
from adtr_edge.agent.settings import AgentSettings, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
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


def dashboard_metrics() -> set[str]:
    """Every metric the provisioned Grafana dashboard queries (checked against a live agent's /metrics in
    tests/integration/test_agent.py)."""
    import json

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "adtr-edge.json").read_text())
    return {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"\badtr_[a-z_]+", target["expr"])}


def alert_metrics() -> set[str]:
    """Every metric the alert rules (deploy/prometheus-rules.yml) query (checked live in
    tests/integration/test_agent.py)."""
    rules = yaml.safe_load((DEPLOY / "prometheus-rules.yml").read_text())
    return {name for group in rules["groups"] for rule in group["rules"]
            for name in re.findall(r"\badtr_[a-z_]+", rule["expr"])}


def test_the_alert_rules_are_well_formed_and_loaded_by_both_prometheus_configs():
    rules = yaml.safe_load((DEPLOY / "prometheus-rules.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names)) >= 8 and alert_metrics()
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        assert rule["expr"].count("(") == rule["expr"].count(")")
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
    assert "prometheus-rules.yml" in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["rule_files"][0]
    compose = (DEPLOY / "docker-compose.yml").read_text()
    mounted = re.search(r"\./prometheus-rules\.yml:(\S+):ro", compose).group(1)
    assert yaml.safe_load((DEPLOY / "prometheus-compose.yml").read_text())["rule_files"] == [mounted]


def test_the_dashboard_is_provisioned_with_its_datasource():
    import json

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "adtr-edge.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {"prometheus"} and dashboard_metrics()
    provisioned = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "uid: prometheus" in provisioned
    assert "/var/lib/grafana/dashboards" in (DEPLOY / "grafana" / "provisioning" / "dashboards" /
                                             "adtr-edge.yml").read_text()


def test_the_image_recipe_installs_dependencies_before_sources_and_runs_unprivileged_under_an_init():
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
             if line.strip() and not line.strip().startswith("#")]
    copies = [i for i, line in enumerate(lines) if line.startswith("COPY ")]
    deps = next(i for i, line in enumerate(lines) if line.startswith("RUN") and "pip install --no-cache-dir ." in line)
    assert lines[copies[0]].startswith("COPY pyproject.toml") and copies[0] < deps < copies[1]
    user = next(line for line in lines if line.startswith("USER "))
    assert user.split()[1] not in ("root", "0")
    assert any(line.startswith("ENTRYPOINT") and "tini" in line for line in lines)
    health = next(line for line in lines if line.startswith("HEALTHCHECK"))
    assert "--start-period=" in health
    assert "9109" in next(line for line in lines if line.startswith("EXPOSE"))
    ignored = (DEPLOY.parent / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
    compose = (DEPLOY / "docker-compose.yml").read_text()
    assert "/var/lib/adtr-edge" in compose and "prometheus" in compose and "grafana" in compose
