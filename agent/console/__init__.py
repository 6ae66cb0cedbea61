"""The operator console: a web page served by the agent on its own port (`console.host`:`console.port`,
127.0.0.1:9109 by default) to watch the line (Live), review decisions and label frames (Review), and
manage model versions and retraining (Models). Flask (the framework the agent's HTTP side already
uses: routing, Jinja templates with autoescaping, signed session cookies; Flask-WTF for CSRF), served by
waitress like /metrics; every script, style sheet and image comes from the agent itself (no CDN, no
external font): edge boxes are offline.
"""
from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import structlog
from waitress.server import create_server

from .auth import read_users

log = structlog.get_logger(__name__)


def console_files(cfg, registry) -> tuple[Path, Path]:
    """(users file, audit file) for these agent settings and registry (None: a plain model folder)."""
    console = cfg.console
    base = (registry.root if registry is not None else Path(cfg.state_dir).expanduser()) / "console"
    users = Path(console.users_file).expanduser() if console.users_file else base / "users.json"
    audit = Path(console.audit_file).expanduser() if console.audit_file else users.parent / "audit.jsonl"
    return users, audit


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _proxy(cfg) -> dict:
    """waitress' own reverse-proxy handling: from `console.trusted_proxy` only, the client's address comes from
    X-Forwarded-For (`trusted_proxy_count` hops from the right); from anyone else the header is dropped."""
    if cfg.trusted_proxy is None:
        return {}
    return {"trusted_proxy": cfg.trusted_proxy, "trusted_proxy_count": cfg.trusted_proxy_count,
            "trusted_proxy_headers": {"x-forwarded-for"}, "clear_untrusted_proxy_headers": True}


class ConsoleServer:
    """waitress on its own thread and port; `url` is the address really bound (port 0 = any free one)."""

    def __init__(self, agent, cache, users_file: Path, audit_file: Path, own_cache: bool = False):
        from .app import create_console_app

        cfg = agent.cfg.console
        self.cache, self.own_cache = cache, own_cache
        self.users_file, self.audit_file = users_file, audit_file
        self.app = create_console_app(agent, cache, users_file, audit_file)
        self.server = create_server(
            self.app, host=cfg.host, port=cfg.port, threads=cfg.threads, connection_limit=cfg.connection_limit,
            channel_timeout=cfg.request_timeout_s, cleanup_interval=max(1, int(cfg.request_timeout_s / 4)),
            max_request_header_size=16 << 10, max_request_body_size=16 << 20, ident="adtr-edge-console",
            expose_tracebacks=False, **_proxy(cfg))
        self.port = self.server.effective_port
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.run, name="console", daemon=True)
        self.thread.start()
        if not is_loopback(cfg.host):
            log.warning("the console listens beyond this box (console.host is not a loopback address): put it "
                        "behind TLS and set console.secure_cookies", host=cfg.host)
        log.info("console listening", url=self.url, users=str(users_file))

    def shutdown(self) -> None:
        self.app.extensions["adtr_console"]["live"].stop.set()
        if self.own_cache:
            self.cache.stop.set()
        self.server.close()


def start_console(agent, cache=None) -> ConsoleServer | None:
    """The console, when enabled and a user exists; else None, with a log line saying how to add one."""
    if not agent.cfg.console.enabled:
        return None
    users_file, audit_file = console_files(agent.cfg, agent.registry)
    if not read_users(users_file):
        where = f"--registry {agent.registry.root}" if agent.registry is not None else f"--users-file {users_file}"
        log.warning("console not started: no users yet; add one with "
                    f"`adtr-edge console add-user {where} NAME --role operator`", users_file=str(users_file))
        return None
    own = cache is None
    if own:  # the agent serves no /metrics: the console takes its own snapshots
        from ..http import SnapshotCache

        cache = SnapshotCache(agent, agent.cfg.http.snapshot_s)
    try:
        return ConsoleServer(agent, cache, users_file, audit_file, own_cache=own)
    except OSError as exc:  # e.g. the port is taken: the line keeps running, without its console
        if own:
            cache.stop.set()
        log.error("console not started: cannot listen", host=agent.cfg.console.host, port=agent.cfg.console.port,
                  error=str(exc))
        return None
