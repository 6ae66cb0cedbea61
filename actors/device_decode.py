"""JPEG frames decoded in batches on the inference actor's device, and resized there.

With `inference.jpeg_decode: device` the ingest sends a JPEG frame's own bytes (tens of KB) instead of
its pixels, and `torchvision.io.decode_jpeg` decodes a whole batch at once on the model's device (nvJPEG
on a GPU; libjpeg on a CPU, which is how the tests run it). The resize follows `model.data.resize_image`:
area averaging when shrinking (the same weights as OpenCV's INTER_AREA), bilinear (half-pixel centres) when
enlarging.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F


def _area_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in): output pixel i averages the source interval [i, i + 1) × n_in / n_out, each source pixel
    weighted by its overlap: OpenCV's INTER_AREA when shrinking, as one matrix product per axis."""
    scale = n_in / n_out
    edges = torch.arange(n_out + 1, dtype=torch.float64, device=device) * scale
    left, right = edges[:-1, None], edges[1:, None]
    pixel = torch.arange(n_in, dtype=torch.float64, device=device)[None, :]
    overlap = (torch.minimum(right, pixel + 1) - torch.maximum(left, pixel)).clamp_(min=0)
    return (overlap / scale).float()


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 → (3, S, S) float in [0, 1], on the image's device, rounded to 8 bits as the ingest's
    resize is (the same pixels as the ingest gives: exactly when shrinking, within 1 level when enlarging)."""
    x = image.float()
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        if min(height, width) > size:
            x = _area_weights(height, size, x.device) @ x @ _area_weights(width, size, x.device).T
        else:
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return x.round_().clamp_(0.0, 255.0) / 255.0


def decode_batch(frames: list[np.ndarray | bytes], size: int,
                 device: torch.device) -> tuple[torch.Tensor, dict[int, str]]:
    """Frames (JPEG bytes, or RGB uint8 pixels at any size) → ((N, 3, S, S) float in [0, 1] on `device` for
    the N frames that decoded, {index: reason} for those that did not). A batch the decoder refuses as a
    whole is decoded frame by frame, so one bad frame costs only itself."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpeg_at = [i for i, f in enumerate(frames) if isinstance(f, (bytes, bytearray, memoryview))]
    decoded: dict[int, torch.Tensor] = {}
    failed: dict[int, str] = {}
    if jpeg_at:
        with warnings.catch_warnings():  # frombuffer over read-only bytes: decode_jpeg never writes to it
            warnings.simplefilter("ignore", UserWarning)
            data = [torch.frombuffer(bytes(frames[i]), dtype=torch.uint8) for i in jpeg_at]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            decoded.update(zip(jpeg_at, images))
        except RuntimeError:
            for i, d in zip(jpeg_at, data):
                try:
                    decoded[i] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
                except RuntimeError as exc:
                    failed[i] = f"JPEG not decodable on {device.type}: {str(exc).splitlines()[0][:200]}"
    for i, frame in enumerate(frames):
        if i not in jpeg_at:
            decoded[i] = torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1)
    ok = [i for i in range(len(frames)) if i in decoded]
    batch = torch.stack([_resize(decoded[i], size) for i in ok]) if ok else \
        torch.empty((0, 3, size, size), device=device)
    return batch, failed
