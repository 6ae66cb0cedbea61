"""Settings: defaults < YAML file (--config) < ADTR_EDGE_... environment variables < --set overrides.

Nested keys use `__` in the environment (ADTR_EDGE_TRAIN__EPOCHS=5) and dots on the command line
(--set train.epochs=5). Unknown keys and bad values are errors, never ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

from model.config import AdtrConfig


class SettingsError(ValueError):
    """A configuration that cannot be used; the message says which key and why."""


class Settings(AdtrConfig, BaseSettings):
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


def load_settings(config_file: str | Path | None = None, overrides: list[str] | dict | None = None) -> AdtrConfig:
    """Resolve all setting sources into a validated `AdtrConfig`."""
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

    class _Resolved(Settings):
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
    return AdtrConfig.model_validate(resolved.model_dump())


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
