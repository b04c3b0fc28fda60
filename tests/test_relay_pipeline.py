"""The outbound transaction: pipelined commands, the message bytes, kept connections.

The peers here are small scripted SMTP servers on loopback, written to fail when the client
does not pipeline or sends an RSET it does not need; the real next hops (smtp-sink, which
pipelines, and the aiosmtpd recording peer, which does not announce PIPELINING) carry the
relay end-to-end tests in test_relay_e2e.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from filterhost.relay.client import ConnectionPool, Delivery, TlsSettings, deliver
from filterhost.relay.pipeline import wire_parts
from filterhost.relay.resolver import MxHost
from filterhost.spool import Checked


def wire_message(data: bytes, *, checked: Checked | None = None) -> bytes:
    """What NextHop writes for ``data``: its pieces, one after the other."""
    return b"".join(wire_parts(data, checked=checked))


def _aiosmtplib_wire(data: bytes) -> bytes:
    """What aiosmtplib's DATA sent for ``data`` (the oracle for wire_message)."""
    data = normalize_message_line_endings(data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return PERIOD_REGEX.sub(b"..", data) + b".\r\n"


def test_wire_message_sends_what_aiosmtplib_sent() -> None:
    rng = random.Random(7)
    alphabet = [b"a", b".", b"\r", b"\n", b"\r\n", b" ", b"..", b"\r\n."]
    for _ in range(20_000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 24)))
        assert wire_message(data) == _aiosmtplib_wire(data), data


def test_checked_bytes_are_sent_as_the_full_check_would_send_them() -> None:
    rng = random.Random(9)
    lines = [b"", b".", b"..x", b"a.b", b" .", b"text"]
    for _ in range(5_000):
        data = b"\r\n".join(rng.choice(lines) for _ in range(rng.randrange(1, 8))) + b"\r\n"
        assert wire_message(data, checked=Checked(len(data))) == wire_message(data), data


def test_only_the_part_before_a_dot_free_body_is_searched_for_dot_lines() -> None:
    """As the front end marks it: headers (which plugins may edit) and a body with no dot line."""
    rng = random.Random(13)
    heads = [b"A: b", b".X: y", b"Received: z", b" folded", b"B: .c"]
    bodies = [b"", b"text", b"a.b", b" .", b"x"]
    for _ in range(5_000):
        head = b"".join(rng.choice(heads) + b"\r\n" for _ in range(rng.randrange(0, 4)))
        body = b"".join(rng.choice(bodies) + b"\r\n" for _ in range(rng.randrange(0, 4)))
        data = head + b"\r\n" + body
        checked = Checked(len(data) - len(body))
        assert wire_message(data, checked=checked) == wire_message(data), data


def test_wire_message_of_a_checked_message_is_one_replace() -> None:
    data = b"Subject: x\r\n\r\n.leading dot\r\nmiddle\r\n..two\r\n"
    assert wire_message(data) == (b"Subject: x\r\n\r\n..leading dot\r\nmiddle\r\n...two\r\n.\r\n")


# -- a scripted next hop -------------------------------------------------------------------


@dataclass
class _Peer:
    """An SMTP server that announces PIPELINING and answers a transaction only once it has
    every command of it (MAIL, each RCPT, DATA): a client that waits for a reply before its
    next command gets no reply and times out."""

    recipients: int
    second: bytes | None = None
    """None: serve every transaction; else on a connection's second transaction, send these
    bytes (b"" for nothing) and hang up, as a server whose idle timeout has just passed."""
    connections: int = 0
    commands: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    port: int = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 peer.test ESMTP\r\n")
        try:
            line = await reader.readuntil(b"\r\n")
            assert line.startswith(b"EHLO ")
            writer.write(b"250-peer.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            served = 0
            while True:
                first = await reader.readuntil(b"\r\n")
                if first == b"QUIT\r\n":
                    writer.write(b"221 bye\r\n")
                    break
                rest = [await reader.readuntil(b"\r\n") for _ in range(self.recipients + 1)]
                batch = [first, *rest]
                self.commands.extend(batch)
                if self.second is not None and served:
                    writer.write(self.second)
                    break
                assert batch[0].startswith(b"MAIL FROM:"), batch
                assert batch[-1] == b"DATA\r\n", batch
                writer.write(b"250 ok\r\n" * (self.recipients + 1) + b"354 go\r\n")
                self.messages.append(await reader.readuntil(b"\r\n.\r\n"))
                writer.write(b"250 2.0.0 queued\r\n")
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def peer_factory() -> AsyncIterator[Callable[..., _Peer]]:
    servers: list[asyncio.Server] = []
    peers: list[_Peer] = []

    def make(**kwargs: object) -> _Peer:
        peer = _Peer(**kwargs)  # type: ignore[arg-type]
        peers.append(peer)
        return peer

    async def start(peer: _Peer) -> None:
        server = await asyncio.start_server(peer.session, "127.0.0.1", 0)
        servers.append(server)
        peer.port = server.sockets[0].getsockname()[1]

    make.start = start  # type: ignore[attr-defined]
    yield make
    for server in servers:
        server.close()
        await server.wait_closed()


async def _send(peer: _Peer, pool: ConnectionPool, rcpts: list[str], body: bytes) -> object:
    host = MxHost("peer.test", 10, ("127.0.0.1",))
    delivery = Delivery("a@example.test", rcpts, body)
    return await deliver(
        [host],
        delivery,
        port=peer.port,
        helo="relay.test",
        tls=TlsSettings("none"),
        pool=pool,
        timeout=5.0,
    )


async def test_commands_are_pipelined_and_a_kept_connection_needs_no_rset(
    peer_factory: Callable[..., _Peer],
) -> None:
    peer = peer_factory(recipients=2)
    await peer_factory.start(peer)  # type: ignore[attr-defined]
    pool = ConnectionPool(idle_time=10.0)
    rcpts = ["b@peer.test", "c@peer.test"]
    for n in range(3):
        result = await _send(peer, pool, rcpts, f"Subject: {n}\r\n\r\n.dot\r\n".encode())
        assert {r.code for r in result.replies.values()} == {250}  # type: ignore[attr-defined]
    await pool.close()
    assert peer.connections == 1
    assert not any(c.startswith(b"RSET") for c in peer.commands)
    assert peer.messages[2] == b"Subject: 2\r\n\r\n..dot\r\n.\r\n"


@pytest.mark.parametrize(
    "second", [b"421 4.4.2 peer.test idle timeout\r\n", b""], ids=["421", "closed"]
)
async def test_a_kept_connection_the_server_closed_is_replaced_without_a_deferral(
    peer_factory: Callable[..., _Peer], second: bytes
) -> None:
    # The server hangs up (with a 421, or without a word) when the kept connection's next
    # transaction arrives: that message goes over a new connection, not into the retry queue.
    peer = peer_factory(recipients=1, second=second)
    await peer_factory.start(peer)  # type: ignore[attr-defined]
    pool = ConnectionPool(idle_time=10.0)
    for n in range(3):
        result = await _send(peer, pool, ["b@peer.test"], f"Subject: {n}\r\n\r\nx\r\n".encode())
        assert [r.code for r in result.replies.values()] == [250]  # type: ignore[attr-defined]
        assert result.reused is False  # type: ignore[attr-defined]
    await pool.close()
    assert peer.connections == 3  # each kept connection found dead once, then replaced
    assert [m.split(b"\r\n")[0] for m in peer.messages] == [
        b"Subject: 0",
        b"Subject: 1",
        b"Subject: 2",
    ]


async def test_stopping_closes_a_connection_still_being_set_up() -> None:
    """An attempt cancelled in EHLO (the queue runner stopping) closes its connection."""
    asked = asyncio.Event()
    ended = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hang.test ESMTP\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"EHLO")  # never answered
        asked.set()
        await reader.read()  # until EOF, we hope
        ended.set()
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        attempt = asyncio.create_task(
            deliver(
                [MxHost("hang.test", 10, ("127.0.0.1",))],
                Delivery("a@example.test", ["b@hang.test"], b"Subject: x\r\n\r\nbody\r\n"),
                port=port,
                helo="relay.test",
                tls=TlsSettings("none"),
                pool=ConnectionPool(30.0),
                timeout=60.0,
            )
        )
        await asyncio.wait_for(asked.wait(), 5)
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        await asyncio.wait_for(ended.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()


def test_the_pieces_written_are_the_message_and_a_clean_one_is_not_copied() -> None:
    rng = random.Random(17)
    alphabet = [b"a", b".", b"\r\n", b"\r\n.", b"x\r\n"]
    for _ in range(5_000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        for checked in (None, Checked(len(data))):
            if checked is not None and (b"\r" in data.replace(b"\r\n", b"")):
                continue
            assert b"".join(wire_parts(data, checked=checked)) == _aiosmtplib_wire(data), data
    clean = b"Subject: x\r\n\r\nbody\r\n"
    assert wire_parts(clean, checked=Checked(len(clean)))[0] is clean
