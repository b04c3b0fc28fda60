"""Bounces (RFC 3464 DSNs) and delay warnings, end to end: next hops refuse, the sender is told.

The sender's domain, amx.test, has an implicit MX (127.0.0.2), the same host as mx.test's
first MX, so one recording peer sees both the refused mail and the DSN that comes back.
"""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

from tests.components.fixtures import Peers
from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import FilterhostFactory, FilterhostProcess, base_config

ORIGINAL = b"From: alice@amx.test\r\nTo: x@mx.test\r\nSubject: original\r\n\r\nhello\r\n"


def _status_blocks(dsn: bytes) -> list[dict[str, str]]:
    msg = cast(EmailMessage, email.message_from_bytes(dsn, policy=email.policy.default))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = []
    for block in status.get_payload():  # type: ignore[union-attr]
        blocks.append({k.lower(): str(v) for k, v in block.items()})
    return blocks


def _queue(proc: FilterhostProcess) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "filterhost", "-c", str(proc.confdir), "queue", "list", "--json"],
        capture_output=True,
        check=True,
    )
    return cast(list[dict[str, Any]], json.loads(out.stdout))


def _start(fh: FilterhostFactory, dns: Dns, peers: Peers, tmp: Path, **relay: Any) -> Any:
    port = free_port()
    peer = peers.start("127.0.0.2", port)  # defer* -> 450, reject* -> 550, else 250
    proc = fh.create(base_config(tmp, free_port(), dns, port, relay=relay)).start()
    return proc, peer


def test_a_refused_recipient_bounces_to_the_sender_and_others_are_kept(
    fh: FilterhostFactory, dns_server: Dns, peers: Peers, tmp_path: Path
) -> None:
    proc, peer = _start(fh, dns_server, peers, tmp_path, retry_schedule=["1h"])
    with proc.smtp() as client:
        client.sendmail(
            "alice@amx.test", ["ok@mx.test", "defer-me@mx.test", "reject-me@mx.test"], ORIGINAL
        )
    got = peer.wait_for_count(2)
    delivered = [m for m in got if m.mail_from == "alice@amx.test"]
    (dsn,) = [m for m in got if m.mail_from == ""]
    assert [m.rcpt_tos for m in delivered] == [["ok@mx.test"]]
    assert dsn.rcpt_tos == ["alice@amx.test"]
    per_message, *per_rcpt = _status_blocks(dsn.data)
    assert per_message["reporting-mta"] == "dns; relay.test"
    # Only the refused recipient is reported; the deferred one is still being tried.
    (report,) = per_rcpt
    assert report["final-recipient"] == "rfc822; reject-me@mx.test"
    assert report["action"] == "failed"
    assert report["status"] == "5.1.1"
    assert report["remote-mta"] == "dns; mx1.mx.test"
    assert report["diagnostic-code"] == "smtp; 550 5.1.1 no such user"
    # The original comes back byte for byte (RET=FULL is the default).
    assert ORIGINAL.split(b"\r\n\r\n")[1] in dsn.data
    assert b"Subject: original" in dsn.data
    (queued,) = _queue(proc)
    states = {r["address"]: r["status"] for r in queued["recipients"]}
    assert states == {
        "ok@mx.test": "delivered",
        "defer-me@mx.test": "pending",
        "reject-me@mx.test": "bounced",
    }


def test_null_mx_and_nxdomain_bounce_at_once(
    fh: FilterhostFactory, dns_server: Dns, peers: Peers, tmp_path: Path
) -> None:
    proc, peer = _start(fh, dns_server, peers, tmp_path)
    with proc.smtp() as client:
        client.sendmail("alice@amx.test", ["a@nullmx.test", "b@nx.test"], ORIGINAL)
    (dsn,) = peer.wait_for_count(1)
    _, *reports = _status_blocks(dsn.data)
    assert {r["final-recipient"]: r["status"] for r in reports} == {
        "rfc822; a@nullmx.test": "5.1.10",
        "rfc822; b@nx.test": "5.1.2",
    }


def test_a_bounce_is_never_bounced_and_is_kept(
    fh: FilterhostFactory, dns_server: Dns, peers: Peers, tmp_path: Path
) -> None:
    proc, peer = _start(fh, dns_server, peers, tmp_path)
    with proc.smtp() as client:
        client.sendmail("<>", ["reject-bounce@mx.test"], ORIGINAL)
    proc.wait_log(r"undeliverable bounce kept on hold")
    assert "a bounce is never bounced" in proc.log
    assert peer.messages() == []
    (kept,) = _queue(proc)
    assert kept["hold"] is True
    assert kept["recipients"][0]["status"] == "bounced"


def test_delay_warning_is_sent_once(
    fh: FilterhostFactory, dns_server: Dns, peers: Peers, tmp_path: Path
) -> None:
    proc, peer = _start(fh, dns_server, peers, tmp_path, retry_schedule=["1s"], delay_warning="1s")
    with proc.smtp() as client:
        client.sendmail("alice@amx.test", ["defer-slow@mx.test"], ORIGINAL)
    (warning,) = peer.wait_for_count(1, timeout=20)
    _, report = _status_blocks(warning.data)
    assert report["action"] == "delayed"
    assert report["status"].startswith("4.")
    assert "will-retry-until" in report
    proc.wait_log(r"status=deferred attempts=4 ")  # several more attempts, no second warning
    assert len(peer.messages()) == 1
