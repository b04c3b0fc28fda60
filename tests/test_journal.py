"""The spool's journal: records, group commit, moving to files, recovery after a crash."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import filterhost.journal as journal_module
from filterhost.checks import check_configuration
from filterhost.journal import DONE, STORE, Batch, Journal, live_messages, read_segment
from filterhost.pluginmanager import Plugins
from filterhost.reload import restart_needed
from filterhost.spool import Checked, RecipientState, Spool, SpoolEntry, new_queue_id
from tests.filterhost_fixtures import wait_for, write_conf


def _entry() -> SpoolEntry:
    return SpoolEntry(
        id=new_queue_id(),
        mail_from="a@example.test",
        recipients=[RecipientState("b@example.test")],
        received=time.time(),
        size=3,
    )


def _spool(tmp: Path, index: int = 0, count: int = 1) -> Spool:
    spool = Spool(tmp)
    spool.use_journal(index, count)
    spool.open()
    return spool


def _files(spool: Spool) -> list[str]:
    return sorted(os.listdir(spool.queue_dir))


def test_records_read_back_and_a_torn_or_damaged_tail_ends_the_reading(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    batch = Batch()
    journal.add(batch, STORE, "ID1", b'{"e":1}', b"message one\r\n")
    journal.add(batch, STORE, "ID2", b'{"e":2}', b"two\r\n")
    journal.add(batch, DONE, "ID1")
    journal.write(batch)
    journal.close()
    (segment,) = journal.segments()
    records = list(read_segment(segment))
    assert [(r.kind, r.queue_id, r.entry, r.data()) for r in records] == [
        (STORE, "ID1", b'{"e":1}', b"message one\r\n"),
        (STORE, "ID2", b'{"e":2}', b"two\r\n"),
        (DONE, "ID1", b"", b""),
    ]
    # The data offsets point at the message bytes in the file.
    blob = segment.read_bytes()
    assert blob[records[1].offset : records[1].offset + 5] == b"two\r\n"
    assert set(live_messages(tmp_path)) == {"ID2"}
    # A listing does not read the message bytes, a recovery checks them.
    assert [r.queue_id for r in read_segment(segment, verify=False)] == ["ID1", "ID2", "ID1"]
    # Zeros follow the records (written ahead, so that the next batches need not grow the
    # file); reading stops there.
    end = records[-1].offset + records[-1].length
    assert len(blob) > end
    assert blob[end:] == bytes(len(blob) - end)
    # A crash in the middle of a write leaves a torn record in those zeros: it was never
    # acknowledged, and neither a recovery nor a listing (which checks the last record) sees it.
    torn = blob[:end] + blob[:30] + bytes(len(blob) - end - 30)
    segment.write_bytes(torn)
    assert len(list(read_segment(segment))) == 3
    assert [r.queue_id for r in read_segment(segment, verify=False)] == ["ID1", "ID2", "ID1"]
    # Without zeros after it (the file ends inside the torn record), too.
    segment.write_bytes(blob[:end] + blob[:30])
    assert len(list(read_segment(segment))) == 3
    assert len(list(read_segment(segment, verify=False))) == 3
    # A flipped byte inside a record: reading stops before it.
    damaged = bytearray(blob)
    damaged[records[1].offset] ^= 0xFF
    segment.write_bytes(bytes(damaged))
    assert [r.queue_id for r in read_segment(segment)] == ["ID1"]


async def test_a_message_delivered_at_once_never_becomes_a_file(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    entry = _entry()
    await spool.store(entry, b"abc")
    assert _files(spool) == []  # no .msg, no .json: one record in the journal
    assert entry.id in spool.journal  # type: ignore[operator]
    loaded, data = await spool.load(entry.id)
    assert (loaded, data) == (entry, b"abc")
    with spool.locked(entry.id) as mine:
        assert mine  # only this process can see it
    await spool.remove(entry.id)
    assert entry.id not in spool.journal  # type: ignore[operator]
    # Its DONE is not waited for: it goes with the next batch, or a moment later.
    assert set(live_messages(tmp_path / "journal")) == {entry.id}
    await wait_for(lambda: live_messages(tmp_path / "journal") == {})
    spool.close()


async def test_a_message_that_must_wait_moves_to_files_the_cli_can_see(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    entry = _entry()
    await spool.store(entry, b"the bytes\r\n")
    entry.recipients[0].attempts = 1
    entry.recipients[0].next_attempt = time.time() + 60
    await spool.update(entry)
    assert _files(spool) == [f"{entry.id}.json", f"{entry.id}.msg"]
    assert spool.read_message(entry.id) == b"the bytes\r\n"
    assert spool.read_entry(entry.id).recipients[0].attempts == 1
    assert live_messages(tmp_path / "journal") == {}  # its DONE is written
    # From now on it is an ordinary queued message.
    loaded, data = await spool.load(entry.id)
    assert (loaded.recipients[0].attempts, data) == (1, b"the bytes\r\n")
    await spool.remove(entry.id)
    assert _files(spool) == []
    spool.close()


async def test_concurrent_stores_share_one_fdatasync(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    journal = spool.journal
    assert journal is not None
    entries = [_entry() for _ in range(200)]
    await asyncio.gather(*(spool.store(e, b"x" * 5000) for e in entries))
    assert journal.batched == 200
    assert journal.batches < 100  # batches formed while the previous one was being synced
    spool.close()


async def test_full_segments_are_deleted_once_every_message_in_them_is_done(
    tmp_path: Path,
) -> None:
    spool = _spool(tmp_path)
    assert spool.journal is not None
    spool.journal.segment_size = 20_000
    entries = [_entry() for _ in range(12)]
    for entry in entries:
        await spool.store(entry, b"y" * 5000)
    assert len(spool.journal.segments()) >= 3
    for entry in entries[:-1]:
        await spool.remove(entry.id)
    # Only the segment holding the last message (the current one) is left, once the DONEs
    # (not waited for) are written.
    journal = spool.journal
    await wait_for(lambda: len(journal.segments()) == 1)
    await spool.remove(entries[-1].id)
    await wait_for(lambda: live_messages(tmp_path / "journal") == {})
    spool.close()


async def test_after_a_crash_what_was_not_done_is_queued_as_files(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    delivered, deferred, in_flight = _entry(), _entry(), _entry()
    for entry, body in ((delivered, b"1"), (deferred, b"2"), (in_flight, b"3")):
        await spool.store(entry, body)
    await spool.remove(delivered.id)
    deferred.recipients[0].attempts = 1
    await spool.update(deferred)
    # kill -9 here: no close(), nothing flushed beyond what was acknowledged.
    again = _spool(tmp_path)
    assert sorted(again.queue_ids()) == sorted([deferred.id, in_flight.id])
    assert again.read_message(in_flight.id) == b"3"
    assert again.read_entry(in_flight.id) == in_flight
    assert again.read_entry(deferred.id).recipients[0].attempts == 1
    assert list((tmp_path / "journal").glob("*.jnl")) == []
    again.close()


async def test_worker_zero_recovers_the_journal_of_a_worker_that_no_longer_exists(
    tmp_path: Path,
) -> None:
    second = _spool(tmp_path, index=1, count=2)
    entry = _entry()
    await second.store(entry, b"left behind")
    # workers lowered from 2 to 1: the single process (index 0) takes worker 1's journal.
    single = _spool(tmp_path)
    assert single.queue_ids() == [entry.id]
    single.close()


async def test_a_failed_journal_write_fails_the_store_and_forgets_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = _spool(tmp_path)
    assert spool.journal is not None

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_module.os, "fdatasync", broken)
    entry = _entry()
    with pytest.raises(OSError, match="Input/output error"):
        await spool.store(entry, b"never acknowledged")
    assert entry.id not in spool.journal
    monkeypatch.undo()
    # The next batch starts a new segment (the old one may end in a torn record).
    later = _entry()
    await spool.store(later, b"ok")
    assert later.id in spool.journal
    spool.close()
    # A clean stop leaves everything in files: the later message, not the failed one.
    assert spool.queue_ids() == [later.id]
    assert live_messages(tmp_path / "journal") == {}


def test_turning_the_journal_on_or_off_needs_a_restart(tmp_path: Path) -> None:
    configs = []
    for journal in (True, False):
        sections = {"spool": {"directory": str(tmp_path / "spool"), "journal": journal}}
        confdir = write_conf(tmp_path / f"conf-{journal}.d", sections)
        config, _, problems = check_configuration(confdir, Plugins())
        assert config is not None, problems
        configs.append(config)
    assert restart_needed(configs[0], configs[1]) == ["spool.journal"]


async def test_bytes_the_front_end_checked_are_marked_for_the_first_attempt_only(
    tmp_path: Path,
) -> None:
    spool = _spool(tmp_path)
    checked, unchecked = _entry(), _entry()
    await spool.store(checked, b"a\r\n", checked=Checked(3))
    await spool.store(unchecked, b"b\r\n")
    await spool.load(checked.id)
    await spool.load(unchecked.id)
    assert spool.checked(checked.id) == Checked(3)
    assert spool.checked(checked.id) is None  # once
    assert spool.checked(unchecked.id) is None
    spool.close()


_NEARLY_FULL = """
import json, resource, signal, sys
from pathlib import Path
from filterhost.journal import STORE, Batch, Journal, read_segment
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
journal = Journal(Path(sys.argv[1]))
batch = Batch()
journal.add(batch, STORE, "ID1", b"{}", b"x" * 5000)
journal.write(batch)
journal.close()
(segment,) = journal.segments()
print(json.dumps({"ids": [r.queue_id for r in read_segment(segment)],
                  "size": segment.stat().st_size}))
"""


def test_a_disk_without_room_for_the_zeros_still_takes_the_records(tmp_path: Path) -> None:
    # Files may not grow past the record's own end (RLIMIT_FSIZE: EFBIG, as a full disk's
    # ENOSPC): the zeros after it cannot be written, the record can, and is durable.
    record = 14 + len("ID1") + len("{}") + 5000
    done = subprocess.run(
        [sys.executable, "-c", _NEARLY_FULL, str(tmp_path), str(record)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result == {"ids": ["ID1"], "size": record}
