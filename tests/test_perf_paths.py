"""The fast paths of issue 7 keep their contracts: group commit, method discovery, the pool."""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from pathlib import Path

import pytest

import filterhost.spool as spool_module
from filterhost.relay.client import ConnectionPool, _Conn
from filterhost.relay.queue import _Limiter, share_of
from filterhost.smtp.data import (
    DataCollector,
    check_content,
    decode_body,
    has_bare_line_end,
)
from filterhost.smtp.server import FilterhostSMTP, Handler, _discoverable_names
from filterhost.spool import RecipientState, Spool, SpoolEntry, new_queue_id
from tests.components.services import free_port
from tests.filterhost_fixtures import base_config, running_app

# The oracle: a bare CR, a bare LF or a NUL, in one (slow) pattern.
_BAD_BYTES = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")


def _entry() -> SpoolEntry:
    return SpoolEntry(
        id=new_queue_id(),
        mail_from="alice@example.test",
        recipients=[RecipientState("a@mx.test")],
        received=time.time(),
        size=5,
    )


# -- group commit --------------------------------------------------------------------------


async def test_concurrent_stores_share_batches_and_all_are_durable(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    entries = [_entry() for _ in range(60)]
    await asyncio.gather(*(spool.store(e, f"m{i}".encode()) for i, e in enumerate(entries)))
    # Fewer commits than messages: the point of the group commit.
    assert spool.batches < len(entries)
    assert spool.batched_ops == len(entries)
    for i, entry in enumerate(entries):
        assert spool.read_message(entry.id) == f"m{i}".encode()
        assert spool.read_entry(entry.id) == entry
    await asyncio.gather(*(spool.remove(e.id) for e in entries[:30]))
    assert sorted(spool.queue_ids()) == sorted(e.id for e in entries[30:])
    assert not list(spool.queue_dir.glob(".*.tmp"))
    spool.close()


async def test_250_waits_for_the_directory_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """store() returns only after the batch's directory fsync, and fails when it fails."""
    calls: list[str] = []
    real = spool_module.fsync_dir

    def failing(path: Path) -> None:
        calls.append("dir")
        raise OSError(5, "EIO from the test")

    spool = Spool(tmp_path)
    spool.open()
    monkeypatch.setattr(spool_module, "fsync_dir", failing)
    with pytest.raises(OSError, match="EIO"):
        await spool.store(_entry(), b"x")
    assert calls == ["dir"]
    monkeypatch.setattr(spool_module, "fsync_dir", real)
    await spool.store(_entry(), b"y")  # the spool goes on after a failed batch
    spool.close()


async def test_one_failed_store_does_not_fail_its_batch(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    taken = _entry()
    spool.msg_path(taken.id).write_bytes(b"already there")  # O_EXCL refuses it
    good = [_entry() for _ in range(5)]
    results = await asyncio.gather(
        spool.store(taken, b"x"), *(spool.store(e, b"ok") for e in good), return_exceptions=True
    )
    assert isinstance(results[0], FileExistsError)
    assert results[1:] == [None] * len(good)
    assert sorted(spool.queue_ids()) == sorted(e.id for e in good)
    spool.close()


async def test_operations_on_one_id_never_share_a_batch(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    entry = _entry()
    await spool.store(entry, b"x")
    entry.recipients[0].attempts = 1
    first = asyncio.ensure_future(spool.update(entry))
    second = asyncio.ensure_future(spool.remove(entry.id))
    await asyncio.gather(first, second)
    assert spool.queue_ids() == []
    assert not os.listdir(spool.queue_dir)
    spool.close()


# -- method discovery ----------------------------------------------------------------------


def test_discovery_sees_the_same_methods_as_a_full_dir() -> None:
    """aiosmtpd finds every smtp_/handle_/auth_ method through the short per-class dir()."""
    for cls in (FilterhostSMTP, Handler):
        obj = object.__new__(cls)
        full = sorted(n for n in object.__dir__(obj) if n.startswith(("smtp_", "handle_", "auth_")))
        assert _discoverable_names(obj) == full
        assert dir(obj) == full
    assert "smtp_DATA" in dir(object.__new__(FilterhostSMTP))
    assert {"handle_MAIL", "handle_RCPT"} <= set(dir(object.__new__(Handler)))


# Shared on purpose by every session of a config: the settings and the method tables whose
# bound methods belong to the (shared) handler, or that filterhost never calls (its own AUTH).
_SHARED = {
    "event_handler",
    "_handle_hooks",
    "_auth_methods",
    "tls_context",
    "loop",
    "_loop",
    "front",
    "_auth_callback",
    "_authenticator",
    "listener",
    "limits",
    "_smtp_names",  # a tuple of command names
}


async def test_a_session_from_the_template_shares_no_state(tmp_path: Path) -> None:
    """A session made from the template equals one made by aiosmtpd's __init__, and shares
    no mutable state with it or with another session (a new aiosmtpd that adds per-session
    state makes this fail: the template must then reset it)."""
    conf = base_config(tmp_path, free_port(), None, 25)
    async with running_app(tmp_path, conf) as app:
        front = app.front
        listener = front.listeners()[0]
        front.smtp_templates.clear()
        full = front.protocol(listener)  # aiosmtpd's __init__; becomes the template
        assert front.smtp_templates
        one, two = front.protocol(listener), front.protocol(listener)
    assert one._bound_smtp is None  # bound on first use: the synchronous path never asks
    assert one._smtp_methods
    assert two._smtp_methods
    assert vars(one).keys() == vars(full).keys()
    for name, value in vars(full).items():
        copied = vars(one)[name]
        assert type(copied) is type(value), name
        if name in _SHARED or isinstance(value, (str, bytes, int, float, bool, type(None))):
            assert copied == value, name
            continue
        # Everything else is per session: never the same object in two sessions.
        assert copied is not value, name
        assert copied is not vars(two)[name], name
    assert one._smtp_methods.keys() == full._smtp_methods.keys()
    assert all(m.__self__ is one for m in one._smtp_methods.values())
    assert one._stream_reader is not full._stream_reader


# -- the outbound connection pool ----------------------------------------------------------


class _FakeHop:
    """Stands in for a NextHop session: only the pool's view of it (open, closed, quit)."""

    def __init__(self, quit_gate: asyncio.Event | None = None) -> None:
        self.is_connected = True
        self.quit_gate = quit_gate

    async def reset(self) -> bool:
        return self.is_connected

    async def quit(self) -> None:
        if self.quit_gate is not None:
            await self.quit_gate.wait()
        self.is_connected = False

    def close(self) -> None:
        self.is_connected = False


async def test_expire_never_puts_back_a_connection_in_use() -> None:
    pool = ConnectionPool(idle_time=10.0)
    key = ("127.0.0.1", 25)
    gate = asyncio.Event()
    old = _Conn(_FakeHop(gate), "old", "")  # type: ignore[arg-type]
    fresh = _Conn(_FakeHop(), "fresh", "")  # type: ignore[arg-type]
    pool.give_back(key, old)
    pool.give_back(key, fresh)
    old.idle_since = time.monotonic() - 100
    expiring = asyncio.create_task(pool.expire())
    await asyncio.sleep(0)  # expire() now waits for the old connection's QUIT
    assert await pool.take(key) is fresh  # a delivery takes the fresh one meanwhile
    gate.set()
    await expiring
    # The fresh connection is in use: the pool must not hand it out a second time.
    assert await pool.take(key) is None


async def test_the_per_hop_limit_holds_waits_and_forgets_idle_hops() -> None:
    limiter = _Limiter(2)
    inside: list[int] = []
    gate = asyncio.Event()

    async def deliver(key: str) -> None:
        await limiter.acquire(key)
        try:
            inside.append(1)
            peak.append(len(inside))
            await gate.wait()
            inside.pop()
        finally:
            limiter.release(key)

    peak: list[int] = []
    tasks = [asyncio.create_task(deliver("a")) for _ in range(5)]
    other = asyncio.create_task(deliver("b"))  # another hop is not held up by "a"
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(inside) == 3  # two for "a", one for "b"
    waiting = tasks[-1]
    waiting.cancel()  # a delivery cancelled while it waits for a slot
    gate.set()
    await asyncio.gather(*tasks[:-1], other)
    assert waiting.cancelled()
    assert max(peak) == 3
    assert limiter._sems == {}  # nobody holds or waits: the hops are forgotten


async def test_the_first_load_of_a_message_just_stored_comes_from_memory(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    entry = _entry()
    await spool.store(entry, b"the bytes")
    # The file is what was written; the runner's first load does not read it back.
    spool.msg_path(entry.id).write_bytes(b"changed behind the spool's back")
    loaded, data = await spool.load(entry.id)
    assert (loaded, data) == (entry, b"the bytes")
    # Later loads (retries) read the file again.
    assert (await spool.load(entry.id))[1] == b"changed behind the spool's back"
    spool.close()


async def test_memory_kept_for_the_runner_is_bounded(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    spool.fresh_limit = 10
    first, second = _entry(), _entry()
    await spool.store(first, b"123456")
    await spool.store(second, b"abcdef")  # over the limit: the oldest is forgotten
    assert spool._fresh_bytes <= 10
    assert list(spool._fresh) == [second.id]
    assert (await spool.load(first.id))[1] == b"123456"  # from disk
    await spool.remove(second.id)
    assert spool._fresh_bytes == 0
    spool.close()


def test_content_check_fast_path_agrees_with_the_regex() -> None:
    rng = random.Random(7)
    for _ in range(20000):
        content = bytes(rng.choice(b"a\r\n\x00") for _ in range(rng.randint(0, 8)))
        bad = _BAD_BYTES.search(content)
        reply = check_content(content)
        assert (reply is not None) == (bad is not None), content
        if reply is not None and bad is not None:
            # The first problem in the message is the one named.
            what = {b"\r": "bare CR", b"\n": "bare LF", b"\x00": "NUL"}[bad.group()]
            assert f"contains a {what};" in reply.text, content


def test_long_line_check_agrees_with_splitting_into_lines() -> None:
    """The window scan finds exactly the lines over 998 octets that a split finds."""
    rng = random.Random(11)
    for _ in range(3000):
        lines = [
            b"x" * rng.choice((0, 1, 497, 498, 499, 500, 997, 998, 999, 1000, 1500, 2500))
            for _ in range(rng.randint(1, 6))
        ]
        content = b"\r\n".join(lines) + rng.choice((b"\r\n", b""))
        expected = max(map(len, content.split(b"\r\n"))) > 998
        reply = check_content(content)
        assert (reply is not None) == expected, [len(x) for x in lines]
        if reply is not None:
            assert "over 1000 octets" in reply.text


# -- the queue runner's rescan with worker shares ------------------------------------------


async def test_rescan_takes_every_message_or_exactly_this_workers_share(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    entries = [_entry() for _ in range(12)]
    for entry in entries:
        entry.recipients[0].next_attempt = time.time() + 3600  # due later: stays in the heap
        spool.store_entry(entry, b"x")
    conf = base_config(tmp_path, free_port(), None, 25)
    async with running_app(tmp_path, conf) as app:
        runner = app.queue
        # One process: the start-up rescan scheduled all of them.
        assert sorted(runner._due) == sorted(e.id for e in entries)
        for index in (0, 1):
            runner._due.clear()
            runner._heap.clear()
            runner._mtimes.clear()
            runner.share = (index, 2)
            runner.rescan()
            mine = sorted(e.id for e in entries if share_of(e.id, 2) == index)
            assert sorted(runner._due) == mine
    spool.close()


async def test_the_first_load_takes_the_entry_kept_in_memory_only_while_its_file_is_unchanged(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    spool.open()
    kept, changed = _entry(), _entry()
    await spool.store(kept, b"one")
    await spool.store(changed, b"two")
    # The queue CLI's way of changing an entry: a new file renamed over the old one.
    held = SpoolEntry.from_json(spool.entry_path(changed.id).read_bytes())
    held.hold = True
    spool.write_entry(held)
    entry, _ = await spool.load(kept.id)
    assert entry is kept  # unchanged on disk: no read
    entry, _ = await spool.load(changed.id)
    assert entry.hold  # changed on disk: read back
    assert entry is not changed
    spool.close()


def test_unstuffing_and_line_end_searches_agree_with_the_plain_operations() -> None:
    rng = random.Random(5)
    for _ in range(20000):
        raw = bytes(rng.choice(b"a.\r\n") for _ in range(rng.randint(0, 10)))
        plain = raw[1:] if raw.startswith(b".") else raw
        assert decode_body(raw) == plain.replace(b"\r\n.", b"\r\n"), raw
        crlf = raw.count(b"\r\n")
        bare = raw.count(b"\r") != crlf or raw.count(b"\n") != crlf
        assert has_bare_line_end(raw) == bare, raw


def test_data_collector_finds_the_end_and_the_dot_lines_in_any_chunking() -> None:
    """One search finds where DATA ends and whether any line starts with a dot."""
    rng = random.Random(3)
    for _ in range(5000):
        body = bytes(rng.choice(b"a.\r\n") for _ in range(rng.randint(0, 12)))
        stream = body + b"\r\n.\r\n" + bytes(rng.choice(b"a.\r\n") for _ in range(3))
        virtual = b"\r\n" + stream
        end = virtual.find(b"\r\n.\r\n")  # the first end marker is the one that counts
        raw = virtual[2 : end + 2]
        collector = DataCollector(1000)
        cuts = sorted(rng.sample(range(1, len(stream)), min(3, len(stream) - 1)))
        done = None
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            assert done is None, stream  # nothing is fed after the end
            done = collector.feed(stream[a:b])
            if done is not None:
                rest_from = b
                break
        assert done is not None, stream
        result, rest = done
        assert result.raw == raw, stream
        assert rest + stream[rest_from:] == virtual[end + 5 :], stream
        assert result.dot_lines == ((b"\r\n" + raw).find(b"\r\n.") >= 0), stream
        assert decode_body(raw, dot_lines=result.dot_lines) == decode_body(raw), stream
