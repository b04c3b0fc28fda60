"""The objects hooks receive: the session (per connection), the transaction (per message), routes.

Lifetimes are explicit, as in aiosmtpd and Haraka: a :class:`Session` lives as long as the client's
connection, a :class:`Transaction` from MAIL FROM to the end of DATA (and, once spooled, until its
last recipient is delivered or bounced). Each has ``notes``, a dict that plugins share for that
lifetime; key notes by your plugin's name to avoid collisions.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

from filterhost.message import Message
from filterhost.verdict import Reply, Verdict

__all__ = ["PluginResult", "Route", "RouteKind", "Session", "Transaction"]


@dataclass(slots=True)
class Session:
    """One client connection."""

    id: str
    """Session id used in the logs."""
    client_ip: str
    """The client's address, as a string (``"127.0.0.1"``, ``"::1"``)."""
    client_port: int = 0
    helo: str | None = None
    """The name the client gave in HELO/EHLO, once it has."""
    esmtp: bool = False
    """True when the client greeted with EHLO."""
    authenticated_as: str | None = None
    """The user name after a successful AUTH, else None."""
    tls: bool = False
    """True once the session is encrypted."""
    trusted: bool = False
    """True when the client may relay anywhere (its address is in ``mynetworks``, or AUTH)."""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The client's address as an :mod:`ipaddress` object."""
        return ipaddress.ip_address(self.client_ip)


@dataclass(frozen=True, slots=True)
class PluginResult:
    """What one plugin did with one message: its verdict (None: continue) and how long it took."""

    plugin: str
    hook: str
    verdict: Verdict | None
    seconds: float
    error: str | None = None


@dataclass(slots=True)
class Transaction:
    """One message: envelope, content, and what the chain decided.

    ``mail_from`` is the envelope sender without angle brackets (``""`` for the null sender).
    ``recipients`` may be edited by message-phase plugins (add or remove envelope recipients).
    """

    session: Session
    mail_from: str
    recipients: list[str]
    message: Message
    mail_options: list[str] = field(default_factory=list)
    queue_id: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    results: list[PluginResult] = field(default_factory=list)


RouteKind = Literal["mx", "host", "smarthost", "hold", "discard", "reject"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where a recipient goes next.

    Build routes with the constructors: ``Route.mx("example.com")`` (the domain's MX hosts),
    ``Route.host("10.0.0.5", 25)``, ``Route.smarthost()``, ``Route.hold()``,
    ``Route.discard()`` and ``Route.reject("5.7.1", "Not routed")``.
    """

    kind: RouteKind
    domain: str = ""
    hostname: str = ""
    port: int = 0
    reply: Reply | None = None

    @classmethod
    def mx(cls, domain: str) -> Route:
        """Deliver to the MX hosts of ``domain`` (an implicit MX when there is none)."""
        return cls("mx", domain=domain.lower().rstrip("."))

    @classmethod
    def host(cls, host: str, port: int = 25) -> Route:
        """Deliver to ``host:port`` (a name is looked up as an A/AAAA record, not as MX)."""
        return cls("host", hostname=host, port=port)

    @classmethod
    def smarthost(cls) -> Route:
        """Deliver through the configured ``relay.smarthost``."""
        return cls("smarthost")

    @classmethod
    def hold(cls) -> Route:
        """Keep the recipient queued, undelivered, until an operator releases it."""
        return cls("hold")

    @classmethod
    def discard(cls) -> Route:
        """Drop the recipient silently (logged)."""
        return cls("discard")

    @classmethod
    def reject(cls, status: str, text: str) -> Route:
        """Bounce the recipient with a 5xx ``status`` and ``text``."""
        return cls("reject", reply=Reply(550, status, text))

    @property
    def next_hop(self) -> str:
        """A key naming the next hop; recipients with the same key travel together."""
        if self.kind == "mx":
            return f"mx:{self.domain}"
        if self.kind == "host":
            return f"host:{self.hostname}:{self.port}"
        return self.kind
