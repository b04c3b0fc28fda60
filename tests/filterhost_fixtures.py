"""Fixtures that run filterhost itself: as a real process (``fh``), or in this event loop (``app``).

Every process a test starts is stopped by the fixture by its own PID; every in-process App is
stopped at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from filterhost.app import App
from filterhost.checks import check_configuration
from filterhost.journal import live_messages
from filterhost.pluginmanager import Plugins
from tests.components.services import Dns, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _is_array_of_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def toml_dumps(data: Mapping[str, Any], prefix: str = "") -> str:
    """A small TOML writer for test configs: nested tables of scalars and lists.

    A non-empty list of dicts is written as an array of tables (``[[prefix.key]]``).
    """
    scalars = [
        f"{_toml_key(k)} = {_toml_value(v)}"
        for k, v in data.items()
        if not isinstance(v, dict) and not _is_array_of_tables(v)
    ]
    out = []
    if scalars:
        out.append((f"[{prefix}]\n" if prefix else "") + "\n".join(scalars) + "\n")
    for key, value in data.items():
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        if isinstance(value, dict):
            out.append(toml_dumps(value, name))
        elif _is_array_of_tables(value):
            for item in value:
                out.append(
                    f"[[{name}]]\n"
                    + "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in item.items())
                )
    return "\n".join(out)


def write_conf(directory: Path, sections: Mapping[str, Any], name: str = "00-test.toml") -> Path:
    """Write ``sections`` as ``directory/name``; return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(toml_dumps(sections))
    return directory


AGENT_PASS = "FILTERHOST_TEST_DELIVERY_PROCESS"
"""Set to 1, :func:`base_config` turns ``[relay] delivery_process`` on (tests may still set it)."""


def base_config(
    tmp: Path, port: int, dns: Dns | None, mx_port: int, **overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """A test config: listen on 127.0.0.1:port, spool in tmp, the test DNS, quick retries."""
    conf: dict[str, Any] = {
        "server": {"listen": [f"127.0.0.1:{port}"], "hostname": "relay.test"},
        "spool": {"directory": str(tmp / "spool")},
        "relay": {
            "mode": "mx",
            "mx_port": mx_port,
            "nameservers": [dns.nameserver] if dns is not None else ["127.0.0.1:1"],
            "retry_schedule": ["1s"],
        },
        "plugins": {"order": []},
    }
    if os.environ.get(AGENT_PASS) == "1":
        # `make test`'s second pass: the relay tests again, through the delivery agent.
        conf["relay"]["delivery_process"] = True
    for section, values in overrides.items():
        conf.setdefault(section, {}).update(values)
    return conf


class FilterhostProcess:
    """``python -m filterhost -c CONFDIR`` as a child process, logging to a file."""

    def __init__(self, confdir: Path, port: int, log_path: Path) -> None:
        self.confdir = confdir
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> FilterhostProcess:
        """Start and wait until the listener accepts connections."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "filterhost", "-c", str(self.confdir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.confdir.parent,
            )
        try:
            wait_until(self._accepts, timeout, self.proc, "filterhost")
        except BaseException:
            self.kill()
            raise
        return self

    def _accepts(self) -> bool:
        socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        return True

    @property
    def log(self) -> str:
        """Everything the process logged so far."""
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the log matches ``pattern``; return the match."""
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def check() -> bool:
            m = regex.search(self.log)
            if m:
                found.append(m)
            return m is not None

        wait_until(check, timeout, None, f"log line /{pattern}/")
        return found[0]

    def stop(self) -> int:
        """SIGTERM (graceful) and wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def smtp(self, **kwargs: Any) -> smtplib.SMTP:
        """A connected smtplib client."""
        return smtplib.SMTP("127.0.0.1", self.port, timeout=30, **kwargs)


class FilterhostFactory:
    """Creates filterhost processes for one test; stops them all afterwards."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[FilterhostProcess] = []

    def create(self, sections: Mapping[str, Any]) -> FilterhostProcess:
        """A (not yet started) process with ``sections`` as its conf.d."""
        listen = sections["server"]["listen"][0]
        port = int(listen.rpartition(":")[2])
        confdir = write_conf(self.tmp / f"conf{len(self.started)}.d", sections)
        proc = FilterhostProcess(confdir, port, self.tmp / f"filterhost{len(self.started)}.log")
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop every process (SIGKILL if SIGTERM did not do)."""
        for proc in self.started:
            try:
                proc.stop()
            finally:
                proc.kill()


@pytest.fixture
def fh(tmp_path: Path) -> Iterator[FilterhostFactory]:
    """Factory of real filterhost processes."""
    factory = FilterhostFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@asynccontextmanager
async def running_app(
    tmp: Path, sections: Mapping[str, Any], plugins: Mapping[str, object] | None = None
) -> AsyncIterator[App]:
    """An App serving in this event loop, with ``plugins`` given directly (no entry points)."""
    confdir = write_conf(tmp / f"conf-{time.monotonic_ns()}.d", sections)
    registered = Plugins()
    for name, plugin in (plugins or {}).items():
        registered.add(name, plugin)
    config, registered, problems = check_configuration(confdir, registered)
    errors = [p for p in problems if p.severity == "error"]
    assert config is not None, errors
    assert not errors, errors
    app = App(config, registered, drain_seconds=5)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def port_of(app: App) -> int:
    """The first listening port of an in-process App."""
    sock = app.servers[0].sockets[0]
    return int(sock.getsockname()[1])


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Await until ``predicate()`` is true (polls the event loop, does not block it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


__all__ = [
    "FilterhostFactory",
    "FilterhostProcess",
    "base_config",
    "free_port",
    "port_of",
    "running_app",
    "toml_dumps",
    "wait_for",
    "write_conf",
]


def spooled_ids(spool_dir: Path) -> set[str]:
    """Every message a spool holds: queue files and the journal (messages in a first attempt).

    A message goes from the journal to files before its DONE record: files first, then the
    journal, so a message moving meanwhile is seen at least once.
    """
    files = {p.stem for p in (spool_dir / "queue").glob("*.json")}
    return files | set(live_messages(spool_dir / "journal"))


def spooled_entry(spool_dir: Path, queue_id: str) -> dict[str, Any]:
    """The entry of ``queue_id``, from its file or from the journal."""
    path = spool_dir / "queue" / f"{queue_id}.json"
    for _ in range(2):  # it may move from the journal to files between the two looks
        with contextlib.suppress(FileNotFoundError):
            loaded: dict[str, Any] = json.loads(path.read_bytes())
            return loaded
        record = live_messages(spool_dir / "journal").get(queue_id)
        if record is not None:
            entry: dict[str, Any] = json.loads(record.entry)
            return entry
    raise FileNotFoundError(f"{queue_id} is neither in the queue nor in the journal")
