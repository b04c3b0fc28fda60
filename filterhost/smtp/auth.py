"""SMTP AUTH: the credentials file, password checks, and the limit on failed attempts.

The credentials file has one ``user:hash`` line per user (``#`` starts a comment), where the
hash is an Argon2id hash in PHC format (``$argon2id$v=19$m=65536,t=3,p=4$...``), written by
``filterhost passwd FILE USER``. Argon2id (argon2-cffi, RFC 9106's recommended parameters) is
slow and memory-hard on purpose: a stolen file does not give the passwords away cheaply. The
server reads the file again when it changes, so adding a user needs no restart.

A check costs ~0.1-0.5 s of CPU and 64 MiB, so it runs in a thread (never on the event loop),
at most two at a time. A user that does not exist costs the same as a wrong password, so the
timing does not tell which names exist. Passwords and the AUTH exchange are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import argon2

__all__ = [
    "Credentials",
    "FailureLimiter",
    "UserFileError",
    "hash_password",
    "parse_user_file",
    "passwd_main",
    "valid_user_name",
]

log = logging.getLogger("filterhost.smtp")

_USER = re.compile(r"[^\s:#\x00-\x1f\x7f][^\s:\x00-\x1f\x7f]{0,254}")
_HASH_PREFIX = "$argon2id$"
_hasher = argon2.PasswordHasher()


def valid_user_name(name: str) -> bool:
    """True for 1-255 characters without white space, ':' or control characters."""
    return _USER.fullmatch(name) is not None


def hash_password(password: str | bytes) -> str:
    """An Argon2id hash of ``password`` (argon2-cffi's defaults: RFC 9106 low-memory profile)."""
    return _hasher.hash(password)


class UserFileError(ValueError):
    """A line of the credentials file that cannot be used (``line`` is 1-based)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


def parse_user_file(text: str) -> tuple[dict[str, str], list[UserFileError]]:
    """``{user: hash}`` from a credentials file, and the lines that could not be used."""
    users: dict[str, str] = {}
    problems: list[UserFileError] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not valid_user_name(user):
            problems.append(UserFileError(number, 'expected "user:$argon2id$..."'))
        elif not hashed.startswith(_HASH_PREFIX):
            problems.append(
                UserFileError(number, f"{user}: not an Argon2id hash; use filterhost passwd")
            )
        elif user in users:
            problems.append(UserFileError(number, f"{user}: listed twice"))
        else:
            users[user] = hashed
    return users, problems


class Credentials:
    """The users of one credentials file, re-read when the file changes."""

    def __init__(self, path: Path, *, concurrency: int = 2) -> None:
        self.path = path
        self._users: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._slots = asyncio.Semaphore(concurrency)
        self._dummy: str | None = None

    def _refresh(self) -> dict[str, str]:
        """The users, reading the file again if it changed (in a worker thread)."""
        with self._lock:
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    users, problems = parse_user_file(self.path.read_text(encoding="utf-8"))
                    for problem in problems:
                        log.warning("credentials file %s: %s", self.path, problem)
                    self._users, self._stamp = users, stamp
            except (OSError, UnicodeDecodeError) as exc:
                # Keep the users we knew: a file being replaced must not lock everyone out.
                log.error("credentials file %s cannot be read: %s", self.path, exc)
            if self._dummy is None:
                self._dummy = hash_password(os.urandom(16))
            return self._users

    def _verify(self, user: str, password: bytes) -> bool:
        users = self._refresh()
        hashed = users.get(user)
        try:
            # An unknown user is checked against a dummy hash: the same time either way.
            ok = _hasher.verify(hashed or self._dummy or "", password)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            log.error("credentials file %s: the hash of %s is damaged", self.path, user)
            return False
        return ok and hashed is not None

    async def verify(self, user: str, password: bytes) -> bool:
        """True when ``password`` is ``user``'s; runs in a worker thread."""
        async with self._slots:
            return await asyncio.to_thread(self._verify, user, password)


def _client_key(client_ip: str) -> str:
    """IPv4 addresses count one by one; IPv6 ones by /64, the usual size of one site."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class FailureLimiter:
    """Failed AUTH attempts per client address in a sliding window.

    A client with ``limit`` failures within ``window`` seconds is refused AUTH (without a
    password check) until its oldest failure is older than ``window``.
    """

    limit: int
    window: float
    clock: Callable[[], float] = time.monotonic
    max_clients: int = 100_000

    def __post_init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.get(key)
        if failures is None:
            return deque()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return failures

    def failures(self, client_ip: str) -> int:
        """Failures of this client (or its IPv6 /64) within the window."""
        return len(self._recent(_client_key(client_ip), self.clock()))

    def blocked(self, client_ip: str) -> bool:
        """True when this client may not try AUTH now."""
        return self.failures(client_ip) >= self.limit

    def add(self, client_ip: str) -> int:
        """Record a failure; returns the client's failures within the window."""
        now = self.clock()
        key = _client_key(client_ip)
        failures = self._recent(key, now)
        if len(self._failures) >= self.max_clients:
            # Memory stays bounded under a spray from many addresses: forget the stalest.
            for stale in [k for k, v in self._failures.items() if v[-1] <= now - self.window]:
                del self._failures[stale]
            while len(self._failures) >= self.max_clients:
                del self._failures[next(iter(self._failures))]
        failures.append(now)
        self._failures[key] = failures
        return len(failures)


# -- filterhost passwd FILE USER ---------------------------------------------------------------


def _read_password(stdin: TextIO) -> str:
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise ValueError("the passwords differ")
        return first
    return stdin.readline().rstrip("\r\n")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def passwd_main(  # noqa: PLR0911 - one exit status per failure
    path: Path, user: str, *, delete: bool = False, stdin: TextIO | None = None
) -> int:
    """``filterhost passwd FILE USER``: add or change a user (password from stdin or the tty).

    With ``delete``, remove the user. Other lines and comments are kept; the file is replaced
    atomically with mode 0600. Returns the exit status.
    """
    stdin = stdin if stdin is not None else sys.stdin
    if not valid_user_name(user):
        print(f"filterhost passwd: {user!r}: a user name has no spaces or ':'", file=sys.stderr)
        return 2
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError) as exc:
        print(f"filterhost passwd: {path}: {exc}", file=sys.stderr)
        return 1
    kept = [line for line in lines if line.strip().partition(":")[0] != user]
    existed = len(kept) != len(lines)
    if delete:
        if not existed:
            print(f"filterhost passwd: no user {user} in {path}", file=sys.stderr)
            return 1
        _write_atomically(path, "".join(f"{line}\n" for line in kept))
        print(f"{path}: user {user} removed")
        return 0
    try:
        password = _read_password(stdin)
    except (ValueError, EOFError) as exc:
        print(f"filterhost passwd: {exc or 'no password given'}", file=sys.stderr)
        return 1
    if not password:
        print("filterhost passwd: empty password refused", file=sys.stderr)
        return 1
    kept.append(f"{user}:{hash_password(password)}")
    try:
        _write_atomically(path, "".join(f"{line}\n" for line in kept))
    except OSError as exc:
        print(f"filterhost passwd: {path}: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: user {user} {'changed' if existed else 'added'}")
    return 0
