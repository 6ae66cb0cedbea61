"""Hostile and broken cameras against the running agent: real ZeroMQ sockets on loopback, real Ray
actors, a real trained model, real Magnetic Tile frames. Each test is a promise that held against
every attack tried: the books close exactly (per camera label and per reason), /metrics stays readable
by prometheus_client's own parser, every decision is strict JSON, and memory stays within a bound
computed from the settings. Waits are for progress (counters, decisions), never fixed sleeps.
"""
from __future__ import annotations

import json
import random
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from adtr_edge.actors.config import OutputConfig
from adtr_edge.actors.contract import MAX_SAFE_INT
from adtr_edge.actors.scoring import ScoringActor

from hostile import StrictDecisions, corrupt_jpegs, flat_jpeg, malformed, metric, parse_metrics, push_socket, scrape
from live import live_agent, wait_until

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def jpeg(test_images):
    data = test_images[0].read_bytes()
    height, width = cv2.imread(str(test_images[0])).shape[:2]
    return data, width, height


@pytest.fixture(scope="module")
def anomalous_jpeg(trained_model, test_images):
    """A real test frame the model flags (what `adtr-edge predict` decides for it)."""
    from adtr_edge.model.data import read_image
    from adtr_edge.model.detector import load_detector

    detector = load_detector(trained_model)
    scores = detector.score_images([read_image(p) for p in test_images])
    flagged = [p for p, a in zip(test_images, scores.is_anomaly) if bool(a)]
    assert flagged, "the model flags none of 24 real test frames; the test needs one"
    height, width = cv2.imread(str(flagged[0])).shape[:2]
    return flagged[0].read_bytes(), width, height


def _header(camera: str, seq, width: int, height: int, ts=None, **extra) -> bytes:
    header = {"v": 1, "camera_id": camera, "seq": seq, "ts": time.time() if ts is None else ts, "encoding": "jpeg",
              "width": width, "height": height, **extra}
    return json.dumps(header).encode()


def _camera_totals(agent) -> dict[str, dict]:
    """Per label: the ingest's books, with the sequence/clock events."""
    snap = agent.snapshot(timeout_s=5)
    out: dict[str, dict] = {}
    for name, ingest in snap.items():
        if name.startswith("ingest-") and ingest:
            for camera, s in ingest["cameras"].items():
                t = out.setdefault(camera, {"received": 0, "processed": 0, "queued": 0, "in_flight": 0,
                                            "dropped": {}, "invalid": {}, "events": {}})
                for key in ("received", "processed", "queued", "in_flight"):
                    t[key] += s[key]
                for key in ("dropped", "invalid", "events"):
                    for reason, n in s[key].items():
                        t[key][reason] = t[key].get(reason, 0) + n
    return out


def _received(agent) -> int:
    return sum(t["received"] for t in _camera_totals(agent).values())


def _settled(agent, received: int, timeout_s: float = 120.0) -> dict[str, dict]:
    """The books once `received` messages are counted and nothing is queued or in flight."""
    def done():
        totals = _camera_totals(agent)
        return sum(t["received"] for t in totals.values()) >= received and \
            all(t["queued"] == 0 and t["in_flight"] == 0 for t in totals.values())

    assert wait_until(done, timeout_s, 0.2), f"the agent did not count {received} messages: {_camera_totals(agent)}"
    return _camera_totals(agent)


def _scrape_when(base: str, predicate, timeout_s: float = 60.0) -> dict:
    """/metrics parsed strictly, once the snapshot it answers from shows what `predicate` wants."""
    latest: dict = {}

    def ready():
        nonlocal latest
        latest = parse_metrics(scrape(base))
        return predicate(latest)

    assert wait_until(ready, timeout_s, 0.3), "metrics never showed the expected state"
    return latest


def _http(agent):
    from adtr_edge.agent.http import start_http

    return start_http(agent)


# ------------------------------------------------------------------ sequence numbers and huge numbers
def test_huge_and_broken_sequence_numbers_neither_blind_the_metrics_nor_poison_the_books(trained_model, tmp_path,
                                                                                          jpeg):
    payload, w, h = jpeg
    bad = corrupt_jpegs(payload)["half_with_eoi"]
    with live_agent(trained_model, tmp_path, http={"enabled": True, "port": 0}, ingest={"max_seq_gap": 1000},
                    output={"save_anomalies": False}) as agent:
        server = _http(agent)
        decisions = StrictDecisions(agent.bound_results)
        context = zmq.Context()
        camera = push_socket(context, agent.bound_ingest[0])
        # A peer with no label: seq 10**400 (once a 401-digit counter that killed /metrics), seq 2**70.
        camera.send_multipart([json.dumps({"v": 1, "camera_id": "probe", "seq": 10**400}).encode(), payload])
        camera.send_multipart([_header("probe", 2**70, w, h), bad])
        # A camera whose sequence does everything: +1, a jump of 10^9, a restart, a repeat, a real gap of 3.
        plan = [0, 1, 10**9 + 2, 10**9 + 3, 5, 5, 6, 10]
        for seq in plan:
            camera.send_multipart([_header("jumpy", seq, w, h), payload])
        camera.send_multipart([_header("jumpy", 11, w, h), bad])  # refused at decode, its seq still counts
        camera.send_multipart([_header("jumpy", 12, w, h), payload])
        camera.send_multipart([_header("jumpy", MAX_SAFE_INT, w + 1, h), payload])  # refused, a jump
        camera.send_multipart([_header("jumpy", 13, w, h), payload])  # back: a restart
        books = _settled(agent, 2 + len(plan) + 4)
        samples = _scrape_when(server.url, lambda m: metric(m, "adtr_frames_processed_total", camera="jumpy") == 10)
        assert wait_until(lambda: decisions.count("jumpy") == 10, 30)
        server.shutdown()
        camera.close()
        context.term()
        decisions.close()
    assert set(books) == {"_unknown", "jumpy"}, "a refused frame claimed a label"
    assert books["_unknown"]["invalid"] == {"header_schema": 2}  # both seqs are beyond 2**53
    jumpy = books["jumpy"]
    assert jumpy["received"] == 12 and jumpy["processed"] == 10
    assert jumpy["invalid"] == {"decode": 1, "dimension_mismatch": 1}
    assert jumpy["dropped"] == {"upstream_gap": 3}, "only the real gap (7, 8, 9) is a loss"
    assert jumpy["events"] == {"jump": 2, "restart": 2, "repeat": 1}
    # sent by the camera = 12 messages + 3 lost on the way = processed + dropped + invalid
    assert 12 + 3 == jumpy["processed"] + sum(jumpy["dropped"].values()) + sum(jumpy["invalid"].values())
    assert metric(samples, "adtr_frames_dropped_total", camera="jumpy", reason="upstream_gap") == 3
    assert metric(samples, "adtr_camera_faults_total", camera="jumpy", kind="jump") == 2
    assert metric(samples, "adtr_camera_faults_total", camera="jumpy", kind="repeat") == 1
    assert metric(samples, "adtr_camera_faults_total", camera="jumpy", kind="restart") == 2
    assert metric(samples, "adtr_frames_invalid_total", camera="_unknown", reason="header_schema") == 2
    assert not decisions.not_json


# ------------------------------------------------------------------ labels
def test_refused_frames_claim_no_camera_label_so_a_real_camera_keeps_its_own(trained_model, tmp_path, jpeg):
    payload, w, h = jpeg
    with live_agent(trained_model, tmp_path, ingest={"max_cameras": 4}, output={"save_anomalies": False}) as agent:
        decisions = StrictDecisions(agent.bound_results)
        context = zmq.Context()
        spray = push_socket(context, agent.bound_ingest[0])
        for i in range(300):  # each names a new camera, each is refused (its size lies)
            spray.send_multipart([_header(f"spray-{i}", 0, w + 1, h), payload])
        spray.send_multipart([_header("cam\n", 0, w, h), payload])  # `$` matched before the newline once
        spray.send_multipart([_header("cam", 0, w, h, v=True), payload])
        real = push_socket(context, agent.bound_ingest[0])
        for i in range(5):  # real-4 is the fifth camera: beyond max_cameras 4
            for seq in (0, 1, 3):  # seq 2 never arrives
                real.send_multipart([_header(f"real-{i}", seq, w, h), payload])
        books = _settled(agent, 302 + 15)
        assert wait_until(lambda: decisions.count() == 15, 60)
        for s in (spray, real):
            s.close()
        context.term()
        decisions.close()
    assert set(books) == {"_unknown", "real-0", "real-1", "real-2", "real-3", "_overflow"}
    assert books["_unknown"]["invalid"] == {"dimension_mismatch": 300, "header_schema": 2}
    for i in range(4):
        t = books[f"real-{i}"]
        assert t["processed"] == 3 and t["dropped"] == {"upstream_gap": 1}, t
    assert books["_overflow"]["processed"] == 3 and not books["_overflow"]["dropped"]  # seqs mean nothing there


def test_with_allowed_cameras_only_known_cameras_get_labels(trained_model, tmp_path, jpeg):
    payload, w, h = jpeg
    bad = corrupt_jpegs(payload)["sof_6000"]
    with live_agent(trained_model, tmp_path, ingest={"allowed_cameras": ["line-a"]},
                    output={"save_anomalies": False}) as agent:
        decisions = StrictDecisions(agent.bound_results)
        context = zmq.Context()
        sock = push_socket(context, agent.bound_ingest[0])
        for i in range(50):
            sock.send_multipart([_header(f"intruder-{i}", 0, w, h), payload])  # valid, but not allowed
        sock.send_multipart([_header("line-a", 0, 6000, 6000), bad])  # a known camera's first frame is corrupt
        for seq in (1, 2):
            sock.send_multipart([_header("line-a", seq, w, h), payload])
        books = _settled(agent, 53)
        assert wait_until(lambda: decisions.count("line-a") == 2, 60)
        sock.close()
        context.term()
        decisions.close()
    assert set(books) == {"_unknown", "line-a"}
    assert books["_unknown"]["invalid"] == {"unknown_camera": 50}
    assert books["line-a"]["invalid"] == {"decode": 1} and books["line-a"]["processed"] == 2
    assert not books["line-a"]["dropped"]
    assert decisions.count() == 2


# ------------------------------------------------------------------ memory
def _vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)


def test_a_message_part_over_max_payload_is_never_received_whole(trained_model, tmp_path, jpeg):
    payload, w, h = jpeg
    max_payload = 1 << 20
    ingest_cfg = {"max_payload_bytes": max_payload, "max_pixels": 1_000_000}
    with live_agent(trained_model, tmp_path, ingest=ingest_cfg, output={"save_anomalies": False}) as agent:
        from adtr_edge.agent.settings import AgentConfig

        snap = agent.snapshot(timeout_s=5)
        pid = snap["ingest-0"]["pid"]
        cfg = AgentConfig.model_validate({"ingest": ingest_cfg}).ingest
        bound = cfg.memory_bound(image_size=128, cameras=2)["total"]
        decisions = StrictDecisions(agent.bound_results)
        context = zmq.Context()
        baseline = _vm(pid, "VmRSS")
        _reset_peak(pid)
        attacker = push_socket(context, agent.bound_ingest[0], sndhwm=1)
        huge = bytes(200 << 20)
        attacker.send_multipart([_header("big", 0, w, h), huge], copy=False)
        assert wait_until(lambda: agent.snapshot(timeout_s=5)["ingest-0"]["peers"].get("disconnected", 0) >= 1, 60), \
            "ZeroMQ did not drop the peer"
        attacker.close()
        del huge
        # A message of 3 parts whose first is 4 MiB of JSON naming a camera: refused as `parts`, never parsed.
        other = push_socket(context, agent.bound_ingest[0])
        other.send_multipart([json.dumps({"camera_id": "named", "pad": "x" * (max_payload - 100)}).encode(),
                              payload, b"x"])
        other.send_multipart([_header("after", 0, w, h), payload])
        books = _settled(agent, 2)
        assert wait_until(lambda: decisions.count("after") == 1, 60)
        peak = _vm(pid, "VmHWM")
        other.close()
        context.term()
        decisions.close()
    print(f"ingest RSS {baseline / 2**20:.0f} MB, peak during the attack {peak / 2**20:.0f} MB, "
          f"bound from the settings +{bound / 2**20:.0f} MB (a 200 MiB part was sent)")
    assert "big" not in books and books["_unknown"]["invalid"] == {"parts": 1}
    assert books["after"]["processed"] == 1
    assert peak - baseline <= bound


def test_an_unlisted_peer_is_refused_in_the_handshake_before_any_of_its_parts_is_read(trained_model, tmp_path, jpeg):
    """The multipart attack (300 parts of 1 MiB, each within max_payload_bytes) from an address not in
    ingest.allowed_peers: ZAP refuses the handshake, so ZeroMQ never assembles the message; a camera
    connecting from a listed address (127.0.0.2, a loopback alias) is decided as usual."""
    payload, w, h = jpeg
    ingest_cfg = {"max_payload_bytes": 1 << 20, "allowed_peers": ["127.0.0.2"]}
    with live_agent(trained_model, tmp_path, ingest=ingest_cfg, output={"save_anomalies": False}) as agent:
        pid = agent.snapshot(timeout_s=5)["ingest-0"]["pid"]
        decisions = StrictDecisions(agent.bound_results)
        context = zmq.Context()
        baseline = _vm(pid, "VmRSS")
        _reset_peak(pid)
        attacker = push_socket(context, agent.bound_ingest[0])  # from 127.0.0.1: not listed
        parts = [_header("attacker", 0, w, h)] + [bytes(1 << 20)] * 300
        sender = threading.Thread(target=lambda: attacker.send_multipart(parts, copy=False), daemon=True)
        sender.start()
        assert wait_until(lambda: agent.snapshot(timeout_s=5)["ingest-0"]["peers"].get("auth_failed", 0) >= 1, 60), \
            agent.snapshot(timeout_s=5)["ingest-0"]["peers"]
        port = agent.bound_ingest[0].rsplit(":", 1)[1]
        camera = push_socket(context, f"tcp://127.0.0.2:0;127.0.0.1:{port}")  # source address ; destination
        camera.send_multipart([_header("listed", 0, w, h), payload])
        assert wait_until(lambda: decisions.count("listed") == 1, 60)
        peak = _vm(pid, "VmHWM")
        books = _settled(agent, 1)
        for s in (attacker, camera):
            s.close()
        context.term()
        decisions.close()
    print(f"ingest RSS {baseline / 2**20:.0f} MB, peak {peak / 2**20:.0f} MB while an unlisted peer sent 300 MiB")
    assert peak - baseline < 10 << 20
    assert "attacker" not in books and books["listed"]["processed"] == 1


# ------------------------------------------------------------------ decode amplification
def test_a_camera_of_huge_frames_does_not_hold_back_another_camera(trained_model, tmp_path, test_images):
    """Eight small JPEGs that decode to 6000x6000 each (within max_pixels) once took another camera from
    0.07 s to 10.7 s: decoded one after the other on one thread, drawn full size by scoring. Now a
    camera's chunk stops at decode_budget_pixels, decoders are shared fairly and overlays are small,
    so the light camera's frames are all decided while the heavy camera is still being decoded."""
    heavy_jpeg = flat_jpeg(6000, 6000)
    light = [(p.read_bytes(), *cv2.imread(str(p)).shape[1::-1]) for p in test_images[:8]]
    with live_agent(trained_model, tmp_path, output={"overlay_max_side": 512}) as agent:
        decisions = StrictDecisions(agent.bound_results)
        context = zmq.Context()
        heavy = push_socket(context, agent.bound_ingest[0])
        for seq in range(8):
            heavy.send_multipart([_header("heavy", seq, 6000, 6000), heavy_jpeg])
        assert wait_until(lambda: _camera_totals(agent).get("heavy", {}).get("received", 0) == 8, 60)
        victim = push_socket(context, agent.bound_ingest[0])
        for seq, (data, w, h) in enumerate(light):
            victim.send_multipart([_header("light", seq, w, h), data])
        assert wait_until(lambda: decisions.count("heavy") == 8 and decisions.count("light") == 8, 180)
        for s in (heavy, victim):
            s.close()
        context.term()
        decisions.close()
    light_done = max(d["_received_at"] for d in decisions.of("light"))
    heavy_times = sorted(d["_received_at"] for d in decisions.of("heavy"))
    light_agent_ms = max(d["agent_ms"] for d in decisions.of("light"))
    heavy_span_ms = (heavy_times[-1] - min(heavy_times[0], light_done)) * 1000
    print(f"light camera: slowest agent_ms {light_agent_ms:.0f}; heavy camera's 8 frames decided over "
          f"{heavy_span_ms:.0f} ms; light done before heavy frame #{sum(t < light_done for t in heavy_times) + 1}")
    assert light_done < heavy_times[-1], "the light camera waited for the heavy camera's backlog"
    for d in decisions.of("heavy"):
        if d.get("files"):
            overlay = cv2.imread(d["files"]["_overlay.png"])
            assert overlay.shape[0] <= 512 and overlay.shape[1] <= 2 * 512


def test_an_anomaly_overlay_of_a_huge_frame_is_drawn_at_a_bounded_size(trained_model, tmp_path):
    """The scoring actor's save path, in-process: a 6000x6000 JPEG anomaly costs a small overlay."""
    scoring = ScoringActor(str(trained_model), "tcp://127.0.0.1:*",
                           OutputConfig(dir=tmp_path / "anomalies", overlay_max_side=800))
    try:
        big = flat_jpeg(6000, 4000)
        header = {"camera_id": "huge", "seq": 3, "ts": time.time(), "encoding": "jpeg", "width": 6000,
                  "height": 4000, "v": 1}
        amap = np.zeros((128, 128), np.float32)
        amap[40:60, 40:60] = 10.0
        decision = {"normalized_score": 2.0, "threshold": 1.0, "camera_id": "huge", "seq": 3}
        files = scoring._save(header, decision, amap, big, time.time())
        overlay = cv2.imread(files["_overlay.png"])
        assert overlay.shape[:2] == (533, 1600)  # frame | heatmap, each 800 x 533
        assert Path(files[".jpg"]).read_bytes() == big  # the camera's own bytes, full size
    finally:
        scoring.socket.close(linger=0)


# ------------------------------------------------------------------ clocks, strict JSON, the anomaly store
def test_implausible_clocks_are_counted_and_decisions_stay_strict_json(trained_model, tmp_path, jpeg,
                                                                      anomalous_jpeg):
    payload, w, h = jpeg
    flagged, fw, fh = anomalous_jpeg
    with live_agent(trained_model, tmp_path, http={"enabled": True, "port": 0}) as agent:
        server = _http(agent)
        decisions = StrictDecisions(agent.bound_results)
        context = zmq.Context()
        sock = push_socket(context, agent.bound_ingest[0])
        for seq in range(3):
            sock.send_multipart([_header("ms-clock", seq, w, h, ts=time.time() * 1000), payload])
            sock.send_multipart([_header("far-future", seq, w, h, ts=float(MAX_SAFE_INT)), payload])
            sock.send_multipart([_header("epoch", seq, w, h, ts=0), payload])
            sock.send_multipart([_header("good-clock", seq, w, h), payload])
        fixed_ts = time.time()
        for _ in range(3):  # the same anomalous frame three times: same camera, seq and ts
            sock.send_multipart([_header("dup", 7, fw, fh, ts=fixed_ts), flagged])
        _settled(agent, 15)
        assert wait_until(lambda: decisions.count() == 15, 60)
        books = _camera_totals(agent)
        samples = _scrape_when(server.url, lambda m: metric(m, "adtr_frames_processed_total", camera="dup") == 3
                               and metric(m, "adtr_camera_faults_total", camera="epoch", kind="clock") == 3)
        store_dir = tmp_path / "anomalies"

        def on_disk() -> int:  # read again each scrape: sampled normals are written by their own thread
            return sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file())

        _scrape_when(server.url, lambda m: metric(m, "adtr_anomaly_store_bytes") == on_disk())  # what is on disk
        server.shutdown()
        sock.close()
        context.term()
        decisions.close()
    assert not decisions.not_json
    for camera in ("ms-clock", "far-future", "epoch"):
        assert books[camera]["events"] == {"clock": 3} and books[camera]["processed"] == 3
        for d in decisions.of(camera):
            assert d["latency_ms"] is None and 0 <= d["agent_ms"] < 600_000
        assert metric(samples, "adtr_end_to_end_seconds_count", camera=camera) is None
    for d in decisions.of("good-clock"):
        assert d["latency_ms"] is not None and d["latency_ms"] >= d["agent_ms"] - 1
    assert metric(samples, "adtr_end_to_end_seconds_count", camera="good-clock") == 3
    dup = decisions.of("dup")
    assert all(d["is_anomaly"] for d in dup)
    saved = sorted(Path(d["files"][".json"]).name for d in dup)
    assert len(set(saved)) == 3 and all(name.endswith("_0000000007.json") for name in saved)
    payloads = [p for p in (store_dir / "dup").glob("*.jpg") if not p.name.endswith("_thumb.jpg")]
    assert len(payloads) == 3 and len(list((store_dir / "dup").glob("*_thumb.jpg"))) == 3


# ------------------------------------------------------------------ HTTP
def test_half_sent_requests_and_a_scrape_flood_do_not_take_metrics_down(trained_model, tmp_path, jpeg):
    payload, w, h = jpeg
    http = {"enabled": True, "port": 0, "request_timeout_s": 2.0, "connection_limit": 100, "threads": 8}
    with live_agent(trained_model, tmp_path, http=http, output={"save_anomalies": False}) as agent:
        server = _http(agent)
        host, port = "127.0.0.1", server.port
        context = zmq.Context()
        sock = push_socket(context, agent.bound_ingest[0])
        sock.send_multipart([_header("cam", 0, w, h), payload])
        _settled(agent, 1)
        # 300 clients that send half a request and then one header line every 0.5 s, for up to 90 s.
        slow = [socket.create_connection((host, port)) for _ in range(300)]
        for s in slow:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        stop = threading.Event()
        closed_by_server: set[int] = set()

        def trickle():
            deadline = time.monotonic() + 90
            while not stop.is_set() and time.monotonic() < deadline and len(closed_by_server) < len(slow):
                for i, s in enumerate(slow):
                    if i in closed_by_server:
                        continue
                    try:
                        s.sendall(b"X-Slow: 1\r\n")
                    except OSError:
                        closed_by_server.add(i)
                time.sleep(0.5)

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        # 100 concurrent scrapes while the slow clients hold on.
        results: list[str | Exception] = []

        def scrape_once():
            try:
                results.append(scrape(server.url, timeout_s=120))
            except Exception as exc:  # noqa: BLE001 - counted below
                results.append(exc)

        scrapers = [threading.Thread(target=scrape_once) for _ in range(100)]
        for t in scrapers:
            t.start()
        for t in scrapers:
            t.join(timeout=150)
        trickler.join(timeout=120)
        stop.set()
        closed = len(closed_by_server)
        health = scrape(server.url)
        server.shutdown()
        for s in slow:
            s.close()
        sock.close()
        context.term()
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures and len(results) == 100, failures[:3]
    for text in results:
        samples = parse_metrics(text)
        assert metric(samples, "adtr_frames_received_total", camera="cam") == 1
    assert closed == 300, f"only {closed} of 300 trickling clients were cut off"
    parse_metrics(health)


# ------------------------------------------------------------------ the fuzz, reconciled exactly
def test_a_hostile_fuzz_mix_is_counted_exactly_per_reason(trained_model, tmp_path, jpeg, test_images):
    payload, w, h = jpeg
    rng = random.Random(11)
    trailing = corrupt_jpegs(payload)["trailing_random"]
    expected: dict[str, int] = {}
    valid = 0
    with live_agent(trained_model, tmp_path, output={"save_anomalies": False}) as agent:
        decisions = StrictDecisions(agent.bound_results)
        context = zmq.Context()
        sock = push_socket(context, agent.bound_ingest[0])
        sent = 0
        for i in range(3000):
            if i % 60 == 0:  # a valid frame, with metadata after its end-of-image marker every other time
                sock.send_multipart([_header("good-cam", valid, w, h), trailing if valid % 2 else payload])
                valid += 1
                sent += 1
            parts, reason = malformed(rng, payload, w, h)
            sock.send_multipart(parts)
            sent += 1
            expected[reason] = expected.get(reason, 0) + 1
        books = _settled(agent, sent, timeout_s=300)
        assert wait_until(lambda: decisions.count("good-cam") == valid, 60)
        sock.close()
        context.term()
        decisions.close()
    assert set(books) == {"_unknown", "good-cam"}, "refusals naming `fuzz` must not claim a label"
    print(f"sent {sent}: {valid} valid, 3000 hostile {expected}; books {books}")
    assert books["_unknown"]["invalid"] == expected
    assert books["_unknown"]["received"] == 3000
    good = books["good-cam"]
    assert good["processed"] == good["received"] == valid and not good["invalid"] and not good["dropped"]
    assert not decisions.not_json


# ------------------------------------------------------------------ a minute of everything at once
def test_an_attack_mix_for_a_minute_keeps_memory_in_its_bound_metrics_readable_and_the_books_exact(
        trained_model, tmp_path, test_images, jpeg):
    from adtr_edge.agent.settings import AgentConfig

    from hostile import forward_working_set, nested_json, resized_sof

    payload, w, h = jpeg
    ingest = {"max_payload_bytes": 1 << 20, "max_pixels": 4_000_000, "rcv_hwm": 4, "queue_depth": 4,
              "max_in_flight": 8, "decode_threads": 2}
    output = {"max_bytes": 4 << 20, "overlay_max_side": 512}
    cfg = AgentConfig.model_validate({"ingest": ingest, "output": output})
    connections = 5  # victim, heavy, poison, junk, one oversize sender at a time
    heavy_jpeg, half = flat_jpeg(2000, 2000, 90), corrupt_jpegs(payload)["half_with_eoi"]
    sof = resized_sof(payload, 2000, 2000)
    victim_frames = [(p.read_bytes(), *cv2.imread(str(p)).shape[1::-1]) for p in test_images]
    expected: dict[tuple[str, str], int] = {}

    def expect(label: str, reason: str, n: int = 1) -> None:
        expected[label, reason] = expected.get((label, reason), 0) + n

    with live_agent(trained_model, tmp_path, http={"enabled": True, "port": 0, "snapshot_s": 0.5},
                    ingest=ingest, output=output) as agent:
        server = _http(agent)
        endpoint = agent.bound_ingest[0]
        snap = agent.snapshot(timeout_s=5)
        pids = {name: snap[name]["pid"] for name in ("ingest-0", "inference", "scoring")}
        image_size = 128
        bounds = {"ingest-0": cfg.ingest.memory_bound(image_size, connections)["total"],
                  # frames in flight at model size (uint8 and their float copy), and one full batch's forward pass
                  "inference": connections * cfg.ingest.max_in_flight * image_size**2 * 3 * 5
                  # at the largest batch it ran: the batch it tuned itself to, or a bigger one it timed doing so
                  + forward_working_set(trained_model, max([snap["inference"]["max_batch"]] + [
                      r["batch"] for r in snap["inference"]["tuning"]["table"]]), snap["inference"]["torch_threads"]),
                  # payloads of frames in flight, and one overlay (a DCT-scaled decode < 2x the side)
                  "scoring": connections * cfg.ingest.max_in_flight * cfg.ingest.max_payload_bytes
                  + 20 * (2 * cfg.output.overlay_max_side) ** 2}
        decisions = StrictDecisions(agent.bound_results)
        context = zmq.Context()
        victim, heavy, poison, junk = (push_socket(context, endpoint) for _ in range(4))
        sent = {"victim": 0, "heavy": 0, "poison": 0, "ms-clock": 0}
        stop = threading.Event()

        def victim_loop():  # a real camera, at most 4 frames undecided at a time
            while not stop.is_set():
                if sent["victim"] - decisions.count("victim") >= 4:
                    time.sleep(0.01)
                    continue
                data, fw, fh = victim_frames[sent["victim"] % len(victim_frames)]
                victim.send_multipart([_header("victim", sent["victim"], fw, fh), data])
                sent["victim"] += 1

        def one_round(r: int) -> int:
            """Every attack once; returns the messages that reach the agent."""
            n = 0
            disconnected = agent.snapshot(timeout_s=5)["ingest-0"]["peers"].get("disconnected", 0)
            big = push_socket(context, endpoint, sndhwm=1)  # a part over max_payload: the peer is dropped
            big.send_multipart([_header("big", r, w, h), bytes(3 << 20)])
            assert wait_until(lambda: agent.snapshot(timeout_s=5)["ingest-0"]["peers"].get("disconnected", 0)
                              > disconnected, 60)
            big.close()
            junk.send_multipart([json.dumps({"camera_id": "named", "pad": "x" * 600_000}).encode(), payload, b"x"])
            expect("_unknown", "parts")
            for _ in range(2):  # frames that decode to 2000x2000 (at max_pixels) from 90 KB
                heavy.send_multipart([_header("heavy", sent["heavy"], 2000, 2000), heavy_jpeg])
                sent["heavy"] += 1
            junk.send_multipart([_header("broken", r, w, h), half])
            junk.send_multipart([_header("broken", r, 2000, 2000), sof])
            expect("_unknown", "decode", 2)
            junk.send_multipart([nested_json(1500), payload])
            expect("_unknown", "header_json")
            for fields in ({"v": True}, {"seq": 10**400}, {"ts": 10**400}, {"camera_id": "cam\n"}):
                junk.send_multipart([_header(**{"camera": "x", "seq": r, "width": w, "height": h, **fields}), payload])
            expect("_unknown", "header_schema", 4)
            for i in range(20):
                junk.send_multipart([_header(f"spray-{r}-{i}", 0, w + 1, h), payload])
            expect("_unknown", "dimension_mismatch", 20)
            a = 2 * r
            for seq in (a, a + 10**9, a + 10**9, a + 1):  # a jump, a repeat, a restart
                poison.send_multipart([_header("poison", seq, w, h), payload])
                sent["poison"] += 1
            poison.send_multipart([_header("ms-clock", r, w, h, ts=time.time() * 1000), payload])
            sent["ms-clock"] += 1
            n += 1 + 2 + 2 + 1 + 4 + 20 + 4 + 1
            return n

        sender = threading.Thread(target=victim_loop, daemon=True)
        sender.start()
        attack_messages, rounds, memory = 0, 0, []
        warm_rounds, warm_peaks = 0, {}
        for pid in pids.values():
            _reset_peak(pid)  # the warm-up's peak, not the model loading's
        started = time.monotonic()
        while time.monotonic() - started < 75:
            attack_messages += one_round(rounds)
            rounds += 1
            # progress, not a sleep: the agent has counted every message so far, then /metrics shows it
            target = attack_messages
            assert wait_until(lambda target=target: _received(agent) - sent["victim"] >= target - 4, 120)
            asked = time.time()
            _scrape_when(server.url, lambda m, asked=asked: time.time() - m[("adtr_stats_age_seconds", ())] >= asked)
            memory.append((time.monotonic() - started, {name: _vm(pid, "VmRSS") for name, pid in pids.items()}))
            if not warm_peaks and time.monotonic() - started >= 15:
                # Warmed up: every path has run, batches have been full. From here, memory must stay flat.
                warm_rounds, warm_peaks = rounds, {name: _vm(pid, "VmHWM") for name, pid in pids.items()}
                for pid in pids.values():
                    _reset_peak(pid)
        stop.set()
        sender.join(timeout=10)
        peaks = {name: _vm(pid, "VmHWM") for name, pid in pids.items()}
        baseline = warm_peaks
        total = attack_messages + sent["victim"]
        books = _settled(agent, total, timeout_s=180)
        assert wait_until(lambda: decisions.count("victim") == sent["victim"], 120)
        final = _scrape_when(server.url, lambda m: metric(m, "adtr_frames_processed_total", camera="victim")
                             == sent["victim"])
        server.shutdown()
        for s in (victim, heavy, poison, junk):
            s.close()
        context.term()
        decisions.close()
    for name in pids:
        print(f"{name}: peak RSS {baseline[name] / 2**20:.0f} MB in the warm-up ({warm_rounds} rounds), "
              f"{peaks[name] / 2**20:.0f} MB (+{(peaks[name] - baseline[name]) / 2**20:.1f} MB) in the next "
              f"{rounds - warm_rounds} rounds; bound from the settings "
              f"+{bounds[name] / 2**20:.0f} MB; samples {[round(m[1][name] / 2**20) for m in memory]}")
    print(f"{rounds} rounds in {time.monotonic() - started:.0f} s, {attack_messages} attack messages, "
          f"victim {sent['victim']} frames, books {books}")
    for name in pids:
        assert peaks[name] - baseline[name] <= bounds[name], name
    got = {(label, reason): n for label, t in books.items() for reason, n in t["invalid"].items()}
    assert got == expected
    assert set(books) == {"_unknown", "victim", "heavy", "poison", "ms-clock"}
    for camera in ("victim", "heavy", "poison", "ms-clock"):
        t = books[camera]
        assert t["processed"] == t["received"] == sent[camera] and not t["dropped"], (camera, t)
    assert books["poison"]["events"] == {"jump": rounds, "repeat": rounds, "restart": rounds}
    assert books["ms-clock"]["events"] == {"clock": rounds}
    assert books["_unknown"]["received"] == sum(n for (label, _), n in expected.items() if label == "_unknown")
    assert metric(final, "adtr_ingest_peer_events_total", endpoint=endpoint, event="disconnected") >= rounds
    assert not decisions.not_json and decisions.count("victim") == sent["victim"]
