"""The session policy behind the SMTP front end.

The plugins' verdicts phase by phase, the relay rules, and the end of DATA (content checks,
the message chain, the spool). :mod:`filterhost.smtp.server` owns the wire and calls in
here; nothing in this module writes to a connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Literal

from aiosmtpd.smtp import Envelope
from aiosmtpd.smtp import Session as AioSession

from filterhost.message import Message
from filterhost.model import Session, Transaction
from filterhost.smtp.data import check_content, decode_body, header_size
from filterhost.smtp.policy import RELAY_DENIED, received_value, recipient_allowed
from filterhost.spool import Checked, RecipientState, SpoolEntry, new_queue_id
from filterhost.verdict import Action, Reply, Verdict

if TYPE_CHECKING:
    from filterhost.smtp.server import FilterhostSMTP, FrontEnd

__all__ = ["INTERNAL_ERROR", "FhEnvelope", "Handler", "wire"]

log = logging.getLogger("filterhost.smtp")

INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, please try again later")


# aiosmtpd's SMTP.__init__ discovers the handler's and the protocol's methods on every
# connection with ``inspect.getmembers`` and ``dir()`` over the whole class hierarchy: about a
# sixth of the CPU of a 5 KB message (bench/PERF-LOG.md). It only keeps names with these
# prefixes, so a per-class ``__dir__`` that returns just those names, computed once, gives it
# the same methods for a fraction of the work.
_DISCOVERED_PREFIXES = ("smtp_", "handle_", "auth_")
_dir_cache: dict[type, list[str]] = {}


def _discoverable_names(obj: object) -> list[str]:
    """The attribute names of ``obj``'s class that aiosmtpd looks for (cached per class)."""
    cls = type(obj)
    names = _dir_cache.get(cls)
    if names is None:
        names = sorted(n for n in object.__dir__(obj) if n.startswith(_DISCOVERED_PREFIXES))
        _dir_cache[cls] = names
    return list(names)


def wire(reply: Reply) -> str:
    """The reply as it goes on the wire."""
    return f"{reply.code} {reply.status} {reply.text}"


class FhEnvelope(Envelope):
    """aiosmtpd's envelope plus the RCPT parameters of each recipient."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpt_params: dict[str, list[str]] = {}
        """Normalised RCPT parameters (NOTIFY, ORCPT) per recipient address."""


class Handler:
    """Session policy and the plugins' verdicts, phase by phase; the end of DATA."""

    def __init__(self, front: FrontEnd) -> None:
        self.front = front

    def __dir__(self) -> list[str]:
        """Only the ``handle_``/``auth_`` names: see :func:`_discoverable_names`."""
        return _discoverable_names(self)

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

    async def helo(self, server: FilterhostSMTP, hostname: str, *, esmtp: bool) -> str | None:
        """HELO or EHLO: the plugins' refusal (wire text), or None to greet back."""
        fh = self._fh(server)
        fh.helo, fh.esmtp = hostname, esmtp
        return await self._verdict_reply(
            server,
            self.front.hooks.chain("filterhost_helo", context=fh.id, session=fh, name=hostname),
        )

    async def handle_MAIL(
        self,
        server: FilterhostSMTP,
        session: AioSession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """MAIL FROM after the syntax checks: the plugins' verdict."""
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
        return self.mail_accepted(envelope, address, mail_options)

    @staticmethod
    def mail_accepted(envelope: Envelope, address: str, mail_options: list[str]) -> str:
        """MAIL FROM that passed every check: the transaction starts."""
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: FilterhostSMTP,
        session: AioSession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """RCPT TO after the syntax checks: recipient limit, plugins, then the relay policy."""
        fh = self._fh(server)
        too_many = self.recipient_limit(envelope)
        if too_many is not None:
            return too_many
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
        return self.recipient_decision(server, envelope, address, rcpt_options, verdict)

    def recipient_limit(self, envelope: Envelope) -> str | None:
        """The refusal when the transaction already has ``max_recipients``, else None."""
        limit = self.front.config.server.max_recipients
        if len(envelope.rcpt_tos) >= limit:
            return wire(Reply(452, "4.5.3", f"Too many recipients (at most {limit} per message)"))
        return None

    def recipient_decision(
        self,
        server: FilterhostSMTP,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
        verdict: Verdict | None,
    ) -> str:
        """RCPT TO after the plugins' ``verdict``: their refusal, or the relay policy's."""
        fh = self._fh(server)
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
            sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
            log.info(
                "%s: relay denied from=<%s> to=<%s> client=%s",
                fh.id,
                sender,
                address,
                fh.client_ip,
            )
            return wire(RELAY_DENIED)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    def _content(
        self, fh: Session, raw: bytes, *, dot_lines: bool = True
    ) -> tuple[bytes, Reply | None]:
        """The message from the DATA bytes, or the reply that refuses it."""
        server = self.front.config.server
        line_endings: Literal["reject", "normalize"] = server.line_endings
        content = decode_body(raw, line_endings, dot_lines=dot_lines)
        bad = check_content(content)
        if bad is None and header_size(content) > server.max_header_size:
            bad = Reply(552, "5.3.4", f"Message header exceeds {server.max_header_size} bytes")
        if bad is not None:
            log.info("%s: refused at end of DATA: %s", fh.id, bad)
        return content, bad

    async def process(
        self, server: FilterhostSMTP, envelope: FhEnvelope, raw: bytes, *, dot_lines: bool = True
    ) -> Reply:
        """The end of DATA: content checks, the message chain, the spool. Returns the reply.

        ``dot_lines=False``: the DATA reader saw no line that starts with a dot.
        """
        fh = self._fh(server)
        metrics = self.front.hooks.metrics
        content, bad = self._content(fh, raw, dot_lines=dot_lines)
        # decode_body gave the bytes back as they came: no line of the message starts with a
        # dot (nothing was unstuffed or rewritten), which the body, never edited, keeps.
        dot_free_body = content is raw
        if bad is not None:
            if metrics is not None:
                metrics.refused(bad.status)
            return bad
        message = Message(content)
        if message.count("Received") >= self.front.config.server.max_hops:
            if metrics is not None:
                metrics.refused("5.4.6")
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
        message.add_header(
            "Received", received_value(fh, self.front.config.hostname, queue_id, txn.recipients)
        )
        message.edits.clear()  # our own trace header is not a plugin's edit
        verdict = await self.front.hooks.chain(
            "filterhost_message", context=queue_id, record=txn.results, transaction=txn
        )
        action = verdict.action if verdict is not None else Action.CONTINUE
        if metrics is not None and action is not Action.ACCEPT and verdict is not None:
            metrics.message(verdict)
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
            mail_from=txn.mail_from,  # as the message chain left it
            # DSN parameters travel per recipient (a plugin's added recipients have none).
            recipients=[
                RecipientState(r, options=list(envelope.rcpt_params.get(r, [])))
                for r in txn.recipients
            ],
            received=time.time(),
            size=len(data),
            client_ip=fh.client_ip,
            helo=fh.helo or "",
            mail_options=txn.mail_options,
        )
        if action is Action.QUARANTINE:
            # Kept aside in the quarantine area, which the queue runner never reads; an
            # operator releases it into the queue (filterhost quarantine release).
            assert verdict is not None
            await self.front.quarantine.store(
                entry, data, plugin=verdict.plugin or "-", reason=verdict.reason
            )
            log.info(
                "%s: quarantined from=<%s> size=%d nrcpt=%d client=%s%s plugin=%s reason=%r",
                queue_id,
                txn.mail_from,
                len(data),
                len(txn.recipients),
                fh.client_ip,
                f" user={fh.authenticated_as}" if fh.authenticated_as else "",
                verdict.plugin,
                verdict.reason,
            )
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        # The content check passed, and header edits cannot bring CR or LF in.
        body_at = len(data) - message.body_size if dot_free_body else len(data)
        await self.front.spool.store(entry, data, checked=Checked(body_at))
        if metrics is not None:
            metrics.message(verdict, queued=True)
        log.info(
            "%s: queued from=<%s> size=%d nrcpt=%d client=%s%s",
            queue_id,
            txn.mail_from,
            len(data),
            len(txn.recipients),
            fh.client_ip,
            f" user={fh.authenticated_as}" if fh.authenticated_as else "",
        )
        self.front.on_queued(queue_id)
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
