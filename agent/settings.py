"""Settings: defaults < YAML file (--config) < ADTR_EDGE_... environment variables < --set overrides.

Nested keys use `__` in the environment (ADTR_EDGE_TRAIN__EPOCHS=5) and dots on the command line
(--set train.epochs=5). Unknown keys and bad values are errors, never ignored.
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

from adtr_edge.actors.config import (
    InferenceConfig,
    IngestConfig,
    LearningConfig,
    OutputConfig,
    PointConfig,
    ScoringConfig,
    camera_points,
    check_point_name,
)
from adtr_edge.actors.config import (
    Section as _Section,
)
from adtr_edge.model.config import AdtrConfig


class SettingsError(ValueError):
    """A configuration that cannot be used; the message says which key and why."""


class Settings(AdtrConfig, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADTR_EDGE_", env_nested_delimiter="__", extra="forbid")


# ------------------------------------------------------------------ the streaming agent (`adtr-edge run`)
# The model's own settings travel in its checkpoint; these say how the agent runs it.

class RayConfig(_Section):
    address: str | None = Field(
        None,
        description=(
            "None: start an embedded single-node Ray; \"auto\" or host:port joins a cluster"
        ),
    )
    namespace: str = Field(
        "adtr-edge",
        description=(
            "Ray namespace of the agent's named actors (one agent per namespace)"
        ),
    )
    num_cpus: int | None = Field(None, description="only for the embedded instance")
    include_dashboard: bool = Field(False, description="Ray Jobs (retraining) need it")
    dashboard_port: int = Field(
        8265, ge=0, le=65535,
        description=(
            "The Ray Jobs API of the head the agent starts for retraining: this port when it is free on the "
            "box (Ray's usual 8265: `ray job submit --address http://127.0.0.1:8265` works as written), else "
            "any free one (`adtr-edge status --registry REG` prints it). 0: always any free port."
        ),
    )
    memory_usage_threshold: float = Field(
        0.98, gt=0.0, le=1.0,
        description=(
            "Ray's memory monitor kills Ray workers (the agent's actors, a retrain job) once the *node's* "
            "memory use passes this share, whoever uses it (Ray's default, 0.95, killed the agent's actors "
            "and a retrain here when other programs filled the box). Only for a Ray the agent starts itself; "
            "1.0 turns it off."
        ),
    )
    edge_labels: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "On a cluster: the node labels (a Ray label selector, e.g. {\"adtr-role\": \"edge\"}) of the node "
            "that faces the cameras. The ingest and scoring actors bind the camera and results sockets, so they "
            "must run where the cameras, the subscribers and the Service in front of the agent reach them. "
            "Empty: anywhere (one box)."
        ),
    )
    inference_labels: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "On a cluster: the node labels the inference actor needs (e.g. {\"adtr-role\": \"gpu\"}). Empty: any "
            "node with its CPUs (and GPU)."
        ),
    )


class HttpConfig(_Section):
    enabled: bool = Field(True, description="serve /metrics, /healthz, /readyz and the learning API")
    host: str = Field(
        "127.0.0.1",
        description=(
            "127.0.0.1: this box only. Binding anything else is a deliberate setting (the learning API needs "
            "its token either way; /metrics, /healthz and /readyz are open to whoever can reach the port)."
        ),
    )
    port: int = Field(9108, ge=0, le=65535, description="0 = any free port")
    token_file: Path | None = Field(
        None,
        description=(
            "The token of the learning API (accept samples, promote, roll back, retrain): a file holding it, "
            "created (mode 0600) on first start when missing. Default: `api_token` in the model registry."
        ),
    )
    threads: int = Field(8, ge=1, le=256, description="request handler pool")
    connection_limit: int = Field(100, ge=1, description="open connections; more wait in the listen backlog")
    backlog: int = Field(128, ge=1, description="listen backlog of the HTTP socket")
    request_timeout_s: float = Field(10.0, gt=0, description="a client idle this long mid-request is disconnected")
    snapshot_s: float = Field(1.0, gt=0, description="/metrics and /readyz answer from actor stats at most this old")


class ConsoleConfig(_Section):
    """The operator console (agent/console): a web page on its own port to watch the line, review decisions,
    label frames and manage model versions. It starts only once a user exists (`adtr-edge console
    add-user`); passwords are stored as scrypt hashes."""

    enabled: bool = Field(True, description="serve the operator console (it starts once a user exists)")
    host: str = Field(
        "127.0.0.1",
        description=(
            "127.0.0.1: this box only. Anything else is a deliberate setting (then serve it behind TLS and "
            "set secure_cookies)."
        ),
    )
    port: int = Field(9109, ge=0, le=65535, description="0 = any free port")
    users_file: Path | None = Field(
        None,
        description=(
            "Users and roles (operator: everything; viewer: read only). Default: console/users.json in the "
            "model registry, or in state_dir when the agent serves a plain model folder."
        ),
    )
    audit_file: Path | None = Field(
        None,
        description=(
            "Every console action (who, when, what, result), one JSON line each. Default: beside users_file."
        ),
    )
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="a login lasts this long")
    secure_cookies: bool = Field(
        False,
        description=(
            "the cookie only travels over HTTPS (set when a TLS proxy fronts it)"
        ),
    )
    trusted_proxy: str | None = Field(
        None,
        description=(
            "the address of a reverse proxy in front of the console: from it, waitress takes the client's address "
            "from X-Forwarded-For (the lockout and the audit then go by each client, not by the proxy); from any "
            "other peer the header is removed. \"*\": any peer (only when nothing but the proxy can reach the "
            "console's port). None: the connection's address (behind a proxy every client then shares the "
            "proxy's, and one lockout locks everyone out)"
        ),
    )
    trusted_proxy_count: int = Field(1, ge=1, le=8, description="proxies in a chain in front of the console")
    max_login_failures: int = Field(5, ge=1, description="per user name and per client address…")

    @field_validator("trusted_proxy")
    @classmethod
    def _proxy_address(cls, value: str | None) -> str | None:
        if value not in (None, "*"):
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"console.trusted_proxy: {value!r} is not an IP address (or \"*\")") from None
        return value
    lockout_s: float = Field(60.0, ge=0, description="…then logins from there wait this long")
    page_size: int = Field(48, ge=1, le=500, description="thumbnails per review page")
    threads: int = Field(8, ge=1, le=256, description="request handler pool")
    connection_limit: int = Field(100, ge=1, description="open connections; more wait in the listen backlog")
    request_timeout_s: float = Field(10.0, gt=0, description="a client idle this long mid-request is disconnected")


class AgentConfig(_Section):
    ingest: IngestConfig = IngestConfig()
    inference: InferenceConfig = InferenceConfig()
    scoring: ScoringConfig = ScoringConfig()
    output: OutputConfig = OutputConfig()
    ray: RayConfig = RayConfig()
    http: HttpConfig = HttpConfig()
    console: ConsoleConfig = ConsoleConfig()
    learning: LearningConfig = LearningConfig()
    points: dict[str, PointConfig] = Field(
        default_factory=dict,
        description=(
            "Inspection points besides `run --model`'s (named `default`, serving every camera no point "
            "lists): {name: {model: REGISTRY_OR_MODEL, cameras: [ids]}}. Each point has its own model, "
            "threshold, gate, guard, drift reference, sample store and retrain jobs; all share one backbone "
            "and one batch."
        ),
    )
    points_dir: Path = Field(
        Path("runs/agent/points"),
        description=(
            "Where `adtr-edge points add` creates the registries of points taught on the box."
        ),
    )
    state_dir: Path = Field(
        Path("runs/agent/state"),
        description=(
            "The agent's own books (ingest counters that survive an actor restart)."
        ),
    )
    drain_timeout_s: float = Field(
        30.0, ge=0,
        description=(
            "on SIGTERM, frames in flight get this long to be decided before the agent stops"
        ),
    )
    actor_max_restarts: int = Field(-1, ge=-1, description="-1: Ray restarts crashed actors forever")


    @field_validator("points")
    @classmethod
    def _points_valid(cls, v: dict[str, PointConfig]) -> dict[str, PointConfig]:
        for name, point in v.items():
            check_point_name(name)
            if not point.cameras:
                raise ValueError(f"point {name!r} lists no cameras (points.{name}.cameras)")
        camera_points({name: p.cameras for name, p in v.items()})  # a camera in two points is an error
        return v


class AgentSettings(AgentConfig, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADTR_EDGE_", env_nested_delimiter="__", extra="forbid")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """["train.epochs=5", "backbone.levels=[1,2,3]"] → nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set expects key=value, got {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise SettingsError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingsError(f"--set {key}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def _format_validation(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"bad setting {where}: {first['msg']}" + (f" ({exc.error_count()} errors)" if exc.error_count() > 1 else "")


ENV_PREFIX = "ADTR_EDGE_"


def unknown_environment(environ: dict[str, str] | None = None) -> list[str]:
    """`ADTR_EDGE_*` variables that name no setting: pydantic-settings reads only the names it knows, so
    `ADTR_EDGE_INGST__MODE=latest` would be silently ignored. Both kinds share the prefix, so a variable is
    known when either the model's or the agent's settings have its top-level key (case-insensitive)."""
    known = set(AdtrConfig.model_fields) | set(AgentConfig.model_fields)
    names = os.environ if environ is None else environ
    return sorted(name for name in names if name.upper().startswith(ENV_PREFIX)
                  and name[len(ENV_PREFIX):].split("__")[0].lower() not in known)


def load_settings(config_file: str | Path | None = None, overrides: list[str] | dict | None = None,
                  kind: type[BaseSettings] = Settings) -> Any:
    """Resolve all setting sources into a validated `AdtrConfig` (or `AgentConfig` for kind=AgentSettings)."""
    if unknown := unknown_environment():
        raise SettingsError(f"unknown setting in the environment: {', '.join(unknown)} (settings come as "
                            f"{ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}TRAIN__EPOCHS; see docs/settings.md)")
    yaml_file = None
    if config_file is not None:
        yaml_file = Path(config_file).expanduser()
        if not yaml_file.is_file():
            raise SettingsError(f"config file not found: {yaml_file}")
        try:
            loaded = yaml.safe_load(yaml_file.read_text())
        except yaml.YAMLError as exc:
            raise SettingsError(f"{yaml_file} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"{yaml_file} must hold a mapping of settings, not {type(loaded).__name__}")
    init = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])

    base: Any = kind  # the settings class asked for: mypy takes no variable as a base class

    class _Resolved(base):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            sources = [init_settings, env_settings]
            if yaml_file is not None:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
            return tuple(sources)

    try:
        resolved = _Resolved(**init)
    except ValidationError as exc:
        raise SettingsError(_format_validation(exc)) from exc
    plain = AgentConfig if issubclass(kind, AgentConfig) else AdtrConfig
    return plain.model_validate(resolved.model_dump())


def merge(cfg: AdtrConfig, overrides: list[str]) -> AdtrConfig:
    """Apply --set overrides to an existing config (e.g. one read from a model's manifest)."""
    data = cfg.model_dump()

    def deep(into: dict, new: dict) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                deep(into[k], v)
            else:
                into[k] = v

    deep(data, parse_overrides(overrides))
    try:
        return AdtrConfig.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_format_validation(exc)) from exc
