"""Queue control: what ``filterhost queue ...`` does, usable from Python.

Reading (``list``, ``show``) takes no lock: an entry is replaced by ``rename`` and a ``.msg`` is
never rewritten, so a reader sees either the old state or the new one, never half of each.

Every change (``flush``, ``hold``, ``release``, ``delete``, ``bounce``) is made like this, so it
cannot race with a running server or with another CLI:

1. take the message's delivery lock (:meth:`Spool.locked`, the ``flock`` the queue runner holds
   for a whole delivery attempt), waiting up to ``lock_timeout`` seconds, then give up with
   :class:`MessageBusyError` rather than hang behind a slow next hop;
2. read the entry again under the lock: what was listed a moment ago may have been delivered,
   deferred or deleted since, and the change applies to what is on disk now;
3. write it back with the spool's atomic, fsynced write (or remove the files), still locked;
4. ask the running server to rescan its queue (:func:`notify_server`), so a message made due
   now is attempted now, not at its old retry time.

A delivery attempt that starts after step 3 reads the new state (the runner also reads under
the lock), so a deleted message is never delivered after ``delete`` succeeded and a held one is
not attempted; one that was in flight during step 1 finishes first, and the CLI then acts on
its result (or reports that the message left the queue meanwhile).

Example::

    ctl = QueueControl(Spool(config.spool_directory))
    with ctl.batch():  # one rescan for the lot
        for queue_id in ctl.select(domains=["example.com"]):
            ctl.hold(queue_id)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from filterhost.journal import live_messages
from filterhost.spool import RecipientState, Spool, SpoolEntry, notify_server

__all__ = [
    "BOUNCE_REPLY",
    "EXIT_BUSY",
    "HOLD_REASON",
    "LOCK_TIMEOUT",
    "AmbiguousIdError",
    "MessageBusyError",
    "MessageGoneError",
    "Outcome",
    "QueueControl",
    "QueueError",
    "UnknownMessageError",
    "act_as_spool_owner",
    "entry_summary",
    "format_entry",
    "format_list",
    "run_command",
]

LOCK_TIMEOUT = 30.0
"""Seconds a change waits for a message that a delivery attempt holds."""
LOCK_POLL = 0.05
HOLD_REASON = "held by operator"
BOUNCE_REPLY = "550 5.0.0 bounced by operator"
EXIT_BUSY = 75
"""Exit status when a message stayed locked: ``EX_TEMPFAIL`` of sysexits.h, "try again"."""


class QueueError(Exception):
    """A queue operation that could not be done; ``exit_code`` is the CLI's exit status."""

    exit_code = 1


class UnknownMessageError(QueueError):
    """No queued message has this id (or it left the queue meanwhile)."""


class MessageGoneError(UnknownMessageError):
    """The message left the queue (delivered, bounced, deleted) while we were getting to it."""


class AmbiguousIdError(QueueError):
    """An id prefix that matches more than one queued message."""


class MessageBusyError(QueueError):
    """The message stayed locked by a delivery attempt for the whole ``lock_timeout``."""

    exit_code = EXIT_BUSY


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one operation did to one message."""

    queue_id: str
    changed: bool
    """False when there was nothing to do (already held, nothing pending, ...)."""
    text: str
    exit_code: int = 0
    """Nonzero when the operation failed for this message (see :func:`QueueControl.each`)."""

    def __str__(self) -> str:
        return f"{self.queue_id}: {self.text}"


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _domains(domains: Collection[str] | None) -> set[str] | None:
    # Domains as given on the command line: any case, with or without the root dot.
    return None if domains is None else {d.lower().rstrip(".") for d in domains}


def _pending_in(entry: SpoolEntry, domains: set[str] | None) -> list[RecipientState]:
    """The pending recipients of ``entry`` (in ``domains`` unless None)."""
    return [r for r in entry.pending if domains is None or _domain(r.address) in domains]


class AreaControl:
    """What every operator command on a spool area shares: finding ids and locking an entry.

    ``clock`` gives "now" (for due times); ``on_wait`` is called with the id when an operation
    has to wait for whoever holds the message's lock (a delivery attempt, another command).
    """

    what = "queued"
    """How messages of this area are named in errors ("no queued message X")."""
    gone = "is no longer queued (delivered, bounced or deleted meanwhile)"

    def __init__(
        self,
        area: Spool,
        *,
        lock_timeout: float = LOCK_TIMEOUT,
        clock: Callable[[], float] = time.time,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.area = area
        self.lock_timeout = lock_timeout
        self.clock = clock
        self.on_wait = on_wait
        self.server_notified: bool | None = None
        """After a change: True if a running server was asked to rescan, False if none runs."""

    def entries(self) -> list[SpoolEntry]:
        """Every message of the area, oldest first (empty when it does not exist yet).

        In the queue: with the messages in the server's journal (their first attempt).
        """
        if not self.area.queue_dir.is_dir():
            return []
        files = list(self.area.entries())
        known = {e.id for e in files}
        fresh = [e for e in self._journal() if e.id not in known]
        return sorted(files + fresh, key=lambda e: e.id) if fresh else files

    def _journal(self) -> list[SpoolEntry]:
        if self.area.queue_dir.name != "queue":
            return []  # only the queue has a journal
        return self.area.journal_entries()

    def _in_journal(self, queue_id: str) -> bool:
        # Polled while a command waits: the record headers only, no entry is parsed.
        if self.area.queue_dir.name != "queue":
            return False
        return queue_id in live_messages(self.area.directory / "journal")

    def resolve(self, id_or_prefix: str) -> str:
        """The id that ``id_or_prefix`` names: the id itself or an unambiguous prefix."""
        token = id_or_prefix.strip().upper()
        ids = [e.id for e in self.entries()]
        if token in ids:
            return token
        matches = [i for i in ids if i.upper().startswith(token)] if token else []
        if not matches:
            raise UnknownMessageError(f"no {self.what} message {id_or_prefix}")
        if len(matches) > 1:
            shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise AmbiguousIdError(
                f"{id_or_prefix} is ambiguous: it matches {len(matches)} {self.what} "
                f"messages ({shown})"
            )
        return matches[0]

    def _gone(self, queue_id: str) -> MessageGoneError:
        return MessageGoneError(f"{queue_id} {self.gone}")

    @contextlib.contextmanager
    def _locked_entry(self, queue_id: str) -> Iterator[SpoolEntry]:
        """The entry of ``queue_id``, read under its lock, which is held until exit.

        The lock is polled (not a blocking flock) so that a delivery stuck on a slow next
        hop makes the command give up after ``lock_timeout`` instead of hanging.
        """
        deadline = time.monotonic() + self.lock_timeout
        waiting = False
        while True:
            if not self.area.entry_path(queue_id).exists():
                if not self._in_journal(queue_id):
                    raise self._gone(queue_id)
                # In the server's journal: in its first delivery attempt, or waiting for it.
                # The server moves a waiting one to files when asked to rescan; either way it
                # is soon gone or in files, which we can then change. Wait, as for a lock.
                if not waiting:
                    notify_server(self.area.directory)
                    if self.on_wait is not None:
                        self.on_wait(queue_id)
                waiting = True
                if time.monotonic() >= deadline:
                    raise MessageBusyError(
                        f"{queue_id} is busy: it is in its first delivery attempt "
                        f"(waited {self.lock_timeout:g}s); try again"
                    )
                time.sleep(LOCK_POLL)
                continue
            with self.area.locked(queue_id) as mine:  # non-blocking
                if mine:
                    try:
                        # The lock is on the .msg inode: if the message was removed while we
                        # waited, we now hold the lock of an unlinked file.
                        entry = self.area.read_entry(queue_id)
                    except FileNotFoundError:
                        raise self._gone(queue_id) from None
                    yield entry
                    return
            if not self.area.msg_path(queue_id).exists():
                # Spool.locked() also says "not mine" when there is no .msg to lock. The .json
                # goes first when a message is removed, so an entry without its .msg is damage.
                if self.area.entry_path(queue_id).exists():
                    raise QueueError(f"{queue_id}: the message file is missing (damaged spool)")
                raise self._gone(queue_id)
            if not waiting and self.on_wait is not None:
                self.on_wait(queue_id)
            waiting = True
            if time.monotonic() >= deadline:
                raise MessageBusyError(
                    f"{queue_id} is busy: another process holds it "
                    f"(waited {self.lock_timeout:g}s); try again"
                )
            time.sleep(LOCK_POLL)


class QueueControl(AreaControl):
    """Operations on the messages of one spool area (``queue/`` unless the Spool says otherwise).

    Each change notifies the running server when it is done, or once at the end of a
    :meth:`batch`. ``clock`` gives the time written as "due now"; ``on_wait`` is called with
    the queue id when a change has to wait for a delivery attempt (to tell the operator).
    """

    def __init__(
        self,
        spool: Spool,
        *,
        lock_timeout: float = LOCK_TIMEOUT,
        clock: Callable[[], float] = time.time,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(spool, lock_timeout=lock_timeout, clock=clock, on_wait=on_wait)
        self.spool = spool
        self._batch_depth = 0
        self._dirty = False

    # -- finding messages ------------------------------------------------------------------

    def select(self, *, domains: Collection[str] | None = None) -> list[str]:
        """Ids of the messages with a pending recipient (in one of ``domains`` when given).

        Oldest first. Read without locks, so a message may be gone by the time it is acted
        on: the operations then raise :class:`MessageGoneError`.
        """
        wanted = _domains(domains)
        return [e.id for e in self.entries() if _pending_in(e, wanted)]

    def show(self, id_or_prefix: str) -> tuple[SpoolEntry, bytes]:
        """The entry and the message bytes of one queued message."""
        queue_id = self.resolve(id_or_prefix)
        try:
            return self.spool.read_entry(queue_id), self.spool.read_message(queue_id)
        except FileNotFoundError:
            raise self._gone(queue_id) from None

    # -- changes ---------------------------------------------------------------------------

    def flush(self, id_or_prefix: str, *, domains: Collection[str] | None = None) -> Outcome:
        """Make the pending recipients due now (only those in ``domains`` when given).

        Nothing else changes: attempt counts, replies and the retry schedule stay. A held
        message is left alone: ``release`` it to have it delivered.
        """
        queue_id = self.resolve(id_or_prefix)
        wanted = _domains(domains)
        with self._locked_entry(queue_id) as entry:
            if entry.hold:
                return Outcome(queue_id, False, "held, not flushed (release it to deliver it)")
            targets = _pending_in(entry, wanted)
            if not targets:
                where = f" in {', '.join(sorted(wanted))}" if wanted else ""
                return Outcome(queue_id, False, f"no pending recipient{where}")
            self._make_due(targets)
            self.spool.write_entry(entry)
        self._changed()
        return Outcome(queue_id, True, f"flushed: {len(targets)} recipient(s) due now")

    def hold(self, id_or_prefix: str) -> Outcome:
        """Keep the message queued and unattempted until :meth:`release`."""
        queue_id = self.resolve(id_or_prefix)
        with self._locked_entry(queue_id) as entry:
            if entry.hold:
                return Outcome(queue_id, False, f"already held ({entry.reason or 'no reason'})")
            entry.hold = True
            entry.reason = HOLD_REASON
            self.spool.write_entry(entry)
        self._changed()
        return Outcome(queue_id, True, "held")

    def release(self, id_or_prefix: str) -> Outcome:
        """Undo a hold and make the pending recipients due now."""
        queue_id = self.resolve(id_or_prefix)
        with self._locked_entry(queue_id) as entry:
            if not entry.hold:
                return Outcome(queue_id, False, "not held")
            entry.hold = False
            entry.reason = ""
            self._make_due(entry.pending)
            self.spool.write_entry(entry)
        self._changed()
        return Outcome(queue_id, True, f"released: {len(entry.pending)} recipient(s) due now")

    def delete(self, id_or_prefix: str) -> Outcome:
        """Remove the message from the queue. No bounce is sent."""
        queue_id = self.resolve(id_or_prefix)
        with self._locked_entry(queue_id) as entry:
            self.spool.remove_entry(queue_id)
        self._changed()
        pending = ",".join(f"<{r.address}>" for r in entry.pending) or "none"
        return Outcome(
            queue_id,
            True,
            f"deleted, no bounce sent (from=<{entry.mail_from}> pending={pending})",
        )

    def bounce(self, id_or_prefix: str) -> Outcome:
        """Give up on every pending recipient: bounced with :data:`BOUNCE_REPLY`.

        The recipients are marked ``bounced`` and not ``notified``: the delivery engine
        sends the sender a DSN for them. A hold is lifted, so that the DSN is not held back.
        """
        queue_id = self.resolve(id_or_prefix)
        with self._locked_entry(queue_id) as entry:
            pending = entry.pending
            if not pending:
                return Outcome(queue_id, False, "no pending recipient")
            for rcpt in pending:
                _mark_bounced(rcpt)
            entry.hold = False
            entry.reason = ""
            self.spool.write_entry(entry)
        self._changed()
        return Outcome(queue_id, True, f"bounced {len(pending)} recipient(s)")

    def each(self, operation: Callable[[str], Outcome], ids: Iterable[str]) -> list[Outcome]:
        """Apply ``operation`` to each id in one batch; a failure is an Outcome, not an error."""
        outcomes = []
        with self.batch():
            for queue_id in ids:
                try:
                    outcomes.append(operation(queue_id))
                except QueueError as exc:
                    outcomes.append(Outcome(queue_id, False, str(exc), exc.exit_code))
        return outcomes

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Notify the server once, at the end, for every change made inside."""
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
            if self._batch_depth == 0 and self._dirty:
                self._notify()

    def _changed(self) -> None:
        self._dirty = True
        if self._batch_depth == 0:
            self._notify()

    def _notify(self) -> None:
        self._dirty = False
        self.server_notified = notify_server(self.spool.directory)

    def _make_due(self, recipients: Iterable[RecipientState]) -> None:
        now = self.clock()
        for rcpt in recipients:
            # min(): one that is already overdue keeps its place ahead of the others.
            rcpt.next_attempt = min(rcpt.next_attempt, now)


def act_as_spool_owner(spool: Spool) -> bool:
    """Run as root on a spool that belongs to another user: become that user; True if so.

    The server runs as the spool's owner. Entries the CLI wrote as root (mode 0600) would be
    unreadable to it, and its rescan signal would come from a stranger; as the owner, the
    CLI writes what the server can read (like Postfix's postsuper, which works as the
    mail system's owner).
    """
    if os.geteuid() != 0:
        return False
    try:
        owner = spool.queue_dir.stat()
    except FileNotFoundError:
        return False
    if owner.st_uid == 0:
        return False
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)
    return True


def _mark_bounced(rcpt: RecipientState) -> None:
    rcpt.status = "bounced"
    rcpt.last_reply = BOUNCE_REPLY
    rcpt.notified = False  # the delivery engine owes the sender a DSN for it


# -- presentation ------------------------------------------------------------------------------


def iso_time(epoch: float) -> str:
    """``epoch`` as ISO 8601 in UTC, to the second (for ``--json``)."""
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC).isoformat(timespec="seconds")


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else iso_time(epoch)


def local_time(epoch: float) -> str:
    """``epoch`` in local time, for people."""
    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def span(seconds: float) -> str:
    """A short human duration: ``45s``, ``12m``, ``3h05m``, ``2d04h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _due(rcpt: RecipientState, entry: SpoolEntry) -> float | None:
    # A recipient never tried has next_attempt 0: it has been due since the message came.
    return None if rcpt.done else max(rcpt.next_attempt, entry.received)


def _recipient_summary(rcpt: RecipientState, entry: SpoolEntry) -> dict[str, Any]:
    return {
        "address": rcpt.address,
        "status": rcpt.status,
        "attempts": rcpt.attempts,
        "next_attempt": _iso(_due(rcpt, entry)),
        "last_reply": rcpt.last_reply,
        "notified": rcpt.notified,
    }


def entry_summary(entry: SpoolEntry, now: float) -> dict[str, Any]:
    """The JSON form of a queued message (``queue list --json``); times are ISO 8601, UTC.

    ``next_attempt`` is None for a held message and for recipients that are done.
    """
    times = [t for t in (_due(r, entry) for r in entry.recipients) if t is not None]
    return {
        "id": entry.id,
        "age": max(0, round(now - entry.received)),
        "received": _iso(entry.received),
        "size": entry.size,
        "sender": entry.mail_from,
        "hold": entry.hold,
        "reason": entry.reason,
        "next_attempt": None if entry.hold else _iso(min(times, default=None)),
        "recipients": [_recipient_summary(r, entry) for r in entry.recipients],
    }


def _next_text(rcpt: RecipientState, now: float) -> str:
    if rcpt.done:
        return "-"
    if rcpt.next_attempt <= now:
        return "due now"
    return f"{local_time(rcpt.next_attempt)} (in {span(rcpt.next_attempt - now)})"


def format_list(entries: Sequence[SpoolEntry], now: float) -> str:
    """The human table of ``queue list``: a line per message, then one per recipient."""
    if not entries:
        return "queue is empty\n"
    lines = [f"{'QUEUE ID':<19}  {'AGE':>6}  {'SIZE':>9}  SENDER"]
    for e in entries:
        flag = f"  HELD ({e.reason or 'no reason'})" if e.hold else ""
        lines.append(f"{e.id:<19}  {span(now - e.received):>6}  {e.size:>9}  <{e.mail_from}>{flag}")
        for r in e.recipients:
            lines.append(
                f"    {r.status:<9}  <{r.address}>  attempts={r.attempts}"
                f"  next={_next_text(r, now)}" + (f"  {r.last_reply}" if r.last_reply else "")
            )
    held = sum(e.hold for e in entries)
    pending = sum(len(e.pending) for e in entries)
    lines.append(
        f"-- {len(entries)} message(s), {held} held, {pending} recipient(s) pending",
    )
    return "\n".join(lines) + "\n"


def header_block(data: bytes) -> bytes:
    """The header section of a message (with its last CRLF)."""
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def format_entry(entry: SpoolEntry, data: bytes, now: float, *, body: bool = False) -> bytes:
    """The text of ``queue show``: envelope, recipients' state, headers (``body``: the message).

    Message bytes are shown as spooled, with CRLF turned into LF.
    """
    out = [
        f"id:          {entry.id}",
        f"received:    {local_time(entry.received)} ({span(now - entry.received)} ago)",
        f"size:        {entry.size}",
        f"sender:      <{entry.mail_from}>"
        + (f" {' '.join(entry.mail_options)}" if entry.mail_options else ""),
        f"client:      [{entry.client_ip}] helo={entry.helo or '-'}",
        f"hold:        {'yes (' + (entry.reason or 'no reason') + ')' if entry.hold else 'no'}",
        "recipients:",
    ]
    for r in entry.recipients:
        opts = f" {' '.join(r.options)}" if r.options else ""
        out.append(f"  <{r.address}>{opts}")
        out.append(f"      status={r.status} attempts={r.attempts} next={_next_text(r, now)}")
        if r.last_reply:
            out.append(f"      last reply: {r.last_reply}")
        if r.status == "bounced":
            out.append(f"      sender notified: {'yes' if r.notified else 'not yet'}")
    out.append("message:" if body else "headers:")
    text = "\n".join(out).encode() + b"\n"
    return text + (data if body else header_block(data)).replace(b"\r\n", b"\n")


# -- the command line --------------------------------------------------------------------------


def run_command(
    ctl: QueueControl,
    action: str,
    *,
    ids: Sequence[str] = (),
    as_json: bool = False,
    body: bool = False,
    domains: Sequence[str] = (),
    all_messages: bool = False,
    stdout: IO[bytes] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run ``filterhost queue ACTION`` and return its exit status.

    Listings go to ``stdout``; what a change did, one line per message, to ``stderr``.
    The status is 0, 1 when a message was unknown (or left the queue), :data:`EXIT_BUSY`
    when one stayed locked; with several messages, the worst of them.
    """
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr
    now = time.time()
    if action == "list":
        entries = ctl.entries()
        if as_json:
            text = json.dumps([entry_summary(e, now) for e in entries], indent=1) + "\n"
        else:
            text = format_list(entries, now)
        out.write(text.encode())
        return 0
    if action == "show":
        (queue_id,) = ids
        try:
            entry, data = ctl.show(queue_id)
        except QueueError as exc:
            print(f"filterhost: {exc}", file=err)
            return exc.exit_code
        out.write(_show_json(entry, now) if as_json else format_entry(entry, data, now, body=body))
        return 0
    return _change(ctl, action, ids=ids, domains=domains, all_messages=all_messages, err=err)


def _show_json(entry: SpoolEntry, now: float) -> bytes:
    summary = entry_summary(entry, now)
    summary["recipients"] = [
        {**_recipient_summary(r, entry), "options": r.options, "history": r.history}
        for r in entry.recipients
    ]
    return (json.dumps(summary, indent=1) + "\n").encode()


def _change(
    ctl: QueueControl,
    action: str,
    *,
    ids: Sequence[str],
    domains: Sequence[str],
    all_messages: bool,
    err: IO[str],
) -> int:
    operations: dict[str, Callable[[str], Outcome]] = {
        "flush": ctl.flush,
        "hold": ctl.hold,
        "release": ctl.release,
        "delete": ctl.delete,
        "bounce": ctl.bounce,
    }
    if action not in operations:
        raise ValueError(f"unknown queue action {action!r}")
    operation = operations[action]
    targets: Sequence[str] = ids
    if action == "flush" and not ids:
        if not (domains or all_messages):
            raise ValueError("flush needs queue ids, domains or all_messages")
        # --all / --domain pick messages from a listing; one that leaves the queue before
        # its turn (delivered meanwhile) is no error then.
        only = domains or None
        targets = ctl.select(domains=only)

        def flush_picked(queue_id: str) -> Outcome:
            try:
                return ctl.flush(queue_id, domains=only)
            except MessageGoneError:
                return Outcome(queue_id, False, "left the queue meanwhile")

        operation = flush_picked
    outcomes = ctl.each(operation, targets)
    for o in outcomes:
        print(f"filterhost: {o}", file=err)
    if action == "flush" and not targets:
        print("filterhost: nothing to flush", file=err)
    if any(o.changed for o in outcomes) and ctl.server_notified is False:
        print("filterhost: no server is running; it will see the changes when it starts", file=err)
    return max((o.exit_code for o in outcomes), default=0)
