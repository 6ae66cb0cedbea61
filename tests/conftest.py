"""Shared fixtures: real Magnetic Tile data, a session feature cache, one small trained model."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADTR_TESTS_SHARED", ROOT.parent / "shared"))
MAGNETIC_TILE = SHARED / "data" / "magnetic-tile"

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def pytest_report_header(config):
    state = "found" if MAGNETIC_TILE.is_dir() else "MISSING: the tests that need it are skipped, and say so"
    return f"Magnetic Tile data at {MAGNETIC_TILE}: {state}"


@pytest.fixture(scope="session")
def magnetic_tile() -> Path:
    """The real data (../shared beside the checkout, or $ADTR_TESTS_SHARED). Missing, only the tests that need
    it skip, with the reason; CI sets ADTR_TESTS_REQUIRE_DATA=1, so there a missing folder fails instead."""
    if not MAGNETIC_TILE.is_dir():
        message = f"needs the real Magnetic Tile data at {MAGNETIC_TILE} (../shared beside the checkout)"
        if os.environ.get("ADTR_TESTS_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return MAGNETIC_TILE


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def small_overrides(cache_dir) -> dict:
    """A small, fast, real configuration: real lite0 weights, a Magnetic Tile subset, few epochs."""
    return {
        "backbone": {"image_size": 128, "feature_size": 8},
        "reconstructor": {"hidden_dim": 64, "num_heads": 4, "ffn_dim": 128, "neighbor_mask": 3},
        "train": {"epochs": 6, "batch_size": 8, "warmup_steps": 5, "lr": 2e-3},
        "data": {"limit_per_class": 60, "cache_dir": str(cache_dir)},
    }


@pytest.fixture(scope="session")
def small_config(small_overrides):
    from adtr_edge.agent.settings import load_settings

    return load_settings(overrides=small_overrides)


@pytest.fixture(scope="session")
def small_dataset(small_config, magnetic_tile):
    from adtr_edge.model.data import load_dataset

    return load_dataset(magnetic_tile, small_config.data)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, small_config, small_dataset) -> Path:
    """One real model trained once per session on a Magnetic Tile subset."""
    from adtr_edge.model.train import train_model

    out = tmp_path_factory.mktemp("model")
    train_model(small_config, small_dataset, out, progress=False)
    return out


@pytest.fixture(scope="session")
def test_images(small_dataset):
    """24 real Magnetic Tile test images, normals and every defect type."""
    import random

    rng = random.Random(0)
    samples = list(small_dataset.test)
    rng.shuffle(samples)
    return [s.path for s in samples[:24]]


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


@pytest.fixture(scope="session")
def ray_home(tmp_path_factory):
    """Ray writes its auth token into $HOME/.ray: the test session gets a HOME of its own."""
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    yield home
    if old is not None:
        os.environ["HOME"] = old


@pytest.fixture(scope="session")
def ray_cluster(ray_home):
    """One real Ray cluster for the whole test session: a head node started the way the agent starts one
    for retraining (`ray start --head`, token auth, dashboard for Ray Jobs, the dashboard agent on a free
    port so another Ray on the machine cannot break job submission), this process connected to it."""
    import ray

    from adtr_edge.agent.rayhead import LocalHead

    # 1 GiB of object store is ample for test frames, and keeps the session's footprint small: Ray's
    # memory monitor kills workers (the agent's actors among them) when the machine nears 95 % in use.
    head = LocalHead(num_cpus=2, object_store_bytes=1 << 30, memory_usage_threshold=0.98)
    ray.init(address=head.address, log_to_driver=False, namespace="adtr-edge-tests")
    yield head
    ray.shutdown()
    head.stop()


@pytest.fixture(autouse=True)
def no_retrain_left_running(request):
    """The cluster is shared by the session: a retrain job a failed test leaves running would refuse
    every later test's retrain as busy. After each test that uses the cluster, stop any still active."""
    yield
    if "ray_cluster" not in request.fixturenames:
        return
    from ray.job_submission import JobSubmissionClient

    from adtr_edge.actors.jobs import active_retrains

    client = JobSubmissionClient(request.getfixturevalue("ray_cluster").dashboard)
    for job in active_retrains(client.list_jobs()):
        client.stop_job(job.submission_id)
        deadline = time.monotonic() + 120
        while active_retrains([client.get_job_info(job.submission_id)]):
            if time.monotonic() > deadline:
                pytest.fail(f"retrain job {job.submission_id} left running by this test did not stop in 120 s")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    import ray

    return ray
