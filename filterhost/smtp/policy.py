"""The relay policy: who may send where. Pure functions; the front end applies them at RCPT."""

from __future__ import annotations

import email.utils
import ipaddress
import time
from collections.abc import Sequence

from filterhost.model import Session
from filterhost.smtp.address import canonical_domain
from filterhost.verdict import Reply

__all__ = ["RELAY_DENIED", "is_trusted", "recipient_allowed"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")


def is_trusted(client_ip: str, networks: Sequence[IPNetwork]) -> bool:
    """True when ``client_ip`` is in one of ``networks`` (``mynetworks``)."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return any(address in net for net in networks if net.version == address.version)


def recipient_allowed(recipient: str, *, trusted: bool, relay_domains: Sequence[str]) -> bool:
    """May this recipient be accepted? Trusted clients: any; others: ``relay_domains`` only.

    A relay domain matches exactly (case-insensitively, IDNA-aware); subdomains are not
    included, so ``user@relay.test.evil.test`` does not match ``relay.test``. A recipient domain
    with a trailing dot never matches (the address parser refuses it before this).
    """
    if trusted:
        return True
    local, at, domain = recipient.rpartition("@")
    if not at or not local or not domain or domain.endswith("."):
        return False
    domain = canonical_domain(domain)
    return any(domain == canonical_domain(d) for d in relay_domains if d.strip("."))


def received_value(session: Session, hostname: str, queue_id: str, recipients: list[str]) -> str:
    """The value of the ``Received:`` field filterhost adds (RFC 5321 4.4).

    One source for the front end and the author harness, so that both stamp messages alike.
    """
    proto = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        proto += "S"
    if session.authenticated_as:
        proto += "A"
    ip = f"IPv6:{session.client_ip}" if ":" in session.client_ip else session.client_ip
    value = (
        f"from {session.helo or 'unknown'} ([{ip}]) by {hostname} "
        f"(filterhost) with {proto} id {queue_id}"
    )
    if len(recipients) == 1:
        value += f" for <{recipients[0]}>"
    return f"{value}; {_date_now()}"


_date_cache: tuple[int, str] = (0, "")


def _date_now() -> str:
    """``formatdate(localtime=True)``, computed once a second (it was ~2% of a message's CPU)."""
    global _date_cache  # noqa: PLW0603 - a one-entry cache
    now = time.time()
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, localtime=True))
    return _date_cache[1]
