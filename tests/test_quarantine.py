"""The quarantine: QUARANTINE verdicts kept aside durably; list, show, release, delete.

End to end with a real filterhost process, a real clamd (EICAR test signatures), the test DNS
and an smtp-sink next hop; the CLI is the real ``filterhost quarantine`` command. The last
tests drive :class:`QuarantineControl` on a spool directly (crash leftovers, a busy lock).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from filterhost.quarantine import AREA, QuarantineControl
from filterhost.queuectl import EXIT_BUSY, MessageBusyError, UnknownMessageError
from filterhost.spool import RecipientState, Spool, SpoolEntry, new_queue_id
from tests.components.fixtures import Sinks
from tests.components.services import EICAR, Clamd, Dns, free_port, start_clamd, wait_until
from tests.filterhost_fixtures import FilterhostFactory, FilterhostProcess, base_config, spooled_ids

SENDER = "alice@example.test"


def cli(proc: FilterhostProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``filterhost -c CONFDIR ARGS...``, run to completion."""
    return subprocess.run(
        [sys.executable, "-m", "filterhost", "-c", str(proc.confdir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def quarantined(proc: FilterhostProcess) -> dict[str, dict[str, Any]]:
    done = cli(proc, "quarantine", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {m["id"]: m for m in json.loads(done.stdout)}


def message(
    subject: str, body: bytes = b"hello\n", attachment: tuple[str, bytes] | None = None
) -> bytes:
    m = EmailMessage()
    m["From"] = SENDER
    m["To"] = "bob@mx.test"
    m["Subject"] = subject
    m.set_content(body.decode())
    if attachment is not None:
        name, data = attachment
        m.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def submit(proc: FilterhostProcess, data: bytes) -> str:
    with proc.smtp() as client:
        client.ehlo("client.test")
        client.mail(SENDER)
        assert client.rcpt("bob@mx.test")[0] == 250
        code, text = client.data(data)
    assert code == 250, text
    match = re.search(rb"queued as ([0-9A-F]+)", text)
    assert match is not None, text
    return match.group(1).decode()


@pytest.fixture
def own_clamd() -> Iterator[Clamd]:
    """A clamd for this test alone: the test stops it."""
    server = start_clamd()
    try:
        yield server
    finally:
        server.stop()


def test_quarantine_list_show_release_delete(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, own_clamd: Clamd, tmp_path: Path
) -> None:
    sink = sinks.start("127.0.0.2", free_port())  # mx1.mx.test
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        sink.port,
        plugins={
            "order": ["clamav", "attachments"],
            "clamav": {"servers": [f"127.0.0.1:{own_clamd.port}"], "on_virus": "quarantine"},
            "attachments": {"action": "quarantine"},
        },
    )
    proc = fh.create(conf).start()
    virus = submit(proc, message("eicar", attachment=("eicar.com.txt", EICAR)))
    banned = submit(proc, message("banned", attachment=("invoice.pdf.exe", b"x")))
    clean = submit(proc, message("clean"))
    (delivered,) = sink.wait_for_count(1)
    assert b"Subject: clean" in delivered.data
    proc.wait_log(f"{clean}: to=<bob@mx.test> status=delivered")

    # Both kept aside, with who and why; neither is in the queue.
    listed = quarantined(proc)
    assert set(listed) == {virus, banned}
    assert (listed[virus]["plugin"], listed[virus]["reason"]) == (
        "clamav",
        "Virus found: Filterhost.Test.EICAR-Body.UNOFFICIAL",
    )
    assert listed[banned]["plugin"] == "attachments"
    assert listed[banned]["reason"] == (
        'Attachment "invoice.pdf.exe" is not allowed (double extension)'
    )
    assert listed[virus]["sender"] == SENDER
    assert listed[virus]["recipients"] == ["bob@mx.test"]
    spool = Path(conf["spool"]["directory"])
    queue = Spool(spool)
    assert spooled_ids(spool) == set()
    assert re.search(
        rf"{virus}: quarantined from=<{SENDER}> size=\d+ nrcpt=1 client=127\.0\.0\.1 "
        r"plugin=clamav reason='Virus found: ",
        proc.log,
    )
    table = cli(proc, "quarantine", "list").stdout
    assert re.search(rf"^{virus} +\S+ +\d+  clamav +<{re.escape(SENDER)}>$", table, re.M), table
    assert "    reason: Virus found: Filterhost.Test.EICAR-Body.UNOFFICIAL\n" in table
    assert table.endswith("-- 2 message(s) in quarantine\n")
    shown = cli(proc, "quarantine", "show", virus[:-2])  # a unique prefix will do
    assert shown.returncode == 0, shown.stderr
    assert "plugin:      clamav\n" in shown.stdout
    assert "X-Virus-Status: Infected (Filterhost.Test.EICAR-Body.UNOFFICIAL)" in shown.stdout
    assert "EICAR-STANDARD" not in shown.stdout  # headers only unless --body
    assert "Subject: eicar" in cli(proc, "quarantine", "show", "--body", virus).stdout

    # Release with clamd gone: a rescan would tempfail or block, so delivery proves there is none.
    own_clamd.stop()
    log_before = len(proc.log)
    released = cli(proc, "quarantine", "release", virus)
    assert released.returncode == 0, released.stderr
    assert f"{virus}: released from quarantine into the queue, not scanned again" in (
        released.stderr
    )
    assert "(quarantined " in released.stderr
    assert "by clamav: Virus found: Filterhost.Test.EICAR-Body.UNOFFICIAL); 1 recipient(s)" in (
        released.stderr
    )
    proc.wait_log(f"{virus}: to=<bob@mx.test> status=delivered")
    got = sink.wait_for_count(2)
    infected = next(m for m in got if b"Subject: eicar" in m.data)
    assert infected.rcpt_tos == ["bob@mx.test"]
    assert b"X-Virus-Status: Infected (Filterhost.Test.EICAR-Body.UNOFFICIAL)" in infected.data
    after = proc.log[log_before:]
    assert f"{virus}: to=<bob@mx.test>" in after
    assert "clamav" not in after  # neither scanned nor tried to scan after the release
    assert sorted(p.name for p in (spool / AREA).iterdir()) == [
        f"{banned}.json",
        f"{banned}.msg",
    ]

    deleted = cli(proc, "quarantine", "delete", banned)
    assert deleted.returncode == 0, deleted.stderr
    assert f"{banned}: deleted from quarantine, no bounce sent" in deleted.stderr
    assert list((spool / AREA).iterdir()) == []
    wait_until(lambda: spooled_ids(spool) == set(), 10, proc.proc, "an empty queue")
    queue.close()
    assert len(sink.messages()) == 2  # the deleted one never left

    unknown = cli(proc, "quarantine", "release", "FFFFFFFF", banned)
    assert unknown.returncode == 1, unknown
    assert "no quarantined message FFFFFFFF" in unknown.stderr
    assert f"no quarantined message {banned}" in unknown.stderr


# ----------------------------------------------------------------------------- the store


def _quarantine_one(directory: Path) -> tuple[SpoolEntry, bytes]:
    area = Spool(directory, area=AREA)
    area.open()
    entry = SpoolEntry(
        id=new_queue_id(),
        mail_from=SENDER,
        recipients=[RecipientState("bob@mx.test"), RecipientState("carol@mx.test")],
        received=time.time() - 86400 * 6,  # older than the default queue lifetime
        size=7,
        client_ip="10.0.0.5",
        helo="ws1.test",
        hold=True,
        reason="Virus found: X",
        plugin="clamav",
    )
    data = b"Subject: x\r\n\r\nhello\r\n"
    area.write_entry(entry)  # .json ...
    area.msg_path(entry.id).write_bytes(data)  # ... and .msg: order does not matter here
    area.close()
    return entry, data


def test_release_moves_both_files_and_makes_the_message_due(tmp_path: Path) -> None:
    entry, data = _quarantine_one(tmp_path)
    ctl = QuarantineControl(tmp_path, clock=lambda: 1_000_000_000.0)
    try:
        outcome = ctl.release(entry.id[:8])
    finally:
        ctl.close()
    assert outcome.changed
    assert ctl.server_notified is False  # no server runs on this spool
    queue = Spool(tmp_path)
    try:
        moved = queue.read_entry(entry.id)
        assert queue.read_message(entry.id) == data
    finally:
        queue.close()
    assert (moved.hold, moved.reason, moved.plugin) == (False, "", "")
    assert moved.received == 1_000_000_000.0  # its queue lifetime starts now
    assert [(r.address, r.status, r.next_attempt) for r in moved.recipients] == [
        ("bob@mx.test", "pending", 1_000_000_000.0),
        ("carol@mx.test", "pending", 1_000_000_000.0),
    ]
    assert (moved.mail_from, moved.client_ip, moved.helo) == (SENDER, "10.0.0.5", "ws1.test")
    assert list((tmp_path / AREA).iterdir()) == []


def test_an_interrupted_release_is_finished_not_duplicated(tmp_path: Path) -> None:
    # Crash after the copy was queued, before the quarantine files went: both exist.
    entry, data = _quarantine_one(tmp_path)
    queue = Spool(tmp_path)
    queue.open()
    queue.store_entry(entry, data)
    ctl = QuarantineControl(tmp_path)
    try:
        outcome = ctl.release(entry.id)
        assert "an earlier release was interrupted" in outcome.text
        assert ctl.entries() == []
        assert queue.queue_ids() == [entry.id]
        # Crash after the .msg was written to the queue but before its .json: an orphan that
        # the next release replaces.
        second, data2 = _quarantine_one(tmp_path)
        queue.msg_path(second.id).write_bytes(b"partial")
        ctl.release(second.id)
        assert queue.read_message(second.id) == data2
        assert queue.read_entry(second.id).hold is False
    finally:
        ctl.close()
        queue.close()


def test_a_locked_message_is_busy_and_unknown_ids_are_errors(tmp_path: Path) -> None:
    entry, _ = _quarantine_one(tmp_path)
    area = Spool(tmp_path, area=AREA)
    ctl = QuarantineControl(tmp_path, lock_timeout=0.2)
    waited: list[str] = []
    ctl.on_wait = waited.append
    try:
        with area.locked(entry.id) as mine:
            assert mine
            with pytest.raises(MessageBusyError) as busy:
                ctl.delete(entry.id)
        assert busy.value.exit_code == EXIT_BUSY
        assert waited == [entry.id]
        assert [e.id for e in ctl.entries()] == [entry.id]  # untouched
        with pytest.raises(UnknownMessageError, match="no quarantined message NOPE"):
            ctl.release("NOPE")
        assert ctl.delete(entry.id).changed
        assert ctl.entries() == []
    finally:
        ctl.close()
        area.close()
