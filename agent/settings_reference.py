"""Every setting described once: in its pydantic field's `description`. From the models this writes the
settings reference (docs/settings.md) and the two files of defaults (configs/edge.yaml, configs/agent.yaml).

    python -m adtr_edge.agent.settings_reference --write      # regenerate all three (tests check they are current)
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[1]

YAML_HEADERS = {
    "model": """\
The model's settings (`adtr-edge train --config FILE`): exactly the built-in defaults, generated from the
code by `python -m adtr_edge.agent.settings_reference --write` (a test checks it is current); copy this file to change
them. The edge default is tf_efficientnet_lite0 with the packaged ImageNet weights (no network needed),
sized to train in minutes on a CPU. Every key can also come from ADTR_EDGE_<SECTION>__<KEY> or `--set`.""",
    "agent": """\
The streaming agent's settings (`adtr-edge run --config FILE`): exactly the built-in defaults, generated
from the code by `python -m adtr_edge.agent.settings_reference --write` (a test checks it is current). The model's
own settings travel in its checkpoint, not here. Every key can also come from
ADTR_EDGE_<SECTION>__<KEY> or `--set section.key=value`.""",
}


def _models() -> dict[str, type[BaseModel]]:
    from adtr_edge.agent.settings import AgentConfig
    from adtr_edge.model.config import AdtrConfig

    return {"model": AdtrConfig, "agent": AgentConfig}


def _section(field: FieldInfo) -> type[BaseModel] | None:
    kind = field.annotation
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _default(field: FieldInfo) -> Any:
    value = field.get_default(call_default_factory=True)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _type_name(field: FieldInfo) -> str:
    text = str(field.annotation).replace("typing.", "").replace("pathlib.", "")
    return text.replace("<class '", "").replace("'>", "").replace("NoneType", "None")


def _bounds(field: FieldInfo) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    out = []
    for meta in field.metadata:
        for name, sign in words.items():
            if getattr(meta, name, None) is not None:
                out.append(f"{sign} {getattr(meta, name)}")
    return ", ".join(out)


def _walk(model: type[BaseModel], prefix: str = ""):
    """(dotted key, field, section model or None) for every field, sections before their fields."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section(field)
        yield key, field, section
        if section is not None:
            yield from _walk(section, key + ".")


def undescribed() -> list[str]:
    """Settings that are neither a section nor described: each must say what it does."""
    return [f"{kind}: {key}" for kind, model in _models().items() for key, field, section in _walk(model)
            if section is None and not field.description]


def reference_markdown() -> str:
    lines = ["# Settings", "",
             "Generated from the code (`python -m adtr_edge.agent.settings_reference --write`); every setting is",
             "described once, in its field. Precedence: `--set section.key=value` > `ADTR_EDGE_SECTION__KEY`",
             "environment variables > `--config FILE.yaml` > these defaults. Unknown keys, and unknown",
             "`ADTR_EDGE_*` variables, are errors. `configs/edge.yaml` and `configs/agent.yaml` hold exactly",
             "these defaults.", ""]
    titles = {"model": "The model (`train`, `eval`, `predict`, `finetune`; travels in the checkpoint)",
              "agent": "The streaming agent (`run`, `retrain`)"}
    for kind, model in _models().items():
        lines += [f"## {titles[kind]}", ""]
        rows: list[str] = []
        for key, field, section in _walk(model):
            if section is not None:
                if rows:
                    lines += ["| setting | default | meaning |", "|---|---|---|", *rows, ""]
                    rows = []
                lines += [f"### `{key}`", ""]
                doc = " ".join((field.description or section.__doc__ or "").split())
                if doc:
                    lines += [doc, ""]
                continue
            meaning = " ".join((field.description or "").split()).replace("|", "\\|")
            kind_text = _type_name(field) + (f", {_bounds(field)}" if _bounds(field) else "")
            default = json.dumps(_default(field), ensure_ascii=False).replace("|", "\\|")
            rows.append(f"| `{key}` | `{default}` | {meaning} ({kind_text}) |")
        if rows:
            lines += ["| setting | default | meaning |", "|---|---|---|", *rows, ""]
    return "\n".join(lines).rstrip() + "\n"


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), 100 - len(indent))]


def defaults_yaml(kind: str) -> str:
    lines = [f"# {line}" if line else "#" for line in YAML_HEADERS[kind].split("\n")]

    def emit(model: type[BaseModel], depth: int) -> None:
        indent = "  " * depth
        for name, field in model.model_fields.items():
            section = _section(field)
            if field.description:
                lines.extend(_comment(field.description, indent))
            if section is not None:
                lines.append(f"{indent}{name}:")
                emit(section, depth + 1)
            else:
                lines.append(f"{indent}{name}: {json.dumps(_default(field), ensure_ascii=False)}")

    emit(_models()[kind], 0)
    return "\n".join(lines) + "\n"


def generated() -> dict[Path, str]:
    return {ROOT / "docs" / "settings.md": reference_markdown(),
            ROOT / "configs" / "edge.yaml": defaults_yaml("model"),
            ROOT / "configs" / "agent.yaml": defaults_yaml("agent")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="write the files (else: say which are stale)")
    args = parser.parse_args()
    stale = [path for path, text in generated().items() if not path.is_file() or path.read_text() != text]
    if args.write:
        for path, text in generated().items():
            path.write_text(text)
        print(f"wrote {len(generated())} files")
    else:
        print("\n".join(f"stale: {p}" for p in stale) or "all current")
        raise SystemExit(1 if stale else 0)


if __name__ == "__main__":
    main()
