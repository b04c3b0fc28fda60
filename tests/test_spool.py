"""The spool: durable writes, state updates, crash leftovers, the delivery lock."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from filterhost.spool import RecipientState, Spool, SpoolEntry, new_queue_id


def _entry(queue_id: str | None = None) -> SpoolEntry:
    return SpoolEntry(
        id=queue_id or new_queue_id(),
        mail_from="alice@example.test",
        recipients=[RecipientState("a@mx.test"), RecipientState("b@mx.test")],
        received=time.time(),
        size=5,
        client_ip="127.0.0.1",
        helo="client.test",
    )


async def test_store_load_update_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    entry = _entry()
    await spool.store(entry, b"hello")
    loaded, data = await spool.load(entry.id)
    assert data == b"hello"
    assert loaded == entry
    loaded.recipients[0].status = "delivered"
    loaded.recipients[1].attempts = 1
    loaded.recipients[1].next_attempt = 123.0
    await spool.update(loaded)
    again = spool.read_entry(entry.id)
    assert [r.status for r in again.recipients] == ["delivered", "pending"]
    assert again.next_attempt == 123.0
    await spool.remove(entry.id)
    assert spool.queue_ids() == []
    assert list(spool.queue_dir.iterdir()) == []
    spool.close()


def test_queue_ids_are_unique_and_sortable_by_time() -> None:
    ids = [new_queue_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids[0][:11] <= ids[-1][:11]
    assert all(i.isalnum() for i in ids)


def test_orphans_of_a_crash_are_removed_only_when_old(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    # A .msg without .json: the crash came before the commit, no client heard 250.
    orphan = spool.msg_path("ORPHAN")
    orphan.write_bytes(b"x")
    young = spool.msg_path("YOUNG")
    young.write_bytes(b"y")
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    assert spool.remove_orphans() == ["ORPHAN"]
    # A young one may belong to a transaction another process is committing right now.
    assert young.exists()
    spool.close()


def _try_lock(directory: str, queue_id: str, out: multiprocessing.Queue[bool]) -> None:
    spool = Spool(Path(directory))
    with spool.locked(queue_id) as mine:
        out.put(mine)
    spool.close()


async def test_delivery_lock_excludes_other_processes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    entry = _entry()
    await spool.store(entry, b"m")
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[bool] = ctx.Queue()
    with spool.locked(entry.id) as mine:
        assert mine
        child = ctx.Process(target=_try_lock, args=(str(tmp_path), entry.id, results))
        child.start()
        child.join(30)
        assert results.get(timeout=5) is False
    child = ctx.Process(target=_try_lock, args=(str(tmp_path), entry.id, results))
    child.start()
    child.join(30)
    assert results.get(timeout=5) is True
    results.close()
    results.join_thread()
    spool.close()


def _rich_entry(helo: str) -> SpoolEntry:
    rcpt = RecipientState(address="b@example.net", options=["NOTIFY=FAILURE"])
    rcpt.history = [{"at": 1.5, "host": "mx[192.0.2.1]:25", "reply": "451 4.3.0 Grüße"}]
    return SpoolEntry(
        id=new_queue_id(),
        mail_from="a@example.org",
        recipients=[rcpt, RecipientState(address="c@example.net", status="delivered")],
        received=time.time(),
        size=1234,
        client_ip="192.0.2.7",
        helo=helo,
        mail_options=["BODY=8BITMIME", "SMTPUTF8"],
        reason="hold: 🙂",
    )


def test_entries_round_trip_as_the_standard_library_reads_them() -> None:
    import json  # noqa: PLC0415 - the reference reader, only here

    # Non-ASCII text, a history, options; and a HELO name with bytes that were not UTF-8 (kept
    # as surrogates), which the fast encoder refuses and the standard library escapes.
    for helo in ("client.example.org", "bad-\udcff-name"):
        entry = _rich_entry(helo)
        data = entry.to_json()
        assert SpoolEntry.from_json(data) == entry
        assert json.loads(data)["recipients"][0]["history"][0]["reply"] == "451 4.3.0 Grüße"
        assert json.loads(data)["helo"] == helo


def test_queue_ids_of_forked_processes_do_not_repeat_each_other() -> None:
    # Worker processes are forked: each must draw its own random part (Python reseeds the
    # random module in a forked child; without that both would produce the same ids).
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write_end, "".join(new_queue_id()[11:] for _ in range(4)).encode())
        os._exit(0)
    mine = "".join(new_queue_id()[11:] for _ in range(4))
    os.waitpid(pid, 0)
    theirs = os.read(read_end, 256).decode()
    os.close(read_end)
    os.close(write_end)
    assert len(theirs) == len(mine) == 32
    assert theirs != mine
