"""The SMTP front end: aiosmtpd owns the wire; this module applies policy and runs the chain.

With :mod:`filterhost.smtp.handler` (the session policy and the end of DATA behind it), the
only module that imports aiosmtpd.

aiosmtpd's protocol class is kept (its STARTTLS, its session and envelope objects), but the
parts that decide what a byte means are filterhost's own, because aiosmtpd's are too lenient
for a host on a hostile network:

- the command loop: a command line ends only at CRLF (aiosmtpd's ``readuntil()`` also ends one
  at a bare LF, a desynchronisation vector); a line with a bare CR or NUL, or over 1000 octets,
  is refused; limits on errors, unknown and junk commands;
- a synchronous command path: with no plugin on a session hook, EHLO, MAIL, RCPT and QUIT are
  answered from ``data_received`` with no task or coroutine per command; everything else
  runs in aiosmtpd's session task (see "the synchronous command path" below);
- MAIL and RCPT: a strict path parser with the relay-hygiene checks
  (:mod:`filterhost.smtp.address`) and the DSN parameters (:mod:`filterhost.smtp.params`),
  which aiosmtpd refuses with 555; RCPT parameters are kept per recipient;
- DATA: read in blocks, ended only by CRLF.CRLF (:mod:`filterhost.smtp.data`), under an idle
  timeout and an overall deadline;
- AUTH: PLAIN and LOGIN over TLS only, checked off the event loop, rate limited per client;
- every reply carries an RFC 3463 code (:mod:`filterhost.smtp.replies`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import itertools
import logging
import os
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, TLSSetupException, syntax

from filterhost.config import Config, HostPort
from filterhost.dispatch import HookRunner
from filterhost.model import Session
from filterhost.quarantine import Quarantine
from filterhost.smtp.address import AddressError, check_mailbox, parse_path
from filterhost.smtp.auth import Credentials, FailureLimiter
from filterhost.smtp.data import DataCollector, DataResult, read_data
from filterhost.smtp.handler import (
    INTERNAL_ERROR,
    FhEnvelope,
    Handler,
    _discoverable_names,
    wire,
)
from filterhost.smtp.params import MailParams, parse_mail_params, parse_rcpt_params
from filterhost.smtp.policy import is_trusted
from filterhost.smtp.replies import with_status
from filterhost.smtp.tls import server_context
from filterhost.spool import Spool
from filterhost.verdict import Action, Reply, Verdict

__all__ = ["FilterhostSMTP", "FrontEnd", "Handler", "Listener", "wire"]

log = logging.getLogger("filterhost.smtp")

_session_ids = itertools.count(1)


@functools.cache
def _session_prefix() -> str:
    """``S<pid>-``: the process id, looked up once per process (a fork clears the cache)."""
    return f"S{os.getpid()}-"


os.register_at_fork(after_in_child=_session_prefix.cache_clear)

MAX_LINE = 1000  # octets with the CRLF (RFC 5321 4.5.3.1.6; its 512 for commands is too few
# for RCPT with a 500-character ORCPT, RFC 3461 4.2)
ALLOWED_BEFORE_TLS = frozenset({"EHLO", "HELO", "NOOP", "RSET", "STARTTLS", "QUIT"})
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "HELP", "EXPN"})
# A web client or proxy scanner talking to the SMTP port: hang up at once (Postfix does too).
HTTP_COMMANDS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"})
MAX_HANDSHAKE = 60.0
PARKED_INPUT = 64 * 1024  # bytes of pipelined input kept while a message is processed
FLUSH_REPLIES = 32  # replies of one pipelined batch held before they are written
SESSION_HOOKS = ("filterhost_connect", "filterhost_helo", "filterhost_mail", "filterhost_rcpt")


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening address and how its sessions start."""

    address: HostPort
    implicit_tls: bool = False
    """TLS from the first byte (port 465 style); STARTTLS is then not offered."""
    require_tls: bool = False
    """Mail only after STARTTLS (530 5.7.0 before it)."""


class FrontEnd:
    """Everything the SMTP sessions share: config, hooks, spool, TLS, AUTH and limits."""

    def __init__(
        self,
        config: Config,
        hooks: HookRunner,
        spool: Spool,
        on_queued: Callable[[str], None],
    ) -> None:
        server = config.server
        self.config = config
        self.hooks = hooks
        self.spool = spool
        self.on_queued = on_queued
        self.networks = server.networks
        self._trusted: dict[str, bool] = {}
        self._trusted_for = self.networks
        self.sessions: set[FilterhostSMTP] = set()
        self.active = 0
        """Sessions admitted (the ones ``max_connections`` counts)."""
        self.clients: Counter[str] = Counter()
        """Admitted sessions per client address."""
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopping = False
        """Set by :meth:`drain`: sessions end after their current transaction."""
        self.tls_context: ssl.SSLContext | None = (
            server_context(server.tls_cert, server.tls_key) if server.tls_cert else None
        )
        self.credentials = Credentials(Path(server.auth_file)) if server.auth_file else None
        self.auth_failures = FailureLimiter(
            server.auth_max_failures, float(server.auth_failure_window)
        )
        self.quarantine = Quarantine(spool.directory)
        """Where QUARANTINE verdicts put messages (opened and closed by the App)."""
        self.handler = Handler(self)
        self.smtp_templates: dict[bool, tuple[Config, ssl.SSLContext | None, dict[str, Any]]] = {}
        """Per STARTTLS or not: the settings of a session object (see ``_from_template``)."""
        self.reuse_port = False
        """Listen with SO_REUSEPORT: set when several worker processes share the ports."""
        self._quiet_hooks: tuple[HookRunner, bool] | None = None

    def session_hooks_idle(self) -> bool:
        """True when no plugin implements a session hook (connect, HELO, MAIL, RCPT).

        Sessions then take the synchronous command path (see ``FilterhostSMTP``). Checked
        per connection; a reload brings a new :class:`HookRunner`, and the answer with it.
        """
        hooks = self.hooks
        known = self._quiet_hooks
        if known is None or known[0] is not hooks:
            known = self._quiet_hooks = (hooks, not any(map(hooks.impls, SESSION_HOOKS)))
        return known[1]

    def trusted(self, ip: str) -> bool:
        """True when ``ip`` is in ``mynetworks``, remembered per address.

        Parsing the address was ~1.5% of a message's CPU; a reload that brings other networks
        starts afresh.
        """
        if self._trusted_for is not self.networks:
            self._trusted.clear()
            self._trusted_for = self.networks
        found = self._trusted.get(ip)
        if found is None:
            if len(self._trusted) >= 4096:
                self._trusted.clear()
            found = self._trusted[ip] = is_trusted(ip, self.networks)
        return found

    def listeners(self) -> list[Listener]:
        """The configured listeners: ``listen`` (STARTTLS when a certificate is set) first."""
        server = self.config.server
        plain = [
            Listener(address, require_tls=server.requires_tls(item))
            for item, address in zip(server.listen, server.listen_addresses, strict=True)
        ]
        return plain + [Listener(a, implicit_tls=True) for a in server.tls_listen_addresses]

    def protocol(self, listener: Listener | None = None) -> FilterhostSMTP:
        """A new protocol instance for one connection (the ``create_server`` factory)."""
        return FilterhostSMTP(self, listener or Listener(HostPort("", 0)))

    async def listen(self, servers: list[asyncio.Server]) -> None:
        """Open every listener, appending each to ``servers`` as soon as it is open."""
        loop = asyncio.get_running_loop()
        handshake = min(MAX_HANDSHAKE, float(self.config.server.idle_timeout))
        for listener in self.listeners():
            tls = self.tls_context if listener.implicit_tls else None
            server = await loop.create_server(
                functools.partial(self.protocol, listener),
                listener.address.host,
                listener.address.port,
                ssl=tls,
                ssl_handshake_timeout=handshake if tls is not None else None,
                reuse_port=self.reuse_port or None,
            )
            servers.append(server)
            log.info(
                "listening on %s%s",
                listener.address,
                " (implicit TLS)" if listener.implicit_tls else "",
            )

    async def drain(self, deadline: float) -> None:
        """Wait until every session has ended, or ``deadline`` seconds; then close the rest.

        Sessions between transactions are told 421 4.3.2 and closed at once; the others may
        finish the message they are sending, and are closed after it.
        """
        self.stopping = True
        for proto in list(self.sessions):
            proto.close_if_idle()
        try:
            async with asyncio.timeout(deadline):
                await self.idle.wait()
        except TimeoutError:
            for proto in list(self.sessions):
                if proto.transport is not None:
                    proto.transport.close()


class FilterhostSMTP(SMTP):
    """aiosmtpd's SMTP with filterhost's command loop, MAIL, RCPT, DATA and AUTH."""

    _smtp_names: tuple[str, ...]
    _bound_smtp: dict[str, Any] | None

    def __dir__(self) -> list[str]:
        """Only the ``smtp_``/``handle_``/``auth_`` names: see :func:`_discoverable_names`."""
        return _discoverable_names(self)

    def __init__(self, front: FrontEnd, listener: Listener) -> None:
        config = front.config
        starttls = front.tls_context is not None and not listener.implicit_tls
        context = front.tls_context if starttls else None
        cached = front.smtp_templates.get(starttls)
        if cached is not None and cached[0] is config and cached[1] is context:
            self._from_template(cached[2])
        else:
            super().__init__(
                front.handler,
                # The running loop, given: aiosmtpd's own look-up goes through warnings filters.
                loop=asyncio.get_running_loop(),
                data_size_limit=config.server.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=config.hostname,
                ident="filterhost",
                timeout=float(config.server.idle_timeout),
                tls_context=context,
            )
            # A reload brings a new config (and maybe a new certificate): a new template.
            front.smtp_templates[starttls] = (config, context, dict(vars(self)))
        self.front = front
        self.listener = listener
        self.limits = config.server
        self.fh: Session | None = None
        self.refusal: str | None = None
        self._counted = False
        self.errors = 0
        self.unknown = 0
        self.junk = 0
        self.messages = 0
        self.busy = False
        """True while a command runs (between reading it and replying); on the synchronous
        path, while the end of a message is processed (input then waits in ``_inbuf``)."""
        self._idle_deadline = 0.0
        """Loop time at which the session is idle for too long (see :meth:`_reset_timeout`)."""
        self._fast = False
        """True while the synchronous command path reads this session's input."""
        self._fast_ok = False
        """The session may use the synchronous path (no session hooks, no TLS)."""
        self._inbuf = bytearray()
        """Input the synchronous path has not consumed yet."""
        self._out: list[bytes] = []
        """Replies of the synchronous path, written together (RFC 2920 pipelining)."""
        self._data: DataCollector | None = None
        """The message being received by the synchronous path (between 354 and the dot)."""
        self._data_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False

    def _from_template(self, template: dict[str, Any]) -> None:
        """What ``SMTP.__init__`` would set, from an instance it set up before.

        aiosmtpd's ``__init__`` discovers the handler's and its own methods with ``inspect``
        and ``dir()`` on every connection: ~7% of the CPU of a 5 KB message in the bench
        profile, for a result that is the same each time. The settings come from the first
        instance of the same config; the asyncio stream state, the session state and the
        table of bound ``smtp_`` methods are made anew, as ``__init__`` makes them
        (``test_a_session_from_the_template_shares_no_state`` compares the two ways).
        """
        vars(self).update(template)
        loop = self.loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._bound_smtp = None

    @property
    def _smtp_methods(self) -> dict[str, Any]:
        """The ``smtp_`` methods by command name, bound when first asked for.

        Only aiosmtpd's task path (and HELP) looks commands up here; sessions on the
        synchronous path never do, and binding the table was ~1.5% of a 5 KB message's CPU.
        """
        bound = self._bound_smtp
        if bound is None:
            bound = self._bound_smtp = {n: getattr(self, "smtp_" + n) for n in self._smtp_names}
        return bound

    @_smtp_methods.setter
    def _smtp_methods(self, methods: dict[str, Any]) -> None:
        # aiosmtpd's __init__ sets the table; the names are what a template passes on.
        self._smtp_names = tuple(methods)
        self._bound_smtp = methods

    # -- connection life ------------------------------------------------------------------

    def _create_envelope(self) -> FhEnvelope:
        return FhEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A new connection (or, after STARTTLS, the same one over TLS)."""
        first = self.fh is None
        if first and self._start_fast(transport):
            return
        super().connection_made(transport)
        if first:
            self._admit(transport)
        elif self.fh is not None:
            self._fast_ok = False
            # connection_made again: STARTTLS completed. RFC 3207 4.2: forget what the client
            # said before (aiosmtpd drops the buffered plaintext and the HELO name).
            self.fh.tls = True
            self.fh.helo, self.fh.esmtp = None, False
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                log.info(
                    "%s: STARTTLS %s %s",
                    self.fh.id,
                    ssl_object.version(),
                    (ssl_object.cipher() or ("?",))[0],
                )

    def _admit(self, transport: asyncio.BaseTransport) -> None:
        """Create the session; decide whether the connection limits let it in."""
        peer = transport.get_extra_info("peername") or ("", 0)
        ip = str(peer[0])
        front = self.front
        self.fh = Session(
            id=f"{_session_prefix()}{next(_session_ids)}",
            client_ip=ip,
            client_port=int(peer[1]) if len(peer) > 1 else 0,
            trusted=front.trusted(ip),
            tls=transport.get_extra_info("sslcontext") is not None,
        )
        front.sessions.add(self)
        front.idle.clear()
        host = self.hostname
        if front.active >= self.limits.max_connections:
            self.refusal = f"421 4.7.0 {host} Error: too many connections; try again later"
        elif front.clients[ip] >= self.limits.max_connections_per_client:
            self.refusal = (
                f"421 4.7.0 {host} Error: too many connections from {ip}; try again later"
            )
        else:
            front.active += 1
            front.clients[ip] += 1
            self._counted = True

    def _start_fast(self, transport: asyncio.BaseTransport) -> bool:
        """Open a session on the synchronous command path, if it may take it.

        What aiosmtpd's ``connection_made`` does, less the session task: that is started
        only when a command needs a coroutine (see :meth:`_to_coroutine`). Listeners with
        TLS, and configurations where a plugin implements a session hook, keep aiosmtpd's
        task-per-session path from the start.
        """
        listener = self.listener
        if listener.implicit_tls or listener.require_tls or not self.front.session_hooks_idle():
            return False
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.session = self._create_session()
        self.session.peer = transport.get_extra_info("peername")
        asyncio.StreamReaderProtocol.connection_made(self, transport)
        self.transport = transport
        self._admit(transport)
        self._reset_timeout()
        if self._open():
            self._fast = self._fast_ok = True
            self._out.append(self._banner())
            self._flush()
        return True

    def connection_lost(self, error: Exception | None) -> None:
        """The connection is gone: release its place in the connection limits."""
        front = self.front
        if self.fh is not None and self in front.sessions:
            log.info("%s: disconnect from %s", self.fh.id, self.fh.client_ip)
        if self._counted:
            self._counted = False
            assert self.fh is not None
            front.active -= 1
            front.clients[self.fh.client_ip] -= 1
            if front.clients[self.fh.client_ip] <= 0:
                del front.clients[self.fh.client_ip]
        front.sessions.discard(self)
        if not front.sessions:
            front.idle.set()
        if self._data_timer is not None:
            self._data_timer.cancel()
        if self._handler_coroutine is None:
            # The synchronous path never started aiosmtpd's session task, which its
            # connection_lost expects to cancel.
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            asyncio.StreamReaderProtocol.connection_lost(self, error)
            self.transport = None
            return
        super().connection_lost(error)

    def eof_received(self) -> bool:
        """The client closed its side: the session ends (the transport closes itself).

        aiosmtpd cancels the session task and keeps the transport half open for that task to
        close. Under uvloop the EOF of a client that connects and hangs up at once can arrive
        before the task's first step; cancelled before it ran, the task closed nothing, and
        the connection stayed counted against the limits for ever. Returning False closes
        the transport here, whatever the task got to do.
        """
        if self._data is not None and self.fh is not None:
            log.info("%s: connection lost", self.fh.id)  # in DATA, as the task path says
        if self._handler_coroutine is None:
            asyncio.StreamReaderProtocol.eof_received(self)
        else:
            super().eof_received()
        return False

    def _say_and_close(self, line: str) -> None:
        """Send a last reply and close (buffered data is flushed first)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._flush()
            transport.write(line.encode() + b"\r\n")  # type: ignore[attr-defined]
            transport.close()

    def close_if_idle(self) -> None:
        """At shutdown: end the session now unless a command or a transaction is under way."""
        envelope = self.envelope
        if not self.busy and (envelope is None or not envelope.mail_from):
            self._say_and_close(f"421 4.3.2 {self.hostname} Service shutting down")

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Push the idle deadline back; the timer is re-armed only when it fires early.

        aiosmtpd cancels and creates a timer for every command and every DATA block: with
        the loop's handling of the cancelled ones, ~5% of the CPU of a 5 KB message in the
        bench profiles. Moving the deadline is one float; a timer that fires before it
        sleeps again until it.
        """
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self._idle_deadline > self.loop.time():
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        session = self.fh.id if self.fh is not None else "-"
        log.info("%s: idle timeout, closing", session)
        self._say_and_close(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    # -- the synchronous command path ----------------------------------------------------
    #
    # aiosmtpd runs a task per session that awaits each command line from a StreamReader and
    # each reply's drain: a dozen coroutine steps and future wake-ups per command, and a task
    # per connection. Most sessions only say EHLO, MAIL, RCPT, DATA and QUIT, and (with no
    # plugin on the session hooks) nothing in EHLO, MAIL or RCPT needs to wait. Those are
    # answered straight from data_received, replies to a pipelined group written together;
    # the message after DATA goes into one buffer (DataCollector), and only its end (plugins,
    # the spool's fsync) runs in a task, while input behind it waits. Anything else (AUTH,
    # STARTTLS, a refused DATA, an odd line) goes to the coroutine path with the unread input,
    # byte for byte, so it sees exactly what it would have seen; that path hands the session
    # back when it is between commands with nothing buffered. Both paths share the checks
    # (``_check_mail``, ``_check_rcpt``, the Handler's policy, DataCollector, ``_data_reply``),
    # so they cannot answer differently.

    def data_received(self, data: bytes) -> None:
        """Input: the synchronous path's while it has the session, else aiosmtpd's reader."""
        if not self._fast:
            super().data_received(data)
            return
        if self._data is not None:
            self._reset_timeout()
            self._feed_data(data)
            return
        self._inbuf += data
        if not self.busy:
            self._run_fast()
        elif len(self._inbuf) > PARKED_INPUT and not self._reading_paused:
            # A client pipelining far ahead of a message still being processed: stop reading.
            assert self.transport is not None
            self.transport.pause_reading()  # type: ignore[attr-defined]
            self._reading_paused = True

    def _run_fast(self) -> None:
        buf = self._inbuf
        pos = 0
        while self._fast:
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos >= MAX_LINE:
                    self._to_coroutine(pos)  # it answers an over-long line
                break
            if end - pos + 1 > MAX_LINE or end == pos or buf[end - 1] != 0x0D:
                self._to_coroutine(pos)  # it refuses the line, or ends the session
                break
            line = bytes(buf[pos : end - 1])
            if b"\r" in line or b"\0" in line:
                self._to_coroutine(pos)
                break
            self._reset_timeout()
            try:
                handled = self._fast_command(line)
            except Exception as error:
                self._reply(self._internal_error(error))
                handled = True
            if not handled:
                self._to_coroutine(pos)
                break
            pos = end + 1
            if self._data is not None:
                self._begin_message(pos)
                return
            self._after_command()
            transport = self.transport
            if transport is None or transport.is_closing():
                self._fast = False
                buf.clear()
                break
            if len(self._out) >= FLUSH_REPLIES:
                # A long pipelined batch: write as it goes, so that a client that does not
                # read its replies shows (the transport pauses writing) before many pile up.
                self._flush()
            if self._paused:  # type: ignore[attr-defined]
                # The client is not reading its replies: let the coroutine path wait for it.
                self._to_coroutine(pos)
                break
        self._flush()
        if self._fast:
            del buf[:pos]

    def _begin_message(self, pos: int) -> None:
        """DATA accepted (354 queued): what follows the command line is the message."""
        rest = bytes(self._inbuf[pos:])
        self._inbuf.clear()
        self._flush()
        if rest:
            self._feed_data(rest)

    def _fast_command(self, line: bytes) -> bool:  # noqa: PLR0911 - one outcome per verb
        """Answer ``line`` if it is one the synchronous path takes; False: it does not."""
        if not self.front.session_hooks_idle():
            # A reload brought a plugin with a session hook: from now on this session runs
            # its commands through the hooks, as a new one would.
            self._fast_ok = False
            return False
        verb, _, arg_bytes = line.partition(b" ")
        verb = verb.upper()
        arg_bytes = arg_bytes.strip(b" ")
        arg = arg_bytes.decode("utf-8", "surrogateescape") if arg_bytes else None
        if verb == b"RCPT":
            return self._fast_rcpt(arg)
        if verb == b"MAIL":
            return self._fast_mail(arg)
        if verb in (b"EHLO", b"HELO") and arg:
            self._fast_greet(arg, esmtp=verb == b"EHLO")
            return True
        if verb == b"DATA" and arg is None:
            return self._fast_data()
        if verb == b"QUIT" and arg is None:
            self._out.append(f"{with_status('221 Bye')}\r\n".encode())
            self._flush()
            assert self.transport is not None
            self.transport.close()
            return True
        return False

    def _fast_data(self) -> bool:
        """DATA with a sender and recipients: 354, then the message comes to ``_feed_data``."""
        envelope = self.envelope
        assert self.session is not None
        if not self.session.host_name or envelope is None or not envelope.rcpt_tos:
            return False  # the task path refuses it
        self._out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self._data = DataCollector(self.limits.max_message_size)
        # The idle timer restarts with each block; this deadline does not.
        self._data_timer = self.loop.call_later(
            float(self.limits.data_timeout), self._data_deadline
        )
        return True

    def _data_deadline(self) -> None:
        if self._data is None:
            return
        self._data = None
        self._fast = False  # nothing more is read as commands: the session is over
        assert self.fh is not None
        log.info("%s: DATA deadline passed, closing", self.fh.id)
        self._say_and_close(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    def _feed_data(self, chunk: bytes) -> None:
        assert self._data is not None
        done = self._data.feed(chunk)
        if done is None:
            return
        result, rest = done
        self._data = None
        if self._data_timer is not None:
            self._data_timer.cancel()
            self._data_timer = None
        self._inbuf += rest
        self.busy = True
        # The end of DATA waits (plugins, the spool's fsync): the one step with a task. As
        # aiosmtpd's session task would be, it is cancelled if the connection goes.
        self._handler_coroutine = self.loop.create_task(self._end_of_data(result))

    async def _end_of_data(self, result: DataResult) -> None:
        try:
            reply = await self._data_reply(result)
            self._reply(wire(reply))
            self._flush()
            if reply.code == 421 and self.transport is not None:
                self.transport.close()
        finally:
            self.busy = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()  # type: ignore[attr-defined]
        self._after_command()
        if not transport.is_closing():
            self._run_fast()

    def _fast_greet(self, hostname: str, *, esmtp: bool) -> None:
        assert self.fh is not None
        assert self.session is not None
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.session.extended_smtp = esmtp
        self.fh.helo, self.fh.esmtp = hostname, esmtp
        self.session.host_name = hostname
        self._out.append(self._greeting(esmtp=esmtp))

    def _fast_mail(self, arg: str | None) -> bool:
        checked = self._check_mail(arg)
        if checked is None:
            return True
        if isinstance(checked, str):
            self._reply(checked)
            return True
        address, params = checked
        envelope = self.envelope
        assert envelope is not None
        self._reply(self.front.handler.mail_accepted(envelope, address, params.stored))
        envelope.smtp_utf8 = params.smtputf8
        return True

    def _fast_rcpt(self, arg: str | None) -> bool:
        checked = self._check_rcpt(arg)
        if isinstance(checked, str):
            self._reply(checked)
            return True
        address, options = checked
        envelope = self.envelope
        assert isinstance(envelope, FhEnvelope)
        handler = self.front.handler
        status = handler.recipient_limit(envelope) or handler.recipient_decision(
            self, envelope, address, options, None
        )
        if status.startswith("2"):
            envelope.rcpt_params.setdefault(address, options)
        self._reply(status)
        return True

    def _reply(self, status: str) -> None:
        self._out.append(self._counted_reply(status).encode() + b"\r\n")

    def _flush(self) -> None:
        if self._out:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(b"".join(self._out))  # type: ignore[attr-defined]
            self._out.clear()

    def _to_coroutine(self, pos: int) -> None:
        """Hand the session to aiosmtpd's task from ``pos`` of the unread input on."""
        self._fast = False
        self._flush()
        rest = bytes(self._inbuf[pos:])
        self._inbuf.clear()
        if rest:
            self._reader.feed_data(rest)
        self._handler_coroutine = self.loop.create_task(self._command_loop())

    def _may_go_fast(self) -> bool:
        """True when the coroutine path may hand the session back (between commands)."""
        transport = self.transport
        return (
            self._fast_ok
            and not self._reader._buffer  # type: ignore[attr-defined]
            and not self._reader.at_eof()
            and not self._paused  # type: ignore[attr-defined]
            and transport is not None
            and not transport.is_closing()
        )

    # -- replies ----------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        """Send one reply line, with an RFC 3463 code; count 4xx/5xx towards the error limit."""
        if isinstance(status, str):
            await super().push(self._counted_reply(status))
        else:
            await super().push(status)

    def _counted_reply(self, status: str) -> str:
        """``status`` with its enhanced code; a 4xx/5xx counts towards the error limit."""
        status = with_status(status)
        # The last line of a 4xx/5xx reply is one error (Postfix smtpd_hard_error_limit);
        # 421 ends the session anyway, and "too many recipients" is the client's retry cue.
        if (
            status[:1] in "45"
            and status[3:4] != "-"
            and not status.startswith(("421", "452 4.5.3"))
        ):
            self.errors += 1
        return status

    async def _push_raw(self, data: bytes) -> None:
        """Send reply lines as they are: the greeting and HELO/EHLO (RFC 2034 exempts them)."""
        self._writer.write(data)
        await self._writer.drain()

    def _banner(self) -> bytes:
        return f"220 {self.hostname} ESMTP filterhost\r\n".encode()

    async def handle_exception(self, error: Exception) -> str:
        """Turn an error of ours into 451 4.3.0, never aiosmtpd's 500 with the exception text.

        The traceback goes to the log only.
        """
        return self._internal_error(error)

    def _internal_error(self, error: Exception) -> str:
        session = self.fh.id if self.fh is not None else "-"
        log.error("%s: internal error in the SMTP session", session, exc_info=error)
        return wire(INTERNAL_ERROR)

    # -- the command loop -------------------------------------------------------------------

    def _open(self) -> bool:
        """Count and log the new session; False when the limits refused it (421, closing)."""
        fh = self.fh
        assert fh is not None
        metrics = self.front.hooks.metrics
        if self.refusal is not None:
            log.warning("%s: refused %s: %s", fh.id, fh.client_ip, self.refusal.split("Error: ")[1])
            if metrics is not None:
                metrics.sessions.labels("refused").inc()
            self._say_and_close(self.refusal)
            return False
        if metrics is not None:
            metrics.sessions.labels("admitted").inc()
        log.info(
            "%s: connect client=%s port=%d trusted=%s%s",
            fh.id,
            fh.client_ip,
            fh.client_port,
            fh.trusted,
            " tls=implicit" if fh.tls else "",
        )
        return True

    async def _handle_client(self) -> None:
        fh = self.fh
        assert fh is not None
        if not self._open():
            return
        try:
            verdict = await self.front.hooks.chain("filterhost_connect", context=fh.id, session=fh)
        except Exception:
            log.exception("%s: internal error in connect phase", fh.id)
            verdict = Verdict(Action.DISCONNECT, Reply(421, "4.3.0", "Internal error"))
        if verdict is not None and verdict.action in (
            Action.REJECT,
            Action.TEMPFAIL,
            Action.DISCONNECT,
        ):
            reply = verdict.effective_reply
            assert reply is not None
            # RFC 5321 3.1: a refusing server may greet with 554; we then close.
            self._say_and_close(wire(reply))
            return
        try:
            await self._push_raw(self._banner())
        except ConnectionError:
            log.info("%s: connection lost before the greeting", fh.id)
            return
        await self._command_loop()

    async def _command_loop(self) -> None:
        assert self.fh is not None
        while self.transport is not None and not self.transport.is_closing():
            try:
                line = await self._read_line()
                if line is not None:
                    self.busy = True
                    try:
                        await self._dispatch(line)
                    finally:
                        self.busy = False
                self._after_command()
                if self._may_go_fast():
                    self._fast = True
                    return
            except asyncio.CancelledError:
                # The connection is gone (aiosmtpd cancels this task on EOF or loss).
                self._writer.close()
                raise
            except ConnectionError:
                log.info("%s: connection lost", self.fh.id)
                self._writer.close()
                return
            except TLSSetupException as error:
                log.info("%s: TLS handshake failed: %s", self.fh.id, error.__cause__)
                if self.transport is not None:
                    self.transport.close()
                # The TLS layer never told us the connection was up, so it will not tell us
                # that it is down either: release the session here (as aiosmtpd does).
                self.connection_lost(error)
                return
            except Exception as error:
                try:
                    await self.push(await self.handle_exception(error))
                except ConnectionError:
                    return

    def _after_command(self) -> None:
        """Between commands: end the session when shutting down or after too many errors."""
        if self.front.stopping:
            self.close_if_idle()
        if self.errors >= self.limits.max_errors_per_session:
            assert self.fh is not None
            log.info("%s: too many errors, closing", self.fh.id)
            self._say_and_close(f"421 4.7.0 {self.hostname} Error: too many errors")

    async def _read_line(self) -> bytes | None:
        """One command line without its CRLF; None when it was refused (replied, or closing)."""
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as error:
            await self._discard_line(error.consumed)
            await self.push(f"500 5.5.2 Error: line too long (over {MAX_LINE} octets)")
            return None
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("connection closed in a command line") from None
        self._reset_timeout()
        assert self.fh is not None
        if not line.endswith(b"\r\n"):
            # Never a command terminator: if it were, the next bytes would run as a command
            # that another MTA on the path might have read as part of this one.
            log.info("%s: bare LF in a command line, closing", self.fh.id)
            self._say_and_close("500 5.5.2 Error: bare <LF> received; lines must end with <CR><LF>")
            return None
        if len(line) > MAX_LINE:
            await self.push(f"500 5.5.2 Error: line too long (over {MAX_LINE} octets)")
            return None
        body = line[:-2]
        if b"\r" in body or b"\0" in body:
            await self.push("500 5.5.2 Error: bare <CR> or NUL in a command line")
            return None
        return body

    async def _discard_line(self, consumed: int) -> None:
        """Skip the rest of an over-long line."""
        await self._reader.read(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as error:
                await self._reader.read(error.consumed)
            except asyncio.IncompleteReadError:
                raise ConnectionResetError("connection closed in an over-long line") from None

    async def _dispatch(self, line: bytes) -> None:
        assert self.fh is not None
        command_bytes, _, arg_bytes = line.partition(b" ")
        try:
            command = command_bytes.decode("ascii").upper()
        except UnicodeDecodeError:
            command = ""
        if not command or not command.isalnum():
            await self.push("500 5.5.2 Error: bad syntax")
            return
        arg_bytes = arg_bytes.strip(b" ")
        # Arguments may be UTF-8 (SMTPUTF8); invalid bytes survive as surrogates for the
        # address parser to refuse.
        arg = arg_bytes.decode("utf-8", "surrogateescape") if arg_bytes else None
        host = self.hostname
        if command in HTTP_COMMANDS:
            log.info("%s: %s command from %s, closing", self.fh.id, command, self.fh.client_ip)
            self._say_and_close(f"421 4.7.0 {host} Error: this is an SMTP server")
            return
        if self.listener.require_tls and not self.fh.tls and command not in ALLOWED_BEFORE_TLS:
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return
        method = self._smtp_methods.get(command)
        if method is None:
            self.unknown += 1
            if self.unknown > self.limits.max_unknown_commands:
                log.info("%s: too many unrecognized commands, closing", self.fh.id)
                self._say_and_close(f"421 4.7.0 {host} Error: too many unrecognized commands")
                return
            await self.push("500 5.5.2 Error: command not recognized")
            return
        if command in JUNK_COMMANDS:
            self.junk += 1
            if self.junk > self.limits.max_junk_commands:
                log.info("%s: too many %s and the like, closing", self.fh.id, command)
                self._say_and_close(f"421 4.7.0 {host} Error: too many {command} commands")
                return
        await method(arg)

    # -- commands -----------------------------------------------------------------------

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str | None) -> None:
        """HELO: plain SMTP; no enhanced codes on success (RFC 2034)."""
        await self._greet(hostname, esmtp=False)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str | None) -> None:
        """EHLO: the extensions this session may use."""
        await self._greet(hostname, esmtp=True)

    async def _greet(self, hostname: str | None, *, esmtp: bool) -> None:
        assert self.fh is not None
        assert self.session is not None
        verb = "EHLO" if esmtp else "HELO"
        if not hostname:
            await self.push(f"501 5.5.4 Syntax: {verb} hostname")
            return
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.session.extended_smtp = esmtp
        refused = await self.front.handler.helo(self, hostname, esmtp=esmtp)
        if refused is not None:
            await self.push(refused)
            return
        self.session.host_name = hostname
        await self._push_raw(self._greeting(esmtp=esmtp))

    def _greeting(self, *, esmtp: bool) -> bytes:
        """The reply to HELO (one line) or EHLO (the extensions this session may use)."""
        assert self.fh is not None
        if not esmtp:
            return f"250 {self.hostname}\r\n".encode()
        features = [
            "PIPELINING",
            f"SIZE {self.limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ]
        if self.tls_context is not None and not self.fh.tls:
            features.append("STARTTLS")
        if self.front.credentials is not None and self.fh.tls:
            features.append("AUTH PLAIN LOGIN")
        features.append("HELP")
        lines = [self.hostname, *features]
        return "".join([*(f"250-{x}\r\n" for x in lines[:-1]), f"250 {lines[-1]}\r\n"]).encode()

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL FROM: path, parameters (SIZE, BODY, SMTPUTF8, RET, ENVID, AUTH), then policy."""
        checked = self._check_mail(arg)
        if checked is None:
            return
        if isinstance(checked, str):
            await self.push(checked)
            return
        address, params = checked
        envelope = self.envelope
        assert self.session is not None
        assert envelope is not None
        status = await self.front.handler.handle_MAIL(
            self, self.session, envelope, address, params.stored
        )
        if status.startswith("2"):
            envelope.smtp_utf8 = params.smtputf8
        await self.push(status)

    def _check_mail(  # noqa: PLR0911 - one reply per case
        self, arg: str | None
    ) -> str | tuple[str, MailParams] | None:
        """MAIL FROM before the plugins: a refusal, the sender and its parameters, or None.

        None: the session is closing (its message limit). Changes nothing else, so both
        command paths share it.
        """
        assert self.fh is not None
        assert self.session is not None
        envelope = self.envelope
        assert isinstance(envelope, FhEnvelope)
        if not self.session.host_name:
            return "503 Error: send HELO first"
        if envelope.mail_from:
            return "503 5.5.1 Error: nested MAIL command"
        if self.messages >= self.limits.max_messages_per_session:
            log.info("%s: message limit of the session reached, closing", self.fh.id)
            self._say_and_close(
                f"421 4.7.0 {self.hostname} Error: too many messages in one session; reconnect"
            )
            return None
        if not arg or arg[:5].upper() != "FROM:":
            return "501 5.5.4 Syntax: MAIL FROM:<address>"
        try:
            path = parse_path(arg[5:], sender=True)
            if path.params and not self.session.extended_smtp:
                raise AddressError(Reply(501, "5.5.4", "MAIL parameters need EHLO"))
            params = parse_mail_params(path.params, max_size=self.limits.max_message_size)
        except AddressError as refused:
            return wire(refused.reply)
        problem = check_mailbox(
            path.mailbox, sender=True, trusted=self.fh.trusted, smtputf8=params.smtputf8
        )
        if problem is not None:
            return wire(problem)
        return path.address or "<>", params

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT TO: path, DSN parameters (NOTIFY, ORCPT) kept per recipient, then policy."""
        checked = self._check_rcpt(arg)
        if isinstance(checked, str):
            await self.push(checked)
            return
        address, options = checked
        envelope = self.envelope
        assert self.session is not None
        assert isinstance(envelope, FhEnvelope)
        status = await self.front.handler.handle_RCPT(
            self, self.session, envelope, address, options
        )
        if status.startswith("2"):
            envelope.rcpt_params.setdefault(address, options)
        await self.push(status)

    def _check_rcpt(self, arg: str | None) -> str | tuple[str, list[str]]:
        """RCPT TO before the plugins: a refusal, or the recipient and its parameters."""
        assert self.fh is not None
        assert self.session is not None
        envelope = self.envelope
        assert isinstance(envelope, FhEnvelope)
        if not self.session.host_name:
            return "503 Error: send HELO first"
        if not envelope.mail_from:
            return "503 5.5.1 Error: need MAIL command"
        if not arg or arg[:3].upper() != "TO:":
            return "501 5.5.4 Syntax: RCPT TO:<address>"
        try:
            path = parse_path(arg[3:], sender=False)
            if path.params and not self.session.extended_smtp:
                raise AddressError(Reply(501, "5.5.4", "RCPT parameters need EHLO"))
            options = parse_rcpt_params(path.params, smtputf8=envelope.smtp_utf8)
        except AddressError as refused:
            return wire(refused.reply)
        problem = check_mailbox(
            path.mailbox, sender=False, trusted=self.fh.trusted, smtputf8=envelope.smtp_utf8
        )
        if problem is not None:
            return wire(problem)
        return path.address, options

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None) -> None:
        """VRFY: never tells whether a user exists (RFC 5321 3.5.3 allows 252)."""
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        await self.push("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """STARTTLS, on listeners with a certificate, once."""
        assert self.fh is not None
        if self.fh.tls:
            await self.push("503 5.5.1 Error: TLS already active")
            return
        if self.tls_context is None:
            await self.push("502 5.5.1 Error: STARTTLS not available")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        await super().smtp_STARTTLS(arg)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str | None) -> None:  # noqa: PLR0911 - one reply per case
        """AUTH PLAIN and LOGIN (RFC 4954, 4616), over TLS only, against the credentials file."""
        fh, session, envelope = self.fh, self.session, self.envelope
        assert fh is not None
        assert session is not None
        assert envelope is not None
        credentials = self.front.credentials
        if credentials is None:
            await self.push("502 5.5.1 Error: authentication not enabled")
            return
        if not session.host_name or not session.extended_smtp:
            await self.push("503 5.5.1 Error: send EHLO first")
            return
        if not fh.tls:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if fh.authenticated_as is not None:
            await self.push("503 5.5.1 Error: already authenticated")
            return
        if envelope.mail_from:
            await self.push("503 5.5.1 Error: AUTH not permitted during a mail transaction")
            return
        args = (arg or "").split()
        if not 1 <= len(args) <= 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = args[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        limiter = self.front.auth_failures
        if limiter.blocked(fh.client_ip):
            log.warning("%s: AUTH refused: too many failures from %s", fh.id, fh.client_ip)
            await self.push("454 4.7.0 Too many failed authentication attempts; try again later")
            return
        initial = args[1] if len(args) == 2 else None
        pair = await (
            self._auth_plain(initial) if mechanism == "PLAIN" else self._auth_login(initial)
        )
        if pair is None:
            return  # aborted or malformed: already answered
        user, password = pair
        if user is not None and await credentials.verify(user, password):
            fh.authenticated_as = user
            fh.trusted = True  # an authenticated client may relay like mynetworks
            session.authenticated = True
            log.info("%s: AUTH %s succeeded user=%s", fh.id, mechanism, user)
            await self.push("235 2.7.0 Authentication successful")
            return
        failures = limiter.add(fh.client_ip)
        # No user name or password in the log: a password typed into the name field is common.
        log.warning(
            "%s: AUTH %s failed client=%s failures=%d/%d",
            fh.id,
            mechanism,
            fh.client_ip,
            failures,
            limiter.limit,
        )
        if failures >= limiter.limit:
            self._say_and_close(
                f"421 4.7.0 {self.hostname} Error: too many failed authentication attempts"
            )
            return
        await self.push("535 5.7.8 Authentication credentials invalid")

    async def _auth_response(self, challenge: bytes | None, initial: str | None) -> bytes | None:
        """The client's decoded answer: ``initial`` if given, else the answer to a 334."""
        if initial is None:
            await self.push(b"334 " + base64.b64encode(challenge or b""))
            line = await self._read_line()
            if line is None:
                return None
            text = line.strip()
        else:
            text = initial.encode("ascii", "replace")
        if text == b"*":
            await self.push("501 5.7.0 Authentication aborted")
            return None
        if text == b"=":  # RFC 4954: an empty initial response
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot decode the response (not base64)")
            return None

    async def _auth_plain(self, initial: str | None) -> tuple[str | None, bytes] | None:
        response = await self._auth_response(b"", initial)
        if response is None:
            return None
        parts = response.split(b"\0")
        if len(parts) != 3:
            await self.push("501 5.5.2 Malformed PLAIN response")
            return None
        authzid, authcid, password = parts
        # Acting for another user (authzid) is not offered: it must be empty or the same.
        if authzid and authzid != authcid:
            return None, password
        return _user_name(authcid), password

    async def _auth_login(self, initial: str | None) -> tuple[str | None, bytes] | None:
        user = await self._auth_response(b"Username:", initial)
        if user is None:
            return None
        password = await self._auth_response(b"Password:", None)
        if password is None:
            return None
        return _user_name(user), password

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """DATA, read in blocks (see :mod:`filterhost.smtp.data`), then the message chain."""
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        assert self.fh is not None
        if not self.envelope.mail_from:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            # The idle timer restarts with each block; this deadline does not, so a client
            # that trickles a byte at a time still cannot hold the session for ever.
            async with asyncio.timeout(float(self.limits.data_timeout)):
                result = await read_data(
                    self._reader, self.limits.max_message_size, self._reset_timeout
                )
        except TimeoutError:
            log.info("%s: DATA deadline passed, closing", self.fh.id)
            self._say_and_close(f"421 4.4.2 {self.hostname} Error: timeout exceeded")
            return
        reply = await self._data_reply(result)
        await self.push(wire(reply))
        if reply.code == 421 and self.transport is not None:
            self.transport.close()

    async def _data_reply(self, result: DataResult) -> Reply:
        """The end of DATA on either path: the message chain and the spool; the reply."""
        assert self.fh is not None
        envelope = self.envelope
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        self.messages += 1
        if result.too_big or result.raw is None:
            return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        # The chain and the spool may take longer than the idle timeout: not idle time.
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        try:
            assert isinstance(envelope, FhEnvelope)
            return await self.front.handler.process(
                self, envelope, result.raw, dot_lines=result.dot_lines
            )
        except Exception:
            log.exception("%s: internal error at end of DATA", self.fh.id)
            return INTERNAL_ERROR
        finally:
            self._reset_timeout()


def _user_name(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
