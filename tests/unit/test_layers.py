"""The rooms keep to their roles: model/ is the network, its scoring and training; lifecycle/ the model's life
on the line without Ray or ZeroMQ; only actors/ and agent/ talk to Ray and sockets. All are imported under the
one namespace, adtr_edge."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


OURS = {"model", "lifecycle", "actors", "agent"}


def _room(module: str) -> str:
    """The room an import names: `adtr_edge.actors.ingest` -> `actors`; a third-party `ray.train` -> `ray`."""
    parts = module.split(".")
    return parts[1] if parts[0] == "adtr_edge" and len(parts) > 1 else parts[0]


def _imports(path: Path) -> set[str]:
    """Every absolute module name a file imports (at any depth in the file)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def imported(package: str) -> dict[str, set[str]]:
    """{file: rooms and top-level modules it imports} for every file of a package."""
    return {str(path.relative_to(ROOT)): {_room(m) for m in _imports(path)}
            for path in sorted((ROOT / package).rglob("*.py"))}


@pytest.mark.parametrize("package, forbidden", [
    ("model", {"ray", "zmq", "sqlite3", "actors", "agent", "lifecycle", "flask"}),
    ("lifecycle", {"ray", "zmq", "actors", "agent", "flask"}),
    ("actors", {"agent", "flask"}),
])
def test_a_package_imports_nothing_from_the_rooms_above_it(package, forbidden):
    offending = {path: sorted(names & forbidden) for path, names in imported(package).items() if names & forbidden}
    assert not offending, offending


def test_our_code_is_imported_only_under_the_adtr_edge_namespace():
    """A bare `import model` works from the repository's root (it is on sys.path) but not from the wheel, and
    would load a second copy of the module beside `adtr_edge.model`: nothing may use it, tests included."""
    files = [p for folder in (*sorted(OURS), "tests") for p in (ROOT / folder).rglob("*.py")
             if "__pycache__" not in p.parts]
    bare = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] in OURS) for p in files}
    assert files and not {path: names for path, names in bare.items() if names}


def test_the_checker_sees_an_import_inside_a_function(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n    import ray.train\n    from zmq import Context\n"
                                           "    from adtr_edge.agent.web import json_body\n    import model.data\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert imported("pkg") == {"pkg/m.py": {"ray", "zmq", "agent", "model"}}
