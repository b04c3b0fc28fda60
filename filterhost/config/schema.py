"""The core configuration (DESIGN.md section 4): one frozen dataclass per table.

Keys, types and defaults live here and nowhere else; ``help`` metadata is what the README and
``--check-config`` say about a key.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from filterhost.config.typed import SectionError
from filterhost.durations import Duration

__all__ = [
    "HostPort",
    "MetricsSection",
    "PluginsSection",
    "RelaySection",
    "ServerSection",
    "SpoolSection",
    "parse_host_port",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TlsPolicy = Literal["none", "may", "encrypt", "verify"]


@dataclass(frozen=True, slots=True)
class HostPort:
    """A ``host:port`` pair (IPv6 literals in brackets: ``[::1]:25``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@functools.lru_cache(maxsize=256)  # pure, and asked for the smart host once per message
def parse_host_port(text: str, default_port: int | None = None) -> HostPort:
    """Parse ``host:port``, ``[v6]:port`` (or a bare host when ``default_port`` is given)."""
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError(f'{text!r}: write IPv6 addresses in brackets, as "[::1]:25"')
    if not host:
        raise ValueError(f"{text!r}: no host")
    if not port_text:
        if default_port is None:
            raise ValueError(f'{text!r}: expected "host:port", such as "127.0.0.1:2525"')
        return HostPort(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    return HostPort(host, int(port_text))


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True)
class ServerSection:
    """``[server]``: the SMTP front end and who may relay."""

    listen: list[str] = field(
        default_factory=lambda: ["127.0.0.1:2525"], metadata=_help("addresses to listen on")
    )
    hostname: str = field(default="", metadata=_help("banner and Received name; default FQDN"))
    mynetworks: list[str] = field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        metadata=_help("client networks that may relay to any domain"),
    )
    relay_domains: list[str] = field(
        default_factory=list, metadata=_help("domains anyone may send to (inbound)")
    )
    max_message_size: int = field(default=26_214_400, metadata=_help("bytes; advertised as SIZE"))
    max_recipients: int = field(default=1000, metadata=_help("recipients per message"))
    max_hops: int = field(default=50, metadata=_help("Received headers before 554 5.4.6"))
    # -- TLS and AUTH (issue 6) --
    tls_cert: str = field(
        default="", metadata=_help("PEM certificate (chain) file; enables STARTTLS; empty: no TLS")
    )
    tls_key: str = field(default="", metadata=_help("PEM private key file of tls_cert"))
    tls_listen: list[str] = field(
        default_factory=list,
        metadata=_help('implicit-TLS listeners ("host:port", such as port 465); need tls_cert'),
    )
    require_tls: bool | list[str] = field(
        default=False,
        metadata=_help(
            "refuse mail before STARTTLS: true (every listen address), or a list of "
            "listen addresses"
        ),
    )
    auth_file: str = field(
        default="",
        metadata=_help(
            'AUTH PLAIN/LOGIN users, "user:argon2-hash" lines (filterhost passwd); '
            "empty: no AUTH. Offered over TLS only"
        ),
    )
    auth_max_failures: int = field(
        default=5,
        metadata=_help(
            "failed AUTH attempts per client address (IPv6: per /64) within "
            "auth_failure_window; the last gets 421 4.7.0, later ones 454 4.7.0"
        ),
    )
    auth_failure_window: Duration = field(
        default=Duration(900),
        metadata=_help("failures older than this no longer count against a client"),
    )
    # -- line endings and limits (issue 6) --
    line_endings: Literal["reject", "normalize"] = field(
        default="reject",
        metadata=_help('bare CR or LF in a message: "reject" (554 5.6.0) or "normalize" (to CRLF)'),
    )
    max_connections: int = field(
        default=100, metadata=_help("sessions at once; past it 421 4.7.0 and close")
    )
    max_connections_per_client: int = field(
        default=50, metadata=_help("sessions at once from one client address; then 421 4.7.0")
    )
    max_messages_per_session: int = field(
        default=1000, metadata=_help("messages in one session; then 421 4.7.0 and close")
    )
    max_errors_per_session: int = field(
        default=20, metadata=_help("4xx/5xx replies in one session; then 421 4.7.0 and close")
    )
    max_unknown_commands: int = field(
        default=5, metadata=_help("unrecognised commands in one session; then 421 and close")
    )
    max_junk_commands: int = field(
        default=100,
        metadata=_help("NOOP, RSET, VRFY, HELP in one session (they reset the idle timer)"),
    )
    max_header_size: int = field(
        default=102_400, metadata=_help("bytes of message header; past it 552 5.3.4")
    )
    idle_timeout: Duration = field(
        default=Duration(300),
        metadata=_help("wait for a command or for DATA bytes this long, then 421 4.4.2"),
    )
    data_timeout: Duration = field(
        default=Duration(600),
        metadata=_help("most time to receive one message's DATA, however it trickles in"),
    )
    # -- processes (issue 7) --
    event_loop: Literal["uvloop", "asyncio"] = field(
        default="uvloop",
        metadata=_help("the event loop: uvloop (libuv, faster) or Python's own asyncio loop"),
    )
    workers: int = field(
        default=1,
        metadata=_help(
            "processes serving the same ports (SO_REUSEPORT), each with its own queue runner; "
            "more than 1 uses more cores"
        ),
    )

    def __post_init__(self) -> None:
        if self.hostname and (len(self.hostname) > 253 or not _HOSTNAME.match(self.hostname)):
            raise SectionError(
                "hostname",
                f'{self.hostname!r} is not a host name such as "relay.example.net" '
                "(letters, digits, '-' and dots)",
            )
        for item in self.listen:
            try:
                parse_host_port(item)
            except ValueError as exc:
                raise SectionError("listen", str(exc)) from None
        if not self.listen:
            raise SectionError("listen", 'at least one "host:port" is needed')
        for net in self.mynetworks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise SectionError(
                    "mynetworks", f'{net!r} is not a network such as "10.0.0.0/8"'
                ) from None
        for name, value in (
            ("max_message_size", self.max_message_size),
            ("max_recipients", self.max_recipients),
            ("max_hops", self.max_hops),
            ("auth_max_failures", self.auth_max_failures),
            ("max_connections", self.max_connections),
            ("max_connections_per_client", self.max_connections_per_client),
            ("max_messages_per_session", self.max_messages_per_session),
            ("max_errors_per_session", self.max_errors_per_session),
            ("max_unknown_commands", self.max_unknown_commands),
            ("max_junk_commands", self.max_junk_commands),
            ("max_header_size", self.max_header_size),
            ("workers", self.workers),
        ):
            if value < 1:
                raise SectionError(name, f"must be at least 1, got {value}")
        for name, seconds in (
            ("idle_timeout", self.idle_timeout),
            ("data_timeout", self.data_timeout),
            ("auth_failure_window", self.auth_failure_window),
        ):
            if seconds <= 0:
                raise SectionError(name, 'must be more than 0, such as "5m"')
        self._check_tls()

    def _check_tls(self) -> None:
        """TLS and AUTH keys that only make sense together."""
        for item in self.tls_listen:
            try:
                parse_host_port(item)
            except ValueError as exc:
                raise SectionError("tls_listen", str(exc)) from None
        both = set(self.listen) & set(self.tls_listen)
        if both:
            raise SectionError("tls_listen", f"{sorted(both)[0]} is also in listen")
        if bool(self.tls_cert) != bool(self.tls_key):
            missing = "tls_key" if self.tls_cert else "tls_cert"
            raise SectionError(missing, "tls_cert and tls_key go together: set both or neither")
        needs_tls = [
            ("tls_listen", bool(self.tls_listen)),
            ("require_tls", bool(self.require_tls)),
            ("auth_file", bool(self.auth_file)),
        ]
        for name, used in needs_tls:
            if used and not self.tls_cert:
                raise SectionError(name, "needs a certificate: set tls_cert and tls_key")
        if isinstance(self.require_tls, list):
            for item in self.require_tls:
                if item not in self.listen:
                    raise SectionError(
                        "require_tls", f"{item!r} is not one of the listen addresses"
                    )

    @property
    def networks(self) -> list[IPNetwork]:
        """``mynetworks`` parsed."""
        return [ipaddress.ip_network(n, strict=False) for n in self.mynetworks]

    @property
    def listen_addresses(self) -> list[HostPort]:
        """``listen`` parsed."""
        return [parse_host_port(item) for item in self.listen]

    @property
    def tls_listen_addresses(self) -> list[HostPort]:
        """``tls_listen`` parsed."""
        return [parse_host_port(item) for item in self.tls_listen]

    def requires_tls(self, listen: str) -> bool:
        """Whether the plain listener ``listen`` (an item of ``listen``) requires STARTTLS."""
        if isinstance(self.require_tls, bool):
            return self.require_tls
        return listen in self.require_tls


@dataclass(frozen=True, slots=True)
class SpoolSection:
    """``[spool]``: where accepted messages are kept until delivered."""

    directory: str = field(
        default="var/spool", metadata=_help("spool directory; relative paths: from the cwd")
    )
    journal: bool = field(
        default=True,
        metadata=_help(
            "new messages are appended to a journal (one fdatasync per batch) and move to "
            "files of their own only if they must wait; false: files from the start"
        ),
    )

    def __post_init__(self) -> None:
        if not self.directory.strip():
            raise SectionError("directory", 'give a directory, such as "/var/spool/filterhost"')
        if "\0" in self.directory:
            raise SectionError("directory", "a path cannot contain a NUL character")


@dataclass(frozen=True, slots=True)
class RelaySection:
    """``[relay]``: how messages leave."""

    mode: Literal["mx", "smarthost"] = field(
        default="mx", metadata=_help('"mx": each domain\'s MX; "smarthost": all to one host')
    )
    smarthost: str = field(default="", metadata=_help('"host:port" for mode = "smarthost"'))
    mx_port: int = field(default=25, metadata=_help("port used for MX hosts"))
    nameservers: list[str] = field(
        default_factory=list, metadata=_help('"ip" or "ip:port"; empty: the system resolver')
    )
    retry_schedule: list[Duration] = field(
        default_factory=lambda: [Duration.parse(d) for d in ("5m", "10m", "20m", "40m", "66m")],
        metadata=_help("waits between attempts; the last one repeats"),
    )
    max_queue_lifetime: Duration = field(
        default=Duration(5 * 86400), metadata=_help("then undelivered recipients bounce")
    )
    delay_warning: Duration = field(
        default=Duration(0),
        metadata=_help("tell the sender when mail is still queued after this long; 0: never"),
    )
    concurrency: int = field(default=100, metadata=_help("delivery attempts in flight at once"))
    destination_concurrency: int = field(
        default=20, metadata=_help("connections to one next hop at once")
    )
    destination_recipients: int = field(
        default=50, metadata=_help("recipients per SMTP transaction to one next hop")
    )
    connect_timeout: Duration = field(
        default=Duration(30), metadata=_help("time to connect and get the greeting")
    )
    smtp_timeout: Duration = field(
        default=Duration(300), metadata=_help("time for each SMTP command's reply")
    )
    connection_reuse_time: Duration = field(
        default=Duration(5), metadata=_help("keep an idle connection to a next hop this long")
    )
    delivery_process: bool = field(
        default=False,
        metadata=_help("make delivery attempts in a process of their own (a second core)"),
    )
    tls_policy: TlsPolicy = field(
        default="may", metadata=_help("STARTTLS for MX delivery: none, may, encrypt or verify")
    )
    tls_policies: dict[str, TlsPolicy] = field(
        default_factory=dict,
        metadata=_help('per destination domain (or ".domain" for subdomains) TLS policy'),
    )
    smarthost_tls_policy: TlsPolicy = field(
        default="verify", metadata=_help("TLS for the smart host: none, may, encrypt, verify")
    )
    smarthost_tls: Literal["starttls", "implicit"] = field(
        default="starttls", metadata=_help('"implicit" for a smart host on port 465')
    )
    smarthost_auth_file: str = field(
        default="", metadata=_help('file with "user:password" for smart host AUTH; empty: none')
    )
    tls_ca_file: str = field(
        default="", metadata=_help("CA certificates for verify; empty: the system's")
    )
    bounce_original_max: int = field(
        default=100_000, metadata=_help("bytes of the original included in a bounce")
    )

    def __post_init__(self) -> None:
        if self.mode == "smarthost" and not self.smarthost:
            raise SectionError("smarthost", 'mode = "smarthost" needs smarthost = "host:port"')
        if self.smarthost:
            try:
                parse_host_port(self.smarthost, default_port=25)
            except ValueError as exc:
                raise SectionError("smarthost", str(exc)) from None
        if not 0 < self.mx_port < 65536:
            raise SectionError("mx_port", f"must be from 1 to 65535, got {self.mx_port}")
        for ns in self.nameservers:
            try:
                ipaddress.ip_address(parse_host_port(ns, default_port=53).host)
            except ValueError:
                raise SectionError(
                    "nameservers",
                    f'{ns!r} must be an IP address ("127.0.0.1" or "127.0.0.1:5353"), not a name',
                ) from None
        for name in ("concurrency", "destination_concurrency", "destination_recipients"):
            if getattr(self, name) < 1:
                raise SectionError(name, f"must be at least 1, got {getattr(self, name)}")
        for key in self.tls_policies:
            if not key or "@" in key:
                raise SectionError(
                    "tls_policies", f'{key!r}: keys are domains, such as "example.com"'
                )
        if not self.retry_schedule:
            raise SectionError("retry_schedule", 'give at least one interval, such as ["5m"]')

    @property
    def smarthost_address(self) -> HostPort:
        """``smarthost`` parsed (port 25 when none is given)."""
        return parse_host_port(self.smarthost, default_port=25)

    @property
    def nameserver_addresses(self) -> list[HostPort]:
        """``nameservers`` parsed (port 53 when none is given)."""
        return [parse_host_port(ns, default_port=53) for ns in self.nameservers]


@dataclass(frozen=True, slots=True)
class PluginsSection:
    """``[plugins]``: the chain. Each plugin's own settings are in ``[plugins.NAME]``."""

    order: list[str] = field(
        default_factory=list, metadata=_help("installed plugins, in the order they run")
    )


@dataclass(frozen=True, slots=True)
class MetricsSection:
    """``[metrics]``: the Prometheus and health endpoint (off unless ``listen`` is set)."""

    listen: str = field(
        default="",
        metadata=_help(
            'loopback "host:port" serving /metrics (Prometheus) and /health, such as '
            '"127.0.0.1:9125"; empty: off'
        ),
    )
    stuck_after: Duration = field(
        default=Duration(600),
        metadata=_help(
            "/health fails (503) when queued work has been due this long without the queue "
            "runner starting it"
        ),
    )

    def __post_init__(self) -> None:
        if self.listen:
            try:
                address = parse_host_port(self.listen)
            except ValueError as exc:
                raise SectionError("listen", str(exc)) from None
            try:
                loopback = ipaddress.ip_address(address.host).is_loopback
            except ValueError:
                loopback = address.host == "localhost"
            if not loopback:
                # The endpoint has no authentication: metrics name next hops and plugins.
                raise SectionError(
                    "listen",
                    f"{self.listen!r}: metrics are served on a loopback address only, such as "
                    '"127.0.0.1:9125" (put a reverse proxy in front to expose them)',
                )
        if self.stuck_after <= 0:
            raise SectionError("stuck_after", 'must be more than 0, such as "10m"')
