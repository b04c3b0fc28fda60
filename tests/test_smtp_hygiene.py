"""Relay hygiene over the wire: routing tricks refused at MAIL and RCPT, trusted or not.

mynetworks is 127.0.0.1/32: a client bound to 127.0.0.2 is untrusted and may only send to the
relay domain mx.test; 127.0.0.1 may relay anywhere, but not with routing tricks either.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import (
    FilterhostFactory,
    FilterhostProcess,
    base_config,
    spooled_entry,
)
from tests.smtp_raw import Raw


@pytest.fixture(scope="module")
def proc(tmp_path_factory: pytest.TempPathFactory, dns_server: Dns) -> Iterator[FilterhostProcess]:
    tmp = tmp_path_factory.mktemp("hygiene")
    factory = FilterhostFactory(tmp)
    conf = base_config(
        tmp,
        free_port(),
        dns_server,
        free_port(),  # nothing listens there: accepted mail stays queued
        server={
            "mynetworks": ["127.0.0.1/32"],
            "relay_domains": ["mx.test"],
            "max_errors_per_session": 100,
        },
        relay={"retry_schedule": ["1h"]},
    )
    try:
        yield factory.create(conf).start()
    finally:
        factory.stop_all()


RCPT_REFUSALS = [
    (b"<user@mx.test.evil.test>", b"554 5.7.1 Relay access denied"),  # suffix trick
    (b"<user@evilmx.test>", b"554 5.7.1 Relay access denied"),
    (b"<user@mx.test.>", b"553 5.1.3 Domain may not end with a dot"),
    (b"<user%evil.test@mx.test>", b"553 5.1.3 Address may not contain '%'"),
    (b"<evil.test!user@mx.test>", b"553 5.1.3 Address may not contain '!'"),
    (b"<@mx.test:user@evil.test>", b"553 5.1.3 Source routes"),
    (b"<@mx.test,@x.test:user@evil.test>", b"553 5.1.3 Source routes"),
    (b'<"user@evil.test"@mx.test>', b"553 5.1.3 A quoted local part may not contain"),
    (b"<user@evil.test@mx.test>", b"553 5.1.3 Address has more than one '@'"),
    (b"<user@[127.0.0.2]>", b"550 5.7.1 Address literals"),
    (b"<user@127.0.0.2>", b"553 5.1.3 Domain is an IP address"),
    (b"<us\ter@mx.test>", b"553 5.1.3 Address contains a control character"),
    (b"<us\x01er@mx.test>", b"553 5.1.3 Address contains a control character"),
    (b"<" + b"u" * 65 + b"@mx.test>", b"553 5.1.3 Local part is longer than 64 octets"),
    (
        b"<u@" + b"a" * 50 + (b".a" + b"b" * 49) * 4 + b".mx.test>",
        b"553 5.1.3 Address is longer than 256",
    ),
    (b"<postmaster>", b"553 5.1.3 Address must include a domain"),
]


def test_untrusted_client_routing_tricks_are_refused_at_rcpt(proc: FilterhostProcess) -> None:
    raw = Raw(proc.port, source="127.0.0.2")
    raw.greet(b"outsider.test")
    assert raw.cmd(b"MAIL FROM:<eve@outside.test>").startswith(b"250 2.1.0")
    for path, refusal in RCPT_REFUSALS:
        reply = raw.cmd(b"RCPT TO:" + path)
        assert reply.startswith(refusal), (path, reply)
    # A NUL or bare CR never even reaches the address parser: the line is refused whole.
    assert raw.cmd(b"RCPT TO:<user@mx.test\x00.evil.test>").startswith(b"500 5.5.2 ")
    assert raw.cmd(b"RCPT TO:<user@mx.test>\rRCPT TO:<v@evil.test>").startswith(b"500 5.5.2 ")
    # The relay domain itself is fine, and is the only recipient the message gets.
    assert raw.cmd(b"RCPT TO:<user@MX.test>").startswith(b"250 2.1.5")
    assert raw.cmd(b"DATA").startswith(b"354")
    queued = raw.cmd(b"Subject: hygiene\r\n\r\nhi\r\n.")
    assert queued.startswith(b"250 2.0.0 Ok: queued as ")
    queue_id = queued.rsplit(b" ", 1)[1].decode()
    entry = spooled_entry(proc.confdir.parent / "spool", queue_id)
    assert [r["address"] for r in entry["recipients"]] == ["user@MX.test"]
    raw.close()
    assert "relay denied from=<eve@outside.test> to=<user@mx.test.evil.test>" in proc.log


def test_sender_tricks_are_refused_at_mail(proc: FilterhostProcess) -> None:
    raw = Raw(proc.port, source="127.0.0.2")
    raw.greet()
    for path, refusal in [
        (b"<eve%evil.test@outside.test>", b"553 5.1.7 Address may not contain '%'"),
        (b"<@relay.test:eve@outside.test>", b"553 5.1.7 Source routes"),
        (b"<eve@[127.0.0.2]>", b"553 5.7.1 Address literals"),
        (b"<eve@outside.test.>", b"553 5.1.7 Domain may not end with a dot"),
        (b"<eve@outside@test>", b"553 5.1.7 Address has more than one '@'"),
    ]:
        reply = raw.cmd(b"MAIL FROM:" + path)
        assert reply.startswith(refusal), (path, reply)
    assert raw.cmd(b"MAIL FROM:<>").startswith(b"250 2.1.0")
    raw.close()


def test_trusted_clients_may_use_literals_but_no_routing_tricks(proc: FilterhostProcess) -> None:
    raw = Raw(proc.port)  # 127.0.0.1: in mynetworks
    raw.greet()
    assert raw.cmd(b"MAIL FROM:<app@[127.0.0.1]>").startswith(b"250 2.1.0")
    assert raw.cmd(b"RCPT TO:<user@[127.0.0.9]>").startswith(b"250 2.1.5")
    assert raw.cmd(b"RCPT TO:<anyone@elsewhere.test>").startswith(b"250 2.1.5")
    for path in (b"<user%evil.test@mx.test>", b"<a!b@mx.test>", b"<@a.test:b@c.test>"):
        assert raw.cmd(b"RCPT TO:" + path).startswith(b"553 5.1.3 "), path
    raw.close()
