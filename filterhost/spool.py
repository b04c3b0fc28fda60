"""The durable spool: a message is on disk, fsynced, before the client hears 250.

Layout, one directory (``spool.directory``)::

    queue/<id>.msg    the message bytes as they will be relayed (written once, never changed)
    queue/<id>.json   envelope and per-recipient state (replaced atomically on every change)

A message is queued exactly when its ``.json`` exists: the ``.msg`` is written and fsynced first,
then the ``.json`` through a temporary file and ``rename``, then the directory is fsynced. A crash
before that leaves an orphan ``.msg`` (the client never got 250), removed at the next start.

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
import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "PIDFILE",
    "RESCAN_SIGNAL",
    "RecipientState",
    "Spool",
    "SpoolEntry",
    "new_queue_id",
    "notify_server",
]

PIDFILE = "filterhost.pid"
# The signal a running server takes as "the queue changed on disk: look again".
RESCAN_SIGNAL = signal.SIGUSR1

RecipientStatus = Literal["pending", "delivered", "bounced", "discarded"]
ORPHAN_AGE = 3600.0  # an unlinked .msg this old cannot belong to a transaction still in progress


def new_queue_id() -> str:
    """A queue id: sortable by time (ms), unique across processes, safe as a file name."""
    return f"{time.time_ns() // 1_000_000:011X}{secrets.token_hex(4).upper()}"


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, *, exclusive: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool directory. Blocking file work runs in a small thread pool, off the event loop."""

    def __init__(self, directory: Path, *, area: str = "queue", threads: int = 8) -> None:
        self.directory = directory
        self.queue_dir = directory / area
        # Concurrent fsyncs from several threads let the filesystem journal commit them together.
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spool")

    def open(self) -> None:
        """Create the directories if needed and check that the spool is writable."""
        self.queue_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = self.queue_dir / f".probe-{os.getpid()}"
        _write_file(probe, b"probe", exclusive=False)
        probe.unlink()

    def close(self) -> None:
        """Wait for pending writes and stop the thread pool."""
        self._pool.shutdown(wait=True)

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

    def _write_entry(self, entry: SpoolEntry) -> None:
        tmp = self.queue_dir / f".{entry.id}.json.tmp"
        _write_file(tmp, entry.to_json(), exclusive=False)
        tmp.replace(self.entry_path(entry.id))
        _fsync_dir(self.queue_dir)

    def _remove(self, queue_id: str) -> None:
        self.entry_path(queue_id).unlink(missing_ok=True)
        self.msg_path(queue_id).unlink(missing_ok=True)
        _fsync_dir(self.queue_dir)

    async def store(self, entry: SpoolEntry, data: bytes) -> None:
        """Write a new message durably; when this returns, the client may be told 250."""
        await self._run(self._store, entry, data)

    async def update(self, entry: SpoolEntry) -> None:
        """Durably replace the entry's state."""
        await self._run(self._write_entry, entry)

    async def remove(self, queue_id: str) -> None:
        """Remove a finished message."""
        await self._run(self._remove, queue_id)

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

    async def load(self, queue_id: str) -> tuple[SpoolEntry, bytes]:
        """Entry and message bytes, read off the event loop."""
        entry: SpoolEntry = await self._run(self.read_entry, queue_id)
        data: bytes = await self._run(self.read_message, queue_id)
        return entry, data

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


def notify_server(directory: Path) -> bool:
    """Ask the server running on spool ``directory`` to rescan its queue now.

    Returns False when no server is running there (it rescans at start-up anyway).
    """
    try:
        pid = int((directory / PIDFILE).read_text().strip())
        os.kill(pid, RESCAN_SIGNAL)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return False
    return True
