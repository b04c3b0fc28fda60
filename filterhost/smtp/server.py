"""The SMTP front end: aiosmtpd owns the wire; this module applies policy and runs the chain.

The only module that imports aiosmtpd, and the only one that turns a :class:`Reply` into
wire text.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable

from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as AioSession

from filterhost.config import Config
from filterhost.dispatch import HookRunner
from filterhost.message import Message
from filterhost.model import Session, Transaction
from filterhost.smtp.data import check_content, read_data
from filterhost.smtp.policy import RELAY_DENIED, is_trusted, recipient_allowed
from filterhost.spool import RecipientState, Spool, SpoolEntry, new_queue_id
from filterhost.verdict import Action, Reply, Verdict

__all__ = ["FrontEnd"]

log = logging.getLogger("filterhost.smtp")

INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, please try again later")
_session_ids = itertools.count(1)


def wire(reply: Reply) -> str:
    """The reply as it goes on the wire."""
    return f"{reply.code} {reply.status} {reply.text}"


class FrontEnd:
    """Everything the SMTP sessions share: config, hooks, spool, and where queued mail goes."""

    def __init__(
        self,
        config: Config,
        hooks: HookRunner,
        spool: Spool,
        on_queued: Callable[[str], None],
    ) -> None:
        self.config = config
        self.hooks = hooks
        self.spool = spool
        self.on_queued = on_queued
        self.networks = config.server.networks
        self.sessions: set[FilterhostSMTP] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.handler = Handler(self)

    def protocol(self) -> FilterhostSMTP:
        """A new protocol instance for one connection (the ``create_server`` factory)."""
        return FilterhostSMTP(self)

    async def drain(self, deadline: float) -> None:
        """Wait until every session has ended, or ``deadline`` seconds; then close the rest."""
        try:
            async with asyncio.timeout(deadline):
                await self.idle.wait()
        except TimeoutError:
            for proto in list(self.sessions):
                if proto.transport is not None:
                    proto.transport.close()


class FilterhostSMTP(SMTP):
    """aiosmtpd's SMTP with filterhost's connect phase and a block-reading DATA."""

    def __init__(self, front: FrontEnd) -> None:
        config = front.config
        super().__init__(
            front.handler,
            data_size_limit=config.server.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.hostname,
            ident="filterhost",
            timeout=300,
        )
        self.front = front
        self.fh: Session | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.fh is None
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername") or ("", 0)
            ip = str(peer[0])
            self.fh = Session(
                id=f"S{os.getpid()}-{next(_session_ids)}",
                client_ip=ip,
                client_port=int(peer[1]) if len(peer) > 1 else 0,
                trusted=is_trusted(ip, self.front.networks),
            )
            self.front.sessions.add(self)
            self.front.idle.clear()
        elif self.fh is not None:
            self.fh.tls = True  # connection_made again: STARTTLS completed

    def connection_lost(self, error: Exception | None) -> None:
        self.front.sessions.discard(self)
        if not self.front.sessions:
            self.front.idle.set()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        assert self.fh is not None
        log.info("%s: connect from %s trusted=%s", self.fh.id, self.fh.client_ip, self.fh.trusted)
        try:
            verdict = await self.front.hooks.chain(
                "filterhost_connect", context=self.fh.id, session=self.fh
            )
        except Exception:
            log.exception("%s: internal error in connect phase", self.fh.id)
            verdict = Verdict(Action.DISCONNECT, Reply(421, "4.3.0", "Internal error"))
        if verdict is not None and verdict.action in (
            Action.REJECT,
            Action.TEMPFAIL,
            Action.DISCONNECT,
        ):
            reply = verdict.effective_reply
            assert reply is not None
            # RFC 5321 3.1: a refusing server may greet with 554; we then close.
            await self.push(wire(reply))
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def handle_exception(self, error: Exception) -> str:
        """Turn an error of ours into 451 4.3.0, never aiosmtpd's 500 with the exception text.

        The traceback goes to the log only.
        """
        session = self.fh.id if self.fh is not None else "-"
        log.error("%s: internal error in the SMTP session", session, exc_info=error)
        return wire(INTERNAL_ERROR)

    async def smtp_DATA(self, arg: str) -> None:
        """DATA, read in blocks (see :mod:`filterhost.smtp.data`), then the message chain."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        result = await read_data(self._reader, self.front.config.server.max_message_size)
        envelope = self.envelope
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        if result.too_big or result.content is None:
            reply = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        else:
            try:
                reply = await self.front.handler.process(self, envelope, result.content)
            except Exception:
                assert self.fh is not None
                log.exception("%s: internal error at end of DATA", self.fh.id)
                reply = INTERNAL_ERROR
        await self.push(wire(reply))
        if reply.code == 421 and self.transport is not None:
            self.transport.close()


class Handler:
    """aiosmtpd handler hooks: core policy first, then the plugins' verdicts."""

    def __init__(self, front: FrontEnd) -> None:
        self.front = front

    @staticmethod
    def _fh(server: FilterhostSMTP) -> Session:
        assert server.fh is not None
        return server.fh

    async def _verdict_reply(
        self, server: FilterhostSMTP, call: Awaitable[Verdict | None]
    ) -> str | None:
        """The wire reply for a refusing verdict (closing on DISCONNECT), or None to go on."""
        try:
            verdict = await call
        except Exception:
            log.exception("%s: internal error in a session hook", self._fh(server).id)
            return wire(INTERNAL_ERROR)
        if verdict is None or verdict.action not in (
            Action.REJECT,
            Action.TEMPFAIL,
            Action.DISCONNECT,
        ):
            return None
        reply = verdict.effective_reply
        assert reply is not None
        if verdict.action is Action.DISCONNECT:
            asyncio.get_running_loop().call_soon(self._close, server)
        return wire(reply)

    @staticmethod
    def _close(server: FilterhostSMTP) -> None:
        if server.transport is not None:
            server.transport.close()

    async def handle_HELO(
        self, server: FilterhostSMTP, session: AioSession, envelope: Envelope, hostname: str
    ) -> str:
        fh = self._fh(server)
        fh.helo, fh.esmtp = hostname, False
        refused = await self._verdict_reply(
            server,
            self.front.hooks.chain("filterhost_helo", context=fh.id, session=fh, name=hostname),
        )
        if refused:
            return refused
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_EHLO(
        self,
        server: FilterhostSMTP,
        session: AioSession,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        fh = self._fh(server)
        fh.helo, fh.esmtp = hostname, True
        refused = await self._verdict_reply(
            server,
            self.front.hooks.chain("filterhost_helo", context=fh.id, session=fh, name=hostname),
        )
        if refused:
            return [refused]
        session.host_name = hostname
        # aiosmtpd handles pipelined commands in order; say so, and that replies carry RFC 3463
        # codes. "250 HELP" stays last.
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self,
        server: FilterhostSMTP,
        session: AioSession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        fh = self._fh(server)
        sender = "" if address == "<>" else address
        refused = await self._verdict_reply(
            server,
            self.front.hooks.chain(
                "filterhost_mail", context=fh.id, session=fh, sender=sender, options=mail_options
            ),
        )
        if refused:
            return refused
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(  # noqa: PLR0911 - one reply per refusal reason
        self,
        server: FilterhostSMTP,
        session: AioSession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        fh = self._fh(server)
        limit = self.front.config.server.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            return wire(Reply(452, "4.5.3", f"Too many recipients (at most {limit} per message)"))
        sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        try:
            verdict = await self.front.hooks.chain(
                "filterhost_rcpt",
                context=fh.id,
                session=fh,
                sender=sender,
                recipient=address,
                options=rcpt_options,
            )
        except Exception:
            log.exception("%s: internal error in the rcpt phase", fh.id)
            return wire(INTERNAL_ERROR)
        if verdict is not None and verdict.action in (Action.REJECT, Action.TEMPFAIL):
            reply = verdict.effective_reply
            assert reply is not None
            return wire(reply)
        if verdict is not None and verdict.action is Action.DISCONNECT:
            asyncio.get_running_loop().call_soon(self._close, server)
            return wire(verdict.effective_reply or Reply(421, "4.7.0", "Closing connection"))
        accepted = verdict is not None and verdict.action is Action.ACCEPT
        if not accepted and not recipient_allowed(
            address, trusted=fh.trusted, relay_domains=self.front.config.server.relay_domains
        ):
            log.info(
                "%s: relay denied from=<%s> to=<%s> client=%s",
                fh.id,
                sender,
                address,
                fh.client_ip,
            )
            return wire(RELAY_DENIED)
        if "@" not in address:
            return wire(Reply(550, "5.1.3", "Recipient address must include a domain"))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    def _received(self, fh: Session, queue_id: str, recipients: list[str]) -> str:
        proto = "ESMTP" if fh.esmtp else "SMTP"
        if fh.tls:
            proto += "S"
        if fh.authenticated_as:
            proto += "A"
        ip = f"IPv6:{fh.client_ip}" if ":" in fh.client_ip else fh.client_ip
        value = (
            f"from {fh.helo or 'unknown'} ([{ip}]) by {self.front.config.hostname} "
            f"(filterhost) with {proto} id {queue_id}"
        )
        if len(recipients) == 1:
            value += f" for <{recipients[0]}>"
        return f"{value}; {email.utils.formatdate(localtime=True)}"

    async def process(self, server: FilterhostSMTP, envelope: Envelope, content: bytes) -> Reply:
        """The end of DATA: content checks, the message chain, the spool. Returns the reply."""
        fh = self._fh(server)
        bad = check_content(content)
        if bad is not None:
            log.info("%s: refused at end of DATA: %s", fh.id, bad)
            return bad
        message = Message(content)
        if message.count("Received") >= self.front.config.server.max_hops:
            return Reply(554, "5.4.6", "Too many hops (mail loop?)")
        queue_id = new_queue_id()
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        txn = Transaction(
            session=fh,
            mail_from=sender,
            recipients=list(envelope.rcpt_tos),
            message=message,
            mail_options=list(envelope.mail_options),
            queue_id=queue_id,
        )
        message.add_header("Received", self._received(fh, queue_id, txn.recipients))
        message.edits.clear()  # our own trace header is not a plugin's edit
        verdict = await self.front.hooks.chain(
            "filterhost_message", context=queue_id, record=txn.results, transaction=txn
        )
        action = verdict.action if verdict is not None else Action.CONTINUE
        if action in (Action.REJECT, Action.TEMPFAIL, Action.DISCONNECT):
            assert verdict is not None
            reply = verdict.effective_reply
            assert reply is not None
            log.info(
                "%s: refused from=<%s> plugin=%s reply=%r",
                queue_id,
                sender,
                verdict.plugin,
                str(reply),
            )
            return reply
        if action is Action.DISCARD or not txn.recipients:
            assert verdict is None or verdict.plugin is not None
            log.info(
                "%s: discarded from=<%s> plugin=%s reason=%r",
                queue_id,
                sender,
                verdict.plugin if verdict else "-",
                verdict.reason if verdict else "no recipients",
            )
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        data = message.as_bytes()
        entry = SpoolEntry(
            id=queue_id,
            mail_from=sender,
            recipients=[RecipientState(r) for r in txn.recipients],
            received=time.time(),
            size=len(data),
            client_ip=fh.client_ip,
            helo=fh.helo or "",
            mail_options=txn.mail_options,
            hold=action is Action.QUARANTINE,
        )
        await self.front.spool.store(entry, data)
        log.info(
            "%s: queued from=<%s> size=%d nrcpt=%d client=%s%s",
            queue_id,
            sender,
            len(data),
            len(txn.recipients),
            fh.client_ip,
            f" quarantined={verdict.reason!r}" if action is Action.QUARANTINE and verdict else "",
        )
        if action is not Action.QUARANTINE:
            self.front.on_queued(queue_id)
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
