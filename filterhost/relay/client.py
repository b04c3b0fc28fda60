"""Handing one message to the next hop with aiosmtplib, keeping every recipient's own result."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from filterhost.relay.resolver import MxHost
from filterhost.verdict import Reply

__all__ = ["AttemptResult", "deliver", "remote_reply"]

log = logging.getLogger("filterhost.relay")
_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+")


def remote_reply(code: int, message: str) -> Reply:
    """A next hop's reply as a :class:`Reply` (a generic enhanced status when it sent none)."""
    text = " ".join(message.split()) or "(no text)"
    m = _STATUS.match(text)
    if m and m.group(1) == str(code)[0]:
        return Reply(code, text[: m.end()].strip(), text[m.end() :] or "(no text)")
    if not 200 <= code <= 599:
        code = 451
    return Reply(code, f"{str(code)[0]}.0.0", text)


@dataclass(slots=True)
class AttemptResult:
    """What happened: a reply per recipient, and the host that gave it (for the log)."""

    replies: dict[str, Reply]
    host: str
    seconds: float


class _TryNextHost(Exception):
    """The host failed as a whole (connection, greeting, MAIL 4xx): the next one may do."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


async def _session(  # noqa: PLR0912 - each SMTP stage has its own failure handling
    *,
    host: MxHost,
    address: str,
    port: int,
    helo: str,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    timeout: float,
) -> dict[str, Reply]:
    smtp = aiosmtplib.SMTP(
        hostname=address,
        port=port,
        local_hostname=helo,
        timeout=timeout,
        # Opportunistic TLS, unverified, like Postfix's "may": MX certificates are rarely valid
        # for the MX name, and refusing to deliver over plain text would be worse.
        start_tls=None,
        validate_certs=False,
    )
    try:
        await smtp.connect()
    except aiosmtplib.SMTPResponseException as exc:
        raise _TryNextHost(remote_reply(exc.code, exc.message)) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        reply = Reply(451, "4.4.1", f"connect to {host.name}[{address}]:{port}: {exc}")
        raise _TryNextHost(reply) from None
    replies: dict[str, Reply] = {}
    try:
        try:
            await smtp.mail(sender)
        except aiosmtplib.SMTPResponseException as exc:
            reply = remote_reply(exc.code, exc.message)
            if reply.is_permanent:
                return dict.fromkeys(recipients, reply)
            raise _TryNextHost(reply) from None
        accepted: list[str] = []
        for rcpt in recipients:
            try:
                await smtp.rcpt(rcpt)
                accepted.append(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                replies[rcpt] = remote_reply(exc.code, exc.message)
        if accepted:
            try:
                response = await smtp.data(data)
                reply = remote_reply(response.code, response.message)
            except aiosmtplib.SMTPResponseException as exc:
                reply = remote_reply(exc.code, exc.message)
            for rcpt in accepted:
                replies[rcpt] = reply
        return replies
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
        # Lost mid-transaction: nothing we have not heard 2xx for is delivered.
        lost = Reply(451, "4.4.2", f"{host.name}[{address}]: connection lost: {exc}")
        return {r: replies.get(r, lost) for r in recipients}
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()


async def deliver(
    hosts: Sequence[MxHost],
    *,
    port: int,
    helo: str,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    timeout: float = 60.0,
) -> AttemptResult:
    """Deliver ``data`` to ``recipients`` through the first of ``hosts`` that takes the session.

    Hosts and their addresses are tried in order until one completes a transaction; a host
    that cannot be reached, greets with an error or defers MAIL FROM passes the turn to the next.
    When none does, every recipient gets the last host's temporary reply.
    """
    started = time.monotonic()
    last = Reply(451, "4.4.1", "no host to deliver to")
    where = "-"
    for host in hosts:
        for address in host.addresses:
            where = f"{host.name}[{address}]:{port}"
            try:
                replies = await _session(
                    host=host,
                    address=address,
                    port=port,
                    helo=helo,
                    sender=sender,
                    recipients=recipients,
                    data=data,
                    timeout=timeout,
                )
            except _TryNextHost as exc:
                last = exc.reply
                log.info("relay to %s failed, trying the next host: %s", where, last)
                continue
            return AttemptResult(replies, where, time.monotonic() - started)
    if last.is_permanent:
        last = Reply(451, "4.4.1", f"no host took the message: {last.code} {last.text}")
    return AttemptResult(dict.fromkeys(recipients, last), where, time.monotonic() - started)
