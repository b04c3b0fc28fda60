"""Start and stop the real components the tests talk to, all on loopback.

clamd, unbound and Postfix's smtp-sink are started through the shell scripts beside this
file, and the recording SMTP peer through ``peer.py``. Each runs in the foreground: the
script ``exec``s the server, so the Popen PID *is* the server's PID and ``stop()``
terminates and reaps exactly that process, then removes the service's temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import dns.asyncresolver
import dns.message
import dns.query

HERE = Path(__file__).resolve().parent
LOCALHOST = "127.0.0.1"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
STOP_TIMEOUT = 10.0

_M = TypeVar("_M")


def free_port(host: str = LOCALHOST, kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """Return a port that is free on ``host`` right now (IPv6 if ``host`` has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], bool],
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
    what: str = "service",
) -> float:
    """Poll ``check`` until it returns true; return the seconds it took.

    Any exception from ``check`` counts as "not yet" (connection refused, DNS timeout).
    Raises RuntimeError if ``proc`` exits first or the deadline passes.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with status {proc.returncode}")
        try:
            if check():
                return time.monotonic() - start
        except Exception:  # not ready yet, whatever the reason
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.1f}s")
        time.sleep(0.02)


class Service:
    """One server process with its own temp dir, stopped by its own PID."""

    def __init__(self, name: str) -> None:
        # As root the servers drop to clamav/nobody, so the dir must be reachable by
        # them: /tmp rather than a possibly private $TMPDIR, and mode 755.
        base = "/tmp" if os.geteuid() == 0 else None
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"filterhost-{name}.", dir=base))
        self.dir.chmod(0o755)
        self.log_path = self.dir / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup = 0.0  # seconds until ready
        self._log: IO[bytes] | None = None

    def start(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``argv`` with stdout and stderr going to the service's log file."""
        self._log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                list(argv),
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            self.stop()  # close the log, remove the dir
            raise

    def wait_ready(self, check: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``check`` passes; on failure stop the server and show its log."""
        try:
            self.startup = wait_until(check, timeout, self.proc, self.name)
        except BaseException as exc:
            log = self.log_text()
            self.stop()  # never leave a half-started server behind
            if isinstance(exc, RuntimeError):
                raise RuntimeError(f"{exc}; log:\n{log}") from None
            raise

    def log_text(self) -> str:
        """Return what the server wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate and reap the server (kill it if it ignores SIGTERM), remove the dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pid(self) -> int:
        """The server's PID."""
        assert self.proc is not None
        return self.proc.pid


def _script(name: str) -> list[str]:
    # via bash so that a checkout without exec bits still works
    return ["bash", str(HERE / name)]


def _smtp_greets(addr: str, port: int) -> bool:
    with socket.create_connection((addr, port), timeout=0.5) as s:
        return s.recv(512).startswith(b"220")


# ---------------------------------------------------------------- clamd


@dataclass
class Clamd:
    """A running clamd that knows only the EICAR test signatures."""

    host: str
    port: int
    socket_path: Path
    dir: Path
    service: Service

    def stop(self) -> None:
        """Stop clamd and remove its directory."""
        self.service.stop()


def _clamd_pongs(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1) as s:
        s.sendall(b"zPING\0")
        return s.recv(16) == b"PONG\0"


def start_clamd(stream_max: str = "2M") -> Clamd:
    """Start clamd on a free TCP port of 127.0.0.1 (and a unix socket in its dir).

    ``stream_max`` is clamd's StreamMaxLength: a larger INSTREAM makes clamd answer
    ``INSTREAM size limit exceeded. ERROR`` and close the connection.
    """
    port = free_port()
    svc = Service("clamd")
    svc.start(
        [*_script("clamd.sh"), str(port)],
        {"CLAMD_DIR": str(svc.dir), "CLAMD_STREAM_MAX": stream_max},
    )
    svc.wait_ready(lambda: _clamd_pongs(LOCALHOST, port))
    return Clamd(LOCALHOST, port, svc.dir / "clamd.sock", svc.dir, svc)


# ---------------------------------------------------------------- DNS


@dataclass
class Dns:
    """A running unbound serving the test zone (see unbound.sh for every record)."""

    host: str
    port: int
    service: Service

    @property
    def nameserver(self) -> str:
        """``ip:port``, as in filterhost's ``relay.nameservers``."""
        return f"{self.host}:{self.port}"

    def resolver(self, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
        """Return an async resolver that asks only this server."""
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [self.host]
        r.port = self.port
        r.lifetime = lifetime
        return r

    def stop(self) -> None:
        """Stop unbound and remove its directory."""
        self.service.stop()


def _unbound_line(item: str) -> str:
    if item.startswith(("local-data:", "local-data-ptr:", "local-zone:")):
        return item
    # single quotes keep the double quotes of TXT data intact
    quote = "'" if '"' in item else '"'
    return f"local-data: {quote}{item}{quote}"


def _udp_tcp_port(host: str) -> int:
    # unbound serves UDP and TCP on one port number, so both must be free.
    for _ in range(50):
        port = free_port(host, socket.SOCK_DGRAM)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free for both UDP and TCP")


def start_unbound(extra_data: Sequence[str] | None = None) -> Dns:
    """Start unbound on a free port of 127.0.0.1 with the test zone.

    ``extra_data`` adds records: either an RR (``'spf.test. 60 IN TXT "v=spf1 -all"'``)
    or a whole ``local-data:`` / ``local-data-ptr:`` / ``local-zone:`` line.
    """
    port = _udp_tcp_port(LOCALHOST)
    svc = Service("unbound")
    env = {"UNBOUND_DIR": str(svc.dir)}
    if extra_data:
        env["UNBOUND_EXTRA_DATA"] = "\n".join(_unbound_line(i) for i in extra_data)
    svc.start([*_script("unbound.sh"), str(port)], env)
    query = dns.message.make_query("mx.test", "MX")
    svc.wait_ready(lambda: bool(dns.query.udp(query, LOCALHOST, port=port, timeout=0.2).answer))
    return Dns(LOCALHOST, port, svc)


# ---------------------------------------------------------------- SMTP: smtp-sink


def _address(args: str) -> str:
    """``<a@b> SIZE=10`` -> ``a@b`` (``<>`` -> ``""``)."""
    first = args.split(" ", 1)[0]
    return first[1:-1] if first.startswith("<") and first.endswith(">") else first


@dataclass(frozen=True)
class SinkMessage:
    """One message as smtp-sink's ``-d`` option dumped it (checked with Postfix 3.7).

    The file is, with LF line endings throughout::

        X-Client-Addr: 127.0.0.1              (IPv6: "ipv6:::1")
        X-Client-Proto: ESMTP
        X-Helo-Args: client.example           (only if HELO/EHLO was sent)
        X-Mail-Args: <a@b.test> BODY=8BITMIME (everything after "MAIL FROM:")
        X-Rcpt-Args: <c@d.test>               (one per RCPT, in order)
        Received: from client.example ([127.0.0.1])
        <TAB>by sink-127.0.0.2 (smtp-sink) with ESMTP id 3225d381;
        <TAB>Sun, 29 Nov 2026 09:33:28 +0000 (UTC)
        <the message, dot-unstuffed, every line ended by LF>
        <one empty line>

    smtp-sink turns each CRLF into LF, turns a bare LF into LF as well, and deletes
    every CR (also a bare CR inside a line). NUL bytes, long lines and trailing blanks
    are kept. ``data`` undoes this by dropping the added empty line and turning each
    LF back into CRLF, so it equals the wire bytes exactly when the message used CRLF
    only (all a conforming relay sends). A bare CR or bare LF sent by the relay cannot
    be seen here: use the recording peer (``peer.py``), which keeps the exact bytes.
    The file is also written for a message that was then refused at "." (``-r .``).
    """

    path: Path
    raw: bytes
    client_addr: str
    helo: str | None
    mail_args: str
    rcpt_args: list[str]
    data: bytes

    @property
    def mail_from(self) -> str:
        """The envelope sender without angle brackets (``""`` for the null sender)."""
        return _address(self.mail_args)

    @property
    def rcpt_tos(self) -> list[str]:
        """The envelope recipients without angle brackets, in RCPT order."""
        return [_address(a) for a in self.rcpt_args]

    @classmethod
    def parse(cls, raw: bytes, path: Path) -> SinkMessage:
        """Split a dump file into smtp-sink's own lines and the message."""
        fields: dict[str, str] = {}
        rcpts: list[str] = []
        pos = 0
        while True:
            end = raw.find(b"\n", pos)
            if end < 0:
                raise ValueError(f"{path}: no Received: line from smtp-sink")
            name, _, value = raw[pos:end].decode("utf-8", "surrogateescape").partition(":")
            pos = end + 1
            value = value.removeprefix(" ")
            if name == "Received":
                for _ in range(2):  # its two continuation lines
                    end = raw.find(b"\n", pos)
                    if end < 0 or raw[pos : pos + 1] != b"\t":
                        raise ValueError(f"{path}: malformed smtp-sink Received: header")
                    pos = end + 1
                break
            if name == "X-Rcpt-Args":
                rcpts.append(value)
            elif name in {"X-Client-Addr", "X-Client-Proto", "X-Helo-Args", "X-Mail-Args"}:
                fields[name] = value
            else:
                raise ValueError(f"{path}: unexpected smtp-sink line {name!r}")
        body = raw[pos:]
        if not body.endswith(b"\n"):
            raise ValueError(f"{path}: incomplete dump (no final empty line)")
        return cls(
            path=path,
            raw=raw,
            client_addr=fields.get("X-Client-Addr", ""),
            helo=fields.get("X-Helo-Args"),
            mail_args=fields.get("X-Mail-Args", ""),
            rcpt_args=rcpts,
            data=body[:-1].replace(b"\n", b"\r\n"),
        )


def _open_files(pid: int) -> set[str]:
    """Paths the process has open (empty if it is gone)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return set()
    paths = set()
    for fd in fds:
        try:
            paths.add(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
    return paths


def _wait_for(get: Callable[[], list[_M]], n: int, timeout: float, what: str) -> list[_M]:
    # unlike wait_until, errors propagate: a dump that does not parse is a real failure
    deadline = time.monotonic() + timeout
    while True:
        found = get()
        if len(found) >= n:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: {len(found)} message(s) after {timeout}s, want {n}")
        time.sleep(0.02)


@dataclass
class Sink:
    """A running smtp-sink on ``addr:port`` that dumps each transaction to ``maildir``."""

    addr: str
    port: int
    maildir: Path
    service: Service

    def messages(self) -> list[SinkMessage]:
        """The completely received messages, oldest first."""
        # A dump file exists from MAIL on and is complete once smtp-sink has closed
        # it; list the files before the open descriptors so none is caught half-written.
        files = [p for p in self.maildir.iterdir() if p.is_file()]
        busy = _open_files(self.service.pid)
        done = []
        for p in files:
            if str(p) in busy:
                continue
            try:
                done.append((p.stat().st_mtime_ns, p.name, p.read_bytes(), p))
            except FileNotFoundError:  # RSET or abort removed it
                continue
        return [SinkMessage.parse(raw, p) for _, _, raw, p in sorted(done)]

    def wait_for_count(self, n: int, timeout: float = 10.0) -> list[SinkMessage]:
        """Wait until at least ``n`` messages are complete; return all of them."""
        return _wait_for(self.messages, n, timeout, f"smtp-sink {self.addr}:{self.port}")

    def stop(self) -> None:
        """Stop smtp-sink and remove its directory (and the messages)."""
        self.service.stop()


def _listen(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def start_sink(addr: str, port: int, *options: str) -> Sink:
    """Start smtp-sink on ``addr:port`` (IPv6 addresses without brackets).

    ``options`` are smtp-sink options, e.g. ``"-r", "RCPT"`` (450 to every RCPT),
    ``"-f", "RCPT"`` (500), ``"-Q", "MAIL"`` (421 and hang up), ``"-r", "."``, ``"-w", "5"``.
    smtp-sink cannot answer per recipient: use ``start_recording_peer`` for that.
    """
    svc = Service("smtp-sink")
    svc.start([*_script("smtp-sink.sh"), _listen(addr, port), *options], {"SINK_DIR": str(svc.dir)})
    svc.wait_ready(lambda: _smtp_greets(addr, port))
    return Sink(addr, port, svc.dir / "mail", svc)


# ---------------------------------------------------------------- SMTP: recording peer

DEFAULT_REPLIES: dict[str, tuple[int, str]] = {
    "defer": (450, "4.2.0 try later"),
    "reject": (550, "5.1.1 no such user"),
}


@dataclass(frozen=True)
class PeerMessage:
    """One message received by ``peer.py``: the envelope and the exact DATA bytes.

    ``data`` is the message as sent, after dot-unstuffing only: CRLF, bare CR and
    bare LF are kept as they came. ``rcpt_tos`` holds the accepted recipients only.
    """

    path: Path
    helo: str | None
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[str]
    data: bytes
    tls: str | None = None
    """The TLS version of the session (``"TLSv1.3"``), or None when it was plain."""
    auth: str | None = None
    """The user that authenticated, or None."""


@dataclass(frozen=True)
class RcptAttempt:
    """One RCPT command the peer answered, accepted or not."""

    address: str
    code: int


@dataclass
class Peer:
    """A running recording SMTP peer (aiosmtpd) that answers per recipient."""

    addr: str
    port: int
    maildir: Path
    service: Service
    replies: dict[str, tuple[int, str]] = field(default_factory=dict)

    def messages(self) -> list[PeerMessage]:
        """The received messages, oldest first."""
        # peer.py writes NNNNNN.eml, then renames NNNNNN.json into place last.
        out = []
        for meta_path in sorted(self.maildir.glob("*.json")):
            meta = json.loads(meta_path.read_text())
            out.append(
                PeerMessage(
                    path=meta_path.with_suffix(".eml"),
                    helo=meta["helo"],
                    mail_from=meta["mail_from"],
                    mail_options=meta["mail_options"],
                    rcpt_tos=meta["rcpt_tos"],
                    rcpt_options=meta["rcpt_options"],
                    data=meta_path.with_suffix(".eml").read_bytes(),
                    tls=meta.get("tls"),
                    auth=meta.get("auth"),
                )
            )
        return out

    def rcpt_attempts(self) -> list[RcptAttempt]:
        """Every RCPT the peer answered so far, in order, with the code it gave."""
        log = self.maildir / "rcpt.jsonl"
        if not log.exists():
            return []
        lines = log.read_text().splitlines()
        # a line without its newline is still being written
        return [RcptAttempt(**json.loads(line)) for line in lines if line.endswith("}")]

    def wait_for_count(self, n: int, timeout: float = 10.0) -> list[PeerMessage]:
        """Wait until at least ``n`` messages arrived; return all of them."""
        return _wait_for(self.messages, n, timeout, f"peer {self.addr}:{self.port}")

    def stop(self) -> None:
        """Stop the peer and remove its directory (and the messages)."""
        self.service.stop()


def start_recording_peer(
    addr: str,
    port: int,
    replies: Mapping[str, tuple[int, str]] | None = None,
    *,
    tls: Cert | None = None,
    implicit_tls: bool = False,
    auth: str | None = None,
) -> Peer:
    """Start ``peer.py`` on ``addr:port``.

    ``replies`` maps a recipient local-part prefix to the RCPT reply for it (first
    match wins); any other recipient gets 250. ``None`` means ``DEFAULT_REPLIES``:
    ``defer...@`` gets ``450 4.2.0 try later``, ``reject...@`` ``550 5.1.1 no such user``.
    ``tls`` offers STARTTLS with that certificate (or, with ``implicit_tls``, speaks TLS from
    the start, as on port 465); ``auth="user:password"`` requires AUTH over TLS.
    """
    rules = dict(DEFAULT_REPLIES if replies is None else replies)
    svc = Service("peer")
    maildir = svc.dir / "mail"
    argv = [sys.executable, str(HERE / "peer.py"), "--dir", str(maildir)]
    argv += ["--replies", json.dumps(rules)]
    if tls is not None:
        argv += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        if implicit_tls:
            argv.append("--implicit-tls")
    if auth is not None:
        argv += ["--auth", auth]
    svc.start([*argv, addr, str(port)])
    if implicit_tls:
        svc.wait_ready(lambda: socket.create_connection((addr, port), timeout=0.5).close() is None)
    else:
        svc.wait_ready(lambda: _smtp_greets(addr, port))
    return Peer(addr, port, maildir, svc, rules)


@dataclass(frozen=True)
class Cert:
    """A self-signed certificate (its own CA: give ``cert`` as the CA file to verify it)."""

    cert: Path
    key: Path


def make_cert(directory: Path, name: str, ips: Sequence[str] = ()) -> Cert:
    """A fresh self-signed certificate for DNS name ``name`` (and ``ips``), made by openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    san = ",".join([f"DNS:{name}", *(f"IP:{ip}" for ip in ips)])
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName={san}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return Cert(cert, key)
