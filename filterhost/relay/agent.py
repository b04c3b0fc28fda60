"""Delivery attempts in a process of their own: the delivery agent (``[relay] delivery_process``).

The queue runner decides (routes, retries, bounces, the spool's records); the agent only talks
SMTP to next hops and keeps their connections, as Postfix's qmgr hands attempts to smtp(8). It
takes the relay's sends and reads off the front end's event loop, which otherwise shares its
core with them. Off by default: on the 2-core bench machine it gained 4-17% msg/s for ~13 MiB
more memory (bench/PERF-LOG.md, step 21).

The agent is a child of the filterhost process that uses it. It is forked before the event loop
starts (its pages shared with the parent until either writes them) or, when that is not
possible (an App embedded in a running loop, a restart after the agent died), started as
``python -m filterhost.relay.agent FD ...``. The two talk over a socketpair in frames: a header
and the message's bytes. Nothing durable lives in the agent: when it dies, the attempts
it had are deferred like any network failure (the messages stay spooled) and a new agent
starts; when the parent dies, the agent sees the end of its socket and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from filterhost.config import Config
from filterhost.logs import JsonFormatter, setup_logging
from filterhost.loops import run_on
from filterhost.relay.client import (
    AttemptResult,
    ConnectionPool,
    Credentials,
    Delivery,
    TlsSettings,
    deliver,
)
from filterhost.relay.resolver import MxHost
from filterhost.spool import Checked
from filterhost.verdict import Reply

__all__ = ["AgentSettings", "DeliveryAgent", "fork_agent"]

log = logging.getLogger("filterhost.relay")
_FRAME = struct.Struct("!II")  # header length, data length
_RESTART_DELAY = 1.0  # seconds between starts of an agent that keeps dying
_WAIT_FOR_AGENT = 10.0  # seconds an attempt waits for an agent being started before deferring
_STOP_TIMEOUT = 15.0  # seconds for the agent to QUIT its connections and exit
_CHUNK = 64 * 1024  # bytes read at a time outside a message's data
_SOCKET_BUFFER = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """What the agent process needs from the configuration, fixed for its lifetime."""

    event_loop: str = "asyncio"
    idle_time: float = 5.0
    """``[relay] connection_reuse_time``: how long an idle connection to a next hop is kept."""
    log_level: int = logging.INFO
    log_format: str = "text"

    @classmethod
    def of(cls, config: Config) -> AgentSettings:
        """The settings for ``config``, logging as this process logs now."""
        root = logging.getLogger()
        json = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
        return cls(
            event_loop=config.server.event_loop,
            idle_time=float(config.relay.connection_reuse_time),
            log_level=logging.getLogger("filterhost").getEffectiveLevel(),
            log_format="json" if json else "text",
        )


# Frames carry marshal-encoded tuples of plain values (the standard library's fastest codec:
# an attempt's round trip through the agent costs the front end's loop less than the attempt
# itself did, bench/PERF-LOG.md step 21), then the message's bytes:
#   ("d", id, hosts, sender, recipients, mail_options, rcpt_options, dot_free_from, port, helo,
#    (tls policy, ca file, implicit), (user, password) | None, connect timeout, timeout) + data
#   ("c", id)                                   cancel the attempt ``id``
#   (id, ((rcpt, code, status, text), ...), host, seconds, tls, reused)   its result
#   (id, None, error)                           it failed with an internal error


def _socketpair() -> tuple[socket.socket, socket.socket]:
    pair = socket.socketpair()
    for sock in pair:
        # A 1 MB message goes to the agent in one write where the system allows it (Linux
        # caps this at net.core.wmem_max): with the default ~200 KB, each message took five
        # turns of both loops, and at 1 MB the agent fell behind (bench/PERF-LOG.md step 21).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    return pair


def _frame(header: tuple[Any, ...], data: bytes = b"") -> list[bytes]:
    head = marshal.dumps(header)
    parts = [_FRAME.pack(len(head), len(data)), head]
    if data:
        parts.append(data)  # written as it is: a 1 MB message is not copied into the frame
    return parts


def _encode_attempt(  # noqa: PLR0917 - deliver()'s arguments, in its order
    req_id: int,
    hosts: Sequence[MxHost],
    delivery: Delivery,
    port: int,
    helo: str,
    tls: TlsSettings,
    credentials: Credentials | None,
    connect_timeout: float,
    timeout: float,
) -> tuple[Any, ...]:
    return (
        "d",
        req_id,
        tuple((h.name, h.preference, tuple(h.addresses)) for h in hosts),
        delivery.sender,
        tuple(delivery.recipients),
        tuple(delivery.mail_options),
        {k: list(v) for k, v in delivery.rcpt_options.items()},
        None if delivery.checked is None else delivery.checked.dot_free_from,
        port,
        helo,
        (tls.policy, tls.ca_file, tls.implicit),
        None if credentials is None else (credentials.username, credentials.password),
        float(connect_timeout),
        float(timeout),
    )


def _encode_result(req_id: int, result: AttemptResult) -> tuple[Any, ...]:
    replies = tuple((r, x.code, x.status, x.text) for r, x in result.replies.items())
    return (req_id, replies, result.host, result.seconds, result.tls, result.reused)


def _decode_result(header: tuple[Any, ...]) -> AttemptResult:
    _, replies, host, seconds, tls, reused = header
    return AttemptResult(
        {r: Reply(code, status, text) for r, code, status, text in replies},
        host,
        seconds,
        tls,
        reused,
    )


class _Frames:
    """Cuts the byte stream from the other process into (header, data) frames.

    Made for :class:`asyncio.BufferedProtocol`: :meth:`buffer` is where the next read goes and
    :meth:`filled` takes what it got. Headers are read in chunks; a frame's data that the chunk
    did not hold whole is read straight into a buffer of its own, so a 1 MB message is not
    copied again on its way to the next hop.
    """

    def __init__(self) -> None:
        self._chunk = bytearray(_CHUNK)
        self._head = bytearray()  # read, not yet cut into frames
        self._data: bytearray | None = None  # the data of the frame being read
        self._view = memoryview(b"")
        self._got = 0
        self._header: tuple[Any, ...] = ()

    def buffer(self) -> memoryview | bytearray:
        """Where the next read goes."""
        if self._data is not None:
            return self._view[self._got :]
        return self._chunk

    def filled(self, n: int) -> list[tuple[tuple[Any, ...], bytes]]:
        """Take ``n`` bytes read into :meth:`buffer`; returns the frames they completed."""
        if self._data is not None:
            self._got += n
            if self._got < len(self._data):
                return []
            frame = (self._header, self._data)
            self._data, self._view = None, memoryview(b"")
            return [frame]  # type: ignore[list-item]  # bytearray: bytes for every use here
        self._head += memoryview(self._chunk)[:n]
        return self._cut()

    def _cut(self) -> list[tuple[tuple[Any, ...], bytes]]:
        frames: list[tuple[tuple[Any, ...], bytes]] = []
        buf = self._head
        start = 0
        while len(buf) - start >= _FRAME.size:
            head_len, data_len = _FRAME.unpack_from(buf, start)
            at = start + _FRAME.size
            if len(buf) < at + head_len:
                break
            # The other end is this program, over a socketpair nobody else holds.
            header = marshal.loads(buf[at : at + head_len])  # noqa: S302
            at += head_len
            have = len(buf) - at
            if have >= data_len:
                frames.append((header, bytes(buf[at : at + data_len])))
                start = at + data_len
                continue
            data = bytearray(data_len)
            data[:have] = buf[at:]
            self._data, self._view, self._got, self._header = data, memoryview(data), have, header
            start = len(buf)
            break
        del buf[:start]
        return frames


# -- the parent's end --------------------------------------------------------------------------


class _Link(asyncio.BufferedProtocol):
    def __init__(self, agent: DeliveryAgent) -> None:
        self.agent = agent
        self.frames = _Frames()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        return self.frames.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        for header, _ in self.frames.filled(nbytes):
            self.agent._answered(header)

    def connection_lost(self, exc: Exception | None) -> None:
        self.agent._lost(self)


class DeliveryAgent:
    """The filterhost process's end of its delivery agent: sends attempts, returns results.

    :meth:`deliver` has the signature of :func:`filterhost.relay.client.deliver` without the
    pool (the agent keeps the connections). An attempt cancelled here is cancelled there.
    """

    def __init__(
        self, settings: AgentSettings, forked: tuple[int, socket.socket] | None = None
    ) -> None:
        self.settings = settings
        self._forked = forked  # (pid, socket) of an agent forked before the loop started
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._link: _Link | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._up = asyncio.Event()  # set while an agent is connected
        self._pending: dict[int, tuple[asyncio.Future[AttemptResult], Sequence[str]]] = {}
        self._next_id = 0
        self._started = 0.0
        self._closing = False
        self._reaping: set[asyncio.Task[None]] = set()
        self.starts = 0
        """How many agent processes this end has had (the first one included)."""

    @property
    def pid(self) -> int | None:
        """The running agent's process id."""
        return self._pid

    def start(self) -> None:
        """Connect to the forked agent, or start one; returns at once (attempts wait for it)."""
        loop = asyncio.get_running_loop()
        if self._forked is not None:
            pid, sock = self._forked
            self._forked = None
        else:
            pid, sock = self._spawn()
        self._pid = pid
        self._started = time.monotonic()
        self.starts += 1
        self._connecting = loop.create_task(self._connect(sock), name="delivery-agent-link")

    def _spawn(self) -> tuple[int, socket.socket]:
        ours, theirs = _socketpair()
        try:
            s = self.settings
            self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [
                    sys.executable,
                    "-m",
                    "filterhost.relay.agent",
                    str(theirs.fileno()),
                    s.event_loop,
                    repr(s.idle_time),
                    str(s.log_level),
                    s.log_format,
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=False,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return self._proc.pid, ours

    async def _connect(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, link = await loop.create_unix_connection(lambda: _Link(self), sock=sock)
        except OSError as exc:
            sock.close()  # the agent sees its socket end and exits
            log.error("delivery agent: cannot talk to it: %s", exc)
            self._replace()
            return
        self._link = link
        self._up.set()

    async def deliver(
        self,
        hosts: Sequence[MxHost],
        delivery: Delivery,
        *,
        port: int,
        helo: str,
        tls: TlsSettings,
        credentials: Credentials | None = None,
        connect_timeout: float = 30.0,
        timeout: float = 300.0,
    ) -> AttemptResult:
        """Have the agent deliver ``delivery``; every recipient gets a reply, as in ``deliver``."""
        if not self.starts:
            raise RuntimeError("the delivery agent was not started")
        if not self._up.is_set() and not self._closing:
            # Starting, or being replaced: a new agent is up within a second or so, and an
            # attempt deferred now would wait for the retry schedule (minutes) instead.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), _WAIT_FOR_AGENT)
        link = self._link
        if link is None or link.transport is None or link.transport.is_closing():
            return _agent_failed(delivery.recipients, "the delivery agent is not running")
        self._next_id += 1
        req_id = self._next_id
        header = _encode_attempt(
            req_id, hosts, delivery, port, helo, tls, credentials, connect_timeout, timeout
        )
        future: asyncio.Future[AttemptResult] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = (future, delivery.recipients)
        link.transport.writelines(_frame(header, delivery.data))
        try:
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(req_id, None) is not None and not link.transport.is_closing():
                link.transport.writelines(_frame(("c", req_id)))
            raise

    def _answered(self, header: tuple[Any, ...]) -> None:
        waiting = self._pending.pop(header[0], None)
        if waiting is None or waiting[0].done():
            return  # cancelled here meanwhile
        future, recipients = waiting
        if header[1] is None:
            log.error("delivery agent: the attempt failed with an internal error: %s", header[2])
            future.set_result(_agent_failed(recipients, "internal error in the delivery agent"))
        else:
            future.set_result(_decode_result(header))

    def _lost(self, link: _Link) -> None:
        if link is not self._link:
            return
        self._link = None
        self._up.clear()
        pending, self._pending = self._pending, {}
        for future, recipients in pending.values():
            if not future.done():
                future.set_result(_agent_failed(recipients, "the delivery agent exited"))
        self._replace()

    def _replace(self) -> None:
        """Reap the agent that is gone and start another (unless closing)."""
        pid, proc = self._pid, self._proc
        self._pid, self._proc = None, None
        if pid is not None:
            task = asyncio.get_running_loop().create_task(self._reap(pid, proc))
            self._reaping.add(task)
            task.add_done_callback(self._reaping.discard)

    async def _reap(self, pid: int, proc: subprocess.Popen[bytes] | None) -> None:
        await _exited(pid, proc)
        if self._closing:
            return
        log.error("delivery agent (pid %d) exited; its attempts are deferred; restarting", pid)
        await asyncio.sleep(max(0.0, _RESTART_DELAY - (time.monotonic() - self._started)))
        if not self._closing:
            self.start()

    async def close(self) -> None:
        """Stop the agent: its attempts are cancelled, its connections QUIT; waits for its exit."""
        self._closing = True
        if self._connecting is not None:
            await self._connecting
        pid, proc = self._pid, self._proc
        self._pid, self._proc = None, None  # reaped here, not by _lost
        link = self._link
        if link is not None and link.transport is not None:
            link.transport.close()  # the agent's signal to cancel everything and exit
        if pid is not None:
            try:
                await asyncio.wait_for(_exited(pid, proc), _STOP_TIMEOUT)
            except TimeoutError:
                log.error("delivery agent (pid %d) did not exit; killing it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await _exited(pid, proc)
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)


async def _exited(pid: int, proc: subprocess.Popen[bytes] | None) -> None:
    """Wait (in a thread) until the agent ``pid`` has exited, and reap it."""
    wait: Callable[[], object] = proc.wait if proc is not None else lambda: os.waitpid(pid, 0)
    with contextlib.suppress(ChildProcessError):
        await asyncio.get_running_loop().run_in_executor(None, wait)


def _agent_failed(recipients: Sequence[str], why: str) -> AttemptResult:
    return AttemptResult(dict.fromkeys(recipients, Reply(451, "4.3.0", why)), "-", 0.0)


def fork_agent(settings: AgentSettings) -> tuple[int, socket.socket]:
    """Fork the agent now, before this process starts its event loop; returns (pid, socket).

    The child shares the parent's loaded code and frozen objects (see ``workers._tune_gc``)
    instead of importing them again: a few MiB of its own instead of ~30.
    """
    ours, theirs = _socketpair()
    pid = os.fork()
    if pid == 0:  # the agent
        status = 1
        try:
            ours.close()
            status = agent_main(theirs, settings)
        finally:
            logging.shutdown()
            os._exit(status)
    theirs.close()
    return pid, ours


# -- the agent's end ---------------------------------------------------------------------------


class _Agent(asyncio.BufferedProtocol):
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.frames = _Frames()
        self.transport: asyncio.Transport | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        return self.frames.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        for header, body in self.frames.filled(nbytes):
            req_id = header[1]
            if header[0] == "d":
                self.tasks[req_id] = loop.create_task(self._attempt(header, body))
            elif req_id in self.tasks:  # "c"
                self.tasks[req_id].cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    async def _attempt(self, header: tuple[Any, ...], data: bytes) -> None:
        (_, req_id, hosts, sender, recipients, mail_options, rcpt_options, dot_free_from, port,
         helo, tls, credentials, connect_timeout, timeout) = header  # fmt: skip
        try:
            delivery = Delivery(
                sender=sender,
                recipients=recipients,
                data=data,
                mail_options=mail_options,
                rcpt_options=rcpt_options,
                checked=None if dot_free_from is None else Checked(dot_free_from),
            )
            result = await deliver(
                [MxHost(name, preference, addresses) for name, preference, addresses in hosts],
                delivery,
                port=port,
                helo=helo,
                tls=TlsSettings(*tls),
                pool=self.pool,
                credentials=None if credentials is None else Credentials(*credentials),
                connect_timeout=connect_timeout,
                timeout=timeout,
            )
            answer = _encode_result(req_id, result)
        except asyncio.CancelledError:
            return  # the parent cancelled it and expects no answer
        except Exception as exc:
            log.exception("delivery agent: internal error in an attempt")
            answer = (req_id, None, f"{type(exc).__name__}: {exc}")
        finally:
            self.tasks.pop(req_id, None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(_frame(answer))


async def _serve(sock: socket.socket, settings: AgentSettings) -> None:
    loop = asyncio.get_running_loop()
    pool = ConnectionPool(settings.idle_time)
    _, agent = await loop.create_unix_connection(lambda: _Agent(pool), sock=sock)
    tick = max(settings.idle_time, 1.0)
    while not agent.done.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(agent.done), tick)
        await pool.expire()
    tasks = list(agent.tasks.values())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await pool.close()


def agent_main(sock: socket.socket, settings: AgentSettings) -> int:
    """The agent process's body: serve attempts until the parent closes the socket."""
    setup_logging(logging.getLevelName(settings.log_level), settings.log_format)  # type: ignore[arg-type]
    # The parent decides when to stop (it closes the socket): a Ctrl-C or a TERM to the whole
    # process group must not end attempts the parent is about to record.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    run_on(settings.event_loop, _serve(sock, settings))
    return 0


def _main(argv: list[str]) -> int:
    fd, event_loop, idle_time, level, fmt = argv
    sock = socket.socket(fileno=int(fd))
    settings = AgentSettings(event_loop, float(idle_time), int(level), fmt)
    return agent_main(sock, settings)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
