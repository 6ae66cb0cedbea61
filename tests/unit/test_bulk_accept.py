"""Accepting many saved frames in one call: by sequence numbers, by a time window, by files."""
from __future__ import annotations

import json
import time

import pytest

from adtr_edge.actors.scoring import frame_stem
from adtr_edge.agent.learning import accept_many, parse_time, saved_anomalies
from adtr_edge.lifecycle.samples import SampleStore


@pytest.fixture
def saved(tmp_path, test_images):
    """Six anomalies of camera line-1 saved the way the scoring actor names them, one a minute from t0,
    plus a sampled normal frame (ok_…) that a window must not pick."""
    root = tmp_path / "anomalies"
    folder = root / "line-1"
    folder.mkdir(parents=True)
    t0 = 1_800_000_000.0
    for seq, path in enumerate(test_images[:6]):
        stem = frame_stem(t0 + 60 * seq, seq)
        (folder / f"{stem}.jpg").write_bytes(path.read_bytes())
        (folder / f"{stem}.json").write_text(json.dumps({"camera_id": "line-1", "seq": seq, "score": 1.0,
                                                         "model_version": "v1", "is_anomaly": True}))
    normal = frame_stem(t0 + 90, 99, normal=True)
    (folder / f"{normal}.jpg").write_bytes(test_images[7].read_bytes())
    (folder / f"{normal}.json").write_text(json.dumps({"camera_id": "line-1", "seq": 99}))
    return root, t0


def test_a_window_accepts_the_cameras_anomalies_that_arrived_in_it(saved, tmp_path):
    root, t0 = saved
    store = SampleStore(tmp_path / "store")
    assert [d["seq"] for _, d in saved_anomalies(root, "line-1", t0 + 60, t0 + 240)] == [1, 2, 3]
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + 120))
    result = accept_many(store, root, {"camera_id": "line-1", "since": iso}, "operator:test")
    assert (result["requested"], result["filed"], result["added"]) == (4, 4, 4)  # seqs 2..5, not the ok_ normal
    assert sorted(r["seq"] for r in result["items"]) == [2, 3, 4, 5]
    assert store.counts()["by_origin"]["operator"] == 4
    again = accept_many(store, root, {"camera_id": "line-1", "since": t0 + 120}, "operator:test")
    assert again["filed"] == 4 and again["added"] == 0  # the same frames twice: nothing new


def test_sequence_numbers_are_accepted_and_the_missing_ones_listed(saved, tmp_path):
    root, _ = saved
    store = SampleStore(tmp_path / "store")
    result = accept_many(store, root, {"camera_id": "line-1", "seqs": [0, 5, 42], "label": "defect"}, "op")
    assert result["filed"] == 2 and [m["what"] for m in result["missing"]] == [42]
    assert {r["label"] for r in result["items"]} == {"defect"}


def test_a_wrong_bulk_request_files_nothing(saved, tmp_path):
    root, _ = saved
    store = SampleStore(tmp_path / "store")
    for request, message in (({"camera_id": "line-1", "seqs": ["1"]}, "whole numbers"),
                             ({"seqs": [1]}, "camera_id"),
                             ({"camera_id": "line-1", "since": "yesterday"}, "not a time"),
                             ({"files": "a.jpg"}, "list"),
                             ({"camera_id": "line-1"}, "names files")):
        with pytest.raises(ValueError, match=message):
            accept_many(store, root, request, "op")
    with pytest.raises(ValueError, match="label must be"):
        accept_many(store, root, {"camera_id": "line-1", "seqs": [0], "label": "fine"}, "op")
    assert parse_time("1800000000") == 1.8e9 and parse_time("2027-01-15T08:00:00+01:00") == parse_time(
        "2027-01-15T07:00:00Z")
