"""`adtr-edge retrain`: the Ray job that turns the accepted-sample store into a new, gated model version.

1. Take the retrain lock (one at a time per registry) and a snapshot of the store (saved with the run,
   so a resumed run trains on exactly the same samples).
2. Backbone features for every sample, through the feature cache (only frames it has not seen cost a
   forward pass; the cache is keyed by content, like the store).
3. Refit first (`retrain.refit_first`): the serving reconstructor unchanged, its scoring terms and
   thresholds refitted on the snapshot, gated against the serving model on the holdout and published and
   acted on by policy within seconds, so a line's obvious change (lighting) is answered before training.
4. Train the reconstructor with Ray Train (`TorchTrainer`: one CPU worker on a small box, N workers or
   a GPU worker where the cluster has them), warm-started from the serving version or from scratch,
   checkpointing every epoch under a unique run name, so a crashed run resumes where it stopped.
   Workers run at a lower CPU priority with the threads they reserved: training never starves serving.
   With confirmed defects in the store's training split, an ADTR+ phase follows (model.adtr_plus: pixel
   push-pull where the operator drew a box or a mask, top-k where only the image is labelled).
5. Refit the scoring terms and calibrate the thresholds on the run's own training and validation
   features (`fit_scoring`, as `train` does: a new reconstructor must not ship the serving model's
   residual statistics); score the candidate and the serving model on the same holdout normals and
   labelled defects; gate (`lifecycle.gate`). With a refit-only candidate published, the trained one must
   also pass the gate against it and be better on the same holdout, or it is rejected with that reason.
6. Publish the version in the registry (with its gate result and the dataset list), then act by
   policy: register, shadow, or promote (through the running agent when there is one).
A run that fails or is stopped publishes nothing more than what it had published (its gated refit-only
candidate, when it got that far) and never writes the store; resumed, it keeps that refit candidate.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import structlog
import torch

from adtr_edge.lifecycle.gate import GateResult, GateTolerances, ModelEvaluation, evaluate_model, gate
from adtr_edge.lifecycle.registry import Registry, write_json_atomic
from adtr_edge.lifecycle.samples import SampleStore, Snapshot, StoredSample, StoreLimits
from adtr_edge.model.adtr_plus import label_cell_masks, plus_loss, plus_training_data
from adtr_edge.model.checkpoint import load_checkpoint, save_checkpoint
from adtr_edge.model.config import AdtrConfig
from adtr_edge.model.data import BadFiles, Sample
from adtr_edge.model.detector import AnomalyDetector, load_detector
from adtr_edge.model.features import FeatureCache
from adtr_edge.model.reconstructor import Reconstructor, explained_variance
from adtr_edge.model.scorer import reconstructor_tensors
from adtr_edge.model.train import Calibration, checkpoint_tensors, fit, fit_scoring, model_manifest, seed_everything

from .config import DEFAULT_POINT, RetrainConfig

log = structlog.get_logger(__name__)
STATE_FILE = "train_state.pt"
PLUS_STATE_FILE = "train_state_plus.pt"  # the ADTR+ phase (labelled defects), after the normal epochs
MANAGER_ACTOR = "models"  # the default point's model manager; another point's is "models-<point>"
AGENT_FILE = "agent.json"  # in the registry: the agent serving it (HTTP, Ray Jobs, its inspection point)


def manager_name(point: str) -> str:
    return MANAGER_ACTOR if point == DEFAULT_POINT else f"{MANAGER_ACTOR}-{point}"


class RetrainError(RuntimeError):
    """A retrain that cannot run or finish; the message says why (exit code 2 in the CLI)."""


class RetrainBusy(RetrainError):
    """Another retrain holds this registry."""


@dataclass
class Paths:
    registry: Registry

    @property
    def runs(self) -> Path:
        return self.registry.root / "runs"

    def run(self, name: str) -> Path:
        return self.runs / name

    @property
    def lock(self) -> Path:
        return self.registry.root / ".retrain.lock"

    @property
    def holder(self) -> Path:
        return self.registry.root / "retrain.json"

    @property
    def cache(self) -> Path:
        return self.registry.root / "feature-cache"


@contextmanager
def retrain_lock(registry: Registry, run_name: str) -> Iterator[None]:
    """An exclusive, non-blocking lock held for the whole run; the kernel drops it if the job dies."""
    paths = Paths(registry)
    fh = open(paths.lock, "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        holder = {}
        try:
            holder = json.loads(paths.holder.read_text())
        except (OSError, json.JSONDecodeError):
            pass
        raise RetrainBusy(f"a retrain is already running on {registry.root}: run {holder.get('run', '?')} "
                          f"(pid {holder.get('pid', '?')}, since {holder.get('since', '?')}); one at a time") from None
    try:
        paths.holder.write_text(json.dumps({"run": run_name, "pid": os.getpid(),
                                            "since": datetime.now(UTC).isoformat(timespec="seconds")}))
        yield
    finally:
        paths.holder.unlink(missing_ok=True)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def new_run_name(snapshot: Snapshot) -> str:
    return f"retrain-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{snapshot.fingerprint[:8]}"


def _samples(stored: list[StoredSample]) -> list[Sample]:
    return [Sample(s.path, s.label, s.origin if s.label == 0 else "confirmed_defect") for s in stored]


def _worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: fit the reconstructor on its shard, report (and checkpoint) every epoch."""
    import ray
    import ray.train
    import ray.train.torch  # prepare_model (a submodule `import ray.train` does not load)
    from ray.train import Checkpoint

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    os.nice(config["nice"])  # serving keeps priority over training on a shared box
    torch.set_num_threads(config["threads"])
    cfg = AdtrConfig.model_validate(config["settings"])
    seed_everything(cfg.train.seed)
    train = torch.from_numpy(np.load(config["train_features"]))
    val = torch.from_numpy(np.load(config["val_features"])) if config["val_features"] else None
    model = Reconstructor(train.shape[1], cfg.backbone.feature_size, cfg.reconstructor)
    if config["warm_start"]:  # fine-tune: the serving weights and their feature normalization, unchanged
        _, tensors = load_checkpoint(Path(config["warm_start"]))
        model.load_state_dict(reconstructor_tensors(tensors))  # the scorer is refitted after training
    else:
        model.fit_normalization(train)  # on the whole training set, the same on every worker
    device = torch.device("cuda" if config["use_gpu"] and torch.cuda.is_available() else "cpu")
    model.to(device)
    # What `fit` trains: the model itself, or with several workers DistributedDataParallel around it.
    trained: torch.nn.Module = ray.train.torch.prepare_model(model) if world > 1 else model
    shard = train[rank::world]
    local = Path(tempfile.mkdtemp(prefix="adtr-retrain-")) / STATE_FILE
    local_plus = local.with_name(PLUS_STATE_FILE)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resuming this run after a crash: continue from its last epoch
        with checkpoint.as_directory() as folder:
            for name, target in ((STATE_FILE, local), (PLUS_STATE_FILE, local_plus)):
                if (Path(folder) / name).is_file():
                    shutil.copy(Path(folder) / name, target)
    node = ray.get_runtime_context().get_node_id()

    def report(record: dict[str, Any]) -> None:
        metrics = dict(record, node_id=node, rank=rank)
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                for path in (local, local_plus):
                    if path.is_file():
                        shutil.copy(path, Path(folder) / path.name)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)

    tcfg = cfg.train.model_copy(update={"epochs": config["epochs"], "lr": config["lr"],
                                        "max_minutes": config["max_minutes"] if world == 1 else 0.0})
    result = fit(trained, (shard,), (val,) if val is not None and len(val) else None, tcfg, state_path=local,
                 state_tag=config["run_name"], progress=False, on_epoch=report)
    out = {"node_id": node, "world_size": world, "seconds": result.seconds, "stopped_early": result.stopped_early,
           "epochs": len(result.history), "resumed_from_epoch": result.resumed_from_epoch}
    plus = config.get("plus")
    if plus:  # ADTR+ on the operators' confirmed defects: push-pull with a box/mask, top-k with a label only
        defects = torch.from_numpy(np.load(plus["features"]))[rank::world]
        masks = torch.from_numpy(np.load(plus["cell_masks"]))[rank::world]
        has_mask = torch.from_numpy(np.load(plus["has_mask"]))[rank::world]
        data = plus_training_data(shard, defects, masks, has_mask)
        pcfg = tcfg.model_copy(update={"epochs": plus["epochs"], "lr": plus["lr"]})
        fitted = fit(trained, data, None, pcfg, loss_fn=plus_loss(plus["alpha"], plus["top_k"]), state_path=local_plus,
                     state_tag=config["run_name"] + "/adtr+", progress=False,
                     on_epoch=lambda record: report(dict(record, phase="adtr+")))
        out.update(plus_epochs=len(fitted.history), plus_seconds=fitted.seconds,
                   plus_resumed_from_epoch=fitted.resumed_from_epoch)
    return out


def _train_with_ray(cfg: RetrainConfig, model_cfg: AdtrConfig, run_dir: Path, storage: Path, run_name: str,
                    train_path: Path, val_path: Path | None, warm_start: Path | None, epochs: int, lr: float,
                    plus: dict[str, Any] | None = None):
    if TYPE_CHECKING:  # what ray.train gives at runtime (Train V2, its default); mypy would see V1's classes
        from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.v2.api.result import Result
        from ray.train.v2.torch.torch_trainer import TorchTrainer
    else:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

    # Read by the Train controller (propagated to it from this process's environment): a worker group that
    # cannot be placed fails after this long, `max_start_attempts` times, then the job fails (no hang).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.start_timeout_s)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "settings": json.loads(model_cfg.model_dump_json()), "train_features": str(train_path),
            "val_features": str(val_path) if val_path else "", "warm_start": str(warm_start) if warm_start else "",
            "epochs": epochs, "lr": lr, "max_minutes": cfg.max_minutes, "nice": cfg.nice,
            "threads": max(1, int(cfg.cpus_per_worker)), "use_gpu": cfg.use_gpu, "run_name": run_name,
            "plus": plus,
        },
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.use_gpu else {})},
                                     label_selector=cfg.label_selector or None),
        run_config=RunConfig(
            name=run_name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures,
                                         controller_failure_limit=cfg.max_start_attempts),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = cast("Result", trainer.fit())  # Ray's V2 fit() is annotated with the V1 Result (as mypy sees it)
    except Exception as exc:  # Ray Train wraps worker and placement failures in several types
        text = str(exc).strip().splitlines()
        hint = next((line for line in text if "timeout" in line.lower() or "resources" in line.lower()),
                    text[-1] if text else "")
        raise RetrainError(f"training failed ({type(exc).__name__}): {hint[:400]}") from exc
    if result.checkpoint is None:
        raise RetrainError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        history = list(json.loads(state["history"]))
        if plus and (Path(folder) / PLUS_STATE_FILE).is_file():  # the weights after the ADTR+ phase
            state = torch.load(Path(folder) / PLUS_STATE_FILE, map_location="cpu", weights_only=True)
            history += [dict(record, phase="adtr+") for record in json.loads(state["history"])]
    return state, result.return_value or {}, history


def retrain(registry_path: str | Path, cfg: RetrainConfig, run_name: str | None = None, by: str = "cli",
            namespace: str | None = None, progress: bool = False) -> dict[str, Any]:
    """One retrain, start to finish (see the module doc). Returns what happened, for the job's log."""
    registry = Registry(registry_path)
    paths = Paths(registry)
    store = SampleStore(registry.store_dir, StoreLimits())
    resuming = run_name is not None and (paths.run(run_name) / "snapshot.json").is_file()
    snapshot = _load_snapshot(paths.run(run_name)) if run_name is not None and resuming else store.snapshot()
    run_name = run_name or new_run_name(snapshot)
    run_dir = paths.run(run_name)
    timings: dict[str, float] = {}
    with retrain_lock(registry, run_name):
        started = time.monotonic()
        os.nice(cfg.nice)  # the job's own feature extraction yields to serving too
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            (run_dir / "snapshot.json").write_text(json.dumps(snapshot.to_json()))
        train_rows = snapshot.select(label=0, split="train")
        if len(train_rows) < cfg.min_train_samples:
            raise RetrainError(f"the store holds {len(train_rows)} training normals, fewer than "
                               f"retrain.min_train_samples={cfg.min_train_samples}: accept more frames first")
        serving_version = registry.current()
        serving_dir = registry.version_dir(serving_version)
        serving = load_detector(serving_dir)
        log.info("retrain started", run=run_name, serving=serving_version, resuming=resuming, by=by,
                 **{k: v for k, v in snapshot.counts().items() if k == "by_origin"})

        t0 = time.monotonic()
        cache = FeatureCache(serving.backbone, paths.cache)
        bad = BadFiles()
        misses_before = cache.misses

        def features(rows: list[StoredSample], what: str, operator_repeat: int = 1) -> torch.Tensor:
            if not rows:
                return torch.empty(0, serving.backbone.out_channels, serving.cfg.backbone.feature_size,
                                   serving.cfg.backbone.feature_size)
            fs = cache.extract(_samples(rows), bad, "skip", serving.cfg.train.feature_batch_size, progress, what)
            repeats = [operator_repeat if s.defect_type == "operator" else 1 for s in fs.samples]
            return fs.features.repeat_interleave(torch.tensor(repeats), dim=0) if operator_repeat > 1 else fs.features

        train = features(train_rows, "train", cfg.operator_repeat)
        val = features(snapshot.select(label=0, split="val"), "val")
        holdout_normals = features(snapshot.select(label=0, split="holdout"), "holdout normals")
        holdout_defects = features(snapshot.select(label=1, split="holdout"), "holdout defects")
        defect_rows = snapshot.select(label=1, split="train")
        plus, plus_info = None, {"defects": len(defect_rows), "used": False}
        if cfg.adtr_plus.enabled and len(defect_rows) >= cfg.adtr_plus.min_defects:
            fs = cache.extract(_samples(defect_rows), bad, "skip", serving.cfg.train.feature_batch_size, progress,
                               "train defects")
            kept = {s.path for s in fs.samples}  # an unreadable image is skipped (and listed): keep rows in step
            plus, plus_info = _plus_inputs(cfg, serving.cfg, run_dir, fs.features,
                                           [r for r in defect_rows if r.path in kept])
        timings["features_s"] = time.monotonic() - t0
        computed = cache.misses - misses_before
        np.save(run_dir / "train_features.npy", train.numpy())
        val_path = None
        if len(val):
            np.save(run_dir / "val_features.npy", val.numpy())
            val_path = run_dir / "val_features.npy"

        model_cfg = serving.cfg
        if len(val) == 0:
            raise RetrainError("the store has no validation normals to calibrate a threshold on")
        tolerances = GateTolerances(**cfg.gate.model_dump())
        serving_eval = evaluate_model(serving, holdout_normals, holdout_defects)
        data_info = {"name": "sample-store", "root": str(registry.store_dir), "layout": "store",
                     "fingerprint": snapshot.fingerprint, "counts": snapshot.counts(), "skipped_files": bad.items}

        def publish(detector: AnomalyDetector, calibration, result, training: dict[str, Any]) -> str:
            """The candidate as an immutable registry version, with its gate record and the dataset list."""
            manifest = model_manifest(model_cfg, serving.backbone, calibration, data=data_info, training={
                **training, "feature_seconds": timings["features_s"], "features_computed": computed, "run": run_name,
                "by": by, "val_explained_variance": explained_variance(detector.reconstructor, val)
                if len(val) >= 2 else None})
            manifest["parent_model_version"] = serving_version
            staging = registry.versions_dir / f".staging-{run_name}"
            shutil.rmtree(staging, ignore_errors=True)
            manifest = save_checkpoint(staging, checkpoint_tensors(detector), manifest)
            return registry.add_version(staging, by=by, extra={
                "gate.json": dict(result.to_json(), run=run_name, tolerances=tolerances.__dict__),
                "dataset.json": snapshot.to_json()})

        refit = refit_eval = None
        refit_file = run_dir / "refit.json"
        if cfg.refit_first and resuming and refit_file.is_file():  # published before the crash: judged against it
            refit = json.loads(refit_file.read_text())
            refit_eval = evaluate_model(load_detector(registry.version_dir(refit["version"]), serving.backbone),
                                        holdout_normals, holdout_defects)
        elif cfg.refit_first:
            # The obvious part first, in seconds: the serving reconstructor unchanged, its scoring terms and
            # thresholds refitted on this snapshot, through the same gate and policy as a trained candidate.
            t0 = time.monotonic()
            refit_detector = AnomalyDetector(model_cfg, serving.backbone, serving.reconstructor,
                                             manifest={"model_version": "refit-candidate"})
            refit_calibration = fit_scoring(refit_detector, train, val, np.zeros(len(val), int))
            refit_eval = evaluate_model(refit_detector, holdout_normals, holdout_defects)
            refit_result = gate(refit_eval, serving_eval, tolerances)
            refit_version = publish(refit_detector, refit_calibration, refit_result,
                                    {"kind": "refit", "history": [], "seconds": 0.0, "epochs": 0, "lr": 0.0,
                                     "warm_start": serving_version})
            timings["refit_s"] = time.monotonic() - t0
            refit = {"version": refit_version, "gate": refit_result.to_json(),
                     "action": _act(registry, cfg, refit_version, refit_result, by, namespace),
                     "seconds_since_start": round(time.monotonic() - started, 2)}
            write_json_atomic(refit_file, refit)  # a resumed run reads it: never half-written
            log.info("refit-only candidate published", run=run_name, **refit)

        t0 = time.monotonic()
        warm = serving_dir if cfg.warm_start else None
        epochs = cfg.epochs if cfg.warm_start else max(1, model_cfg.train.epochs)  # a statistics-only model has 0
        lr = cfg.lr or (model_cfg.train.lr * (0.3 if cfg.warm_start else 1.0))
        state, worker_info, history = _train_with_ray(cfg, model_cfg, run_dir, paths.runs / "ray", run_name,
                                                      run_dir / "train_features.npy", val_path, warm, epochs, lr,
                                                      plus)
        timings["train_s"] = time.monotonic() - t0

        t0 = time.monotonic()
        candidate, calibration, result = _judge_trained(
            state["model"], serving, train, val, (holdout_normals, holdout_defects), serving_eval, tolerances,
            refit if refit is not None and refit_eval is not None and refit["action"] != "rejected" else None,
            refit_eval)
        timings["evaluate_s"] = time.monotonic() - t0

        version = publish(candidate, calibration, result, {
            "kind": "trained", "history": history, "seconds": timings["train_s"],
            "warm_start": serving_version if warm else None, "epochs": epochs, "lr": lr, "workers": worker_info,
            "adtr_plus": plus_info})
        outcome = {"run": run_name, "version": version, "serving": serving_version, "gate": result.to_json(),
                   "refit": refit, "features_computed": computed, "samples": snapshot.counts(),
                   "node_id": worker_info.get("node_id"), "adtr_plus": plus_info,
                   "timings": {k: round(v, 2) for k, v in timings.items()}}
        outcome["action"] = _act(registry, cfg, version, result, by, namespace)
        registry.retain(cfg.keep_versions)
        timings["total_s"] = time.monotonic() - started
        outcome["timings"]["total_s"] = round(timings["total_s"], 2)
        (run_dir / "outcome.json").write_text(json.dumps(outcome, indent=2))
        for name in ("train_features.npy", "val_features.npy", *PLUS_FILES):
            (run_dir / name).unlink(missing_ok=True)
        log.info("retrain done", **{k: outcome[k] for k in ("run", "version", "action")},
                 passed=result.passed, reasons=result.reasons)
        return outcome


def _judge_trained(weights: dict[str, torch.Tensor], serving: AnomalyDetector, train: torch.Tensor,
                   val: torch.Tensor, holdout: tuple[torch.Tensor, torch.Tensor], serving_eval: ModelEvaluation,
                   tolerances: GateTolerances, refit: dict[str, Any] | None,
                   refit_eval: ModelEvaluation | None) -> tuple[AnomalyDetector, Calibration, GateResult]:
    """The trained reconstructor as a candidate: its scoring refitted, gated against serving and, when a refit-only
    candidate is out (`refit`), required to be better than it on the same holdout."""
    model_cfg = serving.cfg
    reconstructor = Reconstructor(serving.backbone.out_channels, model_cfg.backbone.feature_size,
                                  model_cfg.reconstructor)
    reconstructor.load_state_dict(weights)
    candidate = AnomalyDetector(model_cfg, serving.backbone, reconstructor, manifest={"model_version": "candidate"})
    # A new reconstructor has new residual statistics: its scoring terms, fusion scales and
    # thresholds are refitted on this run's own training and validation features, as `train` does.
    calibration = fit_scoring(candidate, train, val, np.zeros(len(val), int))
    candidate_eval = evaluate_model(candidate, *holdout)
    result = gate(candidate_eval, serving_eval, tolerances)
    if refit is not None and refit_eval is not None and result.passed:
        reason = not_better_than(candidate_eval, refit_eval, tolerances, refit["version"])
        if reason:  # training must earn its swap: the refit-only candidate stays where the policy put it
            result.passed = False
            result.reasons.append(reason)
    return candidate, calibration, result


PLUS_FILES = ("plus_features.npy", "plus_cell_masks.npy", "plus_has_mask.npy")


def not_better_than(trained: ModelEvaluation, refit: ModelEvaluation, tolerances: GateTolerances,
                    refit_version: str) -> str | None:
    """Why a trained candidate does not replace the refit-only one, or None when it may: it must pass the
    gate against the refit candidate on the same holdout AND improve on something the holdout measures
    (fewer false alarms, higher recall, or a higher AUROC). Equal is not better: a swap costs a reload."""
    against = gate(trained, refit, tolerances)
    if not against.passed:
        return f"worse than the refit-only candidate {refit_version}: " + "; ".join(against.reasons)
    better = (trained.false_alarm_rate is not None and refit.false_alarm_rate is not None
              and trained.false_alarm_rate < refit.false_alarm_rate)
    better |= trained.recall is not None and refit.recall is not None and trained.recall > refit.recall
    better |= trained.auroc is not None and refit.auroc is not None and trained.auroc > refit.auroc + 1e-3
    if better:
        return None
    return (f"not better than the refit-only candidate {refit_version} on the same holdout (false alarms "
            f"{trained.false_alarm_rate} vs {refit.false_alarm_rate}, recall {trained.recall} vs {refit.recall}, "
            f"AUROC {trained.auroc} vs {refit.auroc})")


def _plus_inputs(cfg: RetrainConfig, model_cfg: AdtrConfig, run_dir: Path, features: torch.Tensor,
                 rows: list[StoredSample]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ADTR+ phase's inputs, saved beside the run: the confirmed defects' features and cell masks
    (from the operator's box or brush mask; none: the image label alone)."""
    masks, has_mask = label_cell_masks([(r.path, r.box, r.mask_path) for r in rows], model_cfg.backbone.feature_size)
    for name, array in zip(PLUS_FILES, (features.numpy(), masks.numpy(), has_mask.numpy()), strict=True):
        np.save(run_dir / name, array)
    plus = {"features": str(run_dir / PLUS_FILES[0]), "cell_masks": str(run_dir / PLUS_FILES[1]),
            "has_mask": str(run_dir / PLUS_FILES[2]), "epochs": cfg.adtr_plus.epochs,
            "lr": cfg.adtr_plus.lr or model_cfg.adtr_plus.lr, "alpha": model_cfg.adtr_plus.alpha,
            "top_k": model_cfg.adtr_plus.top_k}
    info = {"defects": len(rows), "used": True, "pixel_labelled": int(has_mask.sum()),
            "image_labelled": int((~has_mask).sum()), "epochs": plus["epochs"], "lr": plus["lr"]}
    log.info("ADTR+ on confirmed defects", **info)
    return plus, info


def _load_snapshot(run_dir: Path) -> Snapshot:
    data = json.loads((run_dir / "snapshot.json").read_text())
    store_root = run_dir.parents[1] / "store"
    store = SampleStore(store_root)
    samples = []
    for s in data["samples"]:
        path = store.blobs / s["sha256"][:2] / s["file"]
        samples.append(StoredSample(s["sha256"], path, s["origin"], s["label"], s["split"], s.get("camera_id"),
                                    s.get("seq"), 0.0, s.get("box"),
                                    store.blobs / s["mask"][:2] / s["mask"] if s.get("mask") else None))
    return Snapshot(samples, data["fingerprint"], data["taken_at"])


def _manager(namespace: str | None, registry: Registry):
    """The running agent's model manager of the inspection point this registry serves, or None when no
    agent in this Ray cluster serves it. Found by asking each manager which registry it serves (a
    point's manager is `models-<point>`), never by name alone: a version must not reach another point."""
    if not namespace:
        return None
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == namespace and (a["name"] == MANAGER_ACTOR or
                                                     a["name"].startswith(MANAGER_ACTOR + "-"))]
    for name in names:
        try:
            manager: Any = ray.get_actor(name, namespace=namespace)  # Any: see ModelManager.__init__
            if ray.get(manager.registry_root.remote(), timeout=30) == str(registry.root.resolve()):
                return manager
        except (ValueError, ray.exceptions.RayError):
            continue  # gone meanwhile, or not answering: not the one to publish to
    return None


def _act(registry: Registry, cfg: RetrainConfig, version: str, result, by: str, namespace: str | None) -> str:
    """What the policy does with a published version: rejected, registered, shadow or promoted."""
    import ray

    if not result.passed:
        registry.reject(version, by, "gate: " + "; ".join(result.reasons), gate=result.to_json())
        return "rejected"
    policy = cfg.policy
    if policy == "auto" and result.mode != "full" and not cfg.auto_without_defects:
        log.info("gate checked normals only (no labelled defects in the store): shadow + manual promotion",
                 version=version)
        policy = "shadow"
    if policy == "register":
        registry.set_candidate(version, by, "gate passed; waiting for promotion", event="candidate")
        return "registered"
    manager = _manager(namespace, registry)
    if manager is not None:
        try:  # through the running agent: it loads, checks and switches the actors live
            if policy == "shadow":
                ray.get(manager.shadow.remote(version, by), timeout=300)
            else:
                ray.get(manager.promote.remote(version, by, f"gate passed ({result.mode})"), timeout=300)
            return "shadow" if policy == "shadow" else "promoted"
        except ray.exceptions.RayTaskError as exc:  # the agent refused (e.g. the version failed to load there)
            registry.reject(version, by, f"the agent refused it: {str(exc).strip().splitlines()[-1][:300]}")
            return "rejected"
        except ray.exceptions.RayError as exc:  # the agent died meanwhile: act on the registry alone
            log.warning("agent gone; acting on the registry only", error=str(exc)[:200])
    if policy == "shadow":
        registry.set_candidate(version, by, "gate passed; no agent running to shadow it", event="shadow")
        return "shadow"
    registry.promote(version, by, f"gate passed ({result.mode}); no agent running")
    return "promoted"
