"""A raw SMTP client for byte-exact tests: what is sent is exactly what the test wrote.

smtplib and aiosmtplib normalise line endings and refuse odd input; this client does neither.
It can bind to another loopback address (127.0.0.2, ...) to be an untrusted client, and can
switch to TLS after STARTTLS or from the start (implicit TLS).
"""

from __future__ import annotations

import re
import socket
import ssl

__all__ = ["Raw", "client_tls", "has_status"]

_STATUS = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3} ")


def has_status(reply: bytes) -> bool:
    """True when every line of ``reply`` carries an RFC 3463 enhanced status code."""
    return all(_STATUS.match(line + b" ") for line in reply.split(b"\r\n"))


def client_tls() -> ssl.SSLContext:
    """A client context that does not verify (the tests' certificates are self-signed)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Raw:
    """Send bytes, read reply lines."""

    def __init__(
        self,
        port: int,
        *,
        source: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.timeout = timeout
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="relay.test")
        self.buf = b""

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send exactly ``data``."""
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; unread: {self.buf!r}")
        self.buf += chunk

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply, lines joined by CRLF."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def cmd(self, line: bytes) -> bytes:
        """Send one command line (CRLF added) and return its reply."""
        self.send(line + b"\r\n")
        return self.reply()

    def greet(self, name: bytes = b"client.test") -> bytes:
        """Read the greeting and say EHLO; returns the EHLO reply."""
        greeting = self.reply()
        assert greeting.startswith(b"220 "), greeting
        reply = self.cmd(b"EHLO " + name)
        assert reply.startswith(b"250"), reply
        return reply

    def starttls(self, context: ssl.SSLContext | None = None) -> None:
        """STARTTLS, then the handshake; nothing the server sent before may be left unread."""
        reply = self.cmd(b"STARTTLS")
        assert reply.startswith(b"220 2.0.0"), reply
        self.wrap_tls(context)

    def wrap_tls(self, context: ssl.SSLContext | None = None) -> None:
        """The TLS handshake (after a 220 to STARTTLS); no plaintext may be left unread."""
        assert self.buf == b"", self.buf
        self.sock = (context or client_tls()).wrap_socket(self.sock, server_hostname="relay.test")

    def pending(self, wait: float = 0.5) -> bytes:
        """Whatever else the server sends within ``wait`` seconds (nothing, we hope)."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            data = b""
        finally:
            self.sock.settimeout(self.timeout)
        return self.buf + data

    def closed(self, wait: float = 5.0) -> bytes:
        """Read until the server closes the connection; returns what came before the close.

        Raises TimeoutError when the connection is still open after ``wait`` seconds.
        """
        self.sock.settimeout(wait)
        data = self.buf
        try:
            while True:
                try:
                    chunk = self.sock.recv(65536)
                except (ConnectionResetError, ssl.SSLEOFError):
                    break
                if not chunk:
                    break
                data += chunk
        finally:
            self.buf = b""
            self.sock.settimeout(self.timeout)
        return data
