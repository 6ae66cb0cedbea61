"""Settings of the actors (ingest, inference, scoring): typed sections the agent's settings compose.

The actors own these, so `actors/` never imports `agent/`; `agent.settings` layers YAML files,
environment variables and `--set` overrides on top of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


DEFAULT_POINT = "default"  # the point of `run --model`: every camera no other point lists
POINT_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"


def check_point_name(name: str) -> None:
    """A point's name: a metric label, an actor's name and a folder; `default` belongs to `run --model`."""
    import re

    if name == DEFAULT_POINT or not re.match(POINT_NAME, name):
        raise ValueError(f"point name {name!r}: lower-case letters, digits, - and _ (at most 32), "
                         f"and not {DEFAULT_POINT!r} (the point of --model)")


class PointConfig(Section):
    """An inspection point: cameras that see the same thing, served by one model (a registry or a model
    folder) with its own threshold, gate, guard, drift reference, sample store and retrain jobs. All
    points of an agent share the backbone (loaded once; frames of every point batched together)."""

    model: Path
    cameras: list[str] = Field(default_factory=list)


def point_paths(model_path: str | dict[str, str]) -> dict[str, str]:
    """{point: model path}; a single path is the one point `default`."""
    return {DEFAULT_POINT: model_path} if isinstance(model_path, str) else dict(model_path)


def camera_points(points: dict[str, list[str]]) -> dict[str, str]:
    """{camera: point} from {point: cameras}; a camera in two points is an error."""
    out: dict[str, str] = {}
    for point, cameras in points.items():
        for camera in cameras:
            if camera in out:
                raise ValueError(f"camera {camera!r} is in two inspection points: {out[camera]!r} and {point!r}")
            out[camera] = point
    return out


class CurveConfig(Section):
    """ZeroMQ CURVE on the ingest sockets: only cameras whose public key is in `allowed_keys_dir` get in."""

    enabled: bool = Field(
        False,
        description=(
            "require ZeroMQ CURVE (encryption and key authentication) on the ingest sockets"
        ),
    )
    server_secret_key: Path | None = Field(None, description="the agent's `<name>.key_secret` from `adtr-edge keys`")
    allowed_keys_dir: Path | None = Field(None, description="a folder of camera `<name>.key` public-key files")
    cameras: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            "camera ids bound to keys: `<name>` (its `<name>.key` in allowed_keys_dir) → the camera ids that key "
            "may send as. Set, every key may send only as its ids (a key not listed, as none): a frame claiming "
            "another id is refused as `camera_not_bound`. Empty: any allowed key may claim any camera id"
        ),
    )

    @model_validator(mode="after")
    def _keys_when_enabled(self) -> CurveConfig:
        if self.enabled and not (self.server_secret_key and self.allowed_keys_dir):
            raise ValueError("ingest.curve.enabled needs ingest.curve.server_secret_key and "
                             "ingest.curve.allowed_keys_dir")
        if self.cameras and not self.enabled:
            raise ValueError("ingest.curve.cameras binds camera ids to CURVE keys: it needs ingest.curve.enabled")
        empty = sorted(name for name, ids in self.cameras.items() if not ids or not all(ids))
        if empty:
            raise ValueError(f"ingest.curve.cameras: {empty} list no camera id (a key that may send as none is "
                             "simply left out)")
        return self


class IngestConfig(Section):
    """The camera sockets and the frames waiting in them. Memory bound of the ingest: cameras × (rcv_hwm +
    queue_depth + max_in_flight) × (max_payload_bytes + 4 KiB) + decode_threads × 20 B × max_pixels
    (`IngestConfig.memory_bound`)."""

    mode: Literal["every", "latest"] = Field(
        "every",
        description=(
            "every: PULL socket, no frame lost, a full agent pushes back on the camera (inspection of every "
            "part). latest: SUB socket, the newest frame wins, the oldest waiting frame is dropped and "
            "counted (live view)."
        ),
    )
    max_in_flight: int = Field(
        16, ge=1, le=1024,
        description=(
            "per camera: frames handed to inference, not yet decided"
        ),
    )
    queue_depth: int = Field(8, ge=1, le=4096, description="per camera: decoded frames waiting for an in-flight slot")
    rcv_hwm: int = Field(16, ge=1, description="ZeroMQ receive high-water mark (messages)")
    socket_buffer_bytes: int = Field(
        256 << 10, ge=0,
        description=(
            "Kernel receive buffer of the socket; bounds what waits unseen in TCP (0 = the OS's autotuning, "
            "which lets several MB of frames, seconds of latency at saturation, queue there)."
        ),
    )
    max_payload_bytes: int = Field(
        32 << 20, ge=1024,
        description=(
            "a frame payload larger than this is refused, counted as invalid"
        ),
    )
    max_pixels: int = Field(
        40_000_000, ge=1,
        description=(
            "a header declaring more pixels (width × height) is refused before decoding, counted as invalid"
        ),
    )
    max_cameras: int = Field(64, ge=1, description="distinct camera ids tracked per endpoint (bounds metric labels)")
    allowed_cameras: list[str] = Field(default_factory=list, description="empty: any camera id")
    allowed_peers: list[str] | None = Field(
        None,
        description=(
            "IP addresses a camera may connect from, checked by a ZAP handler during the ZeroMQ handshake, "
            "before any message part is read (an unlisted peer cannot make the agent assemble even one "
            "message). None: loopback only when the endpoint binds loopback; an endpoint reachable from other "
            "hosts then needs this list or CURVE, and the agent refuses to start with neither. [\"*\"]: any "
            "address (say so on purpose)."
        ),
    )
    curve: CurveConfig = CurveConfig()
    max_seq_gap: int = Field(
        1000, ge=1,
        description=(
            "A forward jump of up to this many seqs is counted as frames lost upstream; a bigger one is a "
            "`jump` (counted once, the sequence starts again there), so one bad seq cannot claim 10^9 drops."
        ),
    )
    max_clock_skew_s: float = Field(
        60.0, gt=0,
        description=(
            "A capture ts further than this from the agent's clock at receipt is a camera clock problem: the "
            "frame is decided and counted, its latency is null and stays out of the latency histogram."
        ),
    )
    decode_threads: int = Field(
        2, ge=1, le=64,
        description=(
            "Decoding runs on this many threads, one chunk per camera at a time, so a camera of huge frames "
            "holds one thread while the others decode the rest."
        ),
    )
    decode_budget_pixels: int = Field(
        16_000_000, ge=1,
        description=(
            "A chunk stops at this many declared pixels (always at least one frame): a camera of huge frames "
            "hands the decoders back after each frame."
        ),
    )
    min_chunk: int = Field(
        4, ge=1, le=512,
        description=(
            "A chunk (one inference call) takes up to the inference batch size, and up to this many frames "
            "when the batch is smaller and they are waiting: at saturation fewer Ray calls per frame (each "
            "costs both sides a serialization and an object-store round trip); at low load the queue holds "
            "fewer frames anyway."
        ),
    )

    @model_validator(mode="after")
    def _peers_valid(self) -> IngestConfig:
        import ipaddress

        for peer in self.allowed_peers or []:
            if peer != "*":
                try:
                    ipaddress.ip_address(peer)
                except ValueError as exc:
                    raise ValueError(f"ingest.allowed_peers: {peer!r} is not an IP address (or \"*\" for any)") from exc
        return self

    def peer_allowlist(self, endpoint: str) -> list[str] | None:
        """The addresses the ZAP handler lets in on `endpoint`; None: no address check. Raises ValueError for an
        endpoint other hosts can reach with neither a list nor CURVE."""
        import ipaddress

        if self.allowed_peers is not None:
            return None if "*" in self.allowed_peers else list(self.allowed_peers)
        if not endpoint.startswith("tcp://"):
            return None  # ipc:// and inproc:// are this host's (file permissions, the process)
        host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
        if host == "localhost":
            return ["127.0.0.1", "::1"]
        try:
            if ipaddress.ip_address(host).is_loopback:
                return ["127.0.0.1", "::1"]
        except ValueError:  # an interface name or * (every interface)
            pass
        if self.curve.enabled:
            return None  # CURVE lets in only cameras whose key is listed
        raise ValueError(f"ingest endpoint {endpoint} is reachable from other hosts: list the cameras' addresses in "
                         "ingest.allowed_peers, or enable ingest.curve (or set allowed_peers to [\"*\"] to let any "
                         "peer in on purpose)")

    def memory_bound(self, image_size: int, cameras: int = 1) -> dict[str, int]:
        """The most bytes the ingest actor holds for `cameras` cameras (one connection each), by part.
        ZeroMQ refuses any message part over max_payload_bytes (ZMQ_MAXMSGSIZE: the peer is
        disconnected before the part is read), so each message it buffers is at most a header + a
        payload. Each decode thread holds at most DECODE_BYTES_PER_PIXEL × max_pixels (the worst case,
        a 16-bit BGRA PNG: its pixels, their shifted copy and the 8-bit copy at once). The kernel's
        socket buffer (socket_buffer_bytes per connection) is not in any process's RSS."""
        from .protocol import DECODE_BYTES_PER_PIXEL, MAX_HEADER_BYTES

        message = self.max_payload_bytes + MAX_HEADER_BYTES
        # in ZeroMQ's pipe, in the camera's queue, and the payloads of frames in flight (kept for scoring)
        per_camera = (self.rcv_hwm + self.queue_depth + self.max_in_flight) * message
        decode = self.decode_threads * DECODE_BYTES_PER_PIXEL * self.max_pixels
        return {"per_camera": per_camera, "decode": decode, "total": cameras * per_camera + decode}


class InferenceConfig(Section):
    max_batch: int | None = Field(
        None, ge=1, le=512,
        description=(
            "Batch size and torch threads: None = measured by the inference actor at start and after every "
            "model swap (actors/tuning.py: the most frames/s whose batch takes at most latency_budget_ms), "
            "the batch size checked again on live batches once the agent is saturated; a number pins it."
        ),
    )
    max_wait_ms: float = Field(
        2.0, ge=0, le=10_000,
        description=(
            "How long a batch that is not full waits for more frames after its first. Under load the queue "
            "fills batches while the previous one runs, so below saturation waiting mostly adds latency. "
            "Measured on 2 cores, batch 4 pinned, fixed offered rates, agents alternated (README, "
            "Self-tuning): p50 / p99 at 20 frames/s 42-44 / 55-69 ms with 10 ms, 33 / 38-42 with 2; at 30 "
            "frames/s 57-62 / 85-94 and 32-33 / 43-49; at 36 (~80 % of batch 1's rate) 57-62 / 96-226 and "
            "36-37 / 89-369 (tails from the box's noise under both). Two milliseconds still join calls that "
            "arrive together (cameras triggered at once)."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description=(
            "auto: a GPU when one is visible, else the CPU"
        ),
    )
    half: bool = Field(True, description="fp16 autocast on a GPU (ignored on the CPU)")
    channels_last: bool = Field(True, description="on a GPU")
    cpu_graph: bool = Field(
        True,
        description=(
            "On the CPU: the backbone as a frozen graph, BatchNorm folded, oneDNN kernels (model/backbone.py; "
            "1.4-1.7x at batch 1 on 2 cores, the same features within 1e-4); false = the eager forward."
        ),
    )
    torch_threads: int | None = Field(
        None, ge=1,
        description=(
            "CPU threads for torch; None = tuned (1, 2, 4, … num_cpus)"
        ),
    )
    num_cpus: float | None = Field(
        None, ge=0,
        description=(
            "CPUs the inference actor reserves in Ray, and the ceiling of its torch threads. None = the "
            "node's cores but one, which the ingest's decoding and the scoring share (on 2 cores one torch "
            "thread beat two end to end: `make bench` thread splits)."
        ),
    )
    latency_budget_ms: float = Field(
        100.0, gt=0,
        description=(
            "The tuner's limit on one batch's forward pass: a latency choice. A frame that arrives while a "
            "batch runs waits for it, so under bursts the p99 is about this budget plus one frame's time. "
            "Measured on 2 cores (README, Self-tuning): 100 ms -> batch 4 or 2, 56-69 frames/s at saturation, "
            "p99 68-87 ms at 50 % of that."
        ),
    )
    tune_batches: list[int] = Field(
        [1, 2, 4, 8, 16, 32, 64, 128, 256], min_length=1,
        description=(
            "the ladder it climbs"
        ),
    )
    tune_seconds: float = Field(0.3, gt=0, description="timed per (threads, batch) point, over at least 3 passes")
    jpeg_decode: Literal["ingest", "device"] = Field(
        "ingest",
        description=(
            "ingest: the ingest actor decodes and resizes every frame. device: JPEG frames travel as their "
            "bytes and the inference actor decodes them in batches on its device (torchvision.io.decode_jpeg: "
            "nvJPEG on a GPU) and resizes them there; other encodings are still decoded by the ingest."
        ),
    )

    @model_validator(mode="after")
    def _ladder(self) -> InferenceConfig:
        if any(b < 1 or b > 512 for b in self.tune_batches):
            raise ValueError("inference.tune_batches must hold batch sizes from 1 to 512")
        return self


class ScoringConfig(Section):
    threads: int = Field(1, ge=1, le=64, description="the scoring actor's torch and OpenCV threads (its CPU budget)")


class NormalSampleConfig(Section):
    """A sample of frames decided normal, saved beside the anomalies for the operator console's review (a
    missed defect is found there). Written by a thread off the decision path; what its queue cannot take
    is shed and counted. Their own share of the folder, inside output.max_bytes. Only with save_anomalies
    (off: the agent writes no frame files at all)."""

    every_s: float = Field(30.0, ge=0, description="per camera: at most one normal frame per interval; 0 = none")
    max_bytes: int = Field(64 << 20, ge=0, description="normals beyond this go first (oldest first)")
    queue: int = Field(
        8, ge=1, le=1024,
        description=(
            "frames waiting to be written; what does not fit is shed and counted"
        ),
    )


class OutputConfig(Section):
    save_anomalies: bool = Field(True, description="frame + heatmap overlay + JSON sidecar per anomalous frame")
    dir: Path = Field(
        Path("runs/agent/anomalies"),
        description=(
            "anomaly folder: <dir>/<camera_id>/<stem>.* per saved frame"
        ),
    )
    max_bytes: int = Field(1 << 30, ge=1 << 20, description="oldest files are deleted beyond this")
    normals: NormalSampleConfig = NormalSampleConfig()
    min_region_area_px: int = Field(4, ge=1, description="at the model's image size")
    max_regions: int = Field(20, ge=0, description="regions published per anomalous frame, largest peak first")
    overlay_max_side: int = Field(
        1024, ge=64,
        description=(
            "The saved overlay (frame | heatmap) is drawn with the frame's longer side at most this many "
            "pixels (JPEGs decoded at a reduced DCT scale): a camera of huge frames cannot stall the scoring "
            "actor."
        ),
    )


class GateConfig(Section):
    """How much worse than the serving model a candidate may be on the holdout samples (see lifecycle.gate)."""

    max_far_increase: float = Field(
        0.01, ge=0, le=1,
        description=(
            "tolerated rise of the false-alarm rate on holdout normals"
        ),
    )
    max_auroc_drop: float = Field(
        0.01, ge=0, le=1,
        description=(
            "tolerated fall of image AUROC (needs labelled defects in the holdout)"
        ),
    )
    max_recall_drop: float = Field(
        0.05, ge=0, le=1,
        description=(
            "tolerated fall of recall at the threshold (needs labelled defects)"
        ),
    )
    min_holdout_normals: int = Field(
        5, ge=1,
        description=(
            "a holdout with fewer normals cannot gate: the candidate waits"
        ),
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="significance of a paired (McNemar) regression in rates")


class RetrainPlusConfig(Section):
    """ADTR+ from the operators' labels: when the store's training split holds at least `min_defects`
    confirmed defects, the retrain fine-tunes with the ADTR+ losses after the normal epochs (pixel
    push-pull where a defect has a box or a mask, top-k where it has only its image label)."""

    enabled: bool = Field(True, description="fine-tune with ADTR+ when the store holds confirmed defects")
    min_defects: int = Field(1, ge=1, description="confirmed defects in the training split needed for ADTR+")
    epochs: int = Field(5, ge=1, description="ADTR+ fine-tuning epochs")
    lr: float | None = Field(None, gt=0, description="None: the model's adtr_plus.lr")


class RetrainConfig(Section):
    """`adtr-edge retrain` (the Ray job): what it trains on, with what resources, and what it does after."""

    policy: Literal["register", "shadow", "auto"] = Field(
        "auto",
        description=(
            "register: the new version waits as the candidate; shadow: the agent runs it beside the serving "
            "one; auto: promote when the gate passed with labelled defects, shadow when only normals could be "
            "checked."
        ),
    )
    auto_without_defects: bool = Field(False, description="let `auto` promote on a normals-only gate too")
    refit_first: bool = Field(
        True,
        description=(
            "Before training, publish a refit-only candidate (the serving reconstructor, its scoring refitted "
            "on the snapshot: seconds) through the same gate and policy; the trained candidate then replaces "
            "it only if it is better on the same holdout. Off: the trained candidate alone, as before."
        ),
    )
    warm_start: bool = Field(True, description="start from the serving version's weights (else from scratch)")
    epochs: int = Field(
        24, ge=1,
        description=(
            "warm-started; a from-scratch retrain uses the model's own train.epochs"
        ),
    )
    lr: float | None = Field(None, gt=0, description="None: the model's train.lr (× 0.3 when warm-started)")
    max_minutes: float = Field(20.0, ge=0, description="training stops here with what it has (0: no limit)")
    min_train_samples: int = Field(
        20, ge=1,
        description=(
            "a retrain with fewer training samples refuses to start (accept more first)"
        ),
    )
    operator_repeat: int = Field(
        4, ge=1, le=100,
        description=(
            "Frames an operator accepted as normal are repeated this many times in the training set: a line's "
            "new condition is a handful of corrected false alarms among the base set's hundreds of normals."
        ),
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP when > 1)")
    cpus_per_worker: float = Field(
        1.0, gt=0,
        description=(
            "CPUs each Ray Train worker asks for (and its torch threads)"
        ),
    )
    use_gpu: bool = Field(False, description="the serving actor holds a 1-GPU box's GPU: train on the CPU there")
    label_selector: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Place training workers on nodes with these Ray node labels (e.g. {\"adtr-role\": \"trainer\"}); {} = "
            "anywhere."
        ),
    )
    nice: int = Field(10, ge=0, le=19, description="training workers yield the CPU to serving")
    start_timeout_s: float = Field(60.0, gt=0, description="a worker group that cannot be placed fails after this…")
    max_start_attempts: int = Field(1, ge=1, description="…this many times (then the job fails, with the reason)")
    max_failures: int = Field(1, ge=0, description="worker crashes Ray Train recovers from (resuming its checkpoint)")
    keep_versions: int = Field(10, ge=1, description="registry retention: the newest N, plus any a pointer names")
    gate: GateConfig = GateConfig()
    adtr_plus: RetrainPlusConfig = RetrainPlusConfig()


class StoreConfig(Section):
    max_normals_per_camera: int = Field(
        5000, ge=1,
        description=(
            "normal samples kept per camera; the oldest automatic ones go first"
        ),
    )
    max_bytes_per_camera: int = Field(2 << 30, ge=1 << 20, description="bytes of samples kept per camera")
    max_defects_per_camera: int = Field(2000, ge=1, description="confirmed defect samples kept per camera")


class AutoSampleConfig(Section):
    """Frames the serving model scored confidently normal go to the store (origin auto), off the decision
    path: a bounded queue and a writer thread in the scoring actor; what does not fit is shed and counted."""

    enabled: bool = Field(True, description="store confidently normal frames (origin auto) for retraining")
    max_normalized_score: float = Field(0.5, gt=0, le=1, description="score / threshold below this is \"confident\"")
    min_interval_s: float = Field(10.0, ge=0, description="per camera: at most one auto sample per interval")
    queue: int = Field(32, ge=1, description="frames waiting to be written; what does not fit is shed and counted")


class ShadowConfig(Section):
    sample: float = Field(0.25, ge=0, le=1, description="fraction of live batches the candidate also runs on")


class GuardConfig(Section):
    """After a promotion: roll back by itself if a camera's anomaly rate jumps far above the previous
    model's rate on that camera (measured over its last `window` decisions before the promotion)."""

    enabled: bool = Field(
        True,
        description=(
            "watch each promotion and roll back by itself on a jump in a camera's anomaly rate"
        ),
    )
    window: int = Field(
        200, ge=10,
        description=(
            "decisions per camera remembered to compare the models' anomaly rates"
        ),
    )
    min_decisions: int = Field(
        50, ge=5,
        description=(
            "decisions a camera needs, under each model, before the guard judges it"
        ),
    )
    factor: float = Field(
        3.0, ge=1,
        description=(
            "roll back when the new rate exceeds max(factor × old rate, old rate + margin)"
        ),
    )
    margin: float = Field(0.05, ge=0, le=1, description="see factor: an absolute rate increase always tolerated")
    watch_s: float = Field(900.0, gt=0, description="how long after a promotion the guard watches")


class DriftConfig(Section):
    """Per camera: the population stability index (PSI) of its last `window` image scores against the
    serving model's validation scores (bins at their stored quantiles). PSI > alarm_psi = drift."""

    enabled: bool = Field(
        True,
        description=(
            "compute each camera's score drift (adtr_score_drift_psi) and raise the alarm"
        ),
    )
    window: int = Field(256, ge=20, description="the camera's most recent image scores compared with the reference")
    min_samples: int = Field(100, ge=10, description="scores a camera needs before its drift is reported")
    alarm_psi: float = Field(0.25, gt=0, description="PSI above this is drift (0.1: some, 0.25: a significant shift)")


class ScheduleConfig(Section):
    """Retrain by itself: after `min_new_samples` new accepted samples (operator, auto, defects), at most
    once per `min_interval_s`, optionally only inside a daily window ("22:00-05:00", local time)."""

    enabled: bool = Field(False, description="retrain by itself when the conditions below hold")
    min_new_samples: int = Field(100, ge=1, description="accepted samples since the last retrain needed to start one")
    min_interval_s: float = Field(3600.0, ge=0, description="at least this long between two scheduled retrains")
    window: str | None = Field(
        None, pattern=r"^\d{2}:\d{2}-\d{2}:\d{2}$",
        description=(
            "a daily window (\"22:00-05:00\", local time) outside which none starts; None: any time"
        ),
    )
    check_every_s: float = Field(30.0, gt=0, description="how often the conditions are checked")


class ColdStartConfig(Section):
    """A new camera taught on the box (`adtr-edge points add`): its point starts from the serving model of
    the agent's first point, records the camera's first `frames` frames into its own sample store (its
    decisions published as not inspected meanwhile), then a retrain job refits and trains its first model
    on them; that model is shadowed (or promoted by the gate with labelled defects) and the operator
    promotes it. Frames are recorded at most one per `every_s` per camera (0: every frame). The operator may
    end the recording earlier (`adtr-edge points finish-recording`, at least 40 frames)."""

    frames: int = Field(
        200, ge=40,
        description=(
            "actors.cold.MIN_RECORDED: 70 % train, a retrain needs min_train_samples"
        ),
    )
    every_s: float = Field(
        0.0, ge=0,
        description=(
            "record at most one frame per camera per this many seconds (0: every frame)"
        ),
    )
    epochs: int = Field(
        3, ge=1,
        description=(
            "the retrain's training after its refit (warm-started from the template)"
        ),
    )
    queue: int = Field(64, ge=1, description="frames waiting to be written; what does not fit is shed and counted")


class LearningConfig(Section):
    """Learning on the line; active when the agent serves from a model registry (`--model REGISTRY`)."""

    store: StoreConfig = StoreConfig()
    auto_sample: AutoSampleConfig = AutoSampleConfig()
    shadow: ShadowConfig = ShadowConfig()
    guard: GuardConfig = GuardConfig()
    drift: DriftConfig = DriftConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    retrain: RetrainConfig = RetrainConfig()
    cold_start: ColdStartConfig = ColdStartConfig()
    reconcile_s: float = Field(5.0, gt=0, description="how often the agent checks it serves the registry's current")
