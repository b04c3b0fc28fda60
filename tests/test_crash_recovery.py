"""Crashes and loops: kill -9 in the middle of a delivery round, and an MX that points at us."""

from __future__ import annotations

import collections
from pathlib import Path

from tests.components.fixtures import Sinks
from tests.components.services import Dns, free_port, start_unbound, wait_until
from tests.filterhost_fixtures import FilterhostFactory, base_config

N = 40


def test_kill_9_mid_delivery_round_loses_nothing(
    fh: FilterhostFactory,
    dns_server: Dns,
    sinks: Sinks,
    tmp_path: Path,
) -> None:
    mx_port = free_port()
    # A slow next hop (every reply delayed) and two connections at most, so that the kill
    # lands in the middle of the round with transactions in flight.
    slow = sinks.start("127.0.0.2", mx_port, "-w", "1")
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        mx_port,
        relay={"destination_concurrency": 2, "retry_schedule": ["1s"]},
    )
    proc = fh.create(conf).start()
    with proc.smtp() as client:
        for i in range(N):
            client.sendmail("alice@example.test", [f"r{i}@mx.test"], f"Subject: {i}\r\n\r\n{i}\r\n")
    proc.wait_log(r"status=delivered")  # the round is under way
    proc.kill()
    first = collections.Counter(r for m in slow.messages() for r in m.rcpt_tos)
    assert sum(first.values()) < N, "the round finished before the kill; slow the next hop"
    slow.stop()

    fast = sinks.start("127.0.0.2", mx_port)
    again = fh.create(conf)
    again.confdir = proc.confdir
    again.start()
    expected = {f"r{i}@mx.test" for i in range(N)}
    missing = expected - set(first)

    def second_round() -> collections.Counter[str]:
        return collections.Counter(r for m in fast.messages() for r in m.rcpt_tos)

    # Wait for every missing recipient by name: a count would be fooled by a duplicate (a
    # message whose 250 the killed process never recorded arrives twice, which is allowed).
    wait_until(lambda: missing <= set(second_round()), timeout=60, what="redelivery")
    again.wait_log(r"queue runner started: \d+ message")
    second = second_round()
    lost = expected - set(first) - set(second)
    duplicated = sorted(set(first) & set(second))
    print(f"kill -9 mid-round: {N} messages, lost {len(lost)}, duplicated {len(duplicated)}")
    assert lost == set()
    # A duplicate is only possible for a message whose 250 from the next hop came in just
    # before the kill, before the spool recorded it: at most one per connection in flight.
    assert len(duplicated) <= 2
    assert all(n == 1 for n in second.values())


def test_an_mx_pointing_back_at_us_is_a_loop_not_a_delivery(
    fh: FilterhostFactory, tmp_path: Path
) -> None:
    port = free_port()
    dns = start_unbound(
        [
            "loop.test. 60 IN MX 10 self.loop.test.",
            "self.loop.test. 60 IN A 127.0.0.1",
        ]
    )
    try:
        # Our own listener is 127.0.0.1:port, and the MX port is the same port: the MX is us.
        proc = fh.create(base_config(tmp_path, port, dns, port)).start()
        with proc.smtp() as client:
            client.sendmail("<>", ["someone@loop.test"], b"Subject: loop\r\n\r\nx\r\n")
        proc.wait_log(
            r"to=<someone@loop\.test> status=bounced reply='550 5\.4\.6 mail for "
            r"loop\.test loops back to myself'"
        )
        # It was never handed to ourselves: one message received, none relayed.
        assert proc.log.count("queued from=") == 1
    finally:
        dns.stop()
