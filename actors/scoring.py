"""ScoringActor: coarse maps → decisions (the model's own ScoreHead), published on a ZeroMQ PUB socket.

Anomalous frames are also written to disk: the original payload, a heatmap overlay and a JSON
sidecar, under a size cap with oldest-first cleanup.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog
import torch
import zmq

from agent.logs import configure_logging
from agent.settings import OutputConfig
from model.detector import ScoreHead, load_score_head
from model.scoring import defect_regions
from model.visualize import heatmap_overlay

from .protocol import FrameHeader, decision_message, decode_payload

log = structlog.get_logger(__name__)
PAYLOAD_SUFFIX = {"jpeg": ".jpg", "png": ".png", "raw": ".png"}


class AnomalyStore:
    """Files for anomalous frames in `<dir>/<camera>/`, total size kept under `max_bytes` (oldest go first)."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        existing = sorted((p for p in self.root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
        self.files: deque[tuple[Path, int]] = deque((p, p.stat().st_size) for p in existing)
        self.total = sum(size for _, size in self.files)
        self.deleted = 0

    def write(self, camera: str, stem: str, files: dict[str, bytes]) -> dict[str, str]:
        folder = self.root / camera
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        for suffix, data in files.items():
            path = folder / f"{stem}{suffix}"
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            self.files.append((path, len(data)))
            self.total += len(data)
            written[suffix] = str(path)
        self._trim()
        return written

    def _trim(self) -> None:
        while self.total > self.max_bytes and self.files:
            path, size = self.files.popleft()
            path.unlink(missing_ok=True)
            self.total -= size
            self.deleted += 1


class ScoringActor:
    def __init__(self, model_dir: str, results_endpoint: str, cfg: OutputConfig):
        configure_logging("info", json_output=True)  # worker stderr reaches the driver
        self.model_dir, self.cfg = model_dir, cfg
        self.head: ScoreHead = load_score_head(model_dir)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.sndhwm = 10_000
        self.socket.linger = 1000
        self.socket.bind(results_endpoint)
        self.bound = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.store = AnomalyStore(cfg.dir, cfg.max_bytes) if cfg.save_anomalies else None
        self.decisions = self.anomalies = self.write_errors = 0
        self.log = log.bind(model_version=self.head.model_version)
        self.log.info("scoring ready", results=self.bound, output=str(cfg.dir) if self.store else None)

    def _head_for(self, version: str) -> ScoreHead:
        """The threshold must be the one of the model that made the map."""
        if version != self.head.model_version:
            head = load_score_head(self.model_dir)
            if head.model_version != version:
                raise RuntimeError(f"map from model {version}, but {self.model_dir} holds {head.model_version}")
            self.head = head
            self.log = log.bind(model_version=version)
        return self.head

    async def score_batch(self, headers: list[dict[str, Any]], results: list[dict[str, Any]],
                          payloads: list[bytes], received_at: list[float]) -> list[dict[str, Any]]:
        """Decide frames from their coarse maps, publish each decision, save anomalies (payloads are
        the camera's bytes). Returns what the ingest counts: is_anomaly and latency per frame."""
        out: list[dict[str, Any]] = [{}] * len(results)
        # One ScoreHead call per model version (there is one, except across a model swap).
        for version in dict.fromkeys(r["model_version"] for r in results):
            idx = [i for i, r in enumerate(results) if r["model_version"] == version]
            head = self._head_for(version)
            coarse = torch.from_numpy(np.stack([np.asarray(results[i]["coarse"], np.float32) for i in idx]))
            scored = head.score(coarse)
            for j, i in enumerate(idx):
                out[i] = self._decide(head, headers[i], results[i], payloads[i], received_at[i], scored, j)
        return out

    def _decide(self, head: ScoreHead, header, result, payload: bytes, received_at: float, scored, j: int) -> dict:
        amap = scored.maps[j].numpy()
        score, threshold = float(scored.scores[j]), head.decision_threshold
        is_anomaly = bool(scored.is_anomaly[j])
        regions = defect_regions(amap, threshold, (header["width"], header["height"]),
                                 self.cfg.min_region_area_px, self.cfg.max_regions) if is_anomaly else []
        now = time.time()
        decision = {
            "camera_id": header["camera_id"], "seq": header["seq"], "ts": header["ts"],
            "score": score, "normalized_score": float(scored.normalized[j]), "threshold": threshold,
            "is_anomaly": is_anomaly, "regions": regions, "model_version": head.model_version,
            "latency_ms": (now - header["ts"]) * 1000.0, "agent_ms": (now - received_at) * 1000.0,
            "inference_ms": result["inference_ms"], "batch_size": result["batch_size"],
            "width": header["width"], "height": header["height"],
        }
        if is_anomaly and self.store is not None:
            decision["files"] = self._save(header, decision, amap, payload)
        self.socket.send_multipart(decision_message(decision))
        self.decisions += 1
        self.anomalies += int(is_anomaly)
        return {"is_anomaly": is_anomaly, "latency_ms": decision["latency_ms"]}

    def _save(self, header, decision, amap, payload: bytes) -> dict[str, str]:
        try:
            # The overlay at the camera's own resolution: decode the original payload (anomalies only).
            frame = decode_payload(FrameHeader.model_validate(header), payload)
            height, width = frame.shape[:2]
            big = cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)
            if header["encoding"] == "raw":  # raw pixels are stored as a lossless PNG
                payload = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()
            caption = f"ANOMALY {decision['normalized_score']:.2f}x thr  {header['camera_id']} #{header['seq']}"
            overlay = heatmap_overlay(frame, big, 2 * decision["threshold"], big >= decision["threshold"], caption)
            stem = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(header['ts']))}_{header['seq']:010d}"
            sidecar = dict(decision, source_encoding=header["encoding"])
            return self.store.write(header["camera_id"], stem, {
                PAYLOAD_SUFFIX[header["encoding"]]: payload,
                "_overlay.png": cv2.imencode(".png", overlay)[1].tobytes(),
                ".json": json.dumps(sidecar, indent=1).encode(),
            })
        except Exception as exc:  # noqa: BLE001 - a full disk (or any save failure) must not stop decisions
            self.write_errors += 1
            self.log.error("cannot save anomaly", camera_id=header["camera_id"], seq=header["seq"], error=str(exc))
            return {}

    async def stats(self) -> dict[str, Any]:
        store = {"bytes": self.store.total, "files": len(self.store.files), "deleted": self.store.deleted} \
            if self.store else None
        return {"model_version": self.head.model_version, "decisions": self.decisions, "anomalies": self.anomalies,
                "write_errors": self.write_errors, "store": store, "results": self.bound, "pid": os.getpid()}

    async def ping(self) -> str:
        return self.head.model_version

    async def close(self) -> None:
        self.socket.close(linger=1000)
