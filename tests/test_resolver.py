"""MX lookup against a real DNS server serving the test zones (RFC 5321 5.1, RFC 7505)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from filterhost.config import parse_host_port
from filterhost.relay.resolver import DnsFailure, Resolver
from tests.components.services import Dns, start_unbound


def _resolver(dns: Dns, lifetime: float = 3.0) -> Resolver:
    return Resolver([parse_host_port(dns.nameserver, 53)], timeout=lifetime, lifetime=lifetime)


async def test_mx_in_preference_order_with_addresses(dns_server: Dns) -> None:
    hosts = await _resolver(dns_server).mx_hosts("mx.test")
    assert [(h.preference, h.name) for h in hosts] == [
        (10, "mx1.mx.test"),
        (20, "mx2.mx.test"),
        (30, "mx3.mx.test"),
    ]
    assert hosts[0].addresses == ("127.0.0.2",)
    assert hosts[2].addresses == ("127.0.0.4", "::1")  # A first, then AAAA


async def test_implicit_mx_and_ipv6_only(dns_server: Dns) -> None:
    r = _resolver(dns_server)
    (implicit,) = await r.mx_hosts("amx.test")
    assert (implicit.name, implicit.addresses) == ("amx.test", ("127.0.0.2",))
    (v6,) = await r.mx_hosts("v6.test")
    assert v6.addresses == ("::1",)


@pytest.mark.parametrize(
    ("domain", "permanent", "status"),
    [
        ("nullmx.test", True, "5.1.10"),
        ("nx.test", True, "5.1.2"),
        ("danglingmx.test", True, "5.4.4"),
        ("servfail.test", False, "4.4.3"),
        ("refused.test", False, "4.4.3"),
    ],
)
async def test_failures_are_permanent_or_temporary(
    dns_server: Dns, domain: str, permanent: bool, status: str
) -> None:
    with pytest.raises(DnsFailure) as info:
        await _resolver(dns_server).mx_hosts(domain)
    assert (info.value.permanent, info.value.status) == (permanent, status)


async def test_timeout_is_temporary(dns_server: Dns) -> None:
    started = time.monotonic()
    with pytest.raises(DnsFailure) as info:
        await _resolver(dns_server, lifetime=0.3).mx_hosts("timeout.test")
    assert not info.value.permanent
    assert time.monotonic() - started < 2


async def test_equal_preferences_are_shuffled() -> None:
    dns = start_unbound(
        [
            "eq.test. 60 IN MX 10 a.eq.test.",
            "eq.test. 60 IN MX 10 b.eq.test.",
            "eq.test. 60 IN MX 20 c.eq.test.",
            "a.eq.test. 60 IN A 127.0.0.11",
            "b.eq.test. 60 IN A 127.0.0.12",
            "c.eq.test. 60 IN A 127.0.0.13",
        ]
    )
    try:
        r = _resolver(dns)
        firsts = Counter()
        for _ in range(40):
            hosts = await r.mx_hosts("eq.test")
            assert hosts[-1].name == "c.eq.test"  # preference still rules
            firsts[hosts[0].name] += 1
    finally:
        dns.stop()
    # Both equal-preference hosts come first sometimes (P(miss) = 2 * 0.5**40).
    assert set(firsts) == {"a.eq.test", "b.eq.test"}


async def test_answers_are_cached_for_their_ttl() -> None:
    dns = start_unbound(["cached.test. 60 IN MX 10 mx1.mx.test."])
    r = _resolver(dns)
    try:
        first = await r.mx_hosts("cached.test")
    finally:
        dns.stop()
    # The server is gone; within the TTL the answer still comes, from the cache.
    assert await r.mx_hosts("cached.test") == first
