"""The quarantine: messages a plugin kept aside, and what ``filterhost quarantine ...`` does.

When the message chain ends with a QUARANTINE verdict (``Verdict.quarantine(reason)``: the
``clamav`` plugin's ``on_virus = "quarantine"``, the ``attachments`` plugin's ``action =
"quarantine"``, any third-party plugin), the front end answers 250 and stores the message here
instead of in the queue, fsynced like any accepted message::

    <spool.directory>/quarantine/<id>.msg    the message, as it would have been relayed
    <spool.directory>/quarantine/<id>.json   the envelope (the spool's SpoolEntry format) with
                                             hold = true, reason = the verdict's reason,
                                             plugin = the plugin that decided,
                                             received = when it was quarantined

The queue runner never looks in this directory, so nothing quarantined is delivered until an
operator releases it. The operator's commands:

* ``list`` and ``show`` read without locks (entries are replaced by ``rename``);
* ``release`` moves the message into the queue, durably and under the message's lock: the
  ``.msg`` and then the ``.json`` are written to ``queue/`` (each fsynced, then the queue
  directory), and only then are both files removed from ``quarantine/`` (then that directory is
  fsynced). The released entry is not held and every recipient is due now; a running server
  is told to rescan (:func:`~filterhost.spool.notify_server`) and delivers it. The message is
  **not scanned again**: it goes straight to the queue runner (routing, delivery), never back
  through the message chain. Its queue lifetime starts at the release.
  A crash in the middle leaves the message in both places, never in none: the next
  ``release`` of that id sees it queued already and only finishes the removal from the
  quarantine.
* ``delete`` removes it for good (no bounce: the sender was told 250).

Every change is logged (``filterhost.quarantine``) with the queue id, as the server logs the
quarantining itself, so ``grep QUEUEID`` tells the whole story.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from filterhost.journal import fsync_dir
from filterhost.queuectl import (
    LOCK_TIMEOUT,
    AreaControl,
    Outcome,
    QueueError,
    header_block,
    iso_time,
    local_time,
    span,
)
from filterhost.spool import Spool, SpoolEntry, notify_server

__all__ = [
    "AREA",
    "Quarantine",
    "QuarantineControl",
    "format_quarantine_entry",
    "format_quarantine_list",
    "quarantine_summary",
    "run_quarantine_command",
]

AREA = "quarantine"
"""The spool area (subdirectory of ``spool.directory``) that holds quarantined messages."""

LOCK_POLL = 0.05

log = logging.getLogger("filterhost.quarantine")


class Quarantine:
    """The quarantine area of a spool, as the front end writes it."""

    def __init__(self, directory: Path, *, threads: int = 2) -> None:
        self.directory = directory
        self.spool = Spool(directory, area=AREA, threads=threads)

    def open(self) -> None:
        """Create the directory if needed (durably) and check that it is writable."""
        existed = self.spool.queue_dir.is_dir()
        self.spool.open()
        if not existed:
            # A new directory entry is only durable once its parent is fsynced; without
            # this, a crash could lose the directory and every message acknowledged into it.
            fsync_dir(self.directory)

    def close(self) -> None:
        """Wait for writes in progress and stop the thread pool."""
        self.spool.close()

    async def store(self, entry: SpoolEntry, data: bytes, *, plugin: str, reason: str) -> None:
        """Keep ``data`` aside under ``entry`` (its id, envelope, time): fsynced on return.

        ``plugin`` and ``reason`` say who quarantined it and why (``list`` and ``show``).
        """
        kept = replace(entry, hold=True, reason=reason, plugin=plugin)
        await self.spool.store(kept, data)


class QuarantineControl(AreaControl):
    """The operator's operations on the quarantine of the spool in ``directory``.

    ``clock`` gives "now" (the due time of released recipients); ``on_wait`` is called with
    the id when an operation has to wait for another one holding the message's lock.
    """

    what = "quarantined"
    gone = "is no longer in the quarantine (released or deleted meanwhile)"

    def __init__(
        self,
        directory: Path,
        *,
        lock_timeout: float = LOCK_TIMEOUT,
        clock: Callable[[], float] = time.time,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(
            Spool(directory, area=AREA, threads=1),
            lock_timeout=lock_timeout,
            clock=clock,
            on_wait=on_wait,
        )
        self.directory = directory
        self.queue = Spool(directory, threads=1)

    def close(self) -> None:
        """Release the spools' thread pools."""
        self.area.close()
        self.queue.close()

    # -- reading ---------------------------------------------------------------------------

    def show(self, id_or_prefix: str) -> tuple[SpoolEntry, bytes]:
        """The entry and the message bytes of one quarantined message."""
        queue_id = self.resolve(id_or_prefix)
        try:
            return self.area.read_entry(queue_id), self.area.read_message(queue_id)
        except FileNotFoundError:
            raise self._gone(queue_id) from None

    # -- changes ---------------------------------------------------------------------------

    def release(self, id_or_prefix: str) -> Outcome:
        """Move the message into the queue, due now, and tell a running server.

        Not scanned again: the queue runner routes and delivers it as it is.
        """
        queue_id = self.resolve(id_or_prefix)
        with self._locked_entry(queue_id) as entry:
            if self.queue.entry_path(queue_id).exists():
                # An earlier release got as far as the queue and was cut short: finish it.
                self.area.remove_entry(queue_id)
                text = "already in the queue (an earlier release was interrupted); removed here"
                log.info("%s: %s", queue_id, text)
                return Outcome(queue_id, True, text)
            data = self.area.read_message(queue_id)
            now = self.clock()
            released = replace(
                entry,
                hold=False,
                reason="",
                plugin="",
                # The queue lifetime (and delay warnings) count from the release, not from
                # the days the message may have spent here.
                received=now,
                recipients=[replace(r, next_attempt=now) for r in entry.recipients],
            )
            # A .msg without .json here is what an interrupted release leaves behind.
            self.queue.msg_path(queue_id).unlink(missing_ok=True)
            self.queue.queue_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.queue.store_entry(released, data)  # .msg, .json, queue dir: all fsynced
            self.area.remove_entry(queue_id)  # .json, .msg, quarantine dir fsynced
        self.server_notified = notify_server(self.directory)
        pending = len(released.pending)
        log.info(
            "%s: released from quarantine into the queue, not scanned again "
            "(quarantined %s by %s: %s); %d recipient(s) due now%s",
            queue_id,
            iso_time(entry.received),
            entry.plugin or "-",
            entry.reason or "-",
            pending,
            "" if self.server_notified else "; no server is running, it delivers when it starts",
        )
        return Outcome(queue_id, True, f"released: {pending} recipient(s) due now")

    def delete(self, id_or_prefix: str) -> Outcome:
        """Remove the message for good. No bounce: the client was answered 250."""
        queue_id = self.resolve(id_or_prefix)
        with self._locked_entry(queue_id) as entry:
            self.area.remove_entry(queue_id)
        log.info(
            "%s: deleted from quarantine, no bounce sent (from=<%s> quarantined by %s: %s)",
            queue_id,
            entry.mail_from,
            entry.plugin or "-",
            entry.reason or "-",
        )
        return Outcome(queue_id, True, "deleted")


def quarantine_summary(entry: SpoolEntry, now: float) -> dict[str, Any]:
    """The JSON form of a quarantined message (``quarantine list --json``); times in UTC."""
    return {
        "id": entry.id,
        "quarantined": iso_time(entry.received),
        "age": max(0, round(now - entry.received)),
        "plugin": entry.plugin,
        "reason": entry.reason,
        "size": entry.size,
        "sender": entry.mail_from,
        "recipients": [r.address for r in entry.recipients],
        "client_ip": entry.client_ip,
        "helo": entry.helo,
    }


def format_quarantine_list(entries: Sequence[SpoolEntry], now: float) -> str:
    """The table of ``quarantine list``: a line per message, then its reason and recipients."""
    if not entries:
        return "quarantine is empty\n"
    lines = [f"{'QUEUE ID':<19}  {'AGE':>6}  {'SIZE':>9}  {'PLUGIN':<12}  SENDER"]
    for e in entries:
        lines.append(
            f"{e.id:<19}  {span(now - e.received):>6}  {e.size:>9}  {e.plugin or '-':<12}"
            f"  <{e.mail_from}>"
        )
        lines.append(f"    reason: {e.reason or '-'}")
        lines.append("    to: " + " ".join(f"<{r.address}>" for r in e.recipients))
    lines.append(f"-- {len(entries)} message(s) in quarantine")
    return "\n".join(lines) + "\n"


def format_quarantine_entry(
    entry: SpoolEntry, data: bytes, now: float, *, body: bool = False
) -> bytes:
    """The text of ``quarantine show``: who, why, envelope, then headers (``body``: all)."""
    out = [
        f"id:          {entry.id}",
        f"quarantined: {local_time(entry.received)} ({span(now - entry.received)} ago)",
        f"plugin:      {entry.plugin or '-'}",
        f"reason:      {entry.reason or '-'}",
        f"size:        {entry.size}",
        f"sender:      <{entry.mail_from}>"
        + (f" {' '.join(entry.mail_options)}" if entry.mail_options else ""),
        f"client:      [{entry.client_ip}] helo={entry.helo or '-'}",
        "recipients:",
        *(
            f"  <{r.address}>" + (f" {' '.join(r.options)}" if r.options else "")
            for r in entry.recipients
        ),
        "message:" if body else "headers:",
    ]
    text = "\n".join(out).encode() + b"\n"
    return text + (data if body else header_block(data)).replace(b"\r\n", b"\n")


def run_quarantine_command(
    ctl: QuarantineControl,
    action: str,
    *,
    ids: Sequence[str] = (),
    as_json: bool = False,
    body: bool = False,
    stdout: IO[bytes] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run ``filterhost quarantine ACTION`` and return its exit status.

    Listings go to ``stdout``; errors to ``stderr`` (what a change did is logged). The status
    is 0, 1 for an unknown message, ``EXIT_BUSY`` (75) for one that stayed locked; with
    several ids, the worst.
    """
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr
    now = time.time()
    if action == "list":
        entries = ctl.entries()
        if as_json:
            text = json.dumps([quarantine_summary(e, now) for e in entries], indent=1) + "\n"
        else:
            text = format_quarantine_list(entries, now)
        out.write(text.encode())
        return 0
    if action == "show":
        (queue_id,) = ids
        try:
            entry, data = ctl.show(queue_id)
        except QueueError as exc:
            print(f"filterhost: {exc}", file=err)
            return exc.exit_code
        if as_json:
            out.write((json.dumps(quarantine_summary(entry, now), indent=1) + "\n").encode())
        else:
            out.write(format_quarantine_entry(entry, data, now, body=body))
        return 0
    operations: dict[str, Callable[[str], Outcome]] = {
        "release": ctl.release,
        "delete": ctl.delete,
    }
    if action not in operations:
        raise ValueError(f"unknown quarantine action {action!r}")
    status = 0
    for queue_id in ids:
        try:
            operations[action](queue_id)
        except QueueError as exc:
            print(f"filterhost: {exc}", file=err)
            status = max(status, exc.exit_code)
    return status
