"""`adtr-edge`: train, fine-tune (ADTR+), evaluate and predict from the command line.

Bad input ends the command with exit code 2 and one clear line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import structlog

from adtr_edge.actors.logs import configure_logging, route_library_loggers

from .settings import SettingsError, load_settings, merge

log = structlog.get_logger("adtr_edge")
EXIT_BAD_INPUT = 2


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", type=Path, help="YAML settings file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the networks run (auto: the GPU when there is one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adtr-edge", description="ADTR visual inspection for the edge")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-json", action="store_true", default=None, help="JSON log lines even on a TTY")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _model_commands(sub)
    _agent_commands(sub)
    _learning_commands(sub)
    return parser


def _model_commands(sub) -> None:
    """train, finetune, eval, predict: the model alone, no agent."""
    p = sub.add_parser("train", help="train a normal-only ADTR model")
    p.add_argument("--data", required=True, help="dataset folder (MVTec or folder layout) or elpv:mono|poly")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    _common(p)

    p = sub.add_parser("finetune", help="ADTR+: fine-tune a trained model with labelled/synthetic anomalies")
    p.add_argument("--model", required=True, type=Path, help="normal-only model folder to start from")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path)
    _common(p, config=False)

    p = sub.add_parser("eval", help="evaluate a model on a dataset's test split")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True)
    p.add_argument("--report", required=True, type=Path, help="JSON report to write")
    p.add_argument("--out", type=Path, help="folder for overlays and the ROC curve (default: beside the report)")
    _device(p)
    _common(p, config=False)

    p = sub.add_parser("predict", help="score an image or a folder of images")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("path", type=Path, help="an image file or a folder (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="folder for results.csv/json and overlays")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    _device(p)
    _common(p, config=False)


def _agent_commands(sub) -> None:
    """run, publish, keys, watch, demo: the streaming agent and its peers."""
    p = sub.add_parser("run", help="run the streaming inspection agent until SIGINT/SIGTERM")
    p.add_argument("--model", type=Path, help="model folder or registry of the `default` inspection point (every "
                   "camera no other point lists); optional when points.<name> are set")
    p.add_argument("--point", dest="points", action="append", default=[], metavar="NAME=MODEL:CAM[,CAM…]",
                   help="one more inspection point: its registry (or model folder) and its cameras (repeatable; "
                        "the same as points.NAME.model / points.NAME.cameras)")
    p.add_argument("--ingest", required=True, action="append", metavar="ENDPOINT",
                   help="camera endpoint to bind, e.g. tcp://0.0.0.0:5555 (repeatable)")
    p.add_argument("--results", required=True, metavar="ENDPOINT", help="decisions PUB endpoint to bind")
    p.add_argument("--config", type=Path, help="agent YAML settings (see configs/agent.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one agent setting, e.g. --set ingest.mode=latest (repeatable)")

    p = sub.add_parser("publish", help="send frames to an agent (a reference camera)")
    p.add_argument("--source", required=True, help="image folder, .txt list of images, video file, or cam:N")
    p.add_argument("--endpoint", required=True, help="the agent's ingest endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--camera-id", required=True)
    p.add_argument("--fps", type=float, default=0.0, help="frames per second (0: as fast as the agent takes them)")
    p.add_argument("--encoding", default="auto", choices=["auto", "jpeg", "png", "raw"],
                   help="auto: image files as they are, video frames as JPEG")
    p.add_argument("--socket", default="push", choices=["push", "pub"],
                   help="push for ingest.mode=every, pub for ingest.mode=latest")
    p.add_argument("--loop", action="store_true", help="start again at the end of the source")
    p.add_argument("--count", type=int, default=0, help="stop after this many frames (0: the whole source)")
    p.add_argument("--sent-log", type=Path, help="write one JSON line per frame: seq and source name")
    p.add_argument("--curve-server-key", type=Path, help="the agent's public key file (CURVE)")
    p.add_argument("--curve-key", type=Path, help="this camera's .key_secret file (CURVE)")

    p = sub.add_parser("keys", help="create a CURVE key pair (NAME.key public, NAME.key_secret secret)")
    p.add_argument("--out", required=True, type=Path, help="folder for the key files")
    p.add_argument("--name", required=True, help="e.g. agent, or a camera id")

    p = sub.add_parser("watch", help="print live decisions from an agent's results socket")
    p.add_argument("--results", required=True, metavar="ENDPOINT")
    p.add_argument("--count", type=int, default=0, help="stop after this many decisions (0: until Ctrl-C)")
    p.add_argument("--anomalies-only", action="store_true")
    p.add_argument("--json", action="store_true", help="print each decision's JSON as it arrived")

    p = sub.add_parser("demo", help="agent + camera replaying a dataset's test split + live summary")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path, help="folder for the agent's anomaly files and summary")
    p.add_argument("--fps", type=float, default=0.0)
    p.add_argument("--loop", action="store_true",
                   help="the learning loop: lighting drifts, false alarms are accepted, a retrain job runs, "
                        "the candidate is shadowed and promoted (--model may be a model or a registry)")
    p.add_argument("--normals-per-phase", type=int, default=48, help="with --loop")
    p.add_argument("--epochs", type=int, default=24, help="with --loop: retrain epochs (warm-started)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _learning_commands(sub) -> None:
    """models, status, points, accept, retrain, console: learning on the line and its operators."""
    p = sub.add_parser("models", help="a model registry: versions, pointers, promotion, rollback, events")
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("init", help="create a registry serving a trained model")
    q.add_argument("--registry", required=True, type=Path)
    q.add_argument("--from", dest="source", required=True, type=Path, help="trained model folder")
    q.add_argument("--base-data", help="the model's dataset: its training normals go to the store as origin base")
    q.add_argument("--store-journal", choices=["wal", "delete"], default="wal",
                   help="the sample store's SQLite journal: wal (one host) or delete (a rollback journal, for a "
                        "registry on shared storage that processes on several hosts open; needs POSIX locks)")
    q.add_argument("--by", default=None)
    for name, text in (("list", "versions, oldest first, with their gate results and pointers"),
                       ("events", "the registry's event log"), ("rollback", "serve the previous version again")):
        q = msub.add_parser(name, help=text)
        q.add_argument("--registry", required=True, type=Path)
        q.add_argument("--json", action="store_true")
        q.add_argument("--by", default=None)
        q.add_argument("--reason", default="")
        q.add_argument("--limit", type=int, default=50)
    for name, text in (("show", "one version: manifest, gate, dataset, events"), ("promote", "serve a version")):
        q = msub.add_parser(name, help=text)
        q.add_argument("--registry", required=True, type=Path)
        q.add_argument("version")
        q.add_argument("--by", default=None)
        q.add_argument("--reason", default="")

    p = sub.add_parser("status", help="the agent serving a registry: its Ray Jobs address, the environment a "
                       "shell needs for `ray job submit`, and the exact command")
    p.add_argument("--registry", required=True, type=Path)

    p = sub.add_parser("points", help="the running agent's inspection points: list them, or teach a new camera")
    psub = p.add_subparsers(dest="points_command", required=True)
    q = psub.add_parser("list", help="each point's cameras, serving and shadow versions, cold start")
    q.add_argument("--registry", required=True, type=Path, help="any registry the agent serves (to find it)")
    q = psub.add_parser("add", help="teach a new point from its cameras' first frames: recorded, a retrain job "
                        "builds its first model, shadowed for you to promote (models promote --registry …)")
    q.add_argument("--registry", required=True, type=Path, help="any registry the agent serves (to find it)")
    q.add_argument("name")
    q.add_argument("--camera", dest="cameras", action="append", required=True, help="its camera ids (repeatable)")
    q.add_argument("--frames", type=int, help="frames to record before training (learning.cold_start.frames)")
    q.add_argument("--by", default=None)
    q = psub.add_parser("remove", help="stop serving a point added on the box: its cameras go to the default "
                        "point (or are refused); its registry stays on disk")
    q.add_argument("--registry", required=True, type=Path, help="any registry the agent serves (to find it)")
    q.add_argument("name")
    q.add_argument("--by", default=None)
    q = psub.add_parser("finish-recording", help="a point being taught: the frames recorded so far are enough "
                        "(at least 40), train its first model now")
    q.add_argument("--registry", required=True, type=Path, help="the point's own registry (points_dir/NAME)")
    q.add_argument("--by", default=None)

    p = sub.add_parser("accept", help="file a saved frame in the sample store: normal (default) or --defect")
    p.add_argument("--registry", required=True, type=Path)
    p.add_argument("--camera", help="camera id of the saved frame")
    p.add_argument("--seq", type=int, action="append", help="its sequence number (repeatable: several frames "
                   "of the camera in one call)")
    p.add_argument("--since", help="with --camera: every saved anomaly of the camera that arrived from then "
                   "(ISO 8601 or epoch seconds)…")
    p.add_argument("--until", help="…until then (default: now)")
    p.add_argument("--file", help="or: the saved frame's file (inside the anomaly folder), or any image")
    p.add_argument("--defect", action="store_true", help="confirm a defect instead of accepting a normal")
    p.add_argument("--box", help="defect box x,y,w,h in frame pixels (with --defect)")
    p.add_argument("--anomalies", type=Path, help="the agent's anomaly folder (when no agent runs)")
    p.add_argument("--note")
    p.add_argument("--by", default=None)

    p = sub.add_parser("retrain", help="retrain on the sample store (a Ray job's entrypoint), or --submit one")
    p.add_argument("--registry", required=True, type=Path)
    p.add_argument("--submit", action="store_true", help="submit as a Ray job (to the agent's Ray, or --address)")
    p.add_argument("--wait", action="store_true", help="with --submit: follow the job's log until it ends")
    p.add_argument("--address", help="Ray: with --submit the Jobs address (http://HEAD:8265); else the cluster "
                                     "to join (default: auto, or a local Ray)")
    p.add_argument("--namespace", help="the agent's Ray namespace (to find its model manager)")
    p.add_argument("--run-name", help="resume this run (after a crash) instead of starting a new one")
    p.add_argument("--by", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="retrain setting, e.g. --set retrain.epochs=5 --set retrain.policy=shadow")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("console", help="the operator console's users: add-user, remove-user, list-users")
    csub = p.add_subparsers(dest="console_command", required=True)
    for name, text in (("add-user", "add a user (or set a user's password and role)"),
                       ("remove-user", "remove a user (their sessions end)"), ("list-users", "users and roles")):
        q = csub.add_parser(name, help=text)
        where = q.add_mutually_exclusive_group(required=True)
        where.add_argument("--registry", type=Path, help="the agent's model registry (users in REG/console/)")
        where.add_argument("--users-file", type=Path, help="or the console.users_file the agent is set to")
        if name != "list-users":
            q.add_argument("name")
        if name == "add-user":
            q.add_argument("--role", default="operator", choices=["operator", "viewer"],
                           help="operator: review, label, retrain, promote, roll back; viewer: read only")
            q.add_argument("--password-stdin", action="store_true",
                           help="read the password from the first line of stdin (else: asked twice)")


def cmd_train(args) -> int:
    from adtr_edge.model.data import load_dataset
    from adtr_edge.model.train import train_model

    cfg = load_settings(args.config, args.overrides)
    dataset = load_dataset(args.data, cfg.data)
    manifest = train_model(cfg, dataset, args.out, progress=not args.no_progress)
    print(json.dumps({"model": str(args.out), "model_version": manifest["model_version"],
                      "threshold": manifest["threshold"],
                      "train_seconds": round(manifest["training"]["seconds"], 1)}))
    return 0


def cmd_finetune(args) -> int:
    from adtr_edge.model.adtr_plus import finetune_adtr_plus
    from adtr_edge.model.checkpoint import read_manifest
    from adtr_edge.model.config import AdtrConfig
    from adtr_edge.model.data import load_dataset

    cfg = merge(AdtrConfig.model_validate(read_manifest(args.model)["settings"]), args.overrides)
    dataset = load_dataset(args.data, cfg.data)
    manifest = finetune_adtr_plus(args.model, dataset, args.out, progress=not args.no_progress, cfg=cfg)
    print(json.dumps({"model": str(args.out), "model_version": manifest["model_version"],
                      "threshold": manifest["threshold"]}))
    return 0


def _detector_with_overrides(model_dir: Path, overrides: list[str], device: str = "auto"):
    from adtr_edge.model.detector import load_detector

    detector = load_detector(model_dir).to(device)
    if overrides:
        detector.reconfigure(merge(detector.cfg, overrides))
    return detector


def cmd_eval(args) -> int:
    from adtr_edge.model.checkpoint import record_metrics
    from adtr_edge.model.data import load_dataset
    from adtr_edge.model.evaluate import evaluate, write_report

    detector = _detector_with_overrides(args.model, args.overrides, args.device)
    dataset = load_dataset(args.data, detector.cfg.data)
    out_dir = args.out or args.report.parent / (args.report.stem + "-pictures")
    report = evaluate(detector, dataset, out_dir, progress=not args.no_progress)
    write_report(report, args.report)
    record_metrics(args.model, dataset.name, {
        k: report[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1", "precision", "recall", "threshold")})
    print(format_metrics(report))
    return 0


def format_metrics(report: dict) -> str:
    def f(v):
        return "  n/a" if v is None else f"{v:.3f}"

    lines = [
        f"{'':14} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7} {'recall':>7} {'n':>5}",
        f"{'all':14} {f(report['image_auroc']):>11} {f(report['pixel_auroc']):>11} {f(report['aupro']):>7} "
        f"{f(report['recall']):>7} {report['counts']['test']:>5}",
    ]
    for kind, m in report["per_type"].items():
        lines.append(f"{kind[:14]:14} {f(m['image_auroc']):>11} {f(m['pixel_auroc']):>11} {f(m['aupro']):>7} "
                     f"{f(m['recall']):>7} {m['count']:>5}")
    lines.append(f"threshold {report['threshold']:.4f}: precision {report['precision']:.3f} recall "
                 f"{report['recall']:.3f} F1 {report['f1']:.3f} false-positive rate {f(report['false_positive_rate'])}")
    return "\n".join(lines)


def cmd_predict(args) -> int:
    from adtr_edge.model.predict import predict_path

    detector = _detector_with_overrides(args.model, args.overrides, args.device)
    summary = predict_path(detector, args.path, args.out, batch_size=args.batch_size,
                           overlays=not args.no_overlays, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def point_overrides(points: list[str]) -> list[str]:
    """`--point top=/reg/top:cam-1,cam-2` → the settings points.top.model and points.top.cameras."""
    out = []
    for spec in points:
        name, sep, rest = spec.partition("=")
        model, sep2, cameras = rest.rpartition(":")
        if not (sep and sep2 and name and model and cameras):
            raise SettingsError(f"--point {spec!r}: expected NAME=MODEL:CAMERA[,CAMERA…]")
        out += [f"points.{name}.model={json.dumps(model)}",
                f"points.{name}.cameras={json.dumps([c for c in cameras.split(',') if c])}"]
    return out


def cmd_run(args) -> int:
    from .runner import Agent
    from .settings import AgentSettings
    from .supervise import serve_until_signal

    cfg = load_settings(args.config, [*args.overrides, *point_overrides(args.points)], kind=AgentSettings)
    agent = Agent(args.model, args.ingest, args.results, cfg)
    return serve_until_signal(agent)


def cmd_publish(args) -> int:
    from .publisher import publish

    summary = publish(args.source, args.endpoint, args.camera_id, args.fps, args.encoding, args.socket, args.loop,
                      args.count, args.sent_log, args.curve_server_key, args.curve_key)
    print(json.dumps(summary))
    return 0


def cmd_keys(args) -> int:
    import zmq.auth

    args.out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(args.out), args.name)
    Path(secret).chmod(0o600)
    print(json.dumps({"public": public, "secret": secret}))
    return 0


def cmd_watch(args) -> int:
    from .watch import watch

    watch(args.results, args.count, args.anomalies_only, args.json)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.loop:
        from .demo_loop import run_loop_demo

        summary = run_loop_demo(args.model, args.data, args.out, args.overrides, args.normals_per_phase,
                                epochs=args.epochs)
        return 0 if summary["versions"]["after"] != summary["versions"]["before"] else 1

    summary = run_demo(args.model, args.data, args.out, args.fps, args.overrides)
    return 0 if summary["frames_decided"] == summary["frames_sent"] else 1


def cmd_models(args) -> int:
    from adtr_edge.lifecycle.registry import Registry

    from . import operate

    by = args.by or operate.default_by()
    if args.models_command == "init":
        print(json.dumps(operate.models_init(args.registry, args.source, args.base_data, by, args.store_journal)))
        return 0
    registry = Registry(args.registry)
    command = args.models_command
    if command == "list":
        versions = operate.models_list(registry)
        if args.json:
            print(json.dumps(versions, indent=2))
        for v in [] if args.json else versions:
            gate = v["gate"] or {}
            verdict = "—" if not gate else ("passed" if gate.get("passed") else "REJECTED") + f" ({gate.get('mode')})"
            print(f"{v['version']:40s} {','.join(v['pointers']) or '-':18s} threshold {v['threshold']:.4f}  "
                  f"gate {verdict}")
    elif command == "show":
        print(json.dumps(registry.show(args.version), indent=2, default=str))
    elif command == "events":
        for event in registry.events(args.limit):
            print(json.dumps(event) if args.json else
                  f"{event['at']} {event['event']:11s} {event.get('version') or '-'} by {event['by']}"
                  f"{': ' + event['reason'] if event.get('reason') else ''}")
    elif command == "promote":
        print(json.dumps(operate.models_promote(registry, args.version, by, args.reason)))
    elif command == "rollback":
        print(json.dumps(operate.models_rollback(registry, by, args.reason)))
    return 0


def cmd_status(args) -> int:
    from adtr_edge.lifecycle.registry import Registry

    from . import operate

    print(json.dumps(operate.agent_status(Registry(args.registry)), indent=2))
    return 0


def cmd_points(args) -> int:
    from adtr_edge.lifecycle.registry import Registry

    from . import operate

    client = operate.AgentClient.for_registry(Registry(args.registry))
    if client is None:
        raise SettingsError(f"no running agent serves {args.registry}: points are the running agent's "
                            "(start it with adtr-edge run)")
    if args.points_command == "finish-recording":  # about the registry's own point
        print(json.dumps(client.call("POST", "/v1/points/finish-recording", {"by": args.by or operate.default_by()})))
        return 0
    client.point = None  # about the agent, not one point
    if args.points_command == "list":
        print(json.dumps(client.call("GET", "/v1/points"), indent=2))
        return 0
    if args.points_command == "remove":
        print(json.dumps(client.call("DELETE", f"/v1/points/{args.name}", {"by": args.by or operate.default_by()})))
        return 0
    body = {"name": args.name, "cameras": args.cameras, "by": args.by or operate.default_by()}
    if args.frames is not None:
        body["frames"] = args.frames
    print(json.dumps(client.call("POST", "/v1/points", body)))
    return 0


def cmd_accept(args) -> int:
    from adtr_edge.lifecycle.registry import Registry

    from . import operate

    label = "defect" if args.defect else "normal"
    by = args.by or operate.default_by()
    if args.since or args.until or (args.seq and len(args.seq) > 1):
        if args.camera is None or args.box or args.file:
            raise SettingsError("a bulk accept (several --seq, or --since/--until) needs --camera, and takes no "
                                "--box or --file")
        request = {"camera_id": args.camera, "label": label, "note": args.note}
        request.update({"since": args.since, "until": args.until} if args.since or args.until else {"seqs": args.seq})
        print(json.dumps(operate.accept_bulk(Registry(args.registry), request, by, args.anomalies)))
        return 0
    if args.file is None and (args.camera is None or not args.seq):
        raise SettingsError("name the frame: --camera and --seq, or --file (or --camera with --since/--until)")
    box = [int(v) for v in args.box.split(",")] if args.box else None
    result = operate.accept(Registry(args.registry), args.camera, args.seq[0] if args.seq else None, args.file,
                            label, box, by, args.anomalies, args.note)
    print(json.dumps(result))
    return 0


def cmd_retrain(args) -> int:
    from adtr_edge.actors.retrain import retrain
    from adtr_edge.lifecycle.registry import Registry

    from . import operate

    registry = Registry(args.registry)
    by = args.by or operate.default_by()
    if args.submit:
        job = operate.retrain_submit(registry, args.address if args.address else None, args.namespace, by,
                                     operate.retrain_overrides(args.overrides))
        print(json.dumps(job), flush=True)
        if args.wait:
            address = args.address or operate.agent_info(registry).get("jobs")
            info = operate.retrain_wait(address, job["submission_id"])
            print(json.dumps({k: info[k] for k in ("submission_id", "status", "message")}))
            return 0 if info["status"] == "SUCCEEDED" else 1
        return 0
    import ray

    cfg = operate.retrain_config(args.overrides)
    if not ray.is_initialized():
        try:
            ray.init(address=args.address or "auto", log_to_driver=False)
        except ConnectionError:
            ray.init(num_cpus=None, log_to_driver=False)  # no cluster: a local one for this run
        route_library_loggers()
    outcome = retrain(registry.root, cfg, run_name=args.run_name, by=by, namespace=args.namespace,
                      progress=not args.no_progress)
    print(json.dumps({"event": "retrain done", **outcome}), flush=True)
    return 0


def cmd_console(args) -> int:
    import getpass

    from .console.auth import UserError, add_user, read_users, remove_user

    path = args.users_file or Path(args.registry) / "console" / "users.json"
    if args.registry is not None:
        from adtr_edge.lifecycle.registry import Registry

        Registry(args.registry)  # a clear error when it is not a registry
    try:
        if args.console_command == "list-users":
            print(json.dumps({name: u["role"] for name, u in sorted(read_users(path).items())}))
        elif args.console_command == "remove-user":
            print(json.dumps(remove_user(path, args.name)))
        else:
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\n")
            else:
                password = getpass.getpass(f"password for {args.name}: ")
                if getpass.getpass("again: ") != password:
                    raise UserError("the two passwords differ")
            print(json.dumps(add_user(path, args.name, password, args.role)))
    except UserError as exc:
        raise SettingsError(str(exc)) from None
    return 0


COMMANDS = {"train": cmd_train, "finetune": cmd_finetune, "eval": cmd_eval, "predict": cmd_predict,
            "run": cmd_run, "publish": cmd_publish, "keys": cmd_keys, "watch": cmd_watch, "demo": cmd_demo,
            "models": cmd_models, "status": cmd_status, "points": cmd_points, "accept": cmd_accept,
            "retrain": cmd_retrain, "console": cmd_console}


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), or `unknown` when run from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adtr-edge")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_json)
    from adtr_edge.lifecycle.samples import StoreError
    from adtr_edge.model.checkpoint import CheckpointError
    from adtr_edge.model.data import DataError
    from adtr_edge.model.weights import WeightsError

    from .errors import agent_input_errors

    try:
        return COMMANDS[args.command](args)
    except ((SettingsError, DataError, CheckpointError, WeightsError, StoreError, FileNotFoundError)
            + agent_input_errors()) as exc:
        print(f"adtr-edge {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"adtr-edge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
