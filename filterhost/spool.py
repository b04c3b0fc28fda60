"""The durable spool: a message is on disk, fsynced, before the client hears 250.

Layout, one directory (``spool.directory``)::

    queue/<id>.msg    the message bytes as they will be relayed (written once, never changed)
    queue/<id>.json   envelope and per-recipient state (replaced atomically on every change)

A message is queued exactly when its ``.json`` exists: the ``.msg`` is written and fsynced first,
then the ``.json`` through a temporary file and ``rename``, then the directory is fsynced. A crash
before that leaves an orphan ``.msg`` (the client never got 250), removed at the next start.

Writes are group-committed (:class:`Spool` ``store``/``update``/``remove``): the operations that
arrive while a batch is being made durable form the next batch, whose files are written and
fsynced concurrently (so the journal commits them together), renamed into place, and covered by
one ``fsync`` of the directory. Every caller is answered only after that, so "250 after fsync"
holds for each message, and concurrent sessions share the directory fsyncs and journal commits.

With the journal on (``[spool] journal``, :mod:`filterhost.journal`), a new message's first
home is instead one record appended to ``journal/``; it gets the two files above only when it
must wait (:meth:`Spool.update`), so most messages never become files at all.

Several processes may share a spool: a delivery attempt holds an exclusive ``flock`` on the
``.msg`` file, so one message is never delivered by two processes at once, and the queue CLI
takes the same lock before it changes anything.

Other areas of the spool directory (``quarantine/``) use the same format; ``filterhost.pid``
names the running server, which :func:`notify_server` asks to look at the queue again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from filterhost.journal import DONE, STORE, Journal, fsync_dir, live_messages

__all__ = [
    "PIDFILE",
    "RESCAN_SIGNAL",
    "Checked",
    "RecipientState",
    "Spool",
    "SpoolEntry",
    "new_queue_id",
    "notify_server",
    "server_running",
]

PIDFILE = "filterhost.pid"
# The signal a running server takes as "the queue changed on disk: look again".
RESCAN_SIGNAL = signal.SIGUSR1

RecipientStatus = Literal["pending", "delivered", "bounced", "discarded"]
ORPHAN_AGE = 3600.0  # an unlinked .msg this old cannot belong to a transaction still in progress


@dataclass(frozen=True, slots=True)
class Checked:
    """What the front end's checks established about a message's final bytes.

    Its line ends are CRLF only (the content check passed; plugins edit headers only, whose
    values may not hold CR or LF), and no line starting with a dot begins at or after
    ``dot_free_from`` (the body had none, and the body is never edited), so sending it needs
    no normalising and looks for lines to dot-stuff only before that offset.
    """

    dot_free_from: int
    """A byte offset into the message: ``len(message)`` when nothing is known."""


def new_queue_id() -> str:
    """A queue id: sortable by time (ms), unique across processes, safe as a file name."""
    # 32 random bits from the random module's generator, which Python reseeds from the OS in
    # every forked child (worker processes never share a sequence); a queue id is not a
    # secret (the 250 reply tells it), and secrets.token_hex was a getrandom call a message.
    return f"{time.time_ns() // 1_000_000:011X}{random.getrandbits(32):08X}"


@dataclass(slots=True)
class RecipientState:
    """Where one recipient stands."""

    address: str
    status: RecipientStatus = "pending"
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    options: list[str] = field(default_factory=list)
    """ESMTP parameters of this RCPT (DSN: ``NOTIFY=...``, ``ORCPT=...``)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """The latest attempts, oldest first: ``{"at": epoch, "host": ..., "reply": ...}``."""
    notified: bool = False
    """True once the sender has been sent the DSN for this recipient's final state."""
    delay_notified: bool = False
    """True once the sender has been warned that this recipient is delayed."""

    @property
    def done(self) -> bool:
        """True when nothing more will be tried for this recipient."""
        return self.status != "pending"


@dataclass(slots=True)
class SpoolEntry:
    """A spooled message's envelope and state (the ``.json`` file)."""

    id: str
    mail_from: str
    recipients: list[RecipientState]
    received: float
    size: int
    client_ip: str = ""
    helo: str = ""
    mail_options: list[str] = field(default_factory=list)
    hold: bool = False
    reason: str = ""
    """Why the message is held or quarantined (empty otherwise)."""
    plugin: str = ""
    """In the quarantine: the plugin whose verdict put the message there (empty otherwise)."""
    version: int = 1

    def to_json(self) -> bytes:
        """The entry serialised for the spool."""
        try:
            # orjson serialises the dataclasses themselves: 2.6 us against 10.6 for a dict
            # made field by field and the standard library's encoder (~3% of a 5 KB
            # message's CPU at the front end, bench/PERF-LOG.md).
            return orjson.dumps(self)
        except orjson.JSONEncodeError:
            # A string that is not UTF-8 (bytes kept as surrogates by surrogateescape): orjson
            # refuses it, the standard library escapes it. Rare, so the plain way.
            return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SpoolEntry:
        """Read an entry written by :meth:`to_json`."""
        raw: dict[str, Any] = json.loads(data)
        raw["recipients"] = [RecipientState(**r) for r in raw["recipients"]]
        return cls(**raw)

    @property
    def pending(self) -> list[RecipientState]:
        """Recipients still to deliver."""
        return [r for r in self.recipients if not r.done]

    @property
    def next_attempt(self) -> float | None:
        """When the earliest pending recipient is due (None when none is pending)."""
        times = [r.next_attempt for r in self.pending]
        return min(times) if times else None


# Batches committed at once: with one, an operation arriving just after a batch started waits
# for all of it; three kept the spool threads busy in the bench (bench/PERF-LOG.md).
_IN_FLIGHT = 3
_MAX_BATCH = 256  # operations per group commit: bounds the memory and the latency of one batch
_FRESH_LIMIT = 16 * 1024 * 1024  # bytes of just-stored messages kept for the queue runner


@dataclass(slots=True)
class _Op:
    """One queued spool write, answered through ``future`` once its batch is durable."""

    kind: Literal["store", "update", "remove"]
    queue_id: str
    entry: SpoolEntry | None
    data: bytes | None
    future: asyncio.Future[None]
    written: tuple[int, int] | None = None
    """(inode, mtime) of the entry file this operation wrote."""


def _write_file(path: Path | str, data: bytes, *, exclusive: bool) -> tuple[int, int]:
    """Write and fsync ``path``; returns its (inode, mtime in ns): see :meth:`Spool.load`."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        st = os.fstat(fd)
        return st.st_ino, st.st_mtime_ns
    finally:
        os.close(fd)


class Spool:
    """The spool directory. Blocking file work runs in a small thread pool, off the event loop."""

    def __init__(self, directory: Path, *, area: str = "queue", threads: int = 8) -> None:
        self.directory = directory
        self.queue_dir = directory / area
        # Reads, and the group commits (one at a time: see _start_batch), run here.
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spool")
        self._syncs = ThreadPoolExecutor(max_workers=16, thread_name_prefix="spool-sync")
        self._pending: list[_Op] = []
        self._committing = 0
        """Batches being committed (at most ``_IN_FLIGHT``)."""
        self._busy_ids: set[str] = set()
        """Queue ids in the batches being committed (one operation per id at a time)."""
        self.batches = 0
        """Group commits done (with :attr:`batched_ops`: the mean batch size, for the bench)."""
        self.batched_ops = 0
        # The bytes of messages just stored, for the queue runner's first attempt: a .msg is
        # never changed after it is written, so these are its contents, without reading the
        # file back (and without a second trip through the thread pool). Bounded: the oldest
        # go first; a message not found here is read from disk as before.
        self._fresh: dict[str, bytes] = {}
        self._fresh_bytes = 0
        # And their entries, with the (inode, mtime) of the .json they were written to: the
        # queue CLI replaces an entry through a new file, so a match means it is unchanged.
        self._fresh_entries: dict[str, tuple[tuple[int, int], SpoolEntry]] = {}
        self._dir = str(self.queue_dir)
        self.fresh_limit = _FRESH_LIMIT if area == "queue" else 0
        self.journal: Journal | None = None
        """New messages' first home, when enabled (:meth:`use_journal`, before :meth:`open`)."""
        self._journal_entries: dict[str, SpoolEntry] = {}
        self._checked: dict[str, Checked] = {}
        self._loaded_checked: dict[str, Checked] = {}

    def use_journal(self, index: int = 0, count: int = 1) -> None:
        """Store new messages in the journal (:mod:`filterhost.journal`) of worker ``index``.

        The server's queue does; the queue CLI and the quarantine work on files only, and
        every message the CLI can act on is in files (see :meth:`update`).
        """
        self.journal = Journal(self.directory / "journal", index, count)

    def open(self) -> None:
        """Create the directories if needed and check that the spool is writable.

        Messages a stopped process left in its journal move to the queue (as files).
        """
        self.queue_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = self.queue_dir / f".probe-{os.getpid()}"
        _write_file(probe, b"probe", exclusive=False)
        probe.unlink()
        if self.journal is not None:
            self.journal.recover(self._spill_recovered)

    def _spill_recovered(self, queue_id: str, entry: bytes, data: bytes) -> None:
        if self.entry_path(queue_id).exists():
            # Moved to files before a crash took its DONE: the files are the newer state.
            return
        _write_file(self.msg_path(queue_id), data, exclusive=False)
        self._write_entry(SpoolEntry.from_json(entry))

    def close(self) -> None:
        """Wait for pending writes and stop the thread pools."""
        self._pool.shutdown(wait=True)
        self._syncs.shutdown(wait=True)
        if self.journal is not None:
            self.journal.close()
            # A clean stop leaves the queue in files only: the CLI and the next start need
            # no journal for what was still waiting for its first attempt.
            self.journal.recover(self._spill_recovered)

    def msg_path(self, queue_id: str) -> Path:
        """The ``.msg`` file of ``queue_id``."""
        return self.queue_dir / f"{queue_id}.msg"

    def entry_path(self, queue_id: str) -> Path:
        """The ``.json`` file of ``queue_id``."""
        return self.queue_dir / f"{queue_id}.json"

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- writing ---------------------------------------------------------------------------

    def _store(self, entry: SpoolEntry, data: bytes) -> None:
        _write_file(self.msg_path(entry.id), data, exclusive=True)
        self._write_entry(entry)

    def _tmp_path(self, queue_id: str) -> Path:
        return self.queue_dir / f".{queue_id}.json.tmp"

    def _write_entry(self, entry: SpoolEntry) -> None:
        tmp = self._tmp_path(entry.id)
        _write_file(tmp, entry.to_json(), exclusive=False)
        tmp.replace(self.entry_path(entry.id))
        fsync_dir(self.queue_dir)

    def _remove(self, queue_id: str) -> None:
        self.entry_path(queue_id).unlink(missing_ok=True)
        self.msg_path(queue_id).unlink(missing_ok=True)
        fsync_dir(self.queue_dir)

    async def store(
        self, entry: SpoolEntry, data: bytes, *, checked: Checked | None = None
    ) -> None:
        """Write a new message durably; when this returns, the client may be told 250.

        The runner's first :meth:`load` of it gets ``entry`` itself, unless the entry file
        changed meanwhile: the caller must not change ``entry`` after this. ``checked``: what
        the front end's checks established about ``data``; the runner's first attempt sends
        it without checking again (:meth:`checked`).
        """
        journal = self.journal
        if journal is not None:
            await journal.append(STORE, entry.id, entry.to_json(), data)
            self._journal_entries[entry.id] = entry
            written = None
        else:
            written = await self._commit("store", entry.id, entry, data)
        if len(data) <= self.fresh_limit:
            self._fresh[entry.id] = data
            if checked is not None:
                self._checked[entry.id] = checked
            if written is not None:
                self._fresh_entries[entry.id] = (written, entry)
            self._fresh_bytes += len(data)
            while self._fresh_bytes > self.fresh_limit:
                self._forget(next(iter(self._fresh)))

    def _forget(self, queue_id: str) -> bytes | None:
        data = self._fresh.pop(queue_id, None)
        self._fresh_entries.pop(queue_id, None)
        self._checked.pop(queue_id, None)
        self._journal_entries.pop(queue_id, None)
        if data is not None:
            self._fresh_bytes -= len(data)
        return data

    async def update(self, entry: SpoolEntry) -> None:
        """Durably replace the entry's state.

        A message still in the journal moves to files of its own first (durably, before its
        DONE record): from its first deferral, hold or bounce on, the queue CLI sees it.
        """
        journal = self.journal
        if journal is not None and entry.id in journal:
            data = await self._journal_bytes(journal, entry.id)
            await self._commit("store", entry.id, entry, data)
            await journal.append(DONE, entry.id)
            return
        await self._commit("update", entry.id, entry, None)

    async def move_to_files(self, queue_id: str) -> None:
        """Move a message waiting in the journal to its files as it is (see :meth:`update`)."""
        journal = self.journal
        if journal is not None and queue_id in journal:
            await self.update(self._journal_entry(journal, queue_id))

    def _journal_entry(self, journal: Journal, queue_id: str) -> SpoolEntry:
        # Only this process knows it (the CLI acts on files): the entry kept is current.
        kept = self._journal_entries.get(queue_id)
        return kept or SpoolEntry.from_json(journal.entry(queue_id))

    async def _journal_bytes(self, journal: Journal, queue_id: str) -> bytes:
        """The message bytes kept in memory (forgotten now), or read back from the journal."""
        data = self._forget(queue_id)
        if data is None:
            data = await self._run(journal.data, queue_id)
        return data

    async def remove(self, queue_id: str) -> None:
        """Remove a finished message (durably, entry first, so it is never half queued)."""
        self._forget(queue_id)
        journal = self.journal
        if journal is not None and queue_id in journal:
            journal.done_later(queue_id)
            return
        await self._commit("remove", queue_id, None, None)

    # -- group commit ----------------------------------------------------------------------

    async def _commit(
        self,
        kind: Literal["store", "update", "remove"],
        queue_id: str,
        entry: SpoolEntry | None,
        data: bytes | None,
    ) -> tuple[int, int] | None:
        loop = asyncio.get_running_loop()
        op = _Op(kind, queue_id, entry, data, loop.create_future())
        self._pending.append(op)
        if self._committing < _IN_FLIGHT:
            self._start_batch(loop)
        # A cancelled caller does not stop its write (as with run_in_executor before): the
        # batch goes on, and a stored message is then found by the next rescan.
        await op.future
        return op.written

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand everything pending to one commit; what arrives meanwhile waits for the next.

        A bounded number of batches at a time is what makes the batches: while they are
        being made durable, the sessions' writes pile up for the next. A queue id appears
        once per batch (its temporary file has one name); a second operation on it waits.
        """
        batch: list[_Op] = []
        rest: list[_Op] = []
        ids = self._busy_ids
        for op in self._pending:
            if op.queue_id in ids or len(batch) >= _MAX_BATCH:
                rest.append(op)
            else:
                ids.add(op.queue_id)
                batch.append(op)
        self._pending = rest
        self._committing += 1
        done = asyncio.wrap_future(self._pool.submit(self._apply, batch), loop=loop)
        done.add_done_callback(functools.partial(self._batch_done, loop, batch))

    def _batch_done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Op],
        done: asyncio.Future[list[BaseException | None]],
    ) -> None:
        self._committing -= 1
        self.batches += 1
        self.batched_ops += len(batch)
        self._busy_ids.difference_update(op.queue_id for op in batch)
        failure = None if done.cancelled() else done.exception()
        errors: list[BaseException | None]
        if done.cancelled():
            errors = [RuntimeError("spool write cancelled")] * len(batch)
        elif failure is not None:
            errors = [failure] * len(batch)
        else:
            errors = done.result()
        for op, error in zip(batch, errors, strict=True):
            if op.future.done():
                continue  # its caller was cancelled
            if error is None:
                op.future.set_result(None)
            else:
                op.future.set_exception(error)
        if self._pending and self._committing < _IN_FLIGHT:
            self._start_batch(loop)

    def _apply(self, batch: list[_Op]) -> list[BaseException | None]:
        """One group commit, in a pool thread; returns each operation's error (or None).

        Order, as for a single message: the ``.msg`` and the entry's temporary file are
        durable before the rename makes the message queued, and the directory is fsynced
        before anyone is answered. An error of the directory fsync fails the whole batch.
        """
        # Each operation runs in a thread of its own: creating, renaming and unlinking a file
        # wait while the journal commits, and concurrent fsyncs share one commit, so one
        # thread doing them in turn is several times slower (measured: bench/PERF-LOG.md).
        # What the batch shares is the directory fsync that makes the renames durable.
        errors: list[BaseException | None] = list(self._syncs.map(self._apply_one, batch))
        fsync_dir(self.queue_dir)
        return errors

    def _apply_one(self, op: _Op) -> OSError | None:
        """``op`` up to, not including, the directory fsync; its error or None."""
        # Plain strings, not Paths: pathlib's parsing was ~2% of a message's CPU.
        base = f"{self._dir}/{op.queue_id}"
        try:
            if op.kind == "remove":
                for path in (base + ".json", base + ".msg"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                return None
            if op.kind == "store":
                assert op.data is not None
                _write_file(base + ".msg", op.data, exclusive=True)
            assert op.entry is not None
            tmp = f"{self._dir}/.{op.queue_id}.json.tmp"
            op.written = _write_file(tmp, op.entry.to_json(), exclusive=False)
            os.replace(tmp, base + ".json")
        except OSError as error:
            return error
        return None

    # Synchronous twins of update(), remove() and store() for callers without an event loop
    # (the queue and quarantine CLI). Same atomic, fsynced writes; the caller holds the lock.

    def write_entry(self, entry: SpoolEntry) -> None:
        """Durably replace the entry's state, in this thread."""
        self._write_entry(entry)

    def remove_entry(self, queue_id: str) -> None:
        """Durably remove ``queue_id`` (entry first, so it is never half queued), in this thread."""
        self._remove(queue_id)

    def store_entry(self, entry: SpoolEntry, data: bytes) -> None:
        """Write a new message durably, in this thread (the twin of :meth:`store`)."""
        self._store(entry, data)

    # -- reading ---------------------------------------------------------------------------

    def read_entry(self, queue_id: str) -> SpoolEntry:
        """The entry of ``queue_id`` (raises FileNotFoundError when it is gone)."""
        return SpoolEntry.from_json(self.entry_path(queue_id).read_bytes())

    def read_message(self, queue_id: str) -> bytes:
        """The message bytes of ``queue_id``."""
        return self.msg_path(queue_id).read_bytes()

    def checked(self, queue_id: str) -> Checked | None:
        """Once: what ``store`` was told about the bytes :meth:`load` just gave, if anything."""
        return self._loaded_checked.pop(queue_id, None)

    async def load(self, queue_id: str) -> tuple[SpoolEntry, bytes]:
        """Entry and message bytes, read off the event loop (just stored: from memory).

        The queue CLI may have changed the entry since it was stored (hold, flush): it does so
        by writing a new file and renaming it over the old, so the entry kept in memory is
        used only while its file is still the one :meth:`store` wrote (same inode and
        mtime); otherwise, and for every later load, the entry is read from disk.
        """
        checked = self._checked.get(queue_id)
        if checked is not None:
            self._loaded_checked[queue_id] = checked
        journal = self.journal
        if journal is not None and queue_id in journal:
            kept_entry = self._journal_entry(journal, queue_id)  # before the bytes forget it
            return kept_entry, await self._journal_bytes(journal, queue_id)
        fresh = self._fresh_entries.get(queue_id)
        data = self._forget(queue_id)
        if data is not None:
            if fresh is not None:
                written, kept = fresh
                # A stat of a file just written is answered from the inode cache: no thread.
                st = os.stat(f"{self._dir}/{queue_id}.json")
                if (st.st_ino, st.st_mtime_ns) == written:
                    return kept, data
            entry: SpoolEntry = await self._run(self.read_entry, queue_id)
            return entry, data
        loaded: tuple[SpoolEntry, bytes] = await self._run(self._read_both, queue_id)
        return loaded

    def _read_both(self, queue_id: str) -> tuple[SpoolEntry, bytes]:
        return self.read_entry(queue_id), self.read_message(queue_id)

    def in_journal(self, queue_id: str) -> bool:
        """True while ``queue_id`` is in this process's journal."""
        return self.journal is not None and queue_id in self.journal

    def journal_ids(self) -> list[str]:
        """Ids of the messages this process holds in its journal (their first attempt)."""
        return self.journal.ids() if self.journal is not None else []

    def journal_entries(self) -> list[SpoolEntry]:
        """Messages in the server's journal, oldest first (read only; see :meth:`update`)."""
        records = live_messages(self.directory / "journal")
        return [SpoolEntry.from_json(records[i].entry) for i in sorted(records)]

    def recover_journal(self) -> int:
        """Move what a stopped server left in the journal to files; how many moved.

        For the queue CLI when no server runs on this spool (a running one owns its journal).
        """
        journal = Journal(self.directory / "journal")
        try:
            return journal.recover(self._spill_recovered)
        finally:
            journal.close()

    def queue_ids(self) -> list[str]:
        """Every queued message, oldest first."""
        return sorted(p.stem for p in self.queue_dir.glob("*.json"))

    def entries(self) -> Iterator[SpoolEntry]:
        """Every readable entry, oldest first (one that vanishes meanwhile is skipped)."""
        for queue_id in self.queue_ids():
            with contextlib.suppress(FileNotFoundError):
                yield self.read_entry(queue_id)

    def remove_orphans(self, now: float | None = None) -> list[str]:
        """Delete ``.msg`` files that never got their ``.json`` (no client was told 250)."""
        now = time.time() if now is None else now
        removed = []
        for path in self.queue_dir.glob("*.msg"):
            if self.entry_path(path.stem).exists():
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > ORPHAN_AGE:
                    path.unlink()
                    removed.append(path.stem)
        for tmp in self.queue_dir.glob(".*.json.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if now - tmp.stat().st_mtime > ORPHAN_AGE:
                    tmp.unlink()
        return removed

    @contextlib.contextmanager
    def locked(self, queue_id: str, *, wait: bool = False) -> Iterator[bool]:
        """Hold the message's delivery lock; yields False when another process holds it."""
        if self.journal is not None and queue_id in self.journal:
            yield True  # in this process's journal: no other process can see it
            return
        try:
            fd = os.open(self.msg_path(queue_id), os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def _signal_server(directory: Path, signum: int) -> bool:
    """Send ``signum`` (0: none, a check) to the pid in the spool's pid file; False if none."""
    try:
        pid = int((directory / PIDFILE).read_text().strip())
        os.kill(pid, signum)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return signum == 0  # it exists, as another user, and may not be signalled
    return True


def server_running(directory: Path) -> bool:
    """True when the pid file of spool ``directory`` names a running process."""
    return _signal_server(directory, 0)


def notify_server(directory: Path) -> bool:
    """Ask the server running on spool ``directory`` to rescan its queue now.

    Returns False when no server is running there (it rescans at start-up anyway).
    """
    return _signal_server(directory, RESCAN_SIGNAL)
