"""The objects hooks receive: the session (per connection), the transaction (per message), routes.

Lifetimes are explicit, as in aiosmtpd and Haraka: a :class:`Session` lives as long as the client's
connection, a :class:`Transaction` from MAIL FROM to the end of DATA (and, once spooled, until its
last recipient is delivered or bounced). Each has ``notes``, a dict that plugins share for that
lifetime; key notes by your plugin's name to avoid collisions.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from filterhost.message import HeaderEdit, Message
from filterhost.verdict import Reply, Verdict

__all__ = [
    "EnvelopeEdit",
    "PluginResult",
    "Route",
    "RouteKind",
    "Session",
    "Transaction",
    "envelope_edits",
]

# RFC 5321 4.5.3.1.3: a path is at most 256 octets with its angle brackets.
_MAX_ADDRESS = 254


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
    """Shared by the plugins for the life of the connection; key them by your plugin's name."""

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The client's address as an :mod:`ipaddress` object."""
        return ipaddress.ip_address(self.client_ip)


@dataclass(frozen=True, slots=True)
class EnvelopeEdit:
    """One envelope change a message-phase plugin made, recorded for the trace.

    ``op`` is ``"sender"`` (``mail_from`` became ``address``), ``"add_recipient"`` or
    ``"remove_recipient"``.
    """

    op: Literal["sender", "add_recipient", "remove_recipient"]
    address: str


@dataclass(frozen=True, slots=True)
class PluginResult:
    """One plugin's part in the trace: what it returned, what it changed, how long it took.

    ``verdict`` is None when the plugin let the chain go on. ``error`` says what went wrong when
    the plugin raised, timed out or returned something invalid (its ``on_error`` policy then
    gave ``verdict``). ``header_edits`` and ``envelope_edits`` are the changes this plugin made
    (message hook); ``route`` is its answer to the route hook.
    """

    plugin: str
    hook: str
    verdict: Verdict | None
    seconds: float
    error: str | None = None
    header_edits: tuple[HeaderEdit, ...] = ()
    envelope_edits: tuple[EnvelopeEdit, ...] = ()
    route: Route | None = None


def _address_problem(address: object, *, null_ok: bool) -> str | None:
    """Why ``address`` cannot be an envelope address, or None when it can."""
    if not isinstance(address, str):
        return f"{address!r} is not a string"
    if address == "" and null_ok:
        return None
    if len(address) > _MAX_ADDRESS:
        return f"{address[:40]!r}... is longer than {_MAX_ADDRESS} characters"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 or c in "<>" for c in address):
        return f"{address!r} contains white space, a control character or angle brackets"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return f"{address!r} is not of the form local@domain"
    return None


@dataclass(slots=True)
class Transaction:
    """One message: envelope, content, notes, and what the chain did with it.

    Message-phase plugins (:func:`~filterhost.hookspecs.filterhost_message`) may change the
    envelope: assign ``mail_from``, or use :meth:`add_recipient` / :meth:`remove_recipient` (or
    edit the ``recipients`` list directly). The runner checks the changed addresses after each
    plugin and records them for the trace (:class:`EnvelopeEdit`); a plugin that leaves an
    invalid envelope fails as if it had raised.
    """

    session: Session
    """The client's connection (in the queue runner: a stand-in with its address and HELO)."""
    mail_from: str
    """The envelope sender without angle brackets; ``""`` is the null sender."""
    recipients: list[str]
    """The envelope recipients, without angle brackets, in RCPT order."""
    message: Message
    """The content: headers readable and editable, body and MIME parts readable."""
    mail_options: list[str] = field(default_factory=list)
    """ESMTP parameters of MAIL FROM (``["SIZE=1000", "BODY=8BITMIME"]``)."""
    queue_id: str = ""
    """The id the message is spooled under; it prefixes every log line about it."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Shared by the plugins for this message; key them by your plugin's name. Not spooled: the
    route and delivery outcome hooks see empty notes."""
    results: list[PluginResult] = field(default_factory=list)
    """The trace: one :class:`PluginResult` per plugin call of the message chain, in order."""

    def add_recipient(self, address: str) -> bool:
        """Add an envelope recipient; False when it is already one.

        Raises :class:`ValueError` for an address that cannot be relayed (no ``@``, white
        space, control characters, angle brackets).
        """
        problem = _address_problem(address, null_ok=False)
        if problem is not None:
            raise ValueError(f"invalid recipient: {problem}")
        if address in self.recipients:
            return False
        self.recipients.append(address)
        return True

    def remove_recipient(self, address: str) -> bool:
        """Remove an envelope recipient; False when it was not one.

        A message whose last recipient is removed is answered 250 and dropped (logged).
        """
        if address not in self.recipients:
            return False
        self.recipients.remove(address)
        return True

    def set_sender(self, address: str) -> None:
        """Change the envelope sender (``""``: the null sender, so bounces are not returned).

        Raises :class:`ValueError` for an address that cannot be relayed.
        """
        problem = _address_problem(address, null_ok=True)
        if problem is not None:
            raise ValueError(f"invalid sender: {problem}")
        self.mail_from = address


def envelope_edits(
    before: tuple[str, list[str]], transaction: Transaction
) -> tuple[list[EnvelopeEdit], str | None]:
    """The envelope changes since ``before`` (sender, recipients), and what is wrong with them.

    Only what changed is checked, so an odd address the client gave (and the front end
    accepted) never fails a plugin that did not touch it.
    """
    sender, recipients = before
    edits: list[EnvelopeEdit] = []
    now = transaction.recipients
    if not isinstance(now, list):
        return edits, f"recipients must be a list of addresses, not {type(now).__name__}"
    if transaction.mail_from != sender:
        problem = _address_problem(transaction.mail_from, null_ok=True)
        if problem is not None:
            return edits, f"invalid sender: {problem}"
        edits.append(EnvelopeEdit("sender", transaction.mail_from))
    old, new = Counter(recipients), Counter(now)
    for address in new - old:
        problem = _address_problem(address, null_ok=False)
        if problem is not None:
            return edits, f"invalid recipient: {problem}"
        if new[address] > 1:
            return edits, f"recipient {address!r} is listed twice"
        edits.append(EnvelopeEdit("add_recipient", address))
    edits.extend(EnvelopeEdit("remove_recipient", address) for address in old - new)
    return edits, None


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
