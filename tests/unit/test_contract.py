"""The contracts with the outside (frame header, decision, anomaly folder): a leaf module, and a published
JSON Schema that is the code's."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from adtr_edge.actors.contract import Decision, decision_message, decision_schema, parse_decision

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "docs" / "decision.schema.json"


def _decision(**change) -> dict:
    base = {"camera_id": "line-1", "seq": 7, "ts": 1.7e9, "score": 2.5, "normalized_score": 1.25,
            "threshold": 2.0, "is_anomaly": True,
            "regions": [{"box": [1, 2, 30, 40], "area": 900, "peak": 3.0, "peak_normalized": 1.5}],
            "model_version": "v1", "point": "default", "inspected": True, "latency_ms": 40.0, "agent_ms": 12.0,
            "inference_ms": 8.0, "batch_size": 2, "width": 640, "height": 480}
    return {**base, **change}


def test_the_contract_imports_neither_torch_nor_opencv_nor_numpy_nor_ray():
    code = ("import sys, actors.contract; "
            "print([m for m in ('torch', 'cv2', 'numpy', 'ray', 'zmq', 'model') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_published_schema_is_generated_from_the_decision_model():
    assert SCHEMA.read_text() == decision_schema(), "regenerate with `python -m adtr_edge.actors.contract`"


def test_a_decision_on_the_wire_is_strict_json_that_the_schema_accepts():
    schema = json.loads(SCHEMA.read_text())
    decision = Decision.model_validate(_decision(score=math.inf, regions=[
        {"box": [0, 0, 1, 1], "area": 1, "peak": math.nan, "peak_normalized": math.nan}]))
    parts = decision_message(decision)
    wire = parse_decision(parts)  # a strict parser: NaN or Infinity would raise
    assert parts[0] == b"line-1" and wire["score"] is None and wire["regions"][0]["peak"] is None
    assert "files" not in wire
    jsonschema.validate(wire, schema)
    with_files = Decision.model_validate(_decision(files={".jpg": "line-1/x.jpg"})).wire()
    jsonschema.validate(with_files, schema)
    assert with_files["files"] == {".jpg": "line-1/x.jpg"}


@pytest.mark.parametrize("change", [{"seq": -1}, {"regions": [{"box": [1, 2, 3]}]}, {"extra": 1},
                                    {"batch_size": 0}])
def test_a_malformed_decision_is_refused_by_the_model_and_by_the_schema(change):
    schema = json.loads(SCHEMA.read_text())
    with pytest.raises(ValidationError):
        Decision.model_validate(_decision(**change))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_decision(**change), schema)
