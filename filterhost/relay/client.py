"""Handing one message to the next hop with aiosmtplib, keeping every recipient's own result.

Outbound TLS follows Postfix's policies: ``none`` (plain), ``may`` (STARTTLS when offered,
unverified, falling back to plain when the handshake fails), ``encrypt`` (TLS required, not
verified) and ``verify`` (TLS required, the certificate checked against the host *name*, which is
also sent as SNI; never the IP address). Connections are kept for reuse per next hop
(:class:`ConnectionPool`): the naive relay spent a quarter of its CPU opening connections.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import aiosmtplib

from filterhost.relay.pipeline import NextHop, Outcome
from filterhost.relay.resolver import MxHost
from filterhost.spool import Checked
from filterhost.verdict import Reply

__all__ = [
    "AttemptResult",
    "ConnectionPool",
    "Credentials",
    "Delivery",
    "TlsSettings",
    "deliver",
    "remote_reply",
]

log = logging.getLogger("filterhost.relay")
_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+")
TlsPolicy = Literal["none", "may", "encrypt", "verify"]
# DSN parameters (RFC 3461) are only passed on to a next hop that announces DSN.
_DSN_MAIL = ("RET=", "ENVID=")
_DSN_RCPT = ("NOTIFY=", "ORCPT=")


def remote_reply(code: int, message: str) -> Reply:
    """A next hop's reply as a :class:`Reply` (a generic enhanced status when it sent none)."""
    text = " ".join(message.split()) or "(no text)"
    m = _STATUS.match(text)
    if m and m.group(1) == str(code)[0]:
        return Reply(code, text[: m.end()].strip(), text[m.end() :] or "(no text)")
    if not 200 <= code <= 599:
        code = 451
    return Reply(code, f"{str(code)[0]}.0.0", text)


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """How to secure a connection: a policy, CA file for ``verify``, implicit TLS (port 465)."""

    policy: TlsPolicy = "may"
    ca_file: str = ""
    implicit: bool = False

    def context(self) -> ssl.SSLContext:
        """The SSL context for this policy."""
        if self.policy == "verify":
            return ssl.create_default_context(cafile=self.ca_file or None)
        ctx = ssl.create_default_context()
        # "may" and "encrypt" protect against passive listeners only, as in Postfix: MX
        # certificates rarely match, and refusing them would mean sending in clear text.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx


@dataclass(frozen=True, slots=True)
class Credentials:
    """User name and password for AUTH at the smart host. Never logged."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Delivery:
    """Everything one SMTP transaction needs."""

    sender: str
    recipients: Sequence[str]
    data: bytes
    mail_options: Sequence[str] = ()
    rcpt_options: dict[str, list[str]] = field(default_factory=dict)
    checked: Checked | None = None
    """What the front end's checks established about ``data`` (None: nothing, check it)."""


@dataclass(slots=True)
class AttemptResult:
    """What happened: a reply per recipient, and the host that gave it (for the log)."""

    replies: dict[str, Reply]
    host: str
    seconds: float
    tls: str = ""
    reused: bool = False
    """True when the transaction went over a connection kept from an earlier message."""


class _StaleConnection(Exception):
    """A kept connection was found dead before the server answered anything of a message."""


class _TryNextHost(Exception):
    """The host failed as a whole (connection, greeting, TLS, MAIL 4xx): the next may do."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(slots=True)
class _Conn:
    hop: NextHop
    where: str
    tls: str
    idle_since: float = 0.0


class ConnectionPool:
    """Idle connections per next hop, reused for ``idle_time`` seconds.

    A connection whose last transaction ended cleanly (the server answered the final dot, or
    refused MAIL) goes straight to the next MAIL; one left mid-transaction gets an RSET first.
    """

    def __init__(self, idle_time: float) -> None:
        self.idle_time = idle_time
        self._idle: dict[tuple[object, ...], list[_Conn]] = {}
        self.reused = 0
        self.opened = 0

    async def take(self, key: tuple[object, ...]) -> _Conn | None:
        """An idle, still healthy connection for ``key``, or None."""
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > self.idle_time or not await conn.hop.reset():
                await conn.hop.quit()
                continue
            self.reused += 1
            return conn
        return None

    def give_back(self, key: tuple[object, ...], conn: _Conn) -> None:
        """Keep ``conn`` for the next message to the same hop."""
        if self.idle_time <= 0 or not conn.hop.is_connected:
            conn.hop.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(conn)

    async def expire(self) -> None:
        """Close connections idle for longer than ``idle_time``."""
        now = time.monotonic()
        expired: list[_Conn] = []
        # Take the expired ones out of the pool before awaiting anything: a snapshot put back
        # after an await would return connections that take() handed out meanwhile, and two
        # deliveries would then share one connection (the sink saw "503 nested MAIL").
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if now - c.idle_since <= self.idle_time]
            expired.extend(c for c in idle if now - c.idle_since > self.idle_time)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        for conn in expired:
            await conn.hop.quit()

    async def close(self) -> None:
        """QUIT every idle connection."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.hop.quit()


async def _tcp_socket(address: str, port: int, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _authenticate(smtp: aiosmtplib.SMTP, credentials: Credentials) -> None:
    """AUTH with one mechanism, PLAIN if offered, else LOGIN.

    (aiosmtplib's ``login`` tries every mechanism in turn; after a refused PLAIN some servers
    never answer the LOGIN that follows.)
    """
    methods = smtp.server_auth_methods
    if "plain" in methods:
        await smtp.auth_plain(credentials.username, credentials.password)
    elif "login" in methods:
        await smtp.auth_login(credentials.username, credentials.password)
    else:
        raise aiosmtplib.SMTPException("the server offers neither AUTH PLAIN nor LOGIN")


async def _starttls(
    smtp: aiosmtplib.SMTP, host: MxHost, tls: TlsSettings, where: str
) -> str | None:
    """STARTTLS as ``tls.policy`` says.

    Returns "starttls" when done, "" when not offered and not required, and None when it
    failed and the policy (``may``) allows a retry in plain text.
    """
    if not smtp.supports_extension("starttls"):
        if tls.policy in ("encrypt", "verify"):
            raise _TryNextHost(
                Reply(451, "4.7.4", f"{where} does not offer STARTTLS ({tls.policy})")
            )
        return ""
    try:
        await smtp.starttls(server_hostname=host.name, tls_context=tls.context())
        await smtp.ehlo()
    except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError) as exc:
        smtp.close()
        if tls.policy == "may":
            log.info("TLS with %s failed (%s); policy may: retrying in plain", where, exc)
            return None
        raise _TryNextHost(
            Reply(451, "4.7.5", f"TLS with {where} failed ({tls.policy}): {exc}")
        ) from None
    return "starttls"


async def _open(  # noqa: PLR0912, PLR0915 - each step of the set-up has its own failure mode
    host: MxHost,
    address: str,
    port: int,
    *,
    helo: str,
    tls: TlsSettings,
    credentials: Credentials | None,
    connect_timeout: float,
    timeout: float,
    plain_fallback: bool = True,
) -> _Conn:
    where = f"{host.name}[{address}]:{port}"
    try:
        if tls.implicit:
            # Our own TCP connection, so that aiosmtplib can use the host *name* for SNI and
            # the certificate check (it would otherwise use the address it connects to).
            sock = await _tcp_socket(address, port, connect_timeout)
            smtp = aiosmtplib.SMTP(
                hostname=host.name,
                sock=sock,
                local_hostname=helo,
                timeout=timeout,
                use_tls=True,
                tls_context=tls.context(),
                start_tls=False,
            )
        else:
            smtp = aiosmtplib.SMTP(
                hostname=address,
                port=port,
                local_hostname=helo,
                timeout=timeout,
                start_tls=False,
            )
        await smtp.connect(timeout=connect_timeout)
    except asyncio.CancelledError:
        smtp.close()  # stopping: the connection being set up must not outlive the attempt
        raise
    except aiosmtplib.SMTPResponseException as exc:
        raise _TryNextHost(remote_reply(exc.code, exc.message)) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as exc:
        raise _TryNextHost(Reply(451, "4.4.1", f"connect to {where}: {exc}")) from None
    tls_info = "implicit" if tls.implicit else ""
    try:
        await smtp.ehlo()
        if not tls.implicit and tls.policy != "none":
            secured = await _starttls(smtp, host, tls, where)
            if secured is None:
                if not plain_fallback:
                    raise _TryNextHost(Reply(451, "4.7.5", f"TLS with {where} failed twice"))
                return await _open(
                    host,
                    address,
                    port,
                    helo=helo,
                    tls=TlsSettings("none"),
                    credentials=credentials,
                    connect_timeout=connect_timeout,
                    timeout=timeout,
                    plain_fallback=False,
                )
            tls_info = secured
        if tls_info:
            version = smtp.get_transport_info("ssl_object")
            proto = version.version() if version is not None else "TLS"
            tls_info = f"{proto}{' verified' if tls.policy == 'verify' else ''}"
        if credentials is not None:
            if not tls_info:
                raise _TryNextHost(
                    Reply(451, "4.7.0", f"{where}: not sending credentials without TLS")
                )
            try:
                await _authenticate(smtp, credentials)
            except aiosmtplib.SMTPResponseException as exc:
                raise _TryNextHost(
                    Reply(451, "4.7.0", f"{where}: authentication failed: {exc.code}")
                ) from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise _TryNextHost(
                    Reply(451, "4.7.0", f"{where}: authentication failed: {exc}")
                ) from None
    except (_TryNextHost, asyncio.CancelledError):
        smtp.close()
        raise
    except aiosmtplib.SMTPResponseException as exc:
        smtp.close()
        raise _TryNextHost(remote_reply(exc.code, exc.message)) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        smtp.close()
        raise _TryNextHost(Reply(451, "4.4.2", f"{where}: {exc}")) from None
    # aiosmtplib's part ends here: the transactions go through NextHop (pipelined).
    # (uvloop's transports are not asyncio.Transport subclasses: a cast, not isinstance.)
    transport = cast(asyncio.Transport, smtp.transport)
    hop = NextHop(transport, set(smtp.esmtp_extensions), timeout)
    return _Conn(hop, where, tls_info)


def _is_dsn_rcpt(option: str) -> bool:
    return option.upper().startswith(_DSN_RCPT)


@dataclass(frozen=True, slots=True)
class _Session:
    helo: str
    tls: TlsSettings
    credentials: Credentials | None
    connect_timeout: float
    timeout: float


async def _open_counted(
    pool: ConnectionPool, host: MxHost, address: str, port: int, session: _Session
) -> _Conn:
    conn = await _open(
        host,
        address,
        port,
        helo=session.helo,
        tls=session.tls,
        credentials=session.credentials,
        connect_timeout=session.connect_timeout,
        timeout=session.timeout,
    )
    pool.opened += 1
    return conn


def _session_failure(outcome: Outcome, where: str) -> Reply | None:
    """The reply for recipients left without one when the session broke (None if it did not)."""
    error = outcome.error
    if error is None:
        return None
    last = outcome.last
    if last is not None and last.code == 421:
        # The server said why it hung up: that says more than "connection lost".
        return remote_reply(last.code, last.text)
    what = "no reply in time" if isinstance(error, TimeoutError) else "connection lost"
    return Reply(451, "4.4.2", f"{where}: {what}: {error}")


async def _transaction(
    conn: _Conn, delivery: Delivery, *, reused: bool
) -> tuple[dict[str, Reply], bool]:
    """MAIL, RCPT per recipient, DATA. Returns the replies, and whether ``conn`` is reusable.

    Raises :class:`_StaleConnection` when a kept connection turns out dead before the server
    said anything about this message (it closed while idle, or sent 421): the caller opens a
    new one, since nothing of this transaction reached the server.
    """
    hop = conn.hop
    dsn = "dsn" in hop.extensions
    mail_options = [o for o in delivery.mail_options if dsn or not o.upper().startswith(_DSN_MAIL)]
    if "8bitmime" not in hop.extensions or not any(
        o.upper() == "BODY=8BITMIME" for o in delivery.mail_options
    ):
        mail_options = [o for o in mail_options if not o.upper().startswith("BODY=")]
    recipients = [
        (rcpt, [o for o in delivery.rcpt_options.get(rcpt, []) if dsn and _is_dsn_rcpt(o)])
        for rcpt in delivery.recipients
    ]
    outcome = await hop.transaction(
        delivery.sender, mail_options, recipients, delivery.data, checked=delivery.checked
    )
    mail, error = outcome.mail, outcome.error
    if reused and (
        (mail is None and error is not None and not isinstance(error, TimeoutError))
        or (mail is not None and mail.code == 421 and not outcome.rcpts)
    ):
        hop.close()
        raise _StaleConnection
    lost = _session_failure(outcome, conn.where)
    if mail is None or not mail.ok:
        reply = lost if mail is None else remote_reply(mail.code, mail.text)
        assert reply is not None
        if reply.is_permanent:
            return dict.fromkeys(delivery.recipients, reply), hop.is_connected
        hop.close()
        raise _TryNextHost(reply)
    replies: dict[str, Reply] = {}
    accepted: list[str] = []
    for rcpt, answer in zip(delivery.recipients, outcome.rcpts, strict=False):
        if answer.ok:
            accepted.append(rcpt)
        else:
            replies[rcpt] = remote_reply(answer.code, answer.text)
    end = outcome.final or outcome.data
    if end is not None and (outcome.final is not None or end.code != 354):
        for rcpt in accepted:
            replies[rcpt] = remote_reply(end.code, end.text)
    if lost is not None:
        # Nothing we have not heard 2xx for (to RCPT and to the end of the message) is
        # delivered: every recipient without a reply of its own gets the session's failure.
        for rcpt in delivery.recipients:
            replies.setdefault(rcpt, lost)
    return replies, hop.is_connected


async def deliver(
    hosts: Sequence[MxHost],
    delivery: Delivery,
    *,
    port: int,
    helo: str,
    tls: TlsSettings,
    pool: ConnectionPool,
    credentials: Credentials | None = None,
    connect_timeout: float = 30.0,
    timeout: float = 300.0,
) -> AttemptResult:
    """Deliver to the first of ``hosts`` that takes the session; every recipient gets a reply.

    Hosts and their addresses are tried in order until one completes a transaction; a host
    that cannot be reached, greets with an error, fails TLS as the policy requires, or defers
    MAIL FROM passes the turn to the next. When none does, every recipient gets the last
    host's failure, as a temporary reply.
    """
    started = time.monotonic()
    last = Reply(451, "4.4.1", "no host to deliver to")
    session = _Session(helo, tls, credentials, connect_timeout, timeout)
    telling: Reply | None = None  # a failure that says more than "connection refused"
    where = "-"
    for host in hosts:
        for address in host.addresses:
            where = f"{host.name}[{address}]:{port}"
            key = (address, port, host.name, tls, credentials)
            conn = await pool.take(key)
            reused = conn is not None
            try:
                try:
                    if conn is None:
                        conn = await _open_counted(pool, host, address, port, session)
                    replies, reusable = await _transaction(conn, delivery, reused=reused)
                except _StaleConnection:
                    log.debug("kept connection to %s was closed; opening a new one", where)
                    reused = False
                    conn = await _open_counted(pool, host, address, port, session)
                    replies, reusable = await _transaction(conn, delivery, reused=False)
            except _TryNextHost as exc:
                if conn is not None:
                    await conn.hop.quit()
                last = exc.reply
                if telling is None and last.status != "4.4.1":
                    telling = last
                log.info("relay to %s failed, trying the next host: %s", where, last)
                continue
            except BaseException:
                if conn is not None:
                    conn.hop.close()
                raise
            if reusable:
                pool.give_back(key, conn)
            else:
                conn.hop.close()
            return AttemptResult(replies, where, time.monotonic() - started, conn.tls, reused)
    # Report what went wrong at the most telling host: a TLS or AUTH failure at the primary MX
    # matters more than the backup MXs being down.
    last = telling or last
    if last.is_permanent:
        last = Reply(451, "4.4.1", f"no host took the message: {last.code} {last.text}")
    return AttemptResult(
        dict.fromkeys(delivery.recipients, last), where, time.monotonic() - started
    )
