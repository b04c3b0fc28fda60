"""The delivery agent: attempts made in a process of their own (``[relay] delivery_process``).

A real agent process against an SMTP peer on loopback; filterhost processes against smtp-sink.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from filterhost.relay.agent import AgentSettings, DeliveryAgent, _frame, _Frames
from filterhost.relay.client import AttemptResult, Delivery, TlsSettings
from filterhost.relay.resolver import MxHost
from filterhost.spool import Checked
from tests.components.fixtures import Sinks
from tests.components.services import Dns, free_port, wait_until
from tests.filterhost_fixtures import FilterhostFactory, base_config


def _feed(cutter: _Frames, chunk: bytes) -> list[tuple[tuple[Any, ...], bytes]]:
    """Give ``chunk`` to ``cutter`` as reads into its buffers would."""
    frames = []
    view = memoryview(chunk)
    while view:
        target = cutter.buffer()
        n = min(len(target), len(view))
        target[:n] = view[:n]
        view = view[n:]
        frames.extend(cutter.filled(n))
    return frames


def test_frames_come_out_whole_however_the_stream_is_cut() -> None:
    rng = random.Random(7)
    sizes = [0, 1, 10, 5000, 65535, 65536, 70000, 300_000]
    for _ in range(200):
        frames = [
            (("d", i, "x" * rng.randrange(300)), rng.randbytes(rng.choice(sizes)))
            for i in range(rng.randrange(1, 8))
        ]
        stream = b"".join(b"".join(_frame(header, data)) for header, data in frames)
        cutter = _Frames()
        got = []
        pos = 0
        while pos < len(stream):
            step = rng.choice([1, 7, 100, 4096, 65536, 1 << 20])
            got.extend(_feed(cutter, stream[pos : pos + step]))
            pos += step
        assert [(h, bytes(d)) for h, d in got] == frames


@dataclass
class _Peer:
    """An SMTP next hop that answers each line as it comes; with ``hold``, never the end of
    DATA (it reads until the client goes)."""

    hold: bool = False
    connections: int = 0
    quits: int = 0
    messages: list[bytes] = field(default_factory=list)
    data_in: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 peer.test ESMTP\r\n")
        try:
            assert (await reader.readuntil(b"\r\n")).startswith(b"EHLO ")
            writer.write(b"250-peer.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            while True:
                line = await reader.readuntil(b"\r\n")
                if line == b"QUIT\r\n":
                    self.quits += 1
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                if line != b"DATA\r\n":
                    writer.write(b"250 2.0.0 ok\r\n")
                    continue
                writer.write(b"354 go ahead\r\n")
                data = await reader.readuntil(b"\r\n.\r\n")
                self.data_in.set()
                if self.hold:
                    await reader.read()
                    break
                self.messages.append(data)
                writer.write(b"250 2.0.0 queued\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


@pytest.fixture
async def peer() -> AsyncIterator[_Peer]:
    p = _Peer()
    server = await asyncio.start_server(p.session, "127.0.0.1", 0, limit=4 << 20)
    p.port = server.sockets[0].getsockname()[1]
    try:
        yield p
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def agent() -> AsyncIterator[DeliveryAgent]:
    a = DeliveryAgent(AgentSettings(idle_time=30.0))
    a.start()
    try:
        yield a
    finally:
        await a.close()


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _gone(pid: int) -> bool:
    """The process has exited (and is reaped, or a zombie waiting for it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _parent_of(int(entry.name)) == pid:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


async def _send(
    agent: DeliveryAgent, peer: _Peer, data: bytes, checked: Checked | None = None
) -> AttemptResult:
    return await agent.deliver(
        [MxHost("peer.test", 10, ("127.0.0.1",))],
        Delivery("a@example.test", ["b@peer.test", "c@peer.test"], data, checked=checked),
        port=peer.port,
        helo="relay.test",
        tls=TlsSettings("none"),
        timeout=10.0,
    )


async def test_attempts_are_made_by_a_child_process_over_one_kept_connection(
    agent: DeliveryAgent, peer: _Peer
) -> None:
    small = b"Subject: 1\r\n\r\n.a dot line\r\n"
    large = b"Subject: 2\r\n\r\n" + b"x" * 998 + b"\r\n" + b"y" * 76 * 13_000 + b"\r\n"
    results = [
        await _send(agent, peer, small),
        await _send(agent, peer, large, Checked(len(large))),
        await _send(agent, peer, small),
    ]
    for result in results:
        assert [str(r) for r in result.replies.values()] == ["250 2.0.0 queued"] * 2
        assert result.host == "peer.test[127.0.0.1]:" + str(peer.port)
    assert [r.reused for r in results] == [False, True, True]
    assert peer.connections == 1
    assert peer.messages == [
        b"Subject: 1\r\n\r\n..a dot line\r\n.\r\n",
        large + b".\r\n",
        b"Subject: 1\r\n\r\n..a dot line\r\n.\r\n",
    ]
    pid = agent.pid
    assert pid is not None
    assert pid != os.getpid()
    assert _parent_of(pid) == os.getpid()
    await agent.close()
    assert peer.quits == 1  # the agent said goodbye on the connection it kept
    assert _gone(pid)


async def _held_attempt(agent: DeliveryAgent, peer: _Peer) -> asyncio.Task[AttemptResult]:
    """An attempt whose message the next hop has whole but never answers."""
    peer.hold = True
    attempt = asyncio.create_task(_send(agent, peer, b"Subject: x\r\n\r\nbody\r\n"))
    await asyncio.wait_for(peer.data_in.wait(), 10)
    return attempt


async def test_a_cancelled_attempt_is_abandoned_by_the_agent(
    agent: DeliveryAgent, peer: _Peer
) -> None:
    attempt = await _held_attempt(agent, peer)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    # The agent closed the connection before the next hop answered the final dot: nothing
    # was delivered, so the message (still spooled) is not sent twice.
    await asyncio.wait_for(peer.closed.wait(), 10)
    assert peer.messages == []


async def test_a_dead_agent_defers_its_attempts_and_a_new_one_takes_over(
    agent: DeliveryAgent, peer: _Peer
) -> None:
    attempt = await _held_attempt(agent, peer)
    first = agent.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    result = await asyncio.wait_for(attempt, 10)
    assert {str(r) for r in result.replies.values()} == {"451 4.3.0 the delivery agent exited"}
    assert set(result.replies) == {"b@peer.test", "c@peer.test"}

    # At once, before the new agent is up: the attempt waits for it rather than deferring.
    peer.hold = False
    again = await _send(agent, peer, b"Subject: y\r\n\r\nbody\r\n")
    assert {r.code for r in again.replies.values()} == {250}
    assert agent.starts == 2
    assert agent.pid not in (None, first)
    assert _gone(first)
    assert peer.messages == [b"Subject: y\r\n\r\nbody\r\n.\r\n"]


@pytest.mark.parametrize("delivery_process", [True, False], ids=["agent", "in-process"])
def test_filterhost_relays_with_or_without_the_agent_which_goes_with_it(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path, delivery_process: bool
) -> None:
    mx_port = free_port()
    mx1 = sinks.start("127.0.0.2", mx_port)
    conf = base_config(
        tmp_path, free_port(), dns_server, mx_port, relay={"delivery_process": delivery_process}
    )
    proc = fh.create(conf).start()
    assert proc.proc is not None
    with proc.smtp() as client:
        for i in range(3):
            client.sendmail("alice@example.test", [f"r{i}@mx.test"], f"Subject: {i}\r\n\r\nx\r\n")
    got = mx1.wait_for_count(3, timeout=20)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["r0@mx.test", "r1@mx.test", "r2@mx.test"]
    proc.wait_log(r"(status=delivered[\s\S]*){3}")
    children = _children(proc.proc.pid)
    if not delivery_process:
        assert children == []
        assert proc.stop() == 0
        return
    (agent_pid,) = children
    # Forked, not started anew: the same program, sharing the parent's pages.
    assert (
        Path(f"/proc/{agent_pid}/cmdline").read_bytes()
        == Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes()
    )
    # A crash of filterhost (no stop, no goodbye): the agent sees its socket end and exits.
    proc.kill()
    wait_until(lambda: _gone(agent_pid), 10, None, "the agent's exit")
