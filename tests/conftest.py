"""Shared fixtures: real Magnetic Tile data, a session feature cache, one small trained model."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADTR_EDGE_SHARED", ROOT.parent / "shared"))
MAGNETIC_TILE = SHARED / "data" / "magnetic-tile"

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def pytest_configure(config):
    if not MAGNETIC_TILE.is_dir():
        raise pytest.UsageError(f"the tests need the real data at {MAGNETIC_TILE} (../shared beside the checkout)")


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
    from agent.settings import load_settings

    return load_settings(overrides=small_overrides)


@pytest.fixture(scope="session")
def small_dataset(small_config):
    from model.data import load_dataset

    return load_dataset(MAGNETIC_TILE, small_config.data)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, small_config, small_dataset) -> Path:
    """One real model trained once per session on a Magnetic Tile subset."""
    from model.train import train_model

    out = tmp_path_factory.mktemp("model")
    train_model(small_config, small_dataset, out, progress=False)
    return out


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One real Ray instance for the whole test session (starting one takes seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="adtr-edge-tests")
    yield ray
    ray.shutdown()
