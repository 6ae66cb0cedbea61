"""The rooms keep to their roles: model/ is the network, its scoring and training; lifecycle/ the model's life
on the line without Ray or ZeroMQ; only actors/ and agent/ talk to Ray and sockets."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported(package: str) -> dict[str, set[str]]:
    """{file: top-level modules it imports} for every file of a package (at any depth in the file)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("model", {"ray", "zmq", "sqlite3", "actors", "agent", "lifecycle", "flask"}),
    ("lifecycle", {"ray", "zmq", "actors", "agent", "flask"}),
    ("actors", {"agent", "flask"}),
])
def test_a_package_imports_nothing_from_the_rooms_above_it(package, forbidden):
    offending = {path: sorted(names & forbidden) for path, names in imported(package).items() if names & forbidden}
    assert not offending, offending


def test_the_checker_sees_an_import_inside_a_function(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n    import ray.train\n    from zmq import Context\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert imported("pkg") == {"pkg/m.py": {"ray", "zmq"}}
