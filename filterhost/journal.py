"""The spool's journal: new messages appended to one file, made durable by one fdatasync a batch.

A message written as two files of its own costs two creates, two fsyncs, a rename and a share of
a directory fsync, and later two unlinks and another directory fsync: in the bench that was half
of the CPU per message (the kernel's journal work) and most of the wait before 250. Most
messages of a smart host are delivered within a second of arriving, so their first home is
cheaper as a record in an append-only journal:

- ``STORE`` (queue id, entry JSON, message bytes) is appended; the batch's one ``fdatasync``
  makes it durable before anyone is told 250;
- ``DONE`` (queue id) is appended when the message needs the journal no more: delivered, bounced,
  or moved to files of its own (:class:`filterhost.spool.Spool` "spills" a message to the classic
  ``.msg``/``.json`` pair, durably, before its ``DONE``, as soon as it must wait for a retry, is
  held or is changed, so everything the queue CLI works on is in files);
- segments (``journal/<owner>-<seq>.jnl``) roll at ``segment_size`` and are deleted once every
  message stored in them is done;
- at start-up, :meth:`Journal.recover` reads the owner's segments, spills every message stored
  without a ``DONE`` (the process stopped or crashed during its first attempt), and deletes them.

Each record: a 14-byte header ``kind, id length, entry length, data length, crc32``, then the id,
the entry and the data; the CRC covers the header's first 10 bytes and the rest. A torn record at
the end of a segment (a crash in the middle of a write, never acknowledged) ends its reading, as
do the zeros the writer keeps ahead of the records (a small batch is followed by 1 MiB of them,
so that later batches overwrite instead of growing the file: see :meth:`Journal.write`).

Only the loop thread calls the methods here, except :meth:`write` (the commit thread) and
:meth:`recover` (start-up, before any other use).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

__all__ = ["Journal", "JournalRecord", "fsync_dir", "live_messages", "read_segment"]

log = logging.getLogger("filterhost.spool")

STORE, DONE = 1, 2
_HEADER = struct.Struct("<BBIII")
SEGMENT_SIZE = 64 * 1024 * 1024
# Seconds a DONE nobody waits for may stay unwritten (when no STORE batch takes it sooner).
_LAZY_FLUSH = 0.2
_PREPARE = 1 << 20  # bytes of zeros written ahead of a small batch
_ZEROS = bytes(_PREPARE)


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """One record read back from a segment (``entry`` empty for DONE)."""

    kind: int
    queue_id: str
    entry: bytes
    path: Path
    offset: int
    """Where the message bytes start in the segment."""
    length: int
    """How many message bytes there are."""

    def data(self) -> bytes:
        """The message bytes, read from the segment."""
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return f.read(self.length)


def _record(kind: int, queue_id: str, entry: bytes = b"", data: bytes = b"") -> list[bytes]:
    ident = queue_id.encode("ascii")
    head = _HEADER.pack(kind, len(ident), len(entry), len(data), 0)[:10]
    crc = zlib.crc32(data, zlib.crc32(entry, zlib.crc32(ident, zlib.crc32(head))))
    first = head + struct.pack("<I", crc) + ident + entry
    return [first, data] if data else [first]


def read_segment(path: Path, *, verify: bool = True) -> Iterator[JournalRecord]:
    """Every whole record of a segment, in order; stops at the first torn or damaged one.

    The message bytes are not kept (:meth:`JournalRecord.data` reads them): a segment may hold
    many large messages. ``verify=False`` (a listing) checks the CRC of the last record only
    (the one a crash, or the server writing right now, may have left torn in the zeros
    written ahead of it), skipping over the others' bytes; recovery verifies every record.
    """
    with path.open("rb") as f:
        total = os.fstat(f.fileno()).st_size
        pos = 0
        last: tuple[JournalRecord, bytes, int] | None = None  # unverified: (record, head+meta, crc)
        while True:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                break
            kind, id_len, entry_len, data_len, crc = _HEADER.unpack(head)
            data_at = pos + _HEADER.size + id_len + entry_len
            end = data_at + data_len
            if kind not in (STORE, DONE) or end > total:
                break  # torn, or the zeros after the last record: never acknowledged
            meta = f.read(id_len + entry_len)
            ident = meta[:id_len].decode("ascii", "replace")
            record = JournalRecord(kind, ident, meta[id_len:], path, data_at, data_len)
            if verify:
                if not _crc_ok(f, head[:10] + meta, data_len, crc):
                    log.warning(
                        "%s: torn or damaged record at offset %d; reading stops there", path, pos
                    )
                    return
                yield record
            else:
                if last is not None:
                    yield last[0]
                last = (record, head[:10] + meta, crc)
                f.seek(end)
            pos = end
        if last is not None:
            record, covered, crc = last
            f.seek(record.offset)
            if _crc_ok(f, covered, record.length, crc):
                yield record


def _crc_ok(f: BinaryIO, covered: bytes, data_len: int, crc: int) -> bool:
    """True when ``covered`` and the next ``data_len`` bytes of ``f`` have the CRC ``crc``."""
    check = zlib.crc32(covered)
    left = data_len
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            return False
        check = zlib.crc32(chunk, check)
        left -= len(chunk)
    return check == crc


def _live(paths: list[Path], *, verify: bool = True) -> dict[str, JournalRecord]:
    stored: dict[str, JournalRecord] = {}
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile: all of it done
            for record in read_segment(path, verify=verify):
                if record.kind == STORE:
                    stored[record.queue_id] = record
                else:
                    stored.pop(record.queue_id, None)
    return stored


def live_messages(directory: Path) -> dict[str, JournalRecord]:
    """Messages stored and not done in every segment of ``directory`` (read only).

    For the queue CLI: while a server runs, these are messages in their first delivery
    attempt; the server moves any that must wait to files of their own.
    """
    return _live(sorted(directory.glob("w*-*.jnl")), verify=False)


@dataclass(slots=True)
class _Segment:
    seq: int
    path: Path
    size: int = 0
    live: set[str] = field(default_factory=set)
    """Queue ids stored here and not done yet."""


@dataclass(slots=True)
class _Where:
    segment: _Segment
    offset: int
    length: int
    entry: bytes


_Rec = tuple[int, str, bytes, bytes]
"""A record to write: kind, queue id, entry, data (framed and checksummed by the writer)."""


@dataclass(slots=True)
class Batch:
    """Records to append, in order, grouped by segment (made by :meth:`Journal.add`)."""

    groups: list[tuple[_Segment, list[_Rec]]] = field(default_factory=list)
    new_segments: bool = False
    retired: list[_Segment] = field(default_factory=list)
    """Segments whose last live message is done by this batch: deleted once it is durable."""

    def __bool__(self) -> bool:
        return bool(self.groups or self.retired)


class Journal:
    """Append-only segments in ``directory`` for one owner (a process, or a worker index)."""

    def __init__(
        self, directory: Path, index: int = 0, count: int = 1, segment_size: int = SEGMENT_SIZE
    ) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        self.owner = f"w{index}"
        self.segment_size = segment_size
        self._index: dict[str, _Where] = {}
        self._current: _Segment | None = None
        self._next_seq = 1
        self._fd: int | None = None
        self._fd_seq = 0
        self._end = 0  # where the commit thread writes the next record of the open segment
        self._prepared = 0  # how far that segment's file is written (records, then zeros)
        self._pending: list[_Pending] = []
        self._retired_later: list[_Segment] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-journal")
        self.batches = 0
        """Batches made durable (with :attr:`batched`: the mean batch size, for the bench)."""
        self.batched = 0

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def ids(self) -> list[str]:
        """The messages stored and not done yet."""
        return list(self._index)

    def segments(self) -> list[Path]:
        """The segments this process recovers at start-up, oldest first.

        Its own, and for worker 0 also those of worker indexes that no longer exist
        (``workers`` was lowered).
        """
        mine = []
        for path in self.directory.glob("w*-*.jnl"):
            try:
                owner = int(path.name[1:].partition("-")[0])
            except ValueError:
                continue
            if owner == self.index or (self.index == 0 and owner >= self.count):
                mine.append(path)
        return sorted(mine)

    # -- start-up ----------------------------------------------------------------------------

    def recover(self, spill: Callable[[str, bytes, bytes], None]) -> int:
        """Hand every message stored without DONE to ``spill(id, entry, data)``; delete segments.

        ``spill`` must make the message durable elsewhere before it returns. Returns how many
        were spilled.
        """
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        paths = self.segments()
        stored = _live(paths)
        for record in stored.values():
            spill(record.queue_id, record.entry, record.data())
        for path in paths:
            path.unlink()
        if paths:
            fsync_dir(self.directory)
            log.info(
                "journal: %d message(s) moved to the queue from %d segment(s)",
                len(stored),
                len(paths),
            )
        return len(stored)

    # -- appending ---------------------------------------------------------------------------

    def _release(self, queue_id: str, retired: list[_Segment]) -> bool:
        """Take ``queue_id`` out of the index; False when it is not in the journal."""
        where = self._index.pop(queue_id, None)
        if where is None:
            return False
        where.segment.live.discard(queue_id)
        if not where.segment.live and where.segment is not self._current:
            retired.append(where.segment)
        return True

    def add(
        self,
        batch: Batch,
        kind: int,
        queue_id: str,
        entry: bytes = b"",
        data: bytes = b"",
        *,
        released: bool = False,
    ) -> bool:
        """Put one record in ``batch`` (the loop thread: offsets are handed out in order).

        Returns False for a DONE of a message not in the journal (nothing to record), unless
        ``released`` says it was taken out of the index already (:meth:`done_later`).
        """
        if kind == DONE and not released and not self._release(queue_id, batch.retired):
            return False
        # Framed and checksummed in the commit thread (:meth:`write`): zlib.crc32 lets go of
        # the GIL, so a large message's CRC runs beside the event loop instead of in it.
        meta = _HEADER.size + len(queue_id) + len(entry)
        size = meta + len(data)
        current = self._current
        if current is None or (
            kind == STORE and current.size and current.size + size > self.segment_size
        ):
            if current is not None and not current.live:
                batch.retired.append(current)
            current = self._current = _Segment(
                self._next_seq, self.directory / f"{self.owner}-{self._next_seq:08d}.jnl"
            )
            self._next_seq += 1
            batch.new_segments = True
        if kind == STORE:
            offset = current.size + meta
            self._index[queue_id] = _Where(current, offset, len(data), entry)
            current.live.add(queue_id)
        current.size += size
        if not batch.groups or batch.groups[-1][0] is not current:
            batch.groups.append((current, []))
        batch.groups[-1][1].append((kind, queue_id, entry, data))
        return True

    def forget(self, queue_id: str) -> None:
        """Drop a message whose STORE never became durable (its batch failed)."""
        where = self._index.pop(queue_id, None)
        if where is not None:
            where.segment.live.discard(queue_id)

    # -- group commit (the loop thread) ----------------------------------------------------

    async def append(self, kind: int, queue_id: str, entry: bytes = b"", data: bytes = b"") -> None:
        """Append a record; returns once it is durable, with every record added meanwhile."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(_Pending(kind, queue_id, entry, data, future))
        if not self._busy:
            self._start(loop)
        await future

    def done_later(self, queue_id: str) -> None:
        """DONE for a message delivered (or bounced and told): not waited for.

        The record goes with the next batch of STOREs, or within ``_LAZY_FLUSH`` seconds:
        the next message's 250 must not wait for an fdatasync of this one's end. A crash
        that loses it delivers the message again at the next start (at least once, as with
        Postfix, which does not sync the unlink of a delivered message either).
        """
        retired: list[_Segment] = []
        if not self._release(queue_id, retired):
            return
        self._retired_later.extend(retired)
        self._pending.append(_Pending(DONE, queue_id, b"", b"", None, released=True))
        if not self._busy and self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(_LAZY_FLUSH, self._flush_lazy, loop)

    def _flush_lazy(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_timer = None
        if not self._busy and self._pending:
            self._start(loop)

    def _take_batch(self) -> tuple[list[_Pending], Batch]:
        """Everything pending, as one batch (offsets are handed out here, in file order)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        ops, self._pending = self._pending, []
        batch = Batch()
        batch.retired, self._retired_later = self._retired_later, []
        for op in ops:
            self.add(batch, op.kind, op.queue_id, op.entry, op.data, released=op.released)
        return ops, batch

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        ops, batch = self._take_batch()  # one batch at a time
        if not batch:
            for op in ops:
                if op.future is not None and not op.future.done():
                    op.future.set_result(None)
            return
        self._busy = True
        done = asyncio.wrap_future(self._thread.submit(self.write, batch), loop=loop)
        done.add_done_callback(functools.partial(self._finished, loop, ops))

    def _finished(
        self, loop: asyncio.AbstractEventLoop, ops: list[_Pending], done: asyncio.Future[None]
    ) -> None:
        self._busy = False
        self.batches += 1
        self.batched += len(ops)
        error = RuntimeError("journal write cancelled") if done.cancelled() else done.exception()
        if error is not None:
            log.error("journal: write failed: %s", error)
            # The segment may end in a torn record now: the next batch starts a new one.
            self._current = None
            for op in ops:
                if op.kind == STORE:
                    self.forget(op.queue_id)
        for op in ops:
            if op.future is None or op.future.done():
                continue
            if error is None:
                op.future.set_result(None)
            else:
                op.future.set_exception(error)
        if any(op.future is not None for op in self._pending):
            self._start(loop)  # someone waits
        elif self._pending and self._flush_timer is None:
            self._flush_timer = loop.call_later(_LAZY_FLUSH, self._flush_lazy, loop)

    def write(self, batch: Batch) -> None:
        """Append ``batch`` and make it durable (the commit thread; one batch at a time)."""
        for segment, records in batch.groups:
            buffers = [b for record in records for b in _record(*record)]
            if self._fd is None or self._fd_seq != segment.seq:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                self._fd = os.open(segment.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                self._fd_seq = segment.seq
                self._end = self._prepared = 0
            start = self._end
            try:
                end = start + _write_all(self._fd, buffers, start)
                if end > self._prepared:
                    # Zeros written ahead: the next small batches overwrite blocks the file
                    # has already, and their fdatasync need not commit a new file size (the
                    # inode, in ext4's or xfs's own journal): 0.24-0.34 -> 0.17-0.19 ms here,
                    # +16% msg/s for one session (bench/PERF-LOG.md, step 22). A large batch
                    # is not worth its size in zeros.
                    self._prepared = end
                    if end - start < _PREPARE:
                        self._prepared += _zeros_after(self._fd, end)
                os.fdatasync(self._fd)
                self._end = end
            except OSError:
                # Nobody is told 250 for these: take them back out, so that a restart does not
                # queue what the client was told to send again (best effort: the disk failed).
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                raise
        if batch.new_segments:
            fsync_dir(self.directory)  # the new segment's name is durable too
        for old in batch.retired:
            with contextlib.suppress(FileNotFoundError):
                old.path.unlink()

    # -- reading -----------------------------------------------------------------------------

    def entry(self, queue_id: str) -> bytes:
        """The entry JSON stored with ``queue_id`` (KeyError when not in the journal)."""
        return self._index[queue_id].entry

    def data(self, queue_id: str) -> bytes:
        """The message bytes of ``queue_id``, read back from its segment."""
        where = self._index[queue_id]
        fd = os.open(where.segment.path, os.O_RDONLY)
        try:
            return os.pread(fd, where.length, where.offset)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Wait for the batch being written, then close the segment.

        What is live in it stays for :meth:`recover` at the next start.
        """
        self._thread.shutdown(wait=True)
        # DONEs nobody waited for: written now, or the next start would redo their messages.
        _, batch = self._take_batch()
        if batch:
            with contextlib.suppress(OSError):
                self.write(batch)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(slots=True)
class _Pending:
    kind: int
    queue_id: str
    entry: bytes
    data: bytes
    future: asyncio.Future[None] | None
    """None: nobody waits (:meth:`Journal.done_later`)."""
    released: bool = False


def _zeros_after(fd: int, end: int) -> int:
    """Write zeros after ``end``; how many (none when the disk has no room for them)."""
    try:
        return os.pwrite(fd, _ZEROS, end)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # A nearly full disk must not refuse mail the zeros were only to speed up.
        return 0


def _write_all(fd: int, buffers: list[bytes], offset: int) -> int:
    """Write ``buffers`` at ``offset``; returns how many bytes that was."""
    views = [memoryview(b) for b in buffers]
    total = sum(len(v) for v in views)
    while views:
        written = os.pwritev(fd, views[:512], offset)  # IOV_MAX is 1024
        offset += written
        while written:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0
    return total


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable (created, renamed, removed files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
