"""The operator console's security, over real HTTP against a live agent (actors on the session's Ray,
frames from a real camera, the console on its own port): login and its throttle, cookie flags,
sessions that end, CSRF on every state-changing route, the viewer role, escaping of crafted names and
fields, image routes that cannot leave the anomaly folder. And the labels an operator gives land in
the sample store, audited."""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from adtr_edge.agent.publisher import frame_from_file
from adtr_edge.lifecycle.samples import SampleStore

from conftest import MAGNETIC_TILE
from console_live import OPERATOR, VIEWER, Client, add_users, agent_with_console, raw_get
from live import Streamer, registry_with_base, wait_until

pytestmark = [pytest.mark.usefixtures("magnetic_tile"), pytest.mark.usefixtures("ray_session"), pytest.mark.slow]
XSS = '<img src=x onerror="window.__xss=1">'


@pytest.fixture(scope="module")
def env(trained_model, tmp_path_factory, small_dataset):
    tmp = tmp_path_factory.mktemp("console-security")
    registry = registry_with_base(trained_model, tmp / "registry", MAGNETIC_TILE)
    add_users(registry.root)
    frames = [frame_from_file(s.path) for s in small_dataset.test[:24]]
    # The tests' own address is a trusted proxy: without X-Forwarded-For each client is that address, as before.
    with agent_with_console(registry.root, tmp, console={"max_login_failures": 3, "lockout_s": 3.0,
                                                         "trusted_proxy": "127.0.0.1"},
                            output={"normals": {"every_s": 0.5}}) as (agent, console):
        camera = Streamer(agent.bound_ingest[0], "line-1", frames, fps=6)
        anomalies = Path(agent.cfg.output.dir) / "line-1"
        ok = wait_until(lambda: len(list(anomalies.glob("2*.json"))) >= 4
                        and len(list(anomalies.glob("ok_*.json"))) >= 2, 180)
        camera.stop()
        assert ok, sorted(p.name for p in anomalies.glob("*.json"))
        yield {"agent": agent, "console": console, "registry": registry, "store": SampleStore(registry.store_dir),
               "anomalies": Path(agent.cfg.output.dir), "url": console.url}


def _operator(env) -> Client:
    client = Client(env["url"])
    assert client.login(*OPERATOR) == 302
    return client


def _first_frame(env, normal: bool = False) -> tuple[str, str]:
    folder = env["anomalies"] / "line-1"
    stems = sorted(p.stem for p in folder.glob(("ok_" if normal else "2") + "*.json"))
    return "line-1", stems[0]


def _audit(env) -> list[dict]:
    path = env["registry"].root / "console" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_page_and_file_needs_a_login(env):
    client = Client(env["url"])
    camera, stem = _first_frame(env)
    for path in ("/live", "/review", f"/review/{camera}/{stem}", "/models", "/activity"):
        status, headers, _ = client.get(path)
        assert status == 302 and headers["Location"].startswith("/login?next="), path
    for path in ("/api/live", "/api/models", "/api/activity", f"/media/{camera}/{stem}.jpg", "/api/retrain/retrain-x"):
        assert client.get(path)[0] == 401, path
    status, _, body = client.get("/login")
    assert status == 200 and b"Operator console" in body
    assert client.get("/static/console.js")[0] == 200  # the agent serves its own assets; they hold no data


def test_the_session_cookie_is_httponly_samesite_strict_and_rotates_at_login_and_ends_at_logout(env):
    client = Client(env["url"])
    status, headers, _ = client.get("/login")
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback; console.secure_cookies turns it on
    before = client.cookie()
    assert client.login(*OPERATOR) == 302
    after = client.cookie()
    assert after and after != before  # a new session at login: a planted cookie is worth nothing
    assert client.get("/live")[0] == 200
    stolen = Client(env["url"])
    stolen.jar.set_cookie(next(c for c in client.jar if c.name == "adtr_console"))
    assert stolen.get("/api/live")[0] == 200
    status, headers, _ = client.post_form("/logout", {"csrf_token": client.token})
    assert status == 302 and headers["Location"] == "/login"
    assert stolen.get("/api/live")[0] == 401  # the server forgot the session: a copied cookie is dead too


def test_wrong_passwords_are_refused_then_throttled_and_audited(env):
    client = Client(env["url"])
    token = client.page_token("/login")
    codes = [client.post_form("/login", {"csrf_token": token, "user": "mallory", "password": f"guess-{i}"})[0]
             for i in range(4)]
    assert codes == [401, 401, 401, 429]
    assert client.post_form("/login", {"csrf_token": token, "user": "mallory", "password": "x"})[0] == 429
    time.sleep(3.2)  # console.lockout_s in this module
    assert client.login(*OPERATOR) == 302
    failed = [e for e in _audit(env) if e["action"] == "login" and e["by"] == "mallory"]
    assert len(failed) >= 5 and not any(e["ok"] for e in failed)
    assert {e["reason"] for e in failed} == {"wrong name or password", "locked out"}


def test_behind_a_reverse_proxy_one_clients_lockout_does_not_lock_out_the_others(env):
    """Every request comes from the proxy (here 127.0.0.1, console.trusted_proxy); the lockout and the audit go
    by the address the proxy forwards, so an attacker's failures lock out only the attacker."""
    attacker, colleague = {"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "198.51.100.4"}
    client = Client(env["url"])
    token = client.page_token("/login")
    codes = [client.post_form("/login", {"csrf_token": token, "user": f"mallory-{i}", "password": "guess"},
                              **attacker)[0] for i in range(4)]  # new names: only the address can lock
    assert codes == [401, 401, 401, 429]
    operator = Client(env["url"])
    token = operator.page_token("/login")
    fields = {"csrf_token": token, "user": OPERATOR[0], "password": OPERATOR[1], "next": "/live"}
    assert operator.post_form("/login", fields, **colleague)[0] == 302  # the proxy's address is not locked
    audit = _audit(env)
    assert {e["address"] for e in audit if e["by"].startswith("mallory-")} == {"203.0.113.9"}
    assert [e for e in audit if e["action"] == "login" and e["ok"]][-1]["address"] == "198.51.100.4"


def _state(env) -> tuple:
    registry, store = env["registry"], env["store"]
    return store.snapshot().fingerprint, registry.pointers(), len(registry.events())


def _routes(env) -> list[tuple[str, dict]]:
    camera, stem = _first_frame(env)
    current = env["registry"].current()
    return [(f"/api/review/{camera}/{stem}/accept", {}),
            (f"/api/review/{camera}/{stem}/confirm", {"box": [0, 0, 5, 5]}),
            (f"/api/review/{camera}/{stem}/skip", {}), ("/api/models/promote", {"version": current}),
            ("/api/models/rollback", {}), ("/api/models/shadow", {"version": current}), ("/api/retrain", {})]


def test_csrf_is_checked_on_every_state_changing_request(env):
    client = _operator(env)
    other = _operator(env)  # another session's valid token
    before = _state(env)
    for path, body in _routes(env):
        assert client.post_json(path, body, token=None)[0] == 400, path
        status, answer = client.post_json(path, body, token="forged-token")
        assert status == 400 and "CSRF" in answer["error"], path
        assert client.post_json(path, body, token=other.token)[0] == 400, path
        status, answer = client.post_json(path, body, Origin="http://evil.example")
        assert status == 403 and "cross-origin" in answer["error"], path
    status, _, _ = client.post_form("/logout", {})  # forms too: no token, no logout
    assert status == 400 and client.get("/api/live")[0] == 200
    fresh = Client(env["url"])
    fresh.get("/login")
    assert fresh.post_form("/login", {"user": OPERATOR[0], "password": OPERATOR[1]})[0] == 400  # login CSRF
    assert _state(env) == before
    refusals = [e for e in _audit(env) if e["action"] == "refused" and e["reason"].startswith("CSRF")]
    assert len(refusals) >= 3 * len(_routes(env))


def test_a_viewer_sees_every_page_and_changes_nothing(env):
    viewer = Client(env["url"])
    assert viewer.login(*VIEWER) == 302
    camera, stem = _first_frame(env)
    for path in ("/live", "/review", f"/review/{camera}/{stem}", "/models", "/activity", "/api/live", "/api/models",
                 f"/media/{camera}/{stem}_thumb.jpg"):
        assert viewer.get(path)[0] == 200, path
    status, _, body = viewer.get("/review")
    assert b'data-act="accept"' not in body and b"Retrain now" not in viewer.get("/models")[2]
    before = _state(env)
    for path, body in _routes(env):
        status, answer = viewer.post_json(path, body)
        assert status == 403 and "viewer" in answer["error"], path
    assert _state(env) == before
    assert any(e["action"] == "refused" and e["by"] == VIEWER[0] for e in _audit(env))


def test_labels_land_in_the_store_with_who_and_bad_labels_are_refused(env):
    client = _operator(env)
    store = env["store"]
    folder = env["anomalies"] / "line-1"
    stems = sorted(p.stem for p in folder.glob("2*.json"))
    normal_stem = _first_frame(env, normal=True)[1]
    side = json.loads((folder / f"{stems[2]}.json").read_text())  # the frame the bad labels are tried on
    width, height = side["width"], side["height"]

    status, result = client.post_json(f"/api/review/line-1/{stems[0]}/accept", {"note": "glare, not a crack"})
    assert status in (200, 201) and result["label"] == "normal", result
    row = store.find(result["sha256"])
    assert row["origin"] == "operator" and row["added_by"] == "console:ana" and row["note"] == "glare, not a crack"
    assert row["seq"] == int(stems[0].split("_")[-1]) and row["camera_id"] == "line-1"

    status, result = client.post_json(f"/api/review/line-1/{stems[1]}/confirm", {"box": [1, 2, 30, 20]})
    assert status in (200, 201), result
    row = store.find(result["sha256"])
    assert row["origin"] == "confirmed_defect" and json.loads(row["box"]) == [1, 2, 30, 20]

    normal_side = json.loads((folder / f"{normal_stem}.json").read_text())
    mask = np.zeros((normal_side["height"], normal_side["width"], 4), np.uint8)
    mask[10:40, 20:60, 3] = 200  # what the brush canvas sends: RGBA, painted where alpha > 0
    data_url = "data:image/png;base64," + __import__("base64").b64encode(cv2.imencode(".png", mask)[1]).decode()
    status, result = client.post_json(f"/api/review/line-1/{normal_stem}/confirm", {"mask": data_url})
    assert status in (200, 201) and result["mask"], result  # a missed defect, found among the sampled normals
    row = store.find(result["sha256"])
    stored = cv2.imread(str(store.blob_path(row["mask_sha256"], ".png")), cv2.IMREAD_GRAYSCALE)
    assert stored.shape == mask.shape[:2] and set(np.unique(stored)) == {0, 255}
    assert (stored > 0).sum() == 30 * 40

    for body, message in [({"box": [0, 0, width + 1, 5]}, "not inside"),
                          ({"box": [0, 0, "5", 5]}, "whole frame pixels"),
                          ({"box": [0, 0, 0, 5]}, "not inside"), ({"mask": "data:image/png;base64,!!!"}, "base64"),
                          ({"mask": data_url.replace("image/png", "text/html")}, "PNG data URL"),
                          ({"mask": data_url}, f"the frame is {width}x{height}"),
                          ({"mask": "data:image/png;base64," + __import__("base64").b64encode(
                              cv2.imencode(".png", np.zeros((5, 5), np.uint8))[1]).decode()}, "mask is 5x5")]:
        status, answer = client.post_json(f"/api/review/line-1/{stems[2]}/confirm", body)
        assert status == 400 and message in answer["error"], (body, answer)
    assert client.post_json("/api/review/line-1/20991231T000000_0000000001/accept")[0] == 404
    assert client.post_json(f"/api/review/line-1/{stems[2]}/delete")[0] == 404
    assert client.post_json("/api/models/promote", {"version": "../../etc"})[0] == 400

    actions = [(e["action"], e["frame"], e["ok"]) for e in _audit(env) if e["by"] == "ana"]
    assert ("accept_normal", f"line-1/{stems[0]}", True) in actions
    assert ("confirm_defect", f"line-1/{stems[1]}", True) in actions
    assert ("confirm_defect", f"line-1/{stems[2]}", False) in actions
    events = {(e["action"], e["origin"], e["by"]) for e in store.events(20)}
    assert ("added", "operator", "console:ana") in events or ("relabelled", "operator", "console:ana") in events
    status, _, page = client.get("/activity")
    assert status == 200 and b"accept normal" in page and b"confirm defect" in page


def test_crafted_camera_ids_file_names_and_fields_are_shown_as_text(env):
    client = _operator(env)
    root = env["anomalies"]
    stem = "20261129T101010_0000004242"
    folder = root / "line-9"
    folder.mkdir(exist_ok=True)
    cv2.imwrite(str(folder / f"{stem}.jpg"), np.full((40, 60, 3), 128, np.uint8))
    (folder / f"{stem}.json").write_text(json.dumps({
        "camera_id": XSS, "seq": 4242, "ts": 1795000000.0, "score": XSS, "normalized_score": 2.0, "threshold": 1.0,
        "model_version": XSS, "width": 60, "height": 40, "regions": [{"box": [1, 2, 3, XSS]}, "<b>"]}))
    hostile = root / XSS.replace("/", "")
    hostile.mkdir(exist_ok=True)  # a folder named like markup: not a camera id, never listed
    (hostile / f"{stem}.jpg").write_bytes(b"x")
    (hostile / f"{stem}.json").write_text("{}")
    time.sleep(0.6)  # past the index's refresh interval
    for path in ("/review", "/review?camera=line-9", f"/review/line-9/{stem}",
                 "/review?camera=" + __import__("urllib.parse").parse.quote(f'"><script>window.__xss=1</script>{XSS}'),
                 "/activity", "/models"):
        status, headers, body = client.get(path)
        assert status == 200, path
        assert b"<img src=x onerror" not in body and b"<script>window" not in body, path
        assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    status, _, body = client.get(f"/review/line-9/{stem}")
    assert b"&lt;img src=x onerror=&#34;window.__xss=1&#34;&gt;" in body  # the crafted model version, as text
    status, _, body = client.get("/review?camera=" + __import__("urllib.parse").parse.quote(XSS))
    assert b"&lt;img src=x onerror=" in body  # the filter, echoed as text
    assert client.get("/review?decision=<x>")[0] == 400 and client.get("/review?window=forever")[0] == 400


def test_image_routes_cannot_leave_the_anomaly_folder(env, tmp_path):
    client = _operator(env)
    cookie = client.cookie()
    camera, stem = _first_frame(env)
    secrets_ = (env["registry"].root / "console" / "users.json").read_bytes()
    assert raw_get(env["url"], f"/media/{camera}/{stem}_thumb.jpg", cookie)[0] == 200
    attempts = [
        f"/media/{camera}/..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/media/../../../../etc/passwd",
        f"/media/{camera}/../../registry/console/users.json", "/media/..%2Fregistry/console%2Fusers.json",
        f"/media/{camera}/%2e%2e%2f%2e%2e%2fregistry%2fconsole%2fusers.json", "/media/%2e%2e/%2e%2e",
        f"/media/{camera}/....//....//etc/passwd", f"/media/{camera}/{stem}.json%00.jpg",
        f"/media/{camera}/%252e%252e%252fetc%252fpasswd", f"/media/{camera}//etc/passwd",
        "/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e/auth.py", "/media/line-1/..\\..\\etc\\passwd",
    ]
    # and a link planted in the camera's folder, named like a saved frame, pointing out of it
    (env["anomalies"] / camera / "20261129T000000_0000009999.jpg").symlink_to(
        env["registry"].root / "console" / "users.json")
    attempts.append(f"/media/{camera}/20261129T000000_0000009999.jpg")
    for path in attempts:
        status, body = raw_get(env["url"], path, cookie)
        assert status in (400, 404), (path, status)
        assert b"root:" not in body and secrets_[:40] not in body and b"def create_console_app" not in body, path


def test_the_login_never_sends_anyone_off_the_console(env):
    for target, expected in [("//evil.example/x", "/live"), ("https://evil.example", "/live"),
                             ("/\\evil.example", "/live"), ("/\t/evil.example", "/live"),
                             ("/review?camera=line-1&decision=anomaly", "/review?camera=line-1&decision=anomaly")]:
        client = Client(env["url"])
        token = client.page_token("/login")
        status, headers, _ = client.post_form("/login", {"csrf_token": token, "user": OPERATOR[0],
                                                          "password": OPERATOR[1], "next": target})
        assert status == 302 and headers["Location"] == expected, (target, headers.get("Location"))


def test_a_removed_user_is_logged_out_and_a_changed_role_applies_at_once(env):
    from adtr_edge.agent.console.auth import add_user, remove_user

    users = env["registry"].root / "console" / "users.json"
    add_user(users, "temp", "temporary password 1", "operator")
    client = Client(env["url"])
    assert client.login("temp", "temporary password 1") == 302
    assert client.post_json(f"/api/review/{'/'.join(_first_frame(env))}/skip")[0] == 200
    add_user(users, "temp", "temporary password 1", "viewer")
    assert client.post_json(f"/api/review/{'/'.join(_first_frame(env))}/skip")[0] == 403
    remove_user(users, "temp")
    assert client.get("/api/live")[0] == 401 and client.get("/live")[0] == 302
