"""The built wheel, installed where the repository cannot shadow it: what a container or a fresh box gets."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "agent" / "console"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, a folder it is installed into) — built from this checkout, no dependencies fetched."""
    out = tmp_path_factory.mktemp("wheel")
    # From a clean copy of the sources (links kept): setuptools packs whatever an old build left in build/lib,
    # so a checkout's stale build/ would put modules in the wheel that its sources no longer have.
    source = out / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "build", "tests", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True, timeout=600)
    wheel = next(out.glob("adtr_edge-*.whl"))
    target = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    return wheel, target


def _run(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Python with the installed wheel first and this environment's dependencies after it, from a folder
    with no checkout in it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_carries_every_console_page_and_script(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"adtr_edge/agent/console/{p.relative_to(CONSOLE)}" for folder in ("templates", "static")
                for p in (CONSOLE / folder).iterdir() if p.is_file()}
    assert expected and expected <= names, sorted(expected - names)
    assert not any(n.startswith(("tests/", ".venv", "runs/")) for n in names)


def test_the_wheel_installs_one_namespace_with_every_source_file(installed):
    """Our code under adtr_edge only: no top-level `model`, `agent`, `actors` or `lifecycle` to shadow (or be
    shadowed by) another package, and every module of the four folders inside it (the links are followed)."""
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"adtr_edge"}, tops
    sources = {f"adtr_edge/{p.relative_to(ROOT)}" for folder in ("model", "lifecycle", "actors", "agent")
               for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert len(sources) > 50 and sources <= names, sorted(sources - names)


def test_the_installed_package_reports_its_version_and_renders_its_templates(installed, tmp_path):
    _, target = installed
    result = _run(target, tmp_path, "-m", "adtr_edge.agent.cli", "--version")
    assert result.returncode == 0 and result.stdout.strip() == "adtr-edge 0.1.0", result.stderr[-2000:]
    check = ("import adtr_edge.agent.console.app as app, flask, pathlib, jinja2;"
             "root = pathlib.Path(app.__file__).parent;"
             "print(root);"
             "env = jinja2.Environment(loader=jinja2.FileSystemLoader(root / 'templates'));"
             "[env.parse(env.loader.get_source(env, t)[0]) for t in env.list_templates()];"
             "print(len(env.list_templates()), len(list((root / 'static').iterdir())))")
    result = _run(target, tmp_path, "-c", check)
    assert result.returncode == 0, result.stderr[-2000:]
    where, counts = result.stdout.strip().splitlines()
    assert Path(where).is_relative_to(target)  # the installed copy, not the checkout
    assert counts.split() == [str(len(list((CONSOLE / "templates").glob("*.html")))),
                              str(len([p for p in (CONSOLE / "static").iterdir() if p.is_file()]))]
