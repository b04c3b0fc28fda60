"""The queue CLI against a real filterhost process, real DNS and smtp-sink next hops.

Messages are deferred with the next hop down and ``retry_schedule = ["1h"]``, so they stay
queued; a delivery "without waiting an hour" then proves that the CLI woke the running server.
The last test races the CLI against deliveries in flight to a slow next hop.
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filterhost.queuectl import BOUNCE_REPLY, EXIT_BUSY, HOLD_REASON
from filterhost.spool import Spool
from tests.components.fixtures import Sinks
from tests.components.services import Dns, Sink, free_port, wait_until
from tests.filterhost_fixtures import FilterhostFactory, FilterhostProcess, base_config

SENDER = "alice@example.test"


def cli(proc: FilterhostProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``filterhost -c CONFDIR queue ARGS...``, run to completion."""
    return subprocess.run(
        [sys.executable, "-m", "filterhost", "-c", str(proc.confdir), "queue", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cli_start(proc: FilterhostProcess, *args: str) -> subprocess.Popen[str]:
    """The same, started in the background (to run while a delivery is in flight)."""
    return subprocess.Popen(
        [sys.executable, "-m", "filterhost", "-c", str(proc.confdir), "queue", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(child: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for a background CLI; its exit status and stderr."""
    _, err = child.communicate(timeout=60)
    return child.returncode, err


def queued(proc: FilterhostProcess) -> dict[str, dict[str, Any]]:
    """``queue list --json``, by queue id."""
    done = cli(proc, "list", "--json")
    assert done.returncode == 0, done.stderr
    return {m["id"]: m for m in json.loads(done.stdout)}


def send(proc: FilterhostProcess, recipients: list[str], subject: str) -> str:
    """Submit one message; return its queue id (from the 250 reply)."""
    with proc.smtp() as client:
        client.ehlo("client.test")
        client.mail(SENDER)
        for rcpt in recipients:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode())
    assert code == 250, text
    match = re.search(rb"queued as ([0-9A-F]+)", text)
    assert match is not None, text
    return match.group(1).decode()


def wait_log_count(proc: FilterhostProcess, pattern: str, count: int) -> None:
    """Wait until ``pattern`` occurs ``count`` times in the server's log."""
    regex = re.compile(pattern)
    wait_until(
        lambda: len(regex.findall(proc.log)) >= count, 15, proc.proc, f"{count} x /{pattern}/"
    )


def deferred(
    fh: FilterhostFactory,
    dns: Dns,
    tmp_path: Path,
    mx_port: int,
    messages: list[list[str]],
    retry: str = "1h",
    spool: Path | None = None,
) -> tuple[FilterhostProcess, list[str]]:
    """A running server with ``messages`` (lists of recipients) sent and deferred once each."""
    conf = base_config(tmp_path, free_port(), dns, mx_port, relay={"retry_schedule": [retry]})
    if spool is not None:
        conf["spool"]["directory"] = str(spool)
    proc = fh.create(conf).start()
    ids = [send(proc, rcpts, f"m{i}") for i, rcpts in enumerate(messages)]
    wait_log_count(proc, r"status=deferred", sum(len(r) for r in messages))
    return proc, ids


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory that any user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="filterhost-queue-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def spool_of(tmp_path: Path) -> Spool:
    """The test server's spool, opened from the test process (base_config puts it there)."""
    return Spool(tmp_path / "spool")


def restart(fh: FilterhostFactory, proc: FilterhostProcess) -> FilterhostProcess:
    """Start a stopped server again on the same configuration and spool."""
    again = FilterhostProcess(proc.confdir, proc.port, proc.log_path.with_suffix(".again.log"))
    fh.started.append(again)  # stopped at teardown like the others
    return again.start()


def in_flight(sink: Sink, count: int) -> None:
    """Wait until ``count`` transactions are open at ``sink`` (its dump file exists from MAIL)."""
    wait_until(lambda: len(list(sink.maildir.iterdir())) >= count, 15, None, "deliveries")


def test_list_show_prefixes_and_errors(
    fh: FilterhostFactory, dns_server: Dns, tmp_path: Path
) -> None:
    proc, (first, second) = deferred(
        fh, dns_server, tmp_path, free_port(), [["a@mx.test", "b@mx.test"], ["c@amx.test"]]
    )
    now = time.time()
    listed = queued(proc)
    assert set(listed) == {first, second}
    msg = listed[first]
    assert msg["sender"] == SENDER
    assert (msg["hold"], msg["reason"]) == (False, "")
    assert msg["size"] == spool_of(tmp_path).msg_path(first).stat().st_size
    assert 0 <= msg["age"] < 60
    assert [r["address"] for r in msg["recipients"]] == ["a@mx.test", "b@mx.test"]
    for rcpt in msg["recipients"]:
        assert (rcpt["status"], rcpt["attempts"]) == ("pending", 1)
        assert rcpt["last_reply"].startswith("451 4.4.1"), rcpt
        # Next attempt an hour (plus up to 10 % jitter) after the first, as an ISO time.
        due = datetime.datetime.fromisoformat(rcpt["next_attempt"]).timestamp()
        assert 3500 < due - now < 4000, rcpt
    assert msg["next_attempt"] == min(r["next_attempt"] for r in msg["recipients"])

    table = cli(proc, "list")
    assert table.returncode == 0
    head = rf"^{first} +\S+ +\d+ +<{re.escape(SENDER)}>$"
    assert re.search(head, table.stdout, re.M), table.stdout
    line = re.search(r"^ +pending +<c@amx\.test> .*$", table.stdout, re.M)
    assert line is not None, table.stdout
    assert re.search(r"attempts=1  next=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(in ", line[0]), line[0]
    assert "451 4.4.1" in line[0]
    assert table.stdout.endswith("-- 2 message(s), 0 held, 3 recipient(s) pending\n")

    shown = cli(proc, "show", first)
    assert shown.returncode == 0, shown.stderr
    assert f"sender:      <{SENDER}>" in shown.stdout
    assert "  <b@mx.test>\n      status=pending attempts=1 next=" in shown.stdout
    assert "Subject: m0" in shown.stdout
    assert "body of m0" not in shown.stdout  # headers only, unless --body
    assert "body of m0" in cli(proc, "show", "--body", first).stdout

    # An unambiguous prefix names the message (any case); a shared one is an error.
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b)
    common = first[:shared]
    unique = first[: len(common) + 1]
    assert f"id:          {first}" in cli(proc, "show", unique.lower()).stdout
    if common:
        ambiguous = cli(proc, "hold", common)
        assert ambiguous.returncode == 1
        assert "ambiguous" in ambiguous.stderr
    for action in ("show", "flush", "delete"):
        unknown = cli(proc, action, "FFFFFFFF")
        assert unknown.returncode == 1, (action, unknown)
        assert "no queued message FFFFFFFF" in unknown.stderr

    # A message that a delivery attempt keeps locked: give up after --wait, exit 75.
    spool = spool_of(tmp_path)
    with spool.locked(second) as mine:
        assert mine
        busy = cli(proc, "hold", "--wait", "0.3", second)
    spool.close()
    assert busy.returncode == EXIT_BUSY
    assert f"{second} is busy" in busy.stderr
    assert "try again" in busy.stderr
    assert queued(proc)[second]["hold"] is False


def test_hold_stops_retries_and_release_delivers_at_once(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path
) -> None:
    mx_port = free_port()
    # Retries every second: a held message would be tried again right away if hold failed.
    proc, (held, other) = deferred(
        fh, dns_server, tmp_path, mx_port, [["a@mx.test"], ["b@mx.test"]], retry="1s"
    )
    done = cli(proc, "hold", held)
    assert done.returncode == 0, done.stderr
    assert f"{held}: held" in done.stderr
    state = queued(proc)[held]
    assert (state["hold"], state["reason"]) == (True, HOLD_REASON)
    assert state["next_attempt"] is None
    attempts = state["recipients"][0]["attempts"]
    assert "HELD (held by operator)" in cli(proc, "list").stdout

    # The other message is retried twice more meanwhile (2 s): the held one never.
    retried = proc.log.count(f"{other}: to=<b@mx.test> status=deferred")
    wait_log_count(proc, f"{other}: to=<b@mx\\.test> status=deferred", retried + 2)
    flushed = cli(proc, "flush", held)
    assert flushed.returncode == 0
    assert "held, not flushed" in flushed.stderr
    assert queued(proc)[held]["recipients"][0]["attempts"] == attempts

    sink = sinks.start("127.0.0.2", mx_port)  # mx1.mx.test is back
    released = cli(proc, "release", held)
    assert released.returncode == 0, released.stderr
    assert f"{held}: released" in released.stderr
    # Nothing schedules a held message any more: only the CLI's signal can have it delivered.
    proc.wait_log(f"{held}: to=<a@mx.test> status=delivered")
    got = sink.wait_for_count(2)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["a@mx.test", "b@mx.test"]
    wait_until(lambda: queued(proc) == {}, 10, proc.proc, "an empty queue")


def test_flush_by_domain_and_by_id_delivers_without_waiting_for_the_retry(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path
) -> None:
    mx_port = free_port()
    proc, (to_mx, to_amx) = deferred(
        fh, dns_server, tmp_path, mx_port, [["a@mx.test"], ["c@amx.test"]]
    )
    before = queued(proc)
    sink = sinks.start("127.0.0.2", mx_port)  # mx1.mx.test and amx.test

    done = cli(proc, "flush", "--domain", "AMX.test")
    assert done.returncode == 0, done.stderr
    assert f"{to_amx}: flushed: 1 recipient(s) due now" in done.stderr
    assert to_mx not in done.stderr
    (first,) = sink.wait_for_count(1)  # in seconds, not in an hour
    assert first.rcpt_tos == ["c@amx.test"]
    proc.wait_log(f"{to_amx}: removed")
    # The other domain's message was not touched: same state, same next attempt.
    assert queued(proc)[to_mx]["recipients"] == before[to_mx]["recipients"]

    done = cli(proc, "flush", to_mx[:-4])
    assert done.returncode == 0, done.stderr
    both = sink.wait_for_count(2)
    assert sorted(r for m in both for r in m.rcpt_tos) == ["a@mx.test", "c@amx.test"]
    proc.wait_log(f"{to_mx}: removed")
    assert "nothing to flush" in cli(proc, "flush", "--all").stderr


def test_delete_and_bounce(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path, open_dir: Path
) -> None:
    mx_port = free_port()
    proc, (deleted, kept, bounced) = deferred(
        fh,
        dns_server,
        tmp_path,
        mx_port,
        [["a@mx.test"], ["b@mx.test"], ["c@mx.test", "d@amx.test"]],
        spool=open_dir / "spool",
    )
    done = cli(proc, "delete", deleted)
    assert done.returncode == 0, done.stderr
    assert f"{deleted}: deleted, no bounce sent (from=<{SENDER}> pending=<a@mx.test>)" in (
        done.stderr
    )
    spool = Spool(open_dir / "spool")
    assert not spool.entry_path(deleted).exists()
    assert not spool.msg_path(deleted).exists()
    spool.close()
    assert cli(proc, "delete", deleted).returncode == 1

    # bounce with the server stopped, so that nothing acts on the result before we look:
    # the recipients are bounced and not yet notified, for the delivery engine's DSN.
    assert proc.stop() == 0
    # Run as root on a spool that belongs to a service user, the CLI acts as that user, so
    # the server can still read what it writes.
    nobody = pwd.getpwnam("nobody")
    if os.geteuid() == 0:
        for path in [open_dir / "spool", *(open_dir / "spool").rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    done = cli(proc, "bounce", bounced)
    assert done.returncode == 0, done.stderr
    assert f"{bounced}: bounced 2 recipient(s)" in done.stderr
    assert "no server is running" in done.stderr
    shown = json.loads(cli(proc, "show", "--json", bounced).stdout)
    assert [(r["status"], r["last_reply"], r["notified"]) for r in shown["recipients"]] == [
        ("bounced", BOUNCE_REPLY, False)
    ] * 2
    assert shown["next_attempt"] is None
    if os.geteuid() == 0:
        assert spool.entry_path(bounced).stat().st_uid == nobody.pw_uid
        # Back to root's, as the server here runs as root: its CLI must be able to signal it.
        for path in [open_dir / "spool", *(open_dir / "spool").rglob("*")]:
            os.chown(path, 0, 0)

    # Back up, everything flushed to a working next hop: only the kept message arrives.
    sink = sinks.start("127.0.0.2", mx_port)
    again = restart(fh, proc)
    assert cli(again, "flush", "--all").returncode == 0
    (got,) = sink.wait_for_count(1)
    assert got.rcpt_tos == ["b@mx.test"]
    again.wait_log(f"{kept}: removed")
    assert sink.messages() == [got]


def test_changes_wait_for_a_delivery_in_flight(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path
) -> None:
    mx_port = free_port()
    conf = base_config(tmp_path, free_port(), dns_server, mx_port, relay={"retry_schedule": ["1h"]})
    # 1. A slow next hop that then defers: delete and hold wait for the attempt, then win.
    slow = sinks.start("127.0.0.2", mx_port, "-w", "3", "-r", ".")
    proc = fh.create(conf).start()
    first = send(proc, ["a@mx.test"], "deleted in flight")
    second = send(proc, ["b@mx.test"], "held in flight")
    in_flight(slow, 2)
    deleting = cli_start(proc, "delete", first)
    holding = cli_start(proc, "hold", second)
    (deleted, delete_err), (held, hold_err) = finish(deleting), finish(holding)
    assert (deleted, held) == (0, 0), (delete_err, hold_err)
    assert f"{first} is being delivered; waiting" in delete_err
    assert f"{second} is being delivered; waiting" in hold_err
    assert f"{first}: deleted" in delete_err
    proc.wait_log(f"{first}: to=<a@mx.test> status=deferred")
    spool = spool_of(tmp_path)
    assert not spool.entry_path(first).exists()
    assert not spool.msg_path(first).exists()
    # The hold went in after the attempt's result, and kept it: no update was lost.
    state = queued(proc)
    assert set(state) == {second}
    assert state[second]["hold"] is True
    (rcpt,) = state[second]["recipients"]
    assert (rcpt["attempts"], rcpt["last_reply"][:1]) == (1, "4"), rcpt

    # 2. A slow next hop that accepts: changes that come too late say so, and nothing is
    # lost or delivered twice.
    slow.stop()
    accepting = sinks.start("127.0.0.2", mx_port, "-w", "3")
    assert cli(proc, "release", second).returncode == 0
    third = send(proc, ["c@mx.test"], "delivered in flight")
    in_flight(accepting, 2)
    too_late = [cli_start(proc, "delete", third), cli_start(proc, "hold", second)]
    for child, queue_id in zip(too_late, (third, second), strict=True):
        status, err = finish(child)
        assert status == 1, err
        assert f"{queue_id} is no longer queued" in err
    got = accepting.wait_for_count(2)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["b@mx.test", "c@mx.test"]
    wait_until(lambda: queued(proc) == {}, 10, proc.proc, "an empty queue")
    spool.close()


def test_a_message_waiting_for_its_first_attempt_can_be_held(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path
) -> None:
    # One delivery at a time to a slow next hop: the later messages wait, in the server's
    # journal, for their first attempt. The CLI sees them and can still hold one: the server
    # moves waiting messages to files when the CLI asks it to rescan.
    mx_port = free_port()
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        mx_port,
        relay={"retry_schedule": ["1h"], "concurrency": 1},
    )
    slow = sinks.start("127.0.0.2", mx_port, "-w", "2")
    proc = fh.create(conf).start()
    first = send(proc, ["a@mx.test"], "first")
    in_flight(slow, 1)
    waiting = send(proc, ["b@mx.test"], "waiting")
    assert waiting in queued(proc)  # listed while it is only in the journal
    held = cli(proc, "hold", waiting)
    assert held.returncode == 0, held.stderr
    proc.wait_log(f"{first}: to=<a@mx.test> status=delivered")
    state = queued(proc)
    assert set(state) == {waiting}
    assert state[waiting]["hold"] is True
    assert spool_of(tmp_path).entry_path(waiting).exists()  # moved to files
    assert f"{waiting}: to=<b@mx.test> status=delivered" not in proc.log
    assert [m.rcpt_tos for m in slow.wait_for_count(1)] == [["a@mx.test"]]
