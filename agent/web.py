"""What the agent's two Flask apps (the HTTP API, agent/http.py, and the console, agent/console) share."""
from __future__ import annotations

from typing import Any

import ray
from flask import request


def json_body() -> dict[str, Any]:
    """The request's JSON object; anything else (none, malformed, a list) reads as {}."""
    data = request.get_json(silent=True)
    return data if isinstance(data, dict) else {}


def call_manager(manager: Any, method: str, *args: Any) -> tuple[Any, int]:
    """A model manager's answer and the HTTP status that goes with it: its refusal is a 409 with its last line,
    a manager that does not answer a 503."""
    try:
        return ray.get(getattr(manager, method).remote(*args), timeout=300), 200
    except ray.exceptions.RayTaskError as exc:
        return {"error": str(exc).strip().splitlines()[-1]}, 409
    except (ray.exceptions.RayError, TimeoutError) as exc:
        return {"error": f"the model manager did not answer: {exc}"}, 503
