"""`adtr-edge watch`: print live decisions from an agent's results socket, one line each."""
from __future__ import annotations

import json
import time

import zmq

from adtr_edge.actors.contract import parse_decision


def format_decision(d: dict) -> str:
    verdict = "ANOMALY" if d["is_anomaly"] else "ok     "
    regions = "; ".join(f"box {r['box']} peak {r['peak_normalized']:.2f}x" for r in d["regions"][:3])
    return (f"{d['camera_id']} #{d['seq']:<6d} {verdict} {d['normalized_score']:5.2f}x thr  "
            f"{d['latency_ms']:6.0f} ms  {regions}")


def subscribe(context: zmq.Context, endpoint: str, timeout_s: float = 30.0) -> zmq.Socket:
    """A SUB socket on the agent's decisions, returned once its connection is up. PUB drops what it
    sends before a subscription arrives (slow joiner): waiting for the handshake, then a moment for the
    subscription itself, keeps a subscriber started just before a camera from missing its first frames."""
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.rcvhwm = 0  # a subscriber that keeps up must not lose decisions to its own queue limit
    monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    socket.connect(endpoint)
    connected = monitor.poll(int(timeout_s * 1000)) != 0
    socket.disable_monitor()
    monitor.close()
    if connected:
        time.sleep(0.3)  # the subscription travels after the handshake
    return socket


def watch(endpoint: str, count: int = 0, anomalies_only: bool = False, as_json: bool = False) -> int:
    """Subscribe to `endpoint` and print decisions until `count` were printed (0: until interrupted)."""
    context = zmq.Context()
    socket = subscribe(context, endpoint)
    printed = 0
    try:
        while not count or printed < count:
            parts = socket.recv_multipart()
            if len(parts) != 2:
                continue
            decision = parse_decision(parts)
            if anomalies_only and not decision["is_anomaly"]:
                continue
            print(json.dumps(decision) if as_json else format_decision(decision), flush=True)
            printed += 1
    except KeyboardInterrupt:
        pass
    finally:
        socket.close(linger=0)
        context.term()
    return printed
