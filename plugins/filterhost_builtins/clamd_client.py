"""A small clamd client: INSTREAM over asyncio, plus blocking probes for ``--check-config``.

Protocol (clamd(8); "z" commands end in NUL): send ``zINSTREAM`` and a NUL, then the data as
chunks, each prefixed with its length as a 4-byte big-endian integer, then a zero length; clamd
answers one NUL-terminated line: ``stream: OK``, ``stream: NAME FOUND`` or ``... ERROR``, and
closes the connection. :func:`instream` does exactly that; :class:`ClamdPool`, which the plugin
uses, wraps the same request in an IDSESSION so that the connection can be reused.

Why our own client rather than a library: the PyPI ``clamd`` package is blocking (it would need a
thread per scan) and sends 1 KiB chunks; ``aioclamd`` is async but 20-30 times slower on 1 MB
mails and cannot use a unix socket. The figures are in docs/plugins/clamav.md.

Why ``loop.sock_*`` rather than asyncio streams: when a message exceeds clamd's
StreamMaxLength, clamd writes ``INSTREAM size limit exceeded. ERROR`` and closes while we are still
sending. A stream transport drops the socket on the failed write, so that line is lost (always
over a unix socket, in our runs); with the socket in our hands we can still read it after the
write failed, and report the real reason.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CHUNK_SIZE",
    "REASON_ERROR",
    "REASON_TIMEOUT",
    "REASON_TOO_LARGE",
    "REASON_UNAVAILABLE",
    "ClamdAddress",
    "ClamdError",
    "ClamdFailed",
    "ClamdPool",
    "ClamdUnavailable",
    "ScanResult",
    "command",
    "exceeds_stream_limit",
    "instream",
    "parse_reply",
    "stream_max_length",
]

CHUNK_SIZE = 65536
"""Bytes per INSTREAM chunk: 64 KiB keeps syscalls few; clamd accepts any chunk size."""

MAX_REPLY = 65536
"""A reply longer than this is not clamd talking; stop reading instead of buffering it."""

_END = struct.pack("!L", 0)
_SIZE_LIMIT = "size limit exceeded"

# Short reasons, used in the X-Virus-Status header and notes: a fixed vocabulary, so that the
# header never carries text taken from the network.
REASON_UNAVAILABLE = "scanner unavailable"
REASON_TIMEOUT = "scan timed out"
REASON_TOO_LARGE = "too large for scanner"
REASON_ERROR = "scanner error"


@dataclass(frozen=True, slots=True)
class ClamdAddress:
    """Where a clamd listens: a unix socket (``unix:/path``) or TCP (``host:port``)."""

    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> ClamdAddress:
        """Parse ``unix:/path``, ``host:port`` or ``[v6]:port``; raise ValueError otherwise."""
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if not path.startswith("/"):
                raise ValueError(f"{text!r}: a unix socket needs an absolute path (unix:/path)")
            return cls(path=path)
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise ValueError(f'{text!r}: expected "[ipv6]:port"')
        else:
            if text.count(":") != 1:
                hint = ' (IPv6 addresses go in brackets: "[::1]:3310")' if ":" in text else ""
                raise ValueError(
                    f'{text!r}: expected "unix:/path/to/clamd.sock" or "host:port"{hint}'
                )
            host, _, port_text = text.partition(":")
        if not host:
            raise ValueError(f"{text!r}: no host")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
        return cls(host=host, port=int(port_text))

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ClamdError(Exception):
    """A scan did not produce a verdict.

    ``reason`` is one of a few fixed short phrases (safe to put in a header); ``str(error)`` is
    the detail for the log. ``retryable`` says whether another server might do better: false
    when the message itself is the problem (it exceeds clamd's StreamMaxLength).
    """

    def __init__(self, reason: str, detail: str, *, retryable: bool = True) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retryable = retryable


class ClamdUnavailable(ClamdError):
    """Could not connect to clamd (refused, no socket file, unresolvable, connect timeout)."""


class ClamdFailed(ClamdError):
    """Connected, but the scan failed: timeout, connection lost, or an ERROR reply."""


@dataclass(frozen=True, slots=True)
class ScanResult:
    """clamd's answer for a stream: ``virus`` is the signature name, or None when clean."""

    virus: str | None
    reply: str

    @property
    def clean(self) -> bool:
        """True when clamd said ``OK``."""
        return self.virus is None


def parse_reply(raw: bytes, server: str = "clamd") -> ScanResult:
    """The result in an INSTREAM reply; raise :class:`ClamdFailed` for anything but OK/FOUND."""
    text = raw.rstrip(b"\0").decode("utf-8", "replace").strip()
    if not text:
        raise ClamdFailed(REASON_ERROR, f"{server}: closed the connection without a reply")
    # "stream: OK" / "stream: Eicar-Signature FOUND" / "INSTREAM size limit exceeded. ERROR"
    _, _, result = text.partition(": ") if text.startswith("stream:") else ("", "", text)
    if result == "OK":
        return ScanResult(None, text)
    if result.endswith(" FOUND"):
        return ScanResult(result[: -len(" FOUND")].strip(), text)
    if _SIZE_LIMIT in text:
        raise ClamdFailed(
            REASON_TOO_LARGE,
            f"{server}: {text!r} (the message is larger than clamd's StreamMaxLength)",
            retryable=False,
        )
    raise ClamdFailed(REASON_ERROR, f"{server}: unexpected reply {text!r}")


def _frames(data: bytes, chunk_size: int, prefix: bytes = b"") -> Iterator[bytes]:
    """The INSTREAM request (after ``prefix``) in send units of about ``chunk_size`` bytes.

    The command rides with the first chunk and the terminator with the last, so a small message
    is one send: separate tiny writes could wait on Nagle and delayed ACKs. Frames are made as
    they are sent, so a large message is not copied whole a second time.
    """
    view = memoryview(data)
    head = prefix + b"zINSTREAM\0"
    last = len(data) - chunk_size  # the chunk starting after this one is the last
    for start in range(0, len(data), chunk_size):
        part = view[start : start + chunk_size]
        frame = head + struct.pack("!L", len(part)) + part
        yield frame + _END if start >= last else frame
        head = b""
    if not data:
        yield head + _END


async def _connect(address: ClamdAddress) -> socket.socket:
    """A connected non-blocking socket to ``address`` (the caller bounds the time)."""
    loop = asyncio.get_running_loop()
    if address.path:
        targets: list[tuple[socket.AddressFamily, str | tuple[Any, ...]]] = [
            (socket.AF_UNIX, address.path)
        ]
    else:
        try:
            # An IP literal needs no lookup; loop.getaddrinfo would still cost a thread hop.
            infos = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except socket.gaierror:
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        targets = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    error: OSError = OSError(f"{address}: no address to connect to")
    for family, sockaddr in targets:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:  # cancelled or timed out: do not leak the socket
            sock.close()
            raise
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error


async def _read_reply(sock: socket.socket) -> bytes:
    """Bytes up to and including clamd's NUL, or whatever came before EOF."""
    loop = asyncio.get_running_loop()
    reply = b""
    while not reply.endswith(b"\0") and len(reply) < MAX_REPLY:
        part = await loop.sock_recv(sock, 4096)
        if not part:
            break
        reply += part
    return reply


async def _open(address: ClamdAddress, timeout: float, deadline: float) -> socket.socket:
    """:func:`_connect` within ``timeout`` (and ``deadline``), failures as ClamdUnavailable."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(min(loop.time() + timeout, deadline)):
            return await _connect(address)
    except TimeoutError:
        raise ClamdUnavailable(REASON_UNAVAILABLE, f"{address}: connect timed out") from None
    except OSError as exc:
        raise ClamdUnavailable(REASON_UNAVAILABLE, f"{address}: {_describe(exc)}") from None


async def _exchange(
    sock: socket.socket, frames: Iterable[bytes], deadline: float, address: ClamdAddress
) -> bytes:
    """Send ``frames`` and return the reply up to its NUL (or what came before EOF).

    Raises :class:`ClamdFailed` on timeout, :class:`_Lost` when the connection broke or closed
    before a complete reply.
    """
    loop = asyncio.get_running_loop()
    send_error: OSError | None = None
    try:
        async with asyncio.timeout_at(deadline):
            try:
                for frame in frames:
                    await loop.sock_sendall(sock, frame)
            except OSError as exc:
                # clamd hangs up early when StreamMaxLength is exceeded; its one-line answer
                # is usually already in our receive buffer, so read it anyway.
                send_error = exc
            raw = await _read_reply(sock)
    except TimeoutError:
        raise ClamdFailed(REASON_TIMEOUT, f"{address}: no answer in time") from None
    except OSError as exc:
        raise _Lost(REASON_ERROR, f"{address}: connection lost: {_describe(exc)}") from None
    # Only a NUL-terminated reply is complete: a cut-off "stream: OK..." must not count as OK.
    if raw.endswith(b"\0") or _SIZE_LIMIT.encode() in raw:
        return raw
    if send_error is not None:
        raise _Lost(
            REASON_ERROR,
            f"{address}: connection lost while sending ({_describe(send_error)}); "
            "clamd's StreamMaxLength may be smaller than the message",
            nothing_read=not raw,
        )
    raise _Lost(
        REASON_ERROR,
        f"{address}: closed the connection without a complete reply ({raw[:80]!r})",
        nothing_read=not raw,
    )


async def instream(
    address: ClamdAddress,
    data: bytes,
    *,
    connect_timeout: float,
    scan_timeout: float,
    deadline: float | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> ScanResult:
    """Scan ``data`` with the clamd at ``address`` on a new connection (no session).

    Connecting may take ``connect_timeout`` seconds; sending and the reply then ``scan_timeout``
    seconds; neither goes past ``deadline`` (a ``loop.time()`` value), which lets a caller that
    fails over between servers keep one overall budget. Raises :class:`ClamdUnavailable` when no
    connection could be made, :class:`ClamdFailed` when the scan gave no OK/FOUND answer.
    """
    loop = asyncio.get_running_loop()
    end = float("inf") if deadline is None else deadline
    with await _open(address, connect_timeout, end) as sock:
        scan_deadline = min(loop.time() + scan_timeout, end)
        raw = await _exchange(sock, _frames(data, chunk_size), scan_deadline, address)
    return parse_reply(raw, str(address))


class _Lost(ClamdFailed):
    """The connection broke before a complete reply; ``nothing_read``: not a byte came back."""

    def __init__(self, reason: str, detail: str, *, nothing_read: bool = True) -> None:
        super().__init__(reason, detail)
        self.nothing_read = nothing_read


@dataclass(slots=True)
class _Session:
    sock: socket.socket
    loop: asyncio.AbstractEventLoop
    requests: int = 0
    idle_since: float = 0.0


class ClamdPool:
    """IDSESSION connections to one clamd, each reused for one scan at a time.

    clamd closes a plain INSTREAM connection after its reply; inside an IDSESSION it keeps the
    connection for further commands and tags each reply with the request number (``3: stream:
    OK``). Reusing connections saves the connect and clamd's accept per scan: measured here it
    is worth +7 to +45 % scans/s and a quarter to a half of the client CPU for 5 KB mails, and
    nothing for 1 MB ones (docs/plugins/clamav.md).

    A connection goes back to the pool only after a well-formed OK or FOUND reply whose number is
    the one we expect; any error, timeout or cancellation closes it. An idle connection that clamd
    has closed meanwhile is noticed before use or, if it closes in the race, by the first send or
    read getting nothing at all; the scan then starts over once on a new connection (a scan is
    idempotent, and no reply was read, so no answer can be mistaken for another).
    """

    def __init__(self, address: ClamdAddress, *, max_idle: int = 8, max_age: float = 10.0) -> None:
        self.address = address
        self.max_idle = max_idle
        self.max_age = max_age
        """Seconds an idle connection is kept; clamd may drop idle sessions on its own."""
        self._idle: list[_Session] = []
        self._closed = False

    @property
    def idle(self) -> int:
        """How many connections wait in the pool."""
        return len(self._idle)

    async def scan(
        self,
        data: bytes,
        *,
        connect_timeout: float,
        scan_timeout: float,
        deadline: float | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> ScanResult:
        """Scan ``data``; the timeouts and errors are those of :func:`instream`."""
        loop = asyncio.get_running_loop()
        end = float("inf") if deadline is None else deadline
        session = self._take(loop)
        if session is not None:
            frames = _frames(data, chunk_size)
            try:
                return await self._request(session, frames, min(loop.time() + scan_timeout, end))
            except _Lost as exc:
                if not exc.nothing_read:
                    raise
                # clamd closed the idle session in the meantime: start over once, anew.
        session = _Session(await _open(self.address, connect_timeout, end), loop)
        frames = _frames(data, chunk_size, prefix=b"zIDSESSION\0")
        return await self._request(session, frames, min(loop.time() + scan_timeout, end))

    async def _request(
        self, session: _Session, frames: Iterable[bytes], deadline: float
    ) -> ScanResult:
        session.requests += 1
        try:
            raw = await _exchange(session.sock, frames, deadline, self.address)
            tag = f"{session.requests}: ".encode()
            if not raw.startswith(tag):
                # An untagged reply (clamd's "COMMAND READ TIMED OUT", say) or another request's
                # is never this message's result; only the size limit is worth reporting as such.
                if _SIZE_LIMIT.encode() in raw:
                    parse_reply(raw, str(self.address))  # raises "too large for scanner"
                raise ClamdFailed(
                    REASON_ERROR,
                    f"{self.address}: reply {raw[:80]!r} is not for request {session.requests}",
                )
            result = parse_reply(raw[len(tag) :], str(self.address))
        except BaseException:
            session.sock.close()
            raise
        self._give_back(session)
        return result

    def _take(self, loop: asyncio.AbstractEventLoop) -> _Session | None:
        """An idle session that still looks alive, or None."""
        while self._idle:
            session = self._idle.pop()  # the most recently used: the least likely to be stale
            if session.loop is loop and loop.time() - session.idle_since < self.max_age:
                try:
                    # Alive and quiet is the only good state: EOF or stray bytes mean "drop".
                    session.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return session
                except OSError:
                    pass
            session.sock.close()
        return None

    def _give_back(self, session: _Session) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            session.sock.close()
            return
        session.idle_since = session.loop.time()
        self._idle.append(session)

    def close(self) -> None:
        """Close the idle connections; those in use are closed when their scan ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().sock.close()


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Blocking helpers for filterhost_check_config, which is a plain (synchronous) setup hook that
# runs before the event loop starts.
# ---------------------------------------------------------------------------------------------


def _connect_blocking(address: ClamdAddress, timeout: float) -> socket.socket:
    if address.path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection((address.host, address.port), timeout=timeout)


def _read_blocking(sock: socket.socket) -> bytes:
    reply = b""
    while not reply.endswith(b"\0") and len(reply) < MAX_REPLY:
        part = sock.recv(4096)
        if not part:
            break
        reply += part
    return reply


def command(address: ClamdAddress, name: str, timeout: float) -> str:
    """Send ``z<name>`` (PING, VERSION, VERSIONCOMMANDS, STATS) and return the reply text.

    Raises OSError (including TimeoutError) when clamd cannot be reached or does not answer
    within ``timeout`` seconds (for the connect and again for the reply).
    """
    with _connect_blocking(address, timeout) as sock:
        sock.sendall(b"z" + name.encode("ascii") + b"\0")
        return _read_blocking(sock).rstrip(b"\0").decode("utf-8", "replace").strip()


def exceeds_stream_limit(address: ClamdAddress, size: int, timeout: float) -> bool | None:
    """Whether clamd would refuse an INSTREAM of ``size`` bytes, without sending them.

    clamd checks each chunk's declared length against what is left of StreamMaxLength before it
    reads the chunk. So we announce one chunk of ``size`` bytes and close our side: clamd answers
    ``INSTREAM size limit exceeded`` at once if the chunk is too large, and otherwise sees EOF and
    hangs up without a word. Returns None when the answer is neither.
    """
    with _connect_blocking(address, timeout) as sock:
        sock.sendall(b"zINSTREAM\0" + struct.pack("!L", size))
        sock.shutdown(socket.SHUT_WR)
        try:
            reply = _read_blocking(sock)
        except ConnectionResetError:
            reply = b""
    if _SIZE_LIMIT.encode() in reply:
        return True
    return False if not reply else None


def stream_max_length(address: ClamdAddress, upper: int, timeout: float) -> int | None:
    """The StreamMaxLength of the clamd at ``address`` if it is below ``upper``, else None.

    None also when the probe gets an answer it does not understand.

    A binary search with :func:`exceeds_stream_limit`, only when ``upper`` is refused: about 25
    tiny connections for 25 MiB.
    Each refused probe makes clamd log one "Size limit reached" warning.
    """
    if exceeds_stream_limit(address, upper, timeout) is not True:
        return None
    low, high = 0, upper  # low is accepted, high is refused
    while high - low > 1:
        mid = (low + high) // 2
        verdict = exceeds_stream_limit(address, mid, timeout)
        if verdict is None:
            return None
        if verdict:
            high = mid
        else:
            low = mid
    return low
