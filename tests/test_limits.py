"""Limits over a raw socket: connections, messages, errors, unknown and junk commands, header
size, hops, the idle timeout and the DATA deadline, and a graceful stop.

Limits are set small so that each is reached in a few commands; timeouts are a second or two,
and the timeout tests wait for the server's own clock.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import FilterhostFactory, FilterhostProcess, base_config
from tests.smtp_raw import Raw


def _server(tmp: Path, dns: Dns, **server: Any) -> tuple[FilterhostFactory, FilterhostProcess]:
    factory = FilterhostFactory(tmp)
    conf = base_config(
        tmp, free_port(), dns, free_port(), server=server, relay={"retry_schedule": ["1h"]}
    )
    proc = factory.create(conf).start()
    try:
        # The start-up probe's connection must be gone before the counts are tested.
        proc.wait_log(r"-1: disconnect from 127\.0\.0\.1")
    except BaseException:
        factory.stop_all()  # the caller never gets the factory to stop it
        raise
    return factory, proc


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory, dns_server: Dns
) -> Iterator[FilterhostProcess]:
    factory, proc = _server(
        tmp_path_factory.mktemp("limits"),
        dns_server,
        max_messages_per_session=2,
        max_errors_per_session=4,
        max_unknown_commands=2,
        max_junk_commands=3,
        max_header_size=300,
        max_recipients=3,
        max_hops=3,
    )
    try:
        yield proc
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory, dns_server: Dns) -> Iterator[FilterhostProcess]:
    factory, proc = _server(
        tmp_path_factory.mktemp("timeouts"), dns_server, idle_timeout="1s", data_timeout="2s"
    )
    try:
        yield proc
    finally:
        factory.stop_all()


def _session(proc: FilterhostProcess, source: str = "127.0.0.1") -> Raw:
    raw = Raw(proc.port, source=source)
    raw.greet()
    return raw


def _send_message(raw: Raw, message: bytes = b"Subject: x\r\n\r\nbody\r\n") -> bytes:
    raw.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n")
    replies = [raw.reply() for _ in range(3)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"354"], replies
    return raw.cmd(message + b".")


def test_connections_per_client_and_in_total(tmp_path: Path, dns_server: Dns) -> None:
    factory, proc = _server(tmp_path, dns_server, max_connections=3, max_connections_per_client=2)
    opened: list[Raw] = []
    try:
        for source in ("127.0.0.2", "127.0.0.2"):
            opened.append(Raw(proc.port, source=source))
            assert opened[-1].reply().startswith(b"220 ")
        third = Raw(proc.port, source="127.0.0.2")
        assert third.closed() == (
            b"421 4.7.0 relay.test Error: too many connections from 127.0.0.2; try again later\r\n"
        )
        third.close()
        opened.append(Raw(proc.port, source="127.0.0.3"))
        assert opened[-1].reply().startswith(b"220 ")
        fourth = Raw(proc.port, source="127.0.0.4")
        assert fourth.closed() == (
            b"421 4.7.0 relay.test Error: too many connections; try again later\r\n"
        )
        fourth.close()
        # A session that ends gives its place back.
        assert opened[0].cmd(b"QUIT").startswith(b"221 2.0.0")
        opened.pop(0).close()
        proc.wait_log(r"disconnect from 127\.0\.0\.2")
        again = Raw(proc.port, source="127.0.0.4")
        opened.append(again)
        assert again.reply().startswith(b"220 ")
    finally:
        for raw in opened:
            raw.close()
        factory.stop_all()
    assert "refused 127.0.0.2: too many connections from 127.0.0.2" in proc.log


def test_messages_per_session(limited: FilterhostProcess) -> None:
    raw = _session(limited)
    try:
        for _ in range(2):
            assert _send_message(raw).startswith(b"250 2.0.0 Ok: queued as ")
        raw.send(b"MAIL FROM:<a@example.test>\r\n")
        assert raw.closed() == (
            b"421 4.7.0 relay.test Error: too many messages in one session; reconnect\r\n"
        )
    finally:
        raw.close()


def test_errors_per_session(limited: FilterhostProcess) -> None:
    raw = _session(limited)
    try:
        for _ in range(3):
            assert raw.cmd(b"RCPT TO:<b@mx.test>") == b"503 5.5.1 Error: need MAIL command"
        raw.send(b"RCPT TO:<b@mx.test>\r\n")
        assert raw.closed() == (
            b"503 5.5.1 Error: need MAIL command\r\n421 4.7.0 relay.test Error: too many errors\r\n"
        )
    finally:
        raw.close()


def test_too_many_recipients_is_not_an_error(limited: FilterhostProcess) -> None:
    raw = _session(limited)
    try:
        assert raw.cmd(b"MAIL FROM:<a@example.test>").startswith(b"250")
        for n in range(3):
            assert raw.cmd(b"RCPT TO:<r%d@mx.test>" % n).startswith(b"250 2.1.5")
        for n in range(5):  # more than max_errors_per_session, and the session goes on
            assert raw.cmd(b"RCPT TO:<x%d@mx.test>" % n) == (
                b"452 4.5.3 Too many recipients (at most 3 per message)"
            )
        assert raw.cmd(b"NOOP").startswith(b"250")
    finally:
        raw.close()


def test_unknown_and_junk_commands(limited: FilterhostProcess) -> None:
    raw = _session(limited)
    try:
        for command in (b"FOO", b"BAR"):
            assert raw.cmd(command) == b"500 5.5.2 Error: command not recognized"
        raw.send(b"BAZ\r\n")
        assert raw.closed() == b"421 4.7.0 relay.test Error: too many unrecognized commands\r\n"
    finally:
        raw.close()
    raw = _session(limited)
    try:
        for command in (b"NOOP", b"RSET", b"NOOP"):
            assert raw.cmd(command).startswith(b"250 2.0.0")
        raw.send(b"NOOP\r\n")
        assert raw.closed() == b"421 4.7.0 relay.test Error: too many NOOP commands\r\n"
    finally:
        raw.close()


def test_a_web_request_is_hung_up_on(limited: FilterhostProcess) -> None:
    raw = Raw(limited.port)
    try:
        assert raw.reply().startswith(b"220 ")
        raw.send(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        assert raw.closed() == b"421 4.7.0 relay.test Error: this is an SMTP server\r\n"
    finally:
        raw.close()


def test_header_size_and_hop_count(limited: FilterhostProcess) -> None:
    raw = _session(limited)
    try:
        big_header = b"Subject: x\r\nX-Filler: " + b"y" * 300 + b"\r\n\r\nbody\r\n"
        assert _send_message(raw, big_header) == b"552 5.3.4 Message header exceeds 300 bytes"
        hops = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 3
        reply = _send_message(raw, hops + b"Subject: loop\r\n\r\nbody\r\n")
        assert reply == b"554 5.4.6 Too many hops (mail loop?)"
    finally:
        raw.close()
    raw = _session(limited)
    try:
        # A small header and a body far bigger than max_header_size: fine.
        small = b"Subject: small\r\n\r\n" + b"z" * 900 + b"\r\n" * 20
        assert _send_message(raw, small).startswith(b"250 2.0.0 ")
    finally:
        raw.close()


def test_idle_timeout(timed: FilterhostProcess) -> None:
    raw = _session(timed)
    start = time.monotonic()
    try:
        assert raw.closed() == b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
    finally:
        raw.close()
    assert 0.9 <= time.monotonic() - start < 4


def _trickle(raw: Raw, data: bytes, interval: float, limit: float) -> tuple[bytes, float]:
    """Send one byte every ``interval`` seconds until the server says something or closes."""
    start = time.monotonic()
    for i in range(len(data)):
        try:
            raw.send(data[i : i + 1])
        except (BrokenPipeError, ConnectionResetError):
            break
        got = raw.pending(interval)
        if got or time.monotonic() - start > limit:
            return got + raw.closed(), time.monotonic() - start
    return raw.closed(), time.monotonic() - start


def test_a_trickled_command_still_times_out(timed: FilterhostProcess) -> None:
    raw = _session(timed)
    try:
        # Bytes keep coming, but no line ends: the idle timer is not reset by them.
        got, elapsed = _trickle(raw, b"MAIL FROM:<a@example.test>" * 4, 0.25, 6)
    finally:
        raw.close()
    assert got == b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
    assert elapsed < 2.5


def test_data_deadline_stops_a_client_trickling_one_byte_at_a_time(
    timed: FilterhostProcess,
) -> None:
    raw = _session(timed)
    try:
        raw.send(b"MAIL FROM:<slow@example.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n")
        assert [raw.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        # Each byte comes well within the idle timeout (1s); the DATA deadline (2s) still ends it.
        got, elapsed = _trickle(raw, b"Subject: slow\r\n\r\n" + b"x" * 100, 0.3, 8)
    finally:
        raw.close()
    assert got == b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
    assert 1.8 <= elapsed < 4
    timed.wait_log(r"DATA deadline passed, closing")
    assert "queued from=<slow@" not in timed.log


def test_slow_but_steady_data_within_the_deadline_is_accepted(timed: FilterhostProcess) -> None:
    raw = _session(timed)
    try:
        raw.send(b"MAIL FROM:<steady@example.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n")
        assert [raw.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        # 1.5 s in all, longer than the idle timeout, but never 1 s without a byte.
        for chunk in (b"Subject: steady\r\n", b"\r\n", b"body\r\n"):
            raw.send(chunk)
            assert raw.pending(0.5) == b""
        assert raw.cmd(b".").startswith(b"250 2.0.0 Ok: queued as ")
    finally:
        raw.close()


def test_stop_closes_idle_sessions_and_lets_a_transaction_finish(
    tmp_path: Path, dns_server: Dns
) -> None:
    factory, proc = _server(tmp_path, dns_server)
    idle = _session(proc)
    busy = _session(proc)
    try:
        busy.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@mx.test>\r\n")
        assert [busy.reply()[:3] for _ in range(2)] == [b"250", b"250"]
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        assert idle.closed() == b"421 4.3.2 relay.test Service shutting down\r\n"
        # The transaction in progress completes, then that session is closed too.
        assert busy.cmd(b"DATA").startswith(b"354")
        busy.send(b"Subject: last\r\n\r\nbody\r\n.\r\n")
        got = busy.closed()
        assert got.startswith(b"250 2.0.0 Ok: queued as ")
        assert got.endswith(b"\r\n421 4.3.2 relay.test Service shutting down\r\n")
        assert proc.proc.wait(10) == 0
    finally:
        idle.close()
        busy.close()
        factory.stop_all()
