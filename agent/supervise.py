"""The running agent's lifecycle: start, announce, serve until SIGINT/SIGTERM, then drain and flush."""
from __future__ import annotations

import json
import signal
import threading

import structlog

from .console import start_console
from .http import start_http
from .runner import Agent, totals

log = structlog.get_logger(__name__)


def serve_until_signal(agent: Agent) -> int:
    """Start, serve until SIGINT/SIGTERM, then drain and flush. Returns the process exit code."""
    stop = threading.Event()
    agent.start()
    # After ray.init: Ray installs its own SIGTERM handler there, which would end us without a drain.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.set())
    server = start_http(agent) if agent.cfg.http.enabled else None
    console = start_console(agent, server.cache if server else None)
    agent.announce(server.url if server else None, server.token_file if server else None)
    print(json.dumps({"event": "agent ready", "ingest": agent.ingest_endpoints, "results": agent.results_endpoint,
                      "bound_ingest": agent.bound_ingest, "bound_results": agent.bound_results,
                      "model_version": agent.model_version, "registry": str(agent.registry.root) if agent.registry
                      else None, "http": server.port if server else None, "jobs": agent.jobs_address,
                      "console": console.url if console else None, "nodes": agent.nodes}), flush=True)
    while not stop.wait(1.0):
        pass
    log.info("stopping: draining frames in flight", timeout_s=agent.cfg.drain_timeout_s)
    final = agent.stop(drain=True)
    if server is not None:
        server.shutdown()
    if console is not None:
        console.shutdown()
    print(json.dumps({"event": "agent stopped", "cameras": totals(final.get("ingest", []))}), flush=True)
    return 0
