"""Helpers for the operator console's tests: an agent with its console on loopback, users, an HTTP client
that keeps cookies like a browser, and a real headless Chromium (Debian's package) driven by Playwright."""
from __future__ import annotations

import http.client
import http.cookiejar
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from adtr_edge.agent.console import start_console
from adtr_edge.agent.console.auth import add_user
from adtr_edge.agent.http import start_http

from live import live_agent

OPERATOR = ("ana", "correct horse battery staple")
VIEWER = ("vic", "viewer password 2026")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def add_users(registry_root: Path) -> Path:
    users = Path(registry_root) / "console" / "users.json"
    add_user(users, OPERATOR[0], OPERATOR[1], "operator")
    add_user(users, VIEWER[0], VIEWER[1], "viewer")
    return users


@contextmanager
def agent_with_console(model: Path, tmp_path: Path, **overrides):
    """A live agent (actors on the session's Ray) with /metrics + the learning API and the console."""
    overrides.setdefault("http", {"enabled": True, "port": 0})
    overrides["console"] = {"port": 0, **overrides.get("console", {})}
    with live_agent(model, tmp_path, **overrides) as agent:
        server = start_http(agent)
        console = start_console(agent, server.cache)
        assert console is not None, "the console did not start (no users?)"
        try:
            yield agent, console
        finally:
            console.shutdown()
            server.shutdown()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Client:
    """A cookie-keeping HTTP client (no redirects followed: tests look at them)."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)
        self.token: str | None = None

    def request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        try:
            with self.opener.open(req, timeout=120) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def get(self, path: str, **headers):
        return self.request("GET", path, headers=headers)

    def page_token(self, path: str = "/login") -> str:
        status, _, body = self.get(path)
        assert status == 200, (path, status)
        self.token = re.search(rb'name="csrf-token" content="([^"]+)"', body).group(1).decode()
        return self.token

    def post_form(self, path: str, fields: dict, **headers):
        return self.request("POST", path, urllib.parse.urlencode(fields).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded", **headers})

    def post_json(self, path: str, body: dict | None = None, token: str | None = "page", **headers):
        token = self.token if token == "page" else token
        extra = {"X-CSRFToken": token} if token else {}
        status, _, raw = self.request("POST", path, json.dumps(body or {}).encode(),
                                         {"Content-Type": "application/json", **extra, **headers})
        try:
            return status, json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return status, {"raw": raw.decode(errors="replace")}

    def login(self, user: str, password: str) -> int:
        token = self.page_token("/login")
        status, _, _ = self.post_form("/login", {"csrf_token": token, "user": user, "password": password,
                                                        "next": "/live"})
        if status == 302:
            self.page_token("/live")
        return status

    def cookie(self, name: str = "adtr_console") -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)


def raw_get(url: str, path: str, cookie: str | None = None) -> tuple[int, bytes]:
    """GET a path exactly as written (no client-side normalization of `..` or %2F)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.putrequest("GET", path, skip_accept_encoding=True)
    if cookie:
        connection.putheader("Cookie", f"adtr_console={cookie}")
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


# ------------------------------------------------------------------ the browser
def chromium_path() -> str | None:
    for candidate in (os.environ.get("ADTR_TESTS_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright's Python API. Skipped (with the reason) only where
    no browser is installed; `make test` installs one (tests/install_browser.sh) where it can. Module scope:
    Playwright's sync API runs an event loop on this thread while it is open, and later tests use
    asyncio.run."""
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium to drive: install Debian's chromium package (make test runs "
                    "tests/install_browser.sh, which does it as root), or point ADTR_TESTS_CHROMIUM at one")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Python package playwright is missing: pip install -e '.[test]'")
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def screenshot_dir(tmp_path: Path) -> Path:
    """Where the browser tests put their screenshots: ADTR_TESTS_SCREENSHOTS (make screenshots sets it to
    docs/screenshots, the README's pictures) or the test's temp folder."""
    folder = Path(os.environ.get("ADTR_TESTS_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
