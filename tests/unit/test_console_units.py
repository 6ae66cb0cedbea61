"""The operator console's parts without a running agent: passwords, login throttle, the frame index and
its file guard (path traversal), the output folder's caps with normals, the review files, the live
quantiles, ADTR+ label masks."""
from __future__ import annotations

import json
import stat
import time

import cv2
import numpy as np
import pytest
import torch

from adtr_edge.actors.scoring import NORMAL_PREFIX, AnomalyStore, frame_stem, heat_png, thumbnail_jpg
from adtr_edge.agent.console.auth import (
    Authenticator,
    LoginThrottle,
    Sessions,
    UserError,
    add_user,
    hash_password,
    read_users,
    remove_user,
    verify_password,
)
from adtr_edge.agent.console.frames import FrameIndex, MediaNotFound
from adtr_edge.agent.console.live import histogram_quantile
from adtr_edge.model.adtr_plus import label_cell_masks, plus_loss, plus_training_data
from adtr_edge.model.data import DataError


# ------------------------------------------------------------------ users and passwords
def test_passwords_are_stored_as_salted_scrypt_hashes_in_a_private_file(tmp_path):
    path = tmp_path / "console" / "users.json"
    add_user(path, "ana", "correct horse battery", "operator")
    add_user(path, "vic", "viewer password 1", "viewer")
    text = path.read_text()
    assert "correct horse" not in text and "viewer password" not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = read_users(path)
    assert {n: u["role"] for n, u in users.items()} == {"ana": "operator", "vic": "viewer"}
    assert users["ana"]["hash"].startswith("scrypt$")
    assert hash_password("same password!") != hash_password("same password!")  # salted
    auth = Authenticator(path)
    assert auth.check("ana", "correct horse battery") == "operator"
    assert auth.check("ana", "correct horse batterY") is None
    assert auth.check("nobody", "correct horse battery") is None
    assert auth.check("vic", "viewer password 1") == "viewer"
    remove_user(path, "vic")
    assert auth.check("vic", "viewer password 1") is None  # the file is re-read when it changes


@pytest.mark.parametrize("name, password, role, message", [
    ("ana", "short", "operator", "at least 10"),
    ("<script>", "long enough password", "operator", "must match"),
    ("ana", "long enough password", "admin", "role must be"),
])
def test_bad_users_are_refused_with_a_reason(tmp_path, name, password, role, message):
    with pytest.raises(UserError, match=message):
        add_user(tmp_path / "users.json", name, password, role)


def test_a_damaged_hash_never_verifies():
    good = hash_password("a good password")
    assert verify_password(good, "a good password")
    for damaged in ("", "plain", good.replace("scrypt", "md5"), good[:-8], "scrypt$1$1$1$!!$!!"):
        assert not verify_password(damaged, "a good password")


def test_logins_are_throttled_per_name_and_address_then_released():
    throttle = LoginThrottle(max_failures=3, lockout_s=0.5)
    for _ in range(3):
        assert throttle.wait_s("user:ana", "addr:1") == 0
        throttle.failed("user:ana", "addr:1")
    assert throttle.wait_s("user:ana") > 0 and throttle.wait_s("addr:1") > 0
    assert throttle.wait_s("user:bob", "addr:2") == 0
    time.sleep(0.6)
    assert throttle.wait_s("user:ana", "addr:1") == 0


def test_the_trusted_proxy_must_be_an_address():
    from adtr_edge.agent.settings import AgentSettings, SettingsError, load_settings

    for value in ("10.0.0.7", "::1", "*"):
        assert load_settings(overrides=[f'console.trusted_proxy="{value}"'],
                             kind=AgentSettings).console.trusted_proxy == value
    with pytest.raises(SettingsError, match="not an IP address"):
        load_settings(overrides=["console.trusted_proxy=proxy.local"], kind=AgentSettings)


def test_sessions_end_at_logout_and_expiry():
    sessions = Sessions(lifetime_s=0.3)
    sid = sessions.create("ana", "operator")
    assert sessions.get(sid).user == "ana"
    sessions.end(sid)
    assert sessions.get(sid) is None
    sid = sessions.create("ana", "operator")
    time.sleep(0.4)
    assert sessions.get(sid) is None
    assert sessions.get("made-up") is None and sessions.get(None) is None


# ------------------------------------------------------------------ the frame index and its file guard
def _saved(root, camera, stem, normal=False, suffixes=(".jpg", "_thumb.jpg", "_heat.png", ".json")):
    folder = root / camera
    folder.mkdir(parents=True, exist_ok=True)
    stem = (NORMAL_PREFIX if normal else "") + stem
    for suffix in suffixes:
        (folder / f"{stem}{suffix}").write_bytes(json.dumps({"score": 1.0}).encode() if suffix == ".json" else b"x")
    return stem


def test_the_index_lists_frames_from_names_newest_first_with_filters_and_pages(tmp_path):
    for i in range(30):
        _saved(tmp_path, "cam-a" if i % 2 else "cam-b", f"20261129T1000{i:02d}_{i:010d}", normal=i % 5 == 0)
    _saved(tmp_path, "cam-a", "20261129T110000_0000000099", suffixes=(".json",))  # no payload: incomplete
    (tmp_path / "not a camera!").mkdir()
    (tmp_path / "cam-a" / "notes.txt").write_text("ignored")
    index = FrameIndex(tmp_path, min_refresh_s=0)
    total, page = index.query(limit=10)
    assert total == 30 and [f.seq for f in page] == list(range(29, 19, -1))
    total, page = index.query(camera="cam-a", decision="anomaly", offset=0, limit=100)
    assert total == 12 and all(f.camera == "cam-a" and not f.normal for f in page)
    total, page = index.query(decision="normal", limit=100)
    assert total == 6 and all(f.stem.startswith(NORMAL_PREFIX) for f in page)
    newest = index.query(limit=1)[1][0]
    assert index.query(since=newest.ts, limit=100)[0] == 1 and index.query(until=newest.ts - 1)[0] == 29
    assert index.camera_names() == ["cam-a", "cam-b"]
    newer, older = index.neighbours("cam-a/20261129T100011_0000000011")
    assert newer.seq == 12 and older.seq == 10
    # a new file shows up; a deleted one goes
    _saved(tmp_path, "cam-b", "20261129T120000_0000000100")
    (tmp_path / "cam-a" / "20261129T100029_0000000029.jpg").unlink()
    total, page = index.query(limit=1)
    assert total == 30 and page[0].seq == 100


def test_the_index_reads_the_names_the_scoring_actor_writes(tmp_path):
    """Named by the agent's clock to the microsecond; a name taken twice (a camera whose sequence restarted)
    gets `-1` from the store, and both frames are listed and served."""
    store = AnomalyStore(tmp_path, max_bytes=1 << 20, normals_max_bytes=1 << 16)
    at = 1_796_000_000.25
    files = {".jpg": b"x", "_thumb.jpg": b"t", "_heat.png": b"h", ".json": b'{"ts": 1e306}'}
    first = store.write("cam", frame_stem(at, 7), files)
    second = store.write("cam", frame_stem(at, 7), files)  # the same name again: kept apart
    store.write("cam", frame_stem(at + 1, 8, normal=True), files, normal=True)
    assert first[".jpg"] != second[".jpg"] and second[".jpg"].endswith("-1_0000000007.jpg")
    index = FrameIndex(tmp_path, min_refresh_s=0)
    total, page = index.query(limit=10)
    assert total == 3 and page[0].normal and page[0].seq == 8 and page[0].ts == pytest.approx(at + 1)
    assert {f.stem for f in page[1:]} == {frame_stem(at, 7), frame_stem(at, 7).replace("_", "-1_", 1)}
    for frame in page:
        assert index.get("cam", frame.stem) == frame
        assert index.media_path("cam", frame.stem + ".jpg").read_bytes() == b"x"
    assert index.get("cam", frame_stem(at, 7) + "/../x") is None


def test_the_file_guard_serves_only_saved_frames_inside_the_output_folder(tmp_path):
    root = tmp_path / "anomalies"
    stem = _saved(root, "cam", "20261129T100000_0000000001")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"not yours")
    (root / "cam" / "20261129T100001_0000000002.jpg").symlink_to(secret)  # a link out of the folder
    (root / "evil").symlink_to(tmp_path, target_is_directory=True)  # a camera folder that is a link out
    index = FrameIndex(root)
    assert index.media_path("cam", f"{stem}.jpg").read_bytes() == b"x"
    for camera, name in [("cam", "../../secret.jpg"), ("cam", "..%2F..%2Fsecret.jpg"), ("..", "secret.jpg"),
                         ("cam", "/etc/passwd"), ("cam", f"{stem}.jpg/../../../secret.jpg"),
                         ("cam", "20261129T100001_0000000002.jpg"), ("evil", "secret.jpg"),
                         ("evil", "20261129T100000_0000000001.jpg"), ("cam", f"{stem}.py"), ("cam", ""),
                         ("cam\x00", f"{stem}.jpg"), ("cam", f"{stem}.jpg\x00.png"), (".", f"{stem}.jpg")]:
        with pytest.raises(MediaNotFound):
            index.media_path(camera, name)


# ------------------------------------------------------------------ the output folder's caps
def test_normals_keep_to_their_share_and_everything_to_the_total(tmp_path):
    store = AnomalyStore(tmp_path, max_bytes=20_000, normals_max_bytes=5_000)
    for i in range(6):
        store.write("cam", f"a{i}", {".jpg": b"a" * 2000})
        store.write("cam", f"{NORMAL_PREFIX}n{i}", {".jpg": b"n" * 1000}, normal=True)
    on_disk = {p.name: p.stat().st_size for p in (tmp_path / "cam").iterdir()}
    normals = {n: s for n, s in on_disk.items() if n.startswith(NORMAL_PREFIX)}
    assert sum(normals.values()) <= 5_000 and sum(on_disk.values()) <= 20_000
    assert store.total == sum(on_disk.values()) and store.normals_total == sum(normals.values())
    assert f"{NORMAL_PREFIX}n5.jpg" in normals and f"{NORMAL_PREFIX}n0.jpg" not in normals  # the newest stay
    store.write("cam", "big", {".jpg": b"b" * 15_000})  # the total cap: the oldest of either kind go first
    assert store.total <= 20_000 and (tmp_path / "cam" / "big.jpg").is_file()
    assert not (tmp_path / "cam" / "a0.jpg").exists()
    restarted = AnomalyStore(tmp_path, max_bytes=20_000, normals_max_bytes=5_000)  # counts by name after a restart
    assert restarted.normals_total == store.normals_total and restarted.total == store.total


def test_the_review_files_are_a_small_thumbnail_and_a_transparent_heatmap():
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)
    thumb = cv2.imdecode(np.frombuffer(thumbnail_jpg(frame), np.uint8), cv2.IMREAD_COLOR)
    assert thumb.shape == (180, 240, 3)
    amap = np.zeros((64, 64), np.float32)
    amap[10:20, 10:20] = 3.0  # 3 × a threshold of 1
    heat = cv2.imdecode(np.frombuffer(heat_png(amap, threshold=1.0), np.uint8), cv2.IMREAD_UNCHANGED)
    assert heat.shape == (64, 64, 4)
    assert heat[..., 3][amap == 0].max() == 0  # clear where nothing is anomalous
    assert heat[..., 3][amap > 0].min() == int(0.75 * 255)


def test_latency_quantiles_follow_the_histogram():
    counts = [0] * 13
    counts[3] = 100  # all between 25 and 50 ms
    assert 0.025 <= histogram_quantile(0.5, counts) <= 0.05
    counts[8] = 2  # two slow ones, 1-2.5 s
    assert histogram_quantile(0.99, counts) > 1.0
    assert histogram_quantile(0.5, [0] * 13) is None


# ------------------------------------------------------------------ ADTR+ from labels
def test_boxes_and_masks_become_cell_fractions_and_an_unlabelled_defect_keeps_its_image_label(tmp_path):
    image = tmp_path / "defect.png"
    cv2.imwrite(str(image), np.zeros((100, 200, 3), np.uint8))
    mask = tmp_path / "mask.png"
    pixels = np.zeros((100, 200), np.uint8)
    pixels[50:, 100:] = 255  # the bottom-right quarter
    cv2.imwrite(str(mask), pixels)
    cells, has = label_cell_masks([(image, [0, 0, 100, 50], None), (image, None, mask), (image, None, None)], 4)
    assert has.tolist() == [True, True, False]
    assert cells[0][:2, :2].min() == 1.0 and cells[0].sum() == 4.0  # the top-left quarter
    assert cells[1][2:, 2:].min() == 1.0 and cells[1].sum() == 4.0
    assert cells[2].sum() == 0
    with pytest.raises(DataError, match="outside"):
        label_cell_masks([(image, [300, 0, 10, 10], None)], 4)
    wrong = tmp_path / "wrong.png"
    cv2.imwrite(str(wrong), np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="mask is 10x10"):
        label_cell_masks([(image, None, wrong)], 4)
    normals = torch.rand(5, 8, 4, 4)
    data = plus_training_data(normals, torch.rand(3, 8, 4, 4), cells, has)
    assert [t.shape[0] for t in data] == [8, 8, 8, 8]
    assert data[2].tolist() == [0] * 5 + [1] * 3 and data[3].tolist() == [True] * 7 + [False]

    class Echo(torch.nn.Module):  # a reconstruction that misses by a known amount
        def forward(self, x):
            return x, x * 0.5

    loss = plus_loss(alpha=0.003, top_k=4)(Echo(), data)
    assert torch.isfinite(loss) and loss > 0


def test_the_cli_adds_lists_and_removes_users_and_refuses_weak_passwords(tmp_path, monkeypatch, capsys):
    import io

    from adtr_edge.agent.cli import main

    users = tmp_path / "users.json"
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert main(["console", "add-user", "--users-file", str(users), "ana", "--role", "viewer", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["console", "add-user", "--users-file", str(users), "bob", "--password-stdin"]) == 2
    assert "at least 10 characters" in capsys.readouterr().err
    assert main(["console", "list-users", "--users-file", str(users)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ana": "viewer"}
    assert Authenticator(users).check("ana", "a long enough password") == "viewer"
    assert main(["console", "remove-user", "--users-file", str(users), "ana"]) == 0
    assert read_users(users) == {}
    assert main(["console", "add-user", "--registry", str(tmp_path), "x", "--password-stdin"]) == 2  # not a registry
