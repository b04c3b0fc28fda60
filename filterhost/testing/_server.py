"""A real filterhost front end for end-to-end plugin tests, and a recording next hop.

:func:`start_server` runs :class:`filterhost.app.App` (front end, spool, queue runner) in the
current event loop on a free port, with the given plugins and no entry points. Accepted mail
is relayed, through filterhost's real delivery code, to a :class:`RecordingNextHop`: an SMTP
server in the same loop that keeps what it receives.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as AioSession

from filterhost.app import App
from filterhost.config import Config
from filterhost.message import Message
from filterhost.model import Transaction
from filterhost.testing._config import PluginsArg, build
from filterhost.testing._harness import Phase, Relayed
from filterhost.verdict import Reply

__all__ = ["RecordingNextHop", "RunningServer", "SessionResult", "start_server"]

_STATUS = re.compile(r"^([245]\.\d{1,3}\.\d{1,3}) (.*)$", re.DOTALL)
_QUEUED = re.compile(r"queued as (\S+)")


def parse_reply(code: int, text: str) -> Reply:
    """A wire reply (``code``, ``"5.7.1 No thanks"``) as a :class:`~filterhost.Reply`."""
    first = text.splitlines()[0] if text else ""
    match = _STATUS.match(first)
    if match is None:
        status = f"{str(code)[0]}.0.0"
        return Reply(code, status, first)
    return Reply(code, match.group(1), match.group(2))


class _Recorder:
    """aiosmtpd handler of the next hop: per-recipient replies, and a record of each DATA."""

    def __init__(self, hop: RecordingNextHop) -> None:
        self.hop = hop

    async def handle_RCPT(
        self,
        server: SMTP,
        session: AioSession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.hop.replies.get(address)
        if reply is not None and reply.code >= 400:
            return str(reply)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: AioSession, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        sender = envelope.mail_from or ""
        await self.hop.record(
            Relayed("smarthost", "" if sender == "<>" else sender, list(envelope.rcpt_tos), content)
        )
        return "250 2.0.0 Ok: recorded"


class RecordingNextHop:
    """An SMTP server in this event loop that records every message it is sent.

    :param replies: refusals for some recipients at RCPT (4xx or 5xx), to exercise deferral
        and bounces; every other recipient is accepted.
    """

    def __init__(self, replies: Mapping[str, Reply] | None = None) -> None:
        self.replies = dict(replies or {})
        self.received: list[Relayed] = []
        """Every message received, in order."""
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()
        self.port = 0

    async def record(self, relayed: Relayed) -> None:
        """Keep ``relayed`` and wake whoever waits for it."""
        async with self._changed:
            self.received.append(relayed)
            self._changed.notify_all()

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[Relayed]:
        """Wait until ``count`` messages were received; all received so far."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.received) >= count)
        return list(self.received)

    async def start(self, host: str = "127.0.0.1") -> None:
        """Listen on a free port of ``host``."""
        handler = _Recorder(self)

        def session() -> SMTP:
            protocol = SMTP(handler, hostname="next-hop.test", decode_data=False)
            self._sessions.add(protocol)
            return protocol

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(session, host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._server is not None:
            self._server.close()
            # The relay may keep a connection open for reuse; end it rather than leak it.
            for protocol in self._sessions:
                if protocol.transport is not None:
                    protocol.transport.close()
            await self._server.wait_closed()
            self._server = None


@dataclass(slots=True)
class SessionResult:
    """How a real server answered one client session (see :meth:`RunningServer.send`).

    The same shape as :class:`~filterhost.testing.Outcome` where they overlap: the ``phase``
    the session ended at and the ``reply`` there, and the RCPT reply per recipient.
    """

    phase: Phase
    reply: Reply
    recipient_replies: dict[str, Reply] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        """True when the message was answered 250 at the end of DATA."""
        return self.phase == "data" and self.reply.code == 250

    @property
    def queue_id(self) -> str:
        """The queue id from the 250 reply, or ``""``."""
        match = _QUEUED.search(self.reply.text)
        return match.group(1) if match else ""


@dataclass(slots=True)
class RunningServer:
    """A filterhost serving on ``host``:``port``, relaying to :attr:`next_hop`."""

    app: App
    host: str
    port: int
    next_hop: RecordingNextHop

    @property
    def config(self) -> Config:
        """The server's checked configuration."""
        return self.app.config

    @property
    def relayed(self) -> list[Relayed]:
        """What the next hop received so far."""
        return list(self.next_hop.received)

    async def wait_relayed(self, count: int = 1, timeout: float = 30.0) -> list[Relayed]:
        """Wait until the next hop received ``count`` messages; all received so far."""
        return await self.next_hop.wait_for(count, timeout)

    async def send(
        self,
        transaction: Transaction | Message | bytes,
        *,
        mail_from: str = "sender@example.test",
        recipients: list[str] | None = None,
        helo: str | None = None,
    ) -> SessionResult:
        """Send one message over SMTP, as a client would; how the server answered.

        :param transaction: a :class:`~filterhost.Transaction` (its envelope and HELO name are
            used), or a message with ``mail_from`` and ``recipients``.
        """
        if isinstance(transaction, Transaction):
            mail_from = transaction.mail_from
            recipients = list(transaction.recipients)
            helo = helo or transaction.session.helo
            data = transaction.message.as_bytes()
        else:
            data = transaction.as_bytes() if isinstance(transaction, Message) else transaction
        rcpts = recipients if recipients is not None else ["rcpt@example.test"]
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, start_tls=False, timeout=60)
        try:
            await client.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            return SessionResult("connect", parse_reply(exc.code, exc.message))
        try:
            return await _session(client, helo or "client.example.test", mail_from, rcpts, data)
        finally:
            if client.is_connected:
                try:
                    await client.quit()
                except aiosmtplib.SMTPException:
                    client.close()


async def _session(
    client: aiosmtplib.SMTP, helo: str, mail_from: str, rcpts: list[str], data: bytes
) -> SessionResult:
    try:
        await client.ehlo(hostname=helo)
    except aiosmtplib.SMTPResponseException as exc:
        return SessionResult("helo", parse_reply(exc.code, exc.message))
    try:
        await client.mail(mail_from)
    except aiosmtplib.SMTPResponseException as exc:
        return SessionResult("mail", parse_reply(exc.code, exc.message))
    replies: dict[str, Reply] = {}
    last: Reply | None = None
    for rcpt in rcpts:
        try:
            response = await client.rcpt(rcpt)
        except aiosmtplib.SMTPResponseException as exc:
            last = replies[rcpt] = parse_reply(exc.code, exc.message)
            if exc.code == 421:
                return SessionResult("rcpt", last, replies)
            continue
        replies[rcpt] = parse_reply(response.code, response.message)
    if last is not None and all(r.code != 250 for r in replies.values()):
        return SessionResult("rcpt", last, replies)
    try:
        response = await client.data(data)
    except aiosmtplib.SMTPResponseException as exc:
        return SessionResult("data", parse_reply(exc.code, exc.message), replies)
    return SessionResult("data", parse_reply(response.code, response.message), replies)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def start_server(
    plugins: PluginsArg,
    config: Mapping[str, Any] | None = None,
    *,
    directory: Path,
    next_hop_replies: Mapping[str, Reply] | None = None,
) -> AsyncIterator[RunningServer]:
    """Serve with ``plugins`` in this event loop until the block ends; then stop gracefully.

    :param plugins: as for :class:`~filterhost.testing.Harness`.
    :param config: conf.d settings as nested dicts, over these defaults: listen on a free port
        of 127.0.0.1, spool in ``directory``, relay everything to the recording next hop
        (``relay.mode = "smarthost"``, no TLS), retry after 1 s.
    :param directory: where the spool lives (a test's ``tmp_path``).
    :param next_hop_replies: refusals at the next hop's RCPT, per recipient.
    """
    next_hop = RecordingNextHop(next_hop_replies)
    await next_hop.start()
    try:
        host = "127.0.0.1"
        defaults: dict[str, Any] = {
            "server": {"listen": [f"{host}:{_free_port(host)}"], "hostname": "filterhost.test"},
            "spool": {"directory": str(directory / "spool")},
            "relay": {
                "mode": "smarthost",
                "smarthost": f"{host}:{next_hop.port}",
                "smarthost_tls_policy": "none",
                "retry_schedule": ["1s"],
            },
        }
        built, plugins_registered, _ = build(plugins, config, defaults)
        app = App(built, plugins_registered, drain_seconds=5)
        await app.start()
        try:
            listen = built.server.listen_addresses[0]
            yield RunningServer(app, listen.host, listen.port, next_hop)
        finally:
            await app.stop()
    finally:
        await next_hop.stop()
