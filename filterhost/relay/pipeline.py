"""Mail transactions over an open connection to a next hop: pipelined, bytes written as they are.

aiosmtplib sets a session up (greeting, EHLO, STARTTLS, AUTH) and is then set aside: it waits
for the reply to each command before it sends the next, and it runs a line-ending regex and a
dot-stuffing regex over every message (the largest items of the relay's profile). A relay keeps
connections for many transactions, and its messages are already checked (CRLF line ends only, see
:func:`filterhost.smtp.data.check_content`). :class:`NextHop` takes the transport over and, when
the server announces PIPELINING (RFC 2920), sends MAIL, every RCPT and DATA in one write, then the
dot-stuffed message and its final dot in another: two round trips per message instead of
three plus one per recipient, and two whole-buffer ``bytes`` operations instead of the regexes.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

from filterhost.smtp.data import crlf_line_ends, has_dot_line
from filterhost.spool import Checked

__all__ = ["NextHop", "Outcome", "ServerReply", "wire_parts"]

_MAX_REPLY = 64 * 1024  # bytes of one reply (all its lines); past it the session is broken


@dataclass(frozen=True, slots=True)
class ServerReply:
    """One reply of the next hop: its code and its text (lines joined with a newline)."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        """A 2xx reply."""
        return 200 <= self.code < 300


class ReplyError(ConnectionError):
    """The next hop sent something that is not an SMTP reply (or far too long a one)."""


def wire_parts(data: bytes, *, checked: Checked | None = None) -> list[bytes]:
    """The message as DATA sends it, as the pieces to write one after the other.

    CRLF line ends, dot-stuffed, ending in ``CRLF.CRLF``; a message that needs no stuffing is
    not copied. With ``checked`` (see :class:`~filterhost.spool.Checked`), the bytes go as
    they are, after a look for dot lines in the part plugins may have edited. Otherwise a
    scan for bare line ends first, and bytes with a bare CR or LF (a DSN's, say) get every
    line end turned into CRLF, as aiosmtplib did for every message: never a bare LF or CR
    that a next hop could take for part of an end of data.
    """
    if checked is None:
        data = crlf_line_ends(data)
        dotted = has_dot_line(data)
    else:
        # A line start at or after dot_free_from has no dot: only the part before it (the
        # headers, which plugins may have edited) is looked at; +2 so that a CRLF "." that
        # starts just before the offset is seen whole.
        dotted = has_dot_line(data, end=checked.dot_free_from + 2)
    tail = b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
    # RFC 5321 4.5.2: a line that starts with a dot gets one more.
    head = b"." if data.startswith(b".") else b""
    if dotted:
        data = data.replace(b"\r\n.", b"\r\n..")
    return [head, data, tail] if head else [data, tail]


class _Replies(asyncio.Protocol):
    """Cuts what the server sends into replies, kept in order until they are read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buffer = bytearray()
        self.replies: collections.deque[ServerReply] = collections.deque()
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        start = 0
        lines: list[bytes] = []
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buf[start:end]).rstrip(b"\r")
            start = end + 1
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._fail(ReplyError(f"not an SMTP reply: {line[:80]!r}"))
                return
            lines.append(line)
            if line[3:4] != b"-":
                text = "\n".join(x[4:].strip(b" \t").decode("utf-8", "replace") for x in lines)
                self.replies.append(ServerReply(int(line[:3]), text))
                lines = []
                del buf[:start]
                start = 0
        if len(buf) > _MAX_REPLY:
            self._fail(ReplyError("reply too long"))
            return
        self._wake()

    def eof_received(self) -> bool:
        self._fail(ConnectionResetError("connection closed by the next hop"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed"))

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, timeout: float) -> ServerReply:
        """The next reply, waiting at most ``timeout`` seconds for it."""
        while not self.replies:
            if self.error is not None:
                raise self.error
            waiter = self._waiter = self._loop.create_future()
            # A timer that fails the wait, rather than asyncio.timeout: its context manager,
            # task look-up and rescheduling were ~2% of a relayed 5 KB message's CPU.
            timer = self._loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self.replies.popleft()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


@dataclass(slots=True)
class Outcome:
    """The replies of one transaction, in order, as far as the session got.

    ``mail`` is None when not even MAIL was answered; ``rcpts`` holds the RCPT replies read
    (fewer than the recipients when the session broke); ``data`` is None when DATA was not
    sent or not answered, ``final`` when the message was not sent or its end not answered.
    ``error`` is what broke the session (an :class:`OSError` or :class:`TimeoutError`), or None.
    """

    mail: ServerReply | None = None
    rcpts: list[ServerReply] = field(default_factory=list)
    data: ServerReply | None = None
    final: ServerReply | None = None
    error: OSError | TimeoutError | None = None

    @property
    def last(self) -> ServerReply | None:
        """The last reply read."""
        for reply in (self.final, self.data):
            if reply is not None:
                return reply
        return self.rcpts[-1] if self.rcpts else self.mail


class NextHop:
    """An SMTP session, past EHLO (and STARTTLS, AUTH), ready for mail transactions."""

    def __init__(self, transport: asyncio.Transport, extensions: set[str], timeout: float) -> None:
        self._replies = _Replies(asyncio.get_running_loop())
        self._transport = transport
        transport.set_protocol(self._replies)
        self.extensions = extensions
        """The EHLO keywords, lower case (``pipelining``, ``dsn``, ``8bitmime``, ...)."""
        self.pipelining = "pipelining" in extensions
        self.timeout = timeout
        self.clean = True
        """True between transactions (no RSET needed before the next MAIL)."""

    @property
    def is_connected(self) -> bool:
        """True while the connection is open and nothing unasked-for came from the server."""
        return (
            not self._transport.is_closing()
            and self._replies.error is None
            and not self._replies.replies  # e.g. a 421 on idle timeout
        )

    def close(self) -> None:
        """Drop the connection (without QUIT)."""
        self._transport.close()

    async def quit(self, timeout: float = 5.0) -> None:
        """QUIT, wait briefly for its reply, close."""
        try:
            if self.is_connected:
                self._transport.write(b"QUIT\r\n")
                await self._replies.next(timeout)
        except (OSError, TimeoutError):
            pass
        finally:
            self._transport.close()

    async def reset(self) -> bool:
        """RSET when a transaction was left open; False when the session is not usable."""
        if self.clean:
            return self.is_connected
        try:
            self._transport.write(b"RSET\r\n")
            reply = await self._replies.next(self.timeout)
        except (OSError, TimeoutError):
            return False
        self.clean = reply.ok
        return reply.ok

    async def transaction(
        self,
        sender: str,
        mail_options: Sequence[str],
        recipients: Sequence[tuple[str, Sequence[str]]],
        data: bytes,
        *,
        checked: Checked | None = None,
    ) -> Outcome:
        """MAIL, RCPT for each recipient, DATA, the message: every reply, in order.

        A session that breaks (connection lost, garbage, no reply in time) is closed and
        reported in :attr:`Outcome.error`, with the replies read until then: a recipient
        without a 2xx to its RCPT and to the end of the message is not delivered.
        """
        outcome = Outcome()
        self.clean = False
        try:
            await self._transaction(
                outcome, sender, mail_options, recipients, data, checked=checked
            )
        except (OSError, TimeoutError) as exc:
            outcome.error = exc
            self._transport.close()
        return outcome

    async def _transaction(
        self,
        outcome: Outcome,
        sender: str,
        mail_options: Sequence[str],
        recipients: Sequence[tuple[str, Sequence[str]]],
        data: bytes,
        *,
        checked: Checked | None,
    ) -> None:
        write = self._transport.write
        read = self._replies.next
        timeout = self.timeout
        mail = _command(b"MAIL FROM:", sender, mail_options)
        rcpts = [_command(b"RCPT TO:", address, options) for address, options in recipients]
        if self.pipelining:
            write(b"".join((mail, *rcpts, b"DATA\r\n")))
            outcome.mail = await read(timeout)
            for _ in rcpts:
                outcome.rcpts.append(await read(timeout))
            outcome.data = await read(timeout)
        else:
            write(mail)
            outcome.mail = await read(timeout)
            if not outcome.mail.ok:
                self.clean = True
                return
            for command in rcpts:
                write(command)
                outcome.rcpts.append(await read(timeout))
            if any(r.ok for r in outcome.rcpts):
                write(b"DATA\r\n")
                outcome.data = await read(timeout)
        if outcome.data is None or outcome.data.code != 354:
            # MAIL refused: nothing is open. Otherwise the next transaction needs an RSET.
            self.clean = not outcome.mail.ok
            return
        if not outcome.mail.ok or not any(r.ok for r in outcome.rcpts):
            # 354 with nobody to deliver to (RFC 2920 3.1 says servers must not): never send
            # the message; the session is in an unknown state, so it ends here.
            self._transport.close()
            return
        # writelines: the transport hands the pieces to the kernel as they are (writev).
        self._transport.writelines(wire_parts(data, checked=checked))
        outcome.final = await read(timeout)
        self.clean = True


def _command(verb: bytes, address: str, options: Sequence[str]) -> bytes:
    """One MAIL or RCPT line. Raises ValueError for a CR or LF (command injection)."""
    parts = [verb + b"<" + address.encode("utf-8") + b">"]
    parts.extend(option.encode("utf-8") for option in options)
    line = b" ".join(parts)
    # The front end never lets these through, but a plugin may have edited the envelope.
    if b"\r" in line or b"\n" in line:
        raise ValueError(f"CR or LF in an address or parameter: {line[:80]!r}")
    return line + b"\r\n"
