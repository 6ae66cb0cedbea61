"""Console users: names, roles and scrypt password hashes in a JSON file (mode 0600), login throttling,
and server-side sessions (the cookie carries only a random session id, signed by Flask).

Roles: `operator` may do everything the console offers; `viewer` may look at every page and nothing
else. Users are created at install time with `adtr-edge console add-user`; the console holds no
default password and starts only once a user exists.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROLES = ("operator", "viewer")
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"
MIN_PASSWORD = 10
# scrypt: 2^15 × 8 × 128 B = 32 MiB and ~0.1 s per check on a small box: slow to guess, fine to log in.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
_MAXMEM = 64 << 20


class UserError(ValueError):
    """A user that cannot be added or used as asked; the message says why."""


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=_MAXMEM, dklen=32)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def verify_password(stored: str, password: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        if len(expected) != 32 or int(n) < 1 << 14:  # a truncated or weakened hash never verifies
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt, validate=True), n=int(n), r=int(r),
                             p=int(p), maxmem=_MAXMEM, dklen=32)
    except (ValueError, TypeError, binascii.Error):
        return False
    return hmac.compare_digest(got, expected)


_DUMMY = None


def _dummy_hash() -> str:
    """Checked against when the user does not exist, so a wrong name costs as long as a wrong password."""
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = hash_password(secrets.token_urlsafe(16))
    return _DUMMY


def read_users(path: Path) -> dict[str, dict]:
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read: {exc}") from exc
    users = data.get("users", {}) if isinstance(data, dict) else {}
    return {name: u for name, u in users.items() if isinstance(u, dict) and u.get("role") in ROLES
            and isinstance(u.get("hash"), str)}


def _write_users(path: Path, users: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"format": "adtr-edge-console-users/1", "users": users}, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def add_user(path: Path, name: str, password: str, role: str) -> dict:
    """Add a user or set an existing one's password and role. Only the scrypt hash is written."""
    if not re.fullmatch(USERNAME_PATTERN, name or ""):
        raise UserError(f"user name {name!r} must match {USERNAME_PATTERN}")
    if role not in ROLES:
        raise UserError(f"role must be one of {ROLES}, not {role!r}")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password must be at least {MIN_PASSWORD} characters")
    users = read_users(path)
    existed = name in users
    users[name] = {"role": role, "hash": hash_password(password), "set_at": time.time()}
    _write_users(Path(path), users)
    return {"user": name, "role": role, "updated": existed, "users_file": str(path)}


def remove_user(path: Path, name: str) -> dict:
    users = read_users(path)
    if name not in users:
        raise UserError(f"no user {name!r} in {path}")
    del users[name]
    _write_users(Path(path), users)
    return {"user": name, "removed": True}


class LoginThrottle:
    """After `max_failures` failed logins for one user name or from one address, logins for it wait
    `lockout_s` (counted from the last failure)."""

    def __init__(self, max_failures: int, lockout_s: float):
        self.max_failures, self.lockout_s = max_failures, lockout_s
        self.failures: dict[str, tuple[int, float]] = {}
        self.lock = threading.Lock()

    def wait_s(self, *keys: str) -> float:
        now = time.monotonic()
        with self.lock:
            waits = [self.lockout_s - (now - last) for n, last in (self.failures.get(k, (0, 0.0)) for k in keys)
                     if n >= self.max_failures]
        return max([w for w in waits if w > 0], default=0.0)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self.lock:
            for key in keys:
                n, last = self.failures.get(key, (0, 0.0))
                if n >= self.max_failures and now - last >= self.lockout_s:
                    n = 0  # the lockout ran out: start counting again
                self.failures[key] = (n + 1, now)
            if len(self.failures) > 10_000:  # bounded: forget the oldest
                for key in sorted(self.failures, key=lambda k: self.failures[k][1])[:5_000]:
                    del self.failures[key]

    def succeeded(self, *keys: str) -> None:
        with self.lock:
            for key in keys:
                self.failures.pop(key, None)


@dataclass
class SessionInfo:
    user: str
    role: str
    expires: float
    created: float


class Sessions:
    """Server-side sessions: the cookie holds a random id; logging out (or a restart) ends it for good."""

    def __init__(self, lifetime_s: float):
        self.lifetime_s = lifetime_s
        self.live: dict[str, SessionInfo] = {}
        self.lock = threading.Lock()

    def create(self, user: str, role: str) -> str:
        sid = secrets.token_urlsafe(32)
        now = time.time()
        with self.lock:
            self.live = {k: v for k, v in self.live.items() if v.expires > now}
            self.live[sid] = SessionInfo(user, role, now + self.lifetime_s, now)
        return sid

    def get(self, sid: str | None) -> SessionInfo | None:
        if not sid:
            return None
        with self.lock:
            info = self.live.get(sid)
            if info is None or info.expires <= time.time():
                self.live.pop(sid, None)
                return None
            return info

    def end(self, sid: str | None) -> None:
        with self.lock:
            self.live.pop(sid or "", None)

    def end_user(self, user: str) -> None:
        with self.lock:
            self.live = {k: v for k, v in self.live.items() if v.user != user}


class Authenticator:
    """Checks a name and password against the users file (re-read when it changes on disk)."""

    def __init__(self, users_file: Path):
        self.users_file = Path(users_file)
        self._users: dict[str, dict] = {}
        self._stamp: tuple[float, int] | None = None
        self.lock = threading.Lock()

    def users(self) -> dict[str, dict]:
        try:
            st = self.users_file.stat()
            stamp = (st.st_mtime, st.st_size)
        except OSError:
            return {}
        with self.lock:
            if stamp != self._stamp:
                self._users, self._stamp = read_users(self.users_file), stamp
            return self._users

    def check(self, name: str, password: str) -> str | None:
        """The user's role when the password is right, else None (same cost for an unknown name)."""
        user = self.users().get(name)
        ok = verify_password(user["hash"] if user else _dummy_hash(), password)
        return user["role"] if user and ok else None
