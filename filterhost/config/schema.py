"""The core configuration (DESIGN.md section 4): one frozen dataclass per table.

Keys, types and defaults live here and nowhere else; ``help`` metadata is what the README and
``--check-config`` say about a key.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from filterhost.config.typed import SectionError
from filterhost.durations import Duration

__all__ = [
    "HostPort",
    "PluginsSection",
    "RelaySection",
    "ServerSection",
    "SpoolSection",
    "parse_host_port",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class HostPort:
    """A ``host:port`` pair (IPv6 literals in brackets: ``[::1]:25``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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
        ):
            if value < 1:
                raise SectionError(name, f"must be at least 1, got {value}")

    @property
    def networks(self) -> list[IPNetwork]:
        """``mynetworks`` parsed."""
        return [ipaddress.ip_network(n, strict=False) for n in self.mynetworks]

    @property
    def listen_addresses(self) -> list[HostPort]:
        """``listen`` parsed."""
        return [parse_host_port(item) for item in self.listen]


@dataclass(frozen=True, slots=True)
class SpoolSection:
    """``[spool]``: where accepted messages are kept until delivered."""

    directory: str = field(
        default="var/spool", metadata=_help("spool directory; relative paths: from the cwd")
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
