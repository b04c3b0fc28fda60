"""ESMTP over a raw socket: extensions, RFC 3463 codes on every reply, DSN parameters kept.

One filterhost process serves the module; its next hop never answers, so accepted messages stay
in the spool where the tests read their envelope.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from filterhost.smtp import server
from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import (
    FilterhostFactory,
    FilterhostProcess,
    base_config,
    port_of,
    running_app,
    spooled_entry,
)
from tests.smtp_raw import Raw, has_status


@pytest.fixture(scope="module")
def proc(tmp_path_factory: pytest.TempPathFactory, dns_server: Dns) -> Iterator[FilterhostProcess]:
    tmp = tmp_path_factory.mktemp("esmtp")
    factory = FilterhostFactory(tmp)
    # Nothing listens on the MX port: messages are deferred and stay queued for inspection.
    conf = base_config(
        tmp,
        free_port(),
        dns_server,
        free_port(),
        server={"max_errors_per_session": 100, "max_message_size": 100_000},
        relay={"retry_schedule": ["1h"]},
    )
    try:
        yield factory.create(conf).start()
    finally:
        factory.stop_all()


def _entry(proc: FilterhostProcess, reply: bytes) -> dict[str, object]:
    match = re.search(rb"queued as ([0-9A-F]+)", reply)
    assert match, reply
    return spooled_entry(proc.confdir.parent / "spool", match.group(1).decode())


def test_greeting_and_ehlo_list_every_extension(proc: FilterhostProcess) -> None:
    raw = Raw(proc.port)
    assert raw.reply() == b"220 relay.test ESMTP filterhost"
    assert raw.cmd(b"EHLO client.test") == (
        b"250-relay.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-8BITMIME\r\n"
        b"250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250 HELP"
    )
    # No certificate configured: no STARTTLS, no AUTH, and both commands say so with codes.
    assert raw.cmd(b"STARTTLS") == b"502 5.5.1 Error: STARTTLS not available"
    assert raw.cmd(b"AUTH PLAIN") == b"502 5.5.1 Error: authentication not enabled"
    assert raw.cmd(b"HELO client.test") == b"250 relay.test"
    raw.close()


# Each command with the start of its reply; all but 354 must carry an enhanced status code.
DIALOGUE = [
    (b"MAIL FROM:<a@example.test>", b"503 5.5.1 "),  # before HELO
    (b"NOOP", b"250 2.0.0 "),
    (b"HELP", b"250 2.0.0 "),
    (b"HELP MAIL", b"250 2.0.0 Syntax: MAIL FROM: <address>"),
    (b"VRFY bob", b"252 2.0.0 "),
    (b"VRFY", b"501 5.5.4 "),
    (b"EXPN list", b"502 5.5.1 "),
    (b"BOGUS", b"500 5.5.2 "),
    (b"", b"500 5.5.2 "),
    (b"\xff\xfe", b"500 5.5.2 "),
    (b"RSET", b"250 2.0.0 "),
    (b"EHLO", b"501 5.5.4 "),
    (b"HELO client.test", b"250 relay.test"),
    (b"MAIL FROM:<a@example.test> SIZE=10", b"501 5.5.4 MAIL parameters need EHLO"),
    (b"EHLO client.test", b"250-relay.test"),
    (b"RCPT TO:<b@mx.test>", b"503 5.5.1 Error: need MAIL command"),
    (b"DATA", b"503 5.5.1 Error: need MAIL command"),
    (b"MAIL TO:<a@example.test>", b"501 5.5.4 Syntax: MAIL FROM:<address>"),
    (b"MAIL FROM:<a@example.test> FOO=1", b"555 5.5.4 MAIL FROM parameter FOO"),
    (b"MAIL FROM:<a@example.test> SIZE=100001", b"552 5.3.4 "),
    (b"MAIL FROM:<a@example.test> BODY=BINARYMIME", b"501 5.5.4 BODY must be"),
    (b"MAIL FROM:<a@example.test> SIZE=100 BODY=8BITMIME", b"250 2.1.0 "),
    (b"MAIL FROM:<b@example.test>", b"503 5.5.1 Error: nested MAIL command"),
    (b"RCPT TO:<b@mx.test> FOO=1", b"555 5.5.4 RCPT TO parameter FOO"),
    (b"RCPT TO:<b@mx.test> NOTIFY=SOMETIMES", b"501 5.5.4 NOTIFY must be"),
    (b"RCPT TO:b@mx.test>", b"501 5.1.3 Malformed address"),
    (b"RCPT TO:<>", b"553 5.1.3 "),
    (b"RCPT FROM:<b@mx.test>", b"501 5.5.4 Syntax: RCPT TO:<address>"),
    (b"DATA", b"503 5.5.1 Error: need RCPT command"),
    (b"RCPT TO:<b@mx.test>", b"250 2.1.5 "),
    (b"AUTH PLAIN", b"502 5.5.1 "),
    (b"DATA now", b"501 5.5.4 Syntax: DATA"),
    (b"DATA", b"354 "),
    (b"Subject: codes\r\n\r\nbody\r\n.", b"250 2.0.0 Ok: queued as "),
    (b"QUIT", b"221 2.0.0 "),
]


def test_every_reply_carries_an_enhanced_status_code(proc: FilterhostProcess) -> None:
    raw = Raw(proc.port)
    raw.reply()
    for command, expected in DIALOGUE:
        reply = raw.cmd(command)
        assert reply.startswith(expected), (command, reply)
        exempt = reply.startswith((b"354", b"250-relay.test", b"250 relay.test"))
        assert exempt or has_status(reply), (command, reply)
    raw.close()


def test_dsn_parameters_reach_the_spool_per_recipient(proc: FilterhostProcess) -> None:
    raw = Raw(proc.port)
    raw.greet()
    # Pipelined, as a PIPELINING client may: every reply comes, in order.
    raw.send(
        b"MAIL FROM:<alice@example.test> RET=hdrs ENVID=Q+2B1.xy BODY=8BITMIME SIZE=20\r\n"
        b"RCPT TO:<bob@mx.test> NOTIFY=failure,DELAY ORCPT=rfc822;Bob@Example.org\r\n"
        b"RCPT TO:<carol@mx.test>\r\n"
        b"RCPT TO:<dave@mx.test> notify=NEVER\r\n"
        b"DATA\r\n"
    )
    replies = [raw.reply() for _ in range(5)]
    assert [r[:9] for r in replies] == [
        b"250 2.1.0",
        b"250 2.1.5",
        b"250 2.1.5",
        b"250 2.1.5",
        b"354 End d",
    ]
    queued = raw.cmd(b"Subject: dsn\r\n\r\n\xc3\xa9t\xc3\xa9\r\n.")
    assert queued.startswith(b"250 2.0.0 ")
    entry = _entry(proc, queued)
    assert entry["mail_options"] == ["RET=HDRS", "ENVID=Q+2B1.xy", "BODY=8BITMIME"]
    options = {r["address"]: r["options"] for r in entry["recipients"]}  # type: ignore[attr-defined]
    assert options == {
        "bob@mx.test": ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;Bob@Example.org"],
        "carol@mx.test": [],
        "dave@mx.test": ["NOTIFY=NEVER"],
    }
    # RSET forgets the parameters with the recipients.
    raw.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<eve@mx.test> NOTIFY=NEVER\r\nRSET\r\n")
    assert [raw.reply()[:3] for _ in range(3)] == [b"250"] * 3
    raw.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<eve@mx.test>\r\nDATA\r\n")
    assert [raw.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    entry = _entry(proc, raw.cmd(b"Subject: again\r\n\r\nx\r\n."))
    assert entry["recipients"][0]["options"] == []  # type: ignore[index]
    raw.close()


def test_smtputf8_addresses_need_the_parameter(proc: FilterhostProcess) -> None:
    raw = Raw(proc.port)
    raw.greet()
    reply = raw.cmd("MAIL FROM:<jörg@example.test>".encode())
    assert reply.startswith(b"553 5.6.7 A non-ASCII address needs the SMTPUTF8 parameter")
    assert raw.cmd("MAIL FROM:<jörg@example.test> SMTPUTF8".encode()).startswith(b"250 2.1.0")
    assert raw.cmd("RCPT TO:<björn@mx.test>".encode()).startswith(b"250 2.1.5")
    # Bytes that are not UTF-8 are refused, not guessed at.
    assert raw.cmd(b"RCPT TO:<bj\xf6rn@mx.test>").startswith(
        b"553 5.6.7 Address is not valid UTF-8"
    )
    assert raw.cmd(b"DATA") == b"354 End data with <CR><LF>.<CR><LF>"
    entry = _entry(proc, raw.cmd("Subject: ü\r\n\r\nü\r\n.".encode()))
    assert entry["mail_from"] == "jörg@example.test"
    assert entry["mail_options"] == ["SMTPUTF8"]
    raw.close()


async def test_an_internal_error_in_command_parsing_is_451(
    tmp_path: Path,
    dns_server: Dns,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug of ours with a secret detail")

    conf = base_config(tmp_path, free_port(), dns_server, free_port())
    async with running_app(tmp_path, conf) as app:
        monkeypatch.setattr(server, "parse_path", broken)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port_of(app), start_tls=False)
        await client.connect()
        try:
            await client.ehlo(hostname="client.test")
            code, text = await client.execute_command(b"MAIL", b"FROM:<a@example.test>")
            assert (code, text) == (451, "4.3.0 Internal error, please try again later")
            code, text = await client.execute_command(b"RCPT", b"TO:<b@mx.test>")
            assert code == 503  # the session goes on, in step
            assert (await client.noop()).code == 250
        finally:
            await client.quit()
    assert "a bug of ours" in caplog.text  # the traceback is in the log, only there
    assert "Traceback" in caplog.text


async def test_an_internal_error_at_end_of_data_is_451_and_nothing_is_queued(
    tmp_path: Path, dns_server: Dns, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object) -> object:
        raise KeyError("a bug at end of DATA")

    conf = base_config(tmp_path, free_port(), dns_server, free_port())
    async with running_app(tmp_path, conf) as app:
        monkeypatch.setattr(server.Handler, "process", broken)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port_of(app), start_tls=False)
        await client.connect()
        try:
            await client.ehlo(hostname="client.test")
            await client.mail("a@example.test")
            await client.rcpt("b@mx.test")
            with pytest.raises(aiosmtplib.SMTPDataError) as info:
                await client.data(b"Subject: x\r\n\r\nbody\r\n")
            assert (info.value.code, info.value.message) == (
                451,
                "4.3.0 Internal error, please try again later",
            )
            assert (await client.noop()).code == 250
        finally:
            await client.quit()
        assert list(app.spool.entries()) == []
