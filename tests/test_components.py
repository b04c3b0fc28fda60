"""The test components themselves: real unbound, clamd, smtp-sink and recording peer."""

import asyncio
import smtplib
import socket
import struct
from email.message import EmailMessage

import dns.resolver
import pytest

from tests.components.services import EICAR, Clamd, Dns, free_port, start_unbound, wait_until


async def test_mx_records_in_preference_order(dns_server: Dns):
    answer = await dns_server.resolver().resolve("mx.test", "MX")
    mxs = sorted((r.preference, r.exchange.to_text()) for r in answer)
    assert mxs == [(10, "mx1.mx.test."), (20, "mx2.mx.test."), (30, "mx3.mx.test.")]


async def test_null_mx(dns_server: Dns):
    answer = await dns_server.resolver().resolve("nullmx.test", "MX")
    assert [(r.preference, r.exchange.to_text()) for r in answer] == [(0, ".")]


@pytest.mark.parametrize(
    ("name", "exc"),
    [
        ("amx.test", dns.resolver.NoAnswer),
        ("nx.test", dns.resolver.NXDOMAIN),
        ("servfail.test", dns.resolver.NoNameservers),
        ("timeout.test", dns.resolver.LifetimeTimeout),
    ],
)
async def test_dns_failures(dns_server: Dns, name: str, exc: type[Exception]):
    with pytest.raises(exc):
        await dns_server.resolver(lifetime=0.3).resolve(name, "MX")


async def test_extra_dns_data():
    server = start_unbound(['spf.test. 60 IN TXT "v=spf1 -all"'])
    try:
        r = server.resolver()
        txt = await r.resolve("spf.test", "TXT")
        assert [t.to_text() for t in txt] == ['"v=spf1 -all"']
        assert [a.address for a in await r.resolve("smart.test", "A")] == ["127.0.0.5"]
        assert [m.exchange.to_text() for m in await r.resolve("loop.test", "MX")] == [
            "mx1.mx.test."
        ]
    finally:
        server.stop()


def mail(attachment: bytes | None = None) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "alice@example.test", "bob@mx.test", "t"
    m.set_content("hello\n")
    if attachment is not None:
        m.add_attachment(
            attachment, maintype="application", subtype="octet-stream", filename="a.bin"
        )
    return m.as_bytes()


async def instream(clamd: Clamd, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(clamd.host, clamd.port)
    try:
        writer.write(b"zINSTREAM\0" + struct.pack("!L", len(data)) + data + struct.pack("!L", 0))
        await writer.drain()
        return await reader.readuntil(b"\0")
    finally:
        writer.close()
        await writer.wait_closed()


async def test_clamd_finds_eicar_in_base64_attachment(clamd_server: Clamd):
    assert b"X5O!P" not in mail(EICAR)  # really only in base64 form
    found = await instream(clamd_server, mail(EICAR))
    assert found == b"stream: Filterhost.Test.EICAR-Body.UNOFFICIAL FOUND\0"
    assert await instream(clamd_server, mail()) == b"stream: OK\0"


MESSAGE = (
    b"From: alice@example.test\r\nTo: bob@mx.test\r\nSubject: sink test\r\n\r\n"
    b"line one\r\n.starts with a dot\r\n\r\ntrailing blank \r\n\x00nul\r\n"
)


@pytest.mark.parametrize("addr", ["127.0.0.2", "::1"])
def test_sink_records_message(sinks, addr: str):
    sink = sinks.start(addr, free_port(addr))
    with smtplib.SMTP(addr, sink.port, local_hostname="client.test", timeout=10) as s:
        s.sendmail("alice@example.test", ["bob@mx.test", "carol@mx.test"], MESSAGE)
    (msg,) = sink.wait_for_count(1)
    assert msg.mail_from == "alice@example.test"
    assert msg.rcpt_tos == ["bob@mx.test", "carol@mx.test"]
    assert msg.helo == "client.test"
    assert msg.data == MESSAGE
    assert msg.raw.startswith(b"X-Client-Addr: ")


def test_sink_message_in_progress_is_not_listed(sinks):
    sink = sinks.start("127.0.0.2", free_port("127.0.0.2"))
    big = b"Subject: big\r\n\r\n" + b"x" * 20000 + b"\r\n"  # past smtp-sink's 8 KiB buffer
    with smtplib.SMTP(sink.addr, sink.port, timeout=10) as s:
        s.mail("alice@example.test")
        s.rcpt("bob@mx.test")
        assert s.docmd("DATA")[0] == 354
        s.send(big)
        wait_until(lambda: any(p.stat().st_size for p in sink.maildir.iterdir()), 5)
        assert sink.messages() == []  # the dump file is still open
        s.send(b".\r\n")
        assert s.getreply()[0] == 250
    (msg,) = sink.wait_for_count(1)
    assert msg.data == big


def test_sink_refuses_rcpt(sinks):
    sink = sinks.start("127.0.0.3", free_port("127.0.0.3"), "-r", "RCPT")
    with (
        smtplib.SMTP(sink.addr, sink.port, timeout=10) as s,
        pytest.raises(smtplib.SMTPRecipientsRefused) as e,
    ):
        s.sendmail("alice@example.test", ["bob@mx.test"], MESSAGE)
    assert e.value.recipients["bob@mx.test"][0] == 450
    assert sink.messages() == []


def test_peer_answers_per_recipient(peers):
    peer = peers.start("127.0.0.4", free_port("127.0.0.4"))
    rcpts = ["defer.me@mx.test", "reject-me@mx.test", "ok@mx.test"]
    with smtplib.SMTP(peer.addr, peer.port, local_hostname="client.test", timeout=10) as s:
        refused = s.sendmail("alice@example.test", rcpts, MESSAGE)
    assert {r: code for r, (code, _) in refused.items()} == {
        "defer.me@mx.test": 450,
        "reject-me@mx.test": 550,
    }
    assert refused["defer.me@mx.test"][1] == b"4.2.0 try later"
    (msg,) = peer.wait_for_count(1)
    assert (msg.mail_from, msg.rcpt_tos, msg.helo) == (
        "alice@example.test",
        ["ok@mx.test"],
        "client.test",
    )
    assert msg.data == MESSAGE
    assert [(a.address, a.code) for a in peer.rcpt_attempts()] == [
        ("defer.me@mx.test", 450),
        ("reject-me@mx.test", 550),
        ("ok@mx.test", 250),
    ]


def test_peer_keeps_exact_bytes(peers):
    """smtplib would fix bare LF; talk raw SMTP to show the peer records what came."""
    peer = peers.start("127.0.0.4", free_port("127.0.0.4"), replies={})
    body = b"Subject: raw\r\n\r\nbare\nlf and bare\rcr\r\n..dot\r\n"
    with socket.create_connection((peer.addr, peer.port), timeout=10) as s, s.makefile("rb") as f:

        def say(line: bytes) -> bytes:
            if line:
                s.sendall(line)
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            return reply[:3]

        replies = [
            say(c)
            for c in (
                b"",
                b"EHLO c.test\r\n",
                b"MAIL FROM:<>\r\n",
                b"RCPT TO:<x@mx.test>\r\n",
                b"DATA\r\n",
                body + b".\r\n",
                b"QUIT\r\n",
            )
        ]
    assert replies == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    (msg,) = peer.wait_for_count(1)
    assert msg.mail_from == ""
    assert msg.data == b"Subject: raw\r\n\r\nbare\nlf and bare\rcr\r\n.dot\r\n"
