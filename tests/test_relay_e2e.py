"""End to end through a real filterhost process: smtplib in, real DNS, smtp-sink next hops."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.components.fixtures import Sinks
from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import FilterhostFactory, base_config, spooled_ids

# A message with the things relays like to mangle: folded headers, 8-bit text, dot lines,
# trailing white space, an empty line at the end.
ODD_MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@mx.test\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and a long subject that is folded\r\n"
    b"  onto a second line\r\n"
    b"X-Odd:\tvalue with a tab   \r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe!\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"trailing spaces   \r\n"
    b"\r\n"
)


def _received_prefix(data: bytes, original: bytes) -> bytes:
    assert data.endswith(original), "the message body and headers must arrive byte for byte"
    return data[: len(data) - len(original)]


def test_message_arrives_at_the_preferred_mx_byte_for_byte(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path
) -> None:
    mx_port = free_port()
    mx1 = sinks.start("127.0.0.2", mx_port)
    mx2 = sinks.start("127.0.0.3", mx_port)
    proc = fh.create(base_config(tmp_path, free_port(), dns_server, mx_port)).start()

    with proc.smtp() as client:
        client.ehlo("client.test")
        refused = client.sendmail("alice@example.test", ["bob@mx.test"], ODD_MESSAGE)
    assert refused == {}

    (got,) = mx1.wait_for_count(1)
    assert mx2.messages() == []
    assert got.mail_from == "alice@example.test"
    assert got.rcpt_tos == ["bob@mx.test"]
    added = _received_prefix(got.data, ODD_MESSAGE)
    # Exactly one header field was added (folded at 78 columns): our Received, naming the
    # client and the queue id.
    assert all(len(line) <= 78 for line in added.split(b"\r\n"))
    added = added.replace(b"\r\n ", b" ")
    assert added.count(b"\r\n") == 1
    assert re.match(
        rb"Received: from client\.test \(\[127\.0\.0\.1\]\) by relay\.test \(filterhost\) "
        rb"with ESMTP id [0-9A-F]{19} for <bob@mx\.test>; ",
        added,
    ), added
    queue_id = re.search(rb"id ([0-9A-F]{19})", added).group(1).decode()  # type: ignore[union-attr]
    proc.wait_log(f"{queue_id}: to=<bob@mx.test> status=delivered")
    # The log tells the message's whole story by its queue id.
    story = [line for line in proc.log.splitlines() if queue_id in line]
    assert any("queued from=<alice@example.test>" in line for line in story)
    assert any("relay=mx1.mx.test[127.0.0.2]" in line for line in story)


@pytest.mark.parametrize("delivery_process", [False, True], ids=["in-process", "agent"])
def test_next_mx_is_tried_when_the_first_refuses_connections(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path, delivery_process: bool
) -> None:
    mx_port = free_port()
    mx2 = sinks.start("127.0.0.3", mx_port)  # nothing listens on mx1 (127.0.0.2)
    relay = {"delivery_process": delivery_process}
    proc = fh.create(base_config(tmp_path, free_port(), dns_server, mx_port, relay=relay)).start()
    with proc.smtp() as client:
        client.sendmail("alice@example.test", ["carol@mx.test"], b"Subject: x\r\n\r\nhi\r\n")
    (got,) = mx2.wait_for_count(1)
    assert got.rcpt_tos == ["carol@mx.test"]
    # The attempt's own log line (written by the agent when there is one) is in the log.
    proc.wait_log(rf"relay to mx1\.mx\.test\[127\.0\.0\.2\]:{mx_port} failed, trying the next host")
    proc.wait_log(r"to=<carol@mx\.test> relay=mx2\.mx\.test\[127\.0\.0\.3\]")


def test_implicit_mx_and_recipients_grouped_per_next_hop(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path
) -> None:
    mx_port = free_port()
    mx1 = sinks.start("127.0.0.2", mx_port)  # mx1.mx.test and amx.test (A, no MX) share it
    proc = fh.create(base_config(tmp_path, free_port(), dns_server, mx_port)).start()
    with proc.smtp() as client:
        client.sendmail(
            "alice@example.test",
            ["a@mx.test", "b@mx.test", "c@amx.test"],
            b"Subject: grouped\r\n\r\nhi\r\n",
        )
    got = mx1.wait_for_count(2)
    by_rcpts = sorted(sorted(m.rcpt_tos) for m in got)
    # Two next hops (mx:mx.test and mx:amx.test), one transaction each.
    assert by_rcpts == [["a@mx.test", "b@mx.test"], ["c@amx.test"]]


def test_smarthost_mode_sends_everything_upstream(
    fh: FilterhostFactory, sinks: Sinks, tmp_path: Path
) -> None:
    port = free_port()
    upstream = sinks.start("127.0.0.5", port)
    # No DNS server at all: smart host mode must not need one.
    conf = base_config(
        tmp_path,
        free_port(),
        None,
        25,
        relay={
            "mode": "smarthost",
            "smarthost": f"127.0.0.5:{port}",
            "smarthost_tls_policy": "may",  # smtp-sink has no STARTTLS
        },
    )
    proc = fh.create(conf).start()
    with proc.smtp() as client:
        client.sendmail(
            "alice@example.test", ["x@nx.test", "y@mx.test"], b"Subject: up\r\n\r\nhi\r\n"
        )
    (got,) = upstream.wait_for_count(1)
    assert sorted(got.rcpt_tos) == ["x@nx.test", "y@mx.test"]


def test_relay_is_refused_to_clients_outside_mynetworks(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path
) -> None:
    mx_port = free_port()
    mx1 = sinks.start("127.0.0.2", mx_port)
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        mx_port,
        server={"mynetworks": ["127.0.0.1/32"], "relay_domains": ["mx.test"]},
    )
    proc = fh.create(conf).start()
    with proc.smtp(source_address=("127.0.0.2", 0)) as client:
        client.ehlo("outsider.test")
        client.mail("eve@outside.test")
        code, text = client.rcpt("victim@elsewhere.test")
        assert (code, text[:5]) == (554, b"5.7.1"), text
        # An inbound relay domain is open to anyone.
        code, _ = client.rcpt("postmaster@mx.test")
        assert code == 250
        code, _ = client.data(b"Subject: in\r\n\r\nhello\r\n")
        assert code == 250
    (got,) = mx1.wait_for_count(1)
    assert got.rcpt_tos == ["postmaster@mx.test"]
    assert "relay denied from=<eve@outside.test> to=<victim@elsewhere.test>" in proc.log


def test_kill_9_after_250_loses_nothing(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path
) -> None:
    mx_port = free_port()
    conf = base_config(tmp_path, free_port(), dns_server, mx_port)
    proc = fh.create(conf).start()
    ids = []
    with proc.smtp() as client:
        for i in range(5):
            client.sendmail(
                "alice@example.test", [f"r{i}@mx.test"], f"Subject: m{i}\r\n\r\nbody {i}\r\n"
            )
            ids.append(client.noop())  # keeps the session alive between messages
    # The next hops are down: the first attempts defer.
    proc.wait_log(r"status=deferred")
    proc.kill()

    listed = subprocess.run(
        [sys.executable, "-m", "filterhost", "-c", str(proc.confdir), "queue", "list", "--json"],
        capture_output=True,
        check=True,
    )
    queued = json.loads(listed.stdout)
    assert len(queued) == 5
    assert all(r["status"] == "pending" for m in queued for r in m["recipients"])

    mx1 = sinks.start("127.0.0.2", mx_port)
    again = fh.create(conf)
    again.confdir = proc.confdir
    again.start()
    got = mx1.wait_for_count(5, timeout=20)
    assert sorted(r for m in got for r in m.rcpt_tos) == [f"r{i}@mx.test" for i in range(5)]
    again.wait_log(r"(removed \(all recipients done\)[\s\S]*){5}", timeout=10)
    assert again.stop() == 0
    assert spooled_ids(tmp_path / "spool") == set()


@pytest.mark.parametrize(
    ("sink_options", "log_status"),
    [(["-f", "RCPT"], "status=bounced"), (["-r", "RCPT"], "status=deferred")],
)
def test_next_hop_replies_decide_bounce_or_retry(
    fh: FilterhostFactory,
    dns_server: Dns,
    sinks: Sinks,
    tmp_path: Path,
    sink_options: list[str],
    log_status: str,
) -> None:
    mx_port = free_port()
    sinks.start("127.0.0.2", mx_port, *sink_options)
    proc = fh.create(base_config(tmp_path, free_port(), dns_server, mx_port)).start()
    with proc.smtp() as client:
        client.sendmail("alice@example.test", ["bob@mx.test"], b"Subject: x\r\n\r\nhi\r\n")
    proc.wait_log(log_status)
    if log_status == "status=deferred":
        # Deferred mail is retried on the schedule (1s here): a second attempt follows.
        proc.wait_log(r"status=deferred attempts=2")
    else:
        # A 5xx is final: the message leaves the queue and is not tried again.
        proc.wait_log(r"removed \(all recipients done\)")
        assert proc.log.count("to=<bob@mx.test> status=bounced") == 1


def test_dns_outcomes(fh: FilterhostFactory, dns_server: Dns, tmp_path: Path) -> None:
    proc = fh.create(base_config(tmp_path, free_port(), dns_server, free_port())).start()
    with proc.smtp() as client:
        for rcpt in ("a@nullmx.test", "b@nx.test", "c@servfail.test"):
            client.sendmail("alice@example.test", [rcpt], b"Subject: dns\r\n\r\nhi\r\n")
    proc.wait_log(r"to=<a@nullmx\.test> status=bounced reply='550 5\.1\.10 ")
    proc.wait_log(r"to=<b@nx\.test> status=bounced reply='550 5\.1\.2 ")
    # SERVFAIL is temporary: deferred, never bounced.
    proc.wait_log(r"to=<c@servfail\.test> status=deferred")
    assert "to=<c@servfail.test> status=bounced" not in proc.log


def test_limits_and_content_checks(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path
) -> None:
    mx_port = free_port()
    mx1 = sinks.start("127.0.0.2", mx_port)
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        mx_port,
        server={"max_message_size": 2000, "max_recipients": 2, "max_hops": 3},
    )
    proc = fh.create(conf).start()
    with proc.smtp() as client:
        client.ehlo("client.test")
        assert client.esmtp_features["size"] == "2000"
        # Too big: 552 5.3.4, and the session stays usable.
        client.mail("alice@example.test")
        client.rcpt("bob@mx.test")
        code, text = client.data(b"Subject: big\r\n\r\n" + (b"x" * 80 + b"\r\n") * 40)
        assert (code, text[:5]) == (552, b"5.3.4")
        # Too many recipients: 452 4.5.3 for the third.
        client.mail("alice@example.test")
        assert client.rcpt("a@mx.test")[0] == 250
        assert client.rcpt("b@mx.test")[0] == 250
        code, text = client.rcpt("c@mx.test")
        assert (code, text[:5]) == (452, b"4.5.3")
        client.rset()
        # A mail loop: 554 5.4.6 once there are max_hops Received headers.
        hops = b"".join(
            b"Received: from h%d by h%d; Sun, 29 Nov 2026 10:00:00 +0000\r\n" % (i, i)
            for i in range(3)
        )
        client.mail("alice@example.test")
        client.rcpt("bob@mx.test")
        code, text = client.data(hops + b"Subject: loop\r\n\r\nhi\r\n")
        assert (code, text[:5]) == (554, b"5.4.6")
        # Still fine afterwards.
        client.mail("alice@example.test")
        client.rcpt("bob@mx.test")
        assert client.data(b"Subject: fine\r\n\r\nhi\r\n")[0] == 250
    (got,) = mx1.wait_for_count(1)
    assert b"Subject: fine" in got.data


def test_null_sender_is_relayed(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path
) -> None:
    mx_port = free_port()
    mx1 = sinks.start("127.0.0.2", mx_port)
    proc = fh.create(base_config(tmp_path, free_port(), dns_server, mx_port)).start()
    with proc.smtp() as client:
        client.sendmail("<>", ["bob@mx.test"], b"Subject: a bounce\r\n\r\nhi\r\n")
    (got,) = mx1.wait_for_count(1)
    assert got.mail_from == ""


def test_refuses_to_start_with_a_broken_config(fh: FilterhostFactory, tmp_path: Path) -> None:
    conf = base_config(tmp_path, free_port(), None, 25, server={"max_recipients": "many"})
    proc = fh.create(conf)
    with pytest.raises(RuntimeError, match="exited early"):
        proc.start(timeout=10)
    assert "server.max_recipients: expected integer, got 'many'" in proc.log
    assert "Traceback" not in proc.log


@pytest.mark.parametrize(
    ("sink_options", "relay", "reason"),
    [
        # The next hop hangs up without a word in the middle of the transaction.
        (["-q", "DATA"], {}, r"4\.4\.2 .*connection lost"),
        # The next hop says 421 and hangs up.
        (["-Q", "RCPT"], {}, r"421 "),
        # The next hop never answers the end of DATA: our timeout ends the wait.
        (["-w", "30"], {"smtp_timeout": "1s"}, r"4\.4\.2 .*no reply in time"),
    ],
    ids=["drop", "421", "hang"],
)
def test_a_next_hop_that_drops_or_hangs_defers(
    fh: FilterhostFactory,
    dns_server: Dns,
    sinks: Sinks,
    tmp_path: Path,
    sink_options: list[str],
    relay: dict[str, str],
    reason: str,
) -> None:
    mx_port = free_port()
    # mx1 misbehaves; the other MX hosts are down, so nothing else can take the message.
    sinks.start("127.0.0.2", mx_port, *sink_options)
    conf = base_config(tmp_path, free_port(), dns_server, mx_port, relay=relay)
    proc = fh.create(conf).start()
    with proc.smtp() as client:
        client.sendmail("alice@example.test", ["bob@mx.test"], b"Subject: x\r\n\r\nhi\r\n")
    m = proc.wait_log(r"to=<bob@mx\.test> status=deferred attempts=1 .*reply=(.*)$", timeout=20)
    assert re.search(reason, m.group(1)), m.group(1)
    assert "status=delivered" not in proc.log
    assert "status=bounced" not in proc.log
