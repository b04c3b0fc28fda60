"""Logs and metrics, through a real front end (in this event loop), a real MX and real DNS.

One message's story is read back from the log lines (text and JSON) by its queue id; the
Prometheus endpoint is scraped over HTTP after real sessions; /health is turned red by real
breakage (the spool's queue directory replaced by a file, the queue runner's loop ended).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import argon2
import pytest

from filterhost import Transaction, Verdict, hookimpl
from filterhost.app import App
from filterhost.config import load_config
from filterhost.logs import JsonFormatter, TextFormatter, parse_event
from filterhost.testing import make_message
from filterhost.verdict import Action, Reply
from tests.components.fixtures import Sinks
from tests.components.services import Dns, free_port, make_cert
from tests.filterhost_fixtures import (
    base_config,
    port_of,
    running_app,
    spooled_ids,
    wait_for,
    write_conf,
)

PASSWORD = "Pa55-word-CANARY-9931"
WRONG = "wrong-CANARY-4417"
BODY_CANARY = "BODY-CANARY-7731 the secret plan"


class Gate:
    """Refuses subjects with "refuse me" (554 5.7.1); adds a header to the others."""

    @hookimpl
    async def filterhost_message(self, transaction: Transaction) -> Verdict | None:
        if "refuse me" in (transaction.message.get("Subject") or ""):
            return Verdict(Action.REJECT, Reply(554, "5.7.1", "Refused by gate"), "subject rule")
        transaction.message.add_header("X-Gate", "passed")
        return None


class Records(logging.Handler):
    """Keeps every record of the test, to format them as the server would."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> list[str]:
        fmt = TextFormatter()
        return [fmt.format(r) for r in self.records]

    def json(self) -> list[dict[str, Any]]:
        fmt = JsonFormatter()
        return [json.loads(fmt.format(r)) for r in self.records]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


async def _http(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _send(port: int, subject: str, **login: Any) -> aiosmtplib.SMTPResponse:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        if login:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            await client.starttls(tls_context=context)
            await client.ehlo(hostname="client.test")
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await client.auth_plain("alice", WRONG)
            await client.auth_plain("alice", login["password"])
        message = make_message(subject=subject, to=["bob@mx.test"], body=BODY_CANARY + "\n")
        await client.mail("alice@example.test")
        await client.rcpt("bob@mx.test")
        try:
            return await client.data(message.as_bytes())
        except aiosmtplib.SMTPDataError as exc:
            return aiosmtplib.SMTPResponse(exc.code, exc.message)
    finally:
        await client.quit()


@pytest.fixture
def conf(tmp_path: Path, dns_server: Dns, sinks: Sinks) -> dict[str, Any]:
    mx_port = free_port()
    sinks.start("127.0.0.2", mx_port)
    cert = make_cert(tmp_path / "cert", "relay.test", ["127.0.0.1"])
    users = tmp_path / "users"
    users.write_text(f"alice:{argon2.PasswordHasher().hash(PASSWORD)}\n")
    return base_config(
        tmp_path,
        free_port(),
        dns_server,
        mx_port,
        server={"tls_cert": str(cert.cert), "tls_key": str(cert.key), "auth_file": str(users)},
        plugins={"order": ["gate"]},
        metrics={"listen": f"127.0.0.1:{free_port()}"},
    )


async def test_one_story_per_message_in_text_and_json_without_secrets_or_bodies(
    tmp_path: Path, conf: dict[str, Any], records: Records
) -> None:
    async with running_app(tmp_path, conf, {"gate": Gate()}) as app:
        ok = await _send(port_of(app), "hello", password=PASSWORD)
        refused = await _send(port_of(app), "please refuse me")
        assert ok.code == 250
        assert refused.code == 554
        queue_id = ok.message.rsplit(" ", 1)[1]
        await wait_for(lambda: not spooled_ids(app.spool.directory))
    text = records.text()
    story = [line for line in text if f": {queue_id}: " in line]
    assert any("verdict plugin=gate hook=filterhost_message action=continue" in s for s in story)
    assert any(re.search(r"queued from=<alice@example.test> size=\d+ nrcpt=1 ", s) for s in story)
    assert any(re.search(r"attempt to=<bob@mx.test> relay=\S+ tls=\S+ ", s) for s in story)
    assert any("to=<bob@mx.test> status=delivered" in s for s in story)
    assert any(
        re.search(r"verdict plugin=gate .*action=reject reply='554 5\.7\.1", s) for s in text
    )
    assert any(
        re.search(r"S\d+-\d+: connect client=127\.0\.0\.1 port=\d+ trusted=True", s) for s in text
    )

    events = records.json()
    mine = [e for e in events if e.get("id") == queue_id]
    by_event = {e["event"]: e for e in mine}
    assert by_event["queued"]["size"] > 0
    assert by_event["queued"]["nrcpt"] == 1
    assert by_event["queued"]["from"] == "alice@example.test"
    attempt = by_event["attempt"]
    assert attempt["to"] == "bob@mx.test"
    assert attempt["reply"].startswith("250")
    assert isinstance(attempt["delay"], float)
    assert by_event["delivered"]["to"] == "bob@mx.test"
    verdict = by_event["verdict"]
    assert verdict["plugin"] == "gate"
    assert verdict["action"] == "continue"
    assert isinstance(verdict["duration"], float)
    assert any(e["event"] == "connect" and e.get("client") == "127.0.0.1" for e in events)
    # AUTH: the user name is logged on success; no password (right or wrong), no body text.
    assert any("AUTH PLAIN succeeded user=alice" in s for s in text)
    everything = "\n".join(text) + json.dumps(events)
    for secret in (PASSWORD, WRONG, "CANARY", "secret plan"):
        assert secret not in everything


async def test_metrics_scraped_over_http_after_real_sessions(
    tmp_path: Path, conf: dict[str, Any]
) -> None:
    async with running_app(tmp_path, conf, {"gate": Gate()}) as app:
        assert app.metrics_server is not None
        http = app.metrics_server.port
        _, before = await _http(http, "/metrics")
        assert _sample(before, "filterhost_messages_total", outcome="accepted") == 0
        for subject in ("one", "two", "refuse me"):
            await _send(port_of(app), subject)
        await wait_for(lambda: not spooled_ids(app.spool.directory))
        status, text = await _http(http, "/metrics")
    assert status == 200
    assert _sample(text, "filterhost_sessions_total", result="admitted") == 3
    assert _sample(text, "filterhost_messages_total", outcome="accepted", plugin="-") == 2
    assert (
        _sample(
            text, "filterhost_messages_total", outcome="rejected", plugin="gate", reason="5.7.1"
        )
        == 1
    )
    assert (
        _sample(
            text,
            "filterhost_plugin_duration_seconds_count",
            plugin="gate",
            hook="filterhost_message",
        )
        == 3
    )
    assert _sample(text, "filterhost_plugin_verdicts_total", plugin="gate", action="reject") == 1
    assert _sample(text, "filterhost_deliveries_total", next_hop="mx", outcome="delivered") == 2
    assert _sample(text, "filterhost_queue_messages") == 0
    assert "filterhost_queue_oldest_age_seconds" in text
    assert "filterhost_sessions_active" in text


async def test_queue_gauges_count_what_waits(tmp_path: Path, dns_server: Dns) -> None:
    # Nothing listens on the MX port: the message stays queued, deferred.
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        free_port(),
        metrics={"listen": f"127.0.0.1:{free_port()}"},
    )
    async with running_app(tmp_path, conf) as app:
        await _send_plain(port_of(app))
        assert app.metrics_server is not None
        _, text = await _http(app.metrics_server.port, "/metrics")
        assert _sample(text, "filterhost_queue_messages") == 1
        assert 0 <= _sample(text, "filterhost_queue_oldest_age_seconds") < 60
        # The message's STORE record made durable by a sync (and, if its first attempt has
        # deferred already, its DONE after the move to files).
        syncs = _sample(text, "filterhost_spool_syncs_total", store="journal")
        synced = _sample(text, "filterhost_spool_synced_operations_total", store="journal")
        assert 1 <= syncs <= synced <= 2
        await wait_for(lambda: "deferred" in _deliveries(app))


def _deliveries(app: App) -> str:
    assert app.hooks.metrics is not None
    return "".join(
        s.labels["outcome"] for m in app.hooks.metrics.deliveries.collect() for s in m.samples
    )


async def _send_plain(port: int) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    await client.sendmail("a@example.test", ["b@mx.test"], b"Subject: q\r\n\r\nq\r\n")
    await client.quit()


async def test_health_fails_when_the_spool_is_not_writable_or_the_runner_is_stuck(
    tmp_path: Path, dns_server: Dns
) -> None:
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        free_port(),
        metrics={"listen": f"127.0.0.1:{free_port()}"},
    )
    async with running_app(tmp_path, conf) as app:
        assert app.metrics_server is not None
        http = app.metrics_server.port
        assert await _http(http, "/health") == (200, "ok\n")
        assert (await _http(http, "/nowhere"))[0] == 404
        # The queue directory replaced by a regular file: nothing can be spooled.
        queue_dir = app.spool.queue_dir
        queue_dir.rename(queue_dir.with_name("moved"))
        queue_dir.write_text("not a directory")
        status, body = await _http(http, "/health")
        assert status == 503
        assert "not writable" in body
        queue_dir.unlink()
        queue_dir.with_name("moved").rename(queue_dir)
        assert (await _http(http, "/health"))[0] == 200
        # The runner's loop gone: due work would never start.
        task = app.queue._loop_task
        assert task is not None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        status, body = await _http(http, "/health")
        assert status == 503
        assert "queue runner stuck" in body


async def test_a_replaced_delivery_agent_is_counted(tmp_path: Path, dns_server: Dns) -> None:
    metrics = {"listen": f"127.0.0.1:{free_port()}"}
    relay = {"delivery_process": True}
    conf = base_config(tmp_path, free_port(), dns_server, free_port(), metrics=metrics, relay=relay)
    async with running_app(tmp_path, conf) as app:
        assert app.metrics_server is not None
        agent = app.queue.agent
        assert agent is not None
        starts = "filterhost_delivery_agent_starts_total"
        text = (await _http(app.metrics_server.port, "/metrics"))[1]
        assert _sample(text, starts) == 1
        first = agent.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: agent.starts == 2 and agent.pid not in (None, first))
        text = (await _http(app.metrics_server.port, "/metrics"))[1]
        assert _sample(text, starts) == 2
        assert (await _http(app.metrics_server.port, "/health"))[0] == 200


def test_parse_event_reads_back_fields() -> None:
    line = (
        "0190ABCDEF123: attempt to=<b@x.test> relay=mx[127.0.0.2]:25 tls=none delay=0.120 "
        "reply='451 4.3.0 a b'"
    )
    assert parse_event(line) == {
        "id": "0190ABCDEF123",
        "event": "attempt",
        "to": "b@x.test",
        "relay": "mx[127.0.0.2]:25",
        "tls": "none",
        "delay": 0.12,
        "reply": "451 4.3.0 a b",
    }
    assert parse_event("listening on 127.0.0.1:25")["event"] == "listening on 127.0.0.1:25"
    assert parse_event("S12-3: connect client=::1 trusted=False") == {
        "id": "S12-3",
        "event": "connect",
        "client": "::1",
        "trusted": False,
    }
    assert "id" not in parse_event("config: x: y")


def test_log_format_json_on_the_command_line(tmp_path: Path) -> None:
    """A real process: every log line is one JSON object (here: up to a failed bind)."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        confdir = tmp_path / "conf.d"
        confdir.mkdir()
        (confdir / "00.toml").write_text(
            f'[server]\nlisten = ["127.0.0.1:{held.getsockname()[1]}"]\n'
            f'[spool]\ndirectory = "{tmp_path / "spool"}"\n'
            '[relay]\nnameservers = ["127.0.0.1:1"]\n'
            # clamd is down: a warning, logged at start-up, and serving goes on
            f'[plugins]\norder = ["clamav"]\n[plugins.clamav]\nservers = ["unix:{tmp_path}/x"]\n'
        )
        done = subprocess.run(
            [sys.executable, "-m", "filterhost", "--log-format", "json", "-c", str(confdir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        held.close()
    assert done.returncode == 1  # the port is taken
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(e["event"].startswith("queue runner started") for e in logged)
    warning = next(e for e in logged if e["message"].startswith("config: "))
    assert "id" not in warning
    assert warning["level"] == "WARNING"
    assert warning["logger"] == "filterhost"
    others = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert others == [f"filterhost: cannot start: {others[0].split('cannot start: ')[1]}"]


def test_metrics_listen_must_be_loopback(tmp_path: Path) -> None:
    for listen, ok in (("127.0.0.1:9125", True), ("[::1]:9125", True), ("0.0.0.0:9125", False)):
        confdir = write_conf(tmp_path / f"c{ok}{listen[:3]}", {"metrics": {"listen": listen}})
        config, problems = load_config(confdir)
        assert (config is not None) is ok, problems
        if not ok:
            assert problems[0].key == "metrics.listen"
            assert "loopback" in problems[0].message
