"""Finding the hosts to deliver to: MX lookup per RFC 5321 section 5, and address lookup.

Every answer is one of: an ordered list of hosts with their addresses, a permanent failure
(NXDOMAIN, RFC 7505 null MX, no address at all: the recipient bounces) or a temporary one
(SERVFAIL, timeout: the recipient is retried, never bounced).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from filterhost.config import HostPort

__all__ = ["DnsFailure", "MxHost", "Resolver"]


@dataclass(frozen=True, slots=True)
class MxHost:
    """One host to try: its name (for logs, TLS and the loop guard), preference, addresses."""

    name: str
    preference: int
    addresses: tuple[str, ...]


class DnsFailure(Exception):
    """A lookup that gave no hosts: ``permanent`` (bounce) or not (retry), with an RFC 3463 code."""

    def __init__(self, permanent: bool, status: str, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.status = status
        self.text = text


@functools.lru_cache(maxsize=1024)
def _is_ip(text: str) -> bool:
    # Cached: a smart host or transport named by its address is asked about every message,
    # and parsing it was ~1.5% of a relayed 5 KB message's CPU.
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Resolver:
    """dnspython's async resolver, pointed at ``relay.nameservers`` (or the system's)."""

    def __init__(
        self, nameservers: list[HostPort], *, timeout: float = 3.0, lifetime: float = 8.0
    ) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in nameservers
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.timeout = timeout
        self._resolver.lifetime = lifetime
        # Answers (negative ones included) are kept for their TTL: a queue of thousands of
        # messages to one domain asks DNS once per TTL, not once per attempt.
        self._resolver.cache = dns.resolver.LRUCache(max_size=10_000)

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, None for "no such record" (NoAnswer); DnsFailure for the rest."""
        try:
            return await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN:
            raise DnsFailure(True, "5.1.2", f"{name}: no such domain (NXDOMAIN)") from None
        except dns.resolver.LifetimeTimeout:
            raise DnsFailure(False, "4.4.3", f"{name} {rdtype}: DNS timeout") from None
        except dns.resolver.NoNameservers as exc:
            raise DnsFailure(False, "4.4.3", f"{name} {rdtype}: DNS failure ({exc})") from None
        except dns.exception.DNSException as exc:
            raise DnsFailure(False, "4.4.3", f"{name} {rdtype}: DNS error ({exc})") from None

    async def addresses(self, name: str) -> tuple[str, ...]:
        """A then AAAA addresses of ``name`` (an IP literal is returned as is)."""
        if _is_ip(name):
            return (name,)
        a, aaaa = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        found: list[str] = []
        errors: list[DnsFailure] = []
        for answer in (a, aaaa):
            if isinstance(answer, DnsFailure):
                errors.append(answer)
            elif isinstance(answer, BaseException):
                raise answer
            elif answer is not None:
                found.extend(r.to_text() for r in answer)
        if found:
            return tuple(found)
        if errors:
            # A temporary failure on either family means the name may still have addresses.
            temporary = [e for e in errors if not e.permanent]
            raise temporary[0] if temporary else errors[0]
        raise DnsFailure(True, "5.1.2", f"{name}: no A or AAAA record")

    async def mx_hosts(self, domain: str) -> list[MxHost]:
        """The hosts to try for ``domain``, in order (RFC 5321 5.1, RFC 7505).

        MX records sorted by preference, shuffled within one preference; the domain itself when
        it has no MX (implicit MX). Hosts whose names do not resolve are left out.
        """
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1].removeprefix("IPv6:")
            return [MxHost(literal, 0, (literal,))]
        answer = await self._query(domain, "MX")
        if answer is None:
            return [MxHost(domain, 0, await self.addresses(domain))]
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        if any(name in ("", ".") for _, name in records):
            if len(records) == 1:
                raise DnsFailure(True, "5.1.10", f"{domain}: null MX, the domain accepts no mail")
            records = [(p, n) for p, n in records if n not in ("", ".")]
        random.shuffle(records)  # then a stable sort keeps equal preferences in random order
        records.sort(key=lambda pr: pr[0])
        lookups = await asyncio.gather(
            *(self.addresses(name) for _, name in records), return_exceptions=True
        )
        hosts: list[MxHost] = []
        failures: list[DnsFailure] = []
        for (preference, name), found in zip(records, lookups, strict=True):
            if isinstance(found, DnsFailure):
                failures.append(found)
            elif isinstance(found, BaseException):
                raise found
            else:
                hosts.append(MxHost(name, preference, found))
        if hosts:
            return hosts
        temporary = [f for f in failures if not f.permanent]
        if temporary:
            raise temporary[0]
        raise DnsFailure(True, "5.4.4", f"{domain}: no MX host has an address")
