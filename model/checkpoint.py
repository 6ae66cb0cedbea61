"""Checkpoints: reconstructor tensors in safetensors plus a JSON manifest. Loading executes no code."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .weights import file_sha256

FORMAT = "adtr-edge/1"
WEIGHTS_FILE = "reconstructor.safetensors"
MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, or does not fit the model it is loaded into."""


def save_checkpoint(model_dir: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write tensors and manifest atomically (temp file + rename); returns the manifest written."""
    model_dir.mkdir(parents=True, exist_ok=True)
    weights = model_dir / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    manifest = dict(manifest, format=FORMAT, weights_file=WEIGHTS_FILE, weights_sha256=file_sha256(tmp))
    manifest.setdefault(
        "model_version", f"{manifest.get('created_at', 'v')}-{manifest['weights_sha256'][:8]}"
    )
    tmp.replace(weights)
    _write_manifest(model_dir, manifest)
    return manifest


def _write_manifest(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Temp file + rename: a reader never sees a half-written manifest."""
    tmp = model_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(model_dir / MANIFEST_FILE)


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"no model at {model_dir}: {MANIFEST_FILE} is missing (train one first)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON (truncated or damaged?): {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def record_metrics(model_dir: Path, dataset: str, metrics: dict[str, Any]) -> None:
    """Store an evaluation's headline metrics in the manifest under `metrics[dataset]` (atomic)."""
    manifest = read_manifest(Path(model_dir))
    manifest.setdefault("metrics", {})[dataset] = metrics
    _write_manifest(Path(model_dir), manifest)


def load_checkpoint(model_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, tensors). The weight file's hash must match the manifest: this catches truncation."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    weights = model_dir / manifest.get("weights_file", WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    actual = file_sha256(weights)
    if actual != manifest.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} does not match its manifest (sha256 {actual[:12]}… != "
            f"{str(manifest.get('weights_sha256'))[:12]}…): truncated, damaged or replaced"
        )
    try:
        tensors = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{weights} cannot be read as safetensors: {exc}") from exc
    return manifest, tensors


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load with a message that names the first mismatching tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: tensors do not fit the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    module.load_state_dict(tensors, strict=True)


def data_fingerprint(digests: list[str]) -> str:
    """Order-independent hash of the training images' content."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
