"""The queue runner: takes spooled messages to their next hops, retries, gives up.

Each pending recipient is routed (routing plugins first, then ``[relay] mode``), recipients with
the same next hop travel in one SMTP transaction, and each gets its own result: 2xx delivered,
4xx or a network/DNS failure deferred on ``retry_schedule``, 5xx (or a permanent DNS answer, or
an expired ``max_queue_lifetime``) bounced. Every change of state is written to the spool before
the next step, so a crash loses nothing and repeats at most the delivery it interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from filterhost.config import Config
from filterhost.dispatch import HookRunner
from filterhost.message import Message
from filterhost.model import Route, Session, Transaction
from filterhost.relay.client import AttemptResult, deliver
from filterhost.relay.resolver import DnsFailure, MxHost, Resolver
from filterhost.spool import RecipientState, Spool, SpoolEntry
from filterhost.verdict import Reply

__all__ = ["QueueRunner", "retry_delay"]

log = logging.getLogger("filterhost.queue")


def retry_delay(schedule: Sequence[float], attempts: int, *, jitter: float = 0.1) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt; the last interval repeats.

    A little random jitter keeps messages deferred together from retrying in lock step.
    """
    base = schedule[min(max(attempts, 1), len(schedule)) - 1]
    return base * (1 + random.uniform(0, jitter))  # noqa: S311 - jitter, not crypto


@dataclass(slots=True)
class _Hop:
    route: Route
    recipients: list[RecipientState]


class QueueRunner:
    """Schedules and runs delivery attempts for the spool, in this process."""

    def __init__(
        self,
        spool: Spool,
        config: Config,
        hooks: HookRunner,
        resolver: Resolver,
        *,
        concurrency: int = 100,
        connect_timeout: float = 60.0,
    ) -> None:
        self.spool = spool
        self.config = config
        self.hooks = hooks
        self.resolver = resolver
        self.timeout = connect_timeout
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._active: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._scan_task: asyncio.Task[None] | None = None
        self.rescan_interval = 60.0

    # -- scheduling ------------------------------------------------------------------------

    def schedule(self, queue_id: str, when: float) -> None:
        """Attempt ``queue_id`` at ``when`` (epoch seconds), or sooner if it was already due."""
        current = self._due.get(queue_id)
        if current is not None and current <= when:
            return
        self._due[queue_id] = when
        heapq.heappush(self._heap, (when, queue_id))
        self._wake.set()

    def start(self) -> None:
        """Pick up everything in the spool and start delivering."""
        orphans = self.spool.remove_orphans()
        for queue_id in orphans:
            log.warning("%s: removed an incomplete spool file (never acknowledged)", queue_id)
        count = self.rescan()
        log.info("queue runner started: %d message(s) in the queue", count)
        self._loop_task = asyncio.create_task(self._run(), name="queue-runner")
        self._scan_task = asyncio.create_task(self._rescan_periodically(), name="queue-rescan")

    def rescan(self) -> int:
        """Schedule every queued message this runner does not know yet; returns how many.

        Messages come into the queue behind the runner's back when the queue CLI releases or
        flushes them, or when another process spooled them.
        """
        count = 0
        for queue_id in self.spool.queue_ids():
            if queue_id in self._due or queue_id in self._active:
                continue
            try:
                entry = self.spool.read_entry(queue_id)
            except (FileNotFoundError, ValueError):
                continue
            due = entry.next_attempt
            if due is not None and not entry.hold:
                self.schedule(entry.id, due)
                count += 1
        return count

    async def _rescan_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.rescan_interval)
            self.rescan()

    async def stop(self) -> None:
        """Stop: no new attempts; attempts in flight are cancelled (their messages stay queued)."""
        for background in (self._scan_task, self._loop_task):
            if background is not None:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            now = time.time()
            while self._heap and self._heap[0][0] <= now:
                when, queue_id = heapq.heappop(self._heap)
                if self._due.get(queue_id) != when:
                    continue  # superseded by an earlier schedule
                del self._due[queue_id]
                if queue_id in self._active:
                    continue  # its attempt in flight reschedules it
                await self._slots.acquire()
                self._active.add(queue_id)
                task = asyncio.create_task(self._attempt_guarded(queue_id), name=queue_id)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._wake.clear()
            timeout = self._heap[0][0] - time.time() if self._heap else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _attempt_guarded(self, queue_id: str) -> None:
        try:
            await self.attempt(queue_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The message stays spooled; try again later rather than lose it.
            log.exception("%s: delivery attempt failed with an internal error", queue_id)
            self.schedule(queue_id, time.time() + self.config.relay.retry_schedule[0])
        finally:
            self._active.discard(queue_id)
            self._slots.release()

    # -- one attempt -----------------------------------------------------------------------

    async def attempt(self, queue_id: str) -> None:
        """Try every due recipient of ``queue_id`` once."""
        with self.spool.locked(queue_id) as mine:
            if not mine:
                if self.spool.entry_path(queue_id).exists():
                    # Another process (or the queue CLI) has it; look again shortly.
                    self.schedule(queue_id, time.time() + 5)
                return
            try:
                entry, data = await self.spool.load(queue_id)
            except FileNotFoundError:
                return  # deleted meanwhile
            if entry.hold:
                return
            await self._attempt(entry, data)

    async def _attempt(self, entry: SpoolEntry, data: bytes) -> None:
        now = time.time()
        txn = Transaction(
            session=Session(id="queue", client_ip=entry.client_ip or "0.0.0.0", helo=entry.helo),  # noqa: S104
            mail_from=entry.mail_from,
            recipients=[r.address for r in entry.recipients],
            message=Message(data),
            mail_options=list(entry.mail_options),
            queue_id=entry.id,
        )
        due = [r for r in entry.pending if r.next_attempt <= now]
        hops: dict[str, _Hop] = {}
        for rcpt in due:
            try:
                route = await self._route(txn, rcpt.address)
            except RuntimeError as exc:
                await self._defer(entry, txn, rcpt, Reply(451, "4.3.0", str(exc)))
                continue
            if route.kind == "discard":
                rcpt.status = "discarded"
                log.info("%s: to=<%s> status=discarded by routing", entry.id, rcpt.address)
                continue
            if route.kind == "reject":
                assert route.reply is not None
                await self._bounce(entry, txn, rcpt, route.reply)
                continue
            if route.kind == "hold":
                await self._defer(entry, txn, rcpt, Reply(450, "4.3.2", "held by routing"))
                continue
            hop = hops.setdefault(route.next_hop, _Hop(route, []))
            hop.recipients.append(rcpt)
        if hops:
            results = await asyncio.gather(
                *(self._deliver_hop(entry, txn, hop, data) for hop in hops.values())
            )
            for hop, result in zip(hops.values(), results, strict=True):
                await self._record(entry, txn, hop, result)
        await self._save(entry)

    async def _route(self, txn: Transaction, recipient: str) -> Route:
        route = await self.hooks.first_route(
            context=txn.queue_id, transaction=txn, recipient=recipient
        )
        if route is not None:
            return route
        if self.config.relay.mode == "smarthost":
            return Route.smarthost()
        return Route.mx(recipient.rpartition("@")[2])

    async def _hosts(self, route: Route) -> tuple[list[MxHost], int]:
        relay = self.config.relay
        if route.kind == "smarthost":
            target = relay.smarthost_address
            return [MxHost(target.host, 0, await self.resolver.addresses(target.host))], target.port
        if route.kind == "host":
            return [
                MxHost(route.hostname, 0, await self.resolver.addresses(route.hostname))
            ], route.port
        return await self.resolver.mx_hosts(route.domain), relay.mx_port

    async def _deliver_hop(
        self, entry: SpoolEntry, txn: Transaction, hop: _Hop, data: bytes
    ) -> AttemptResult:
        addresses = [r.address for r in hop.recipients]
        try:
            hosts, port = await self._hosts(hop.route)
        except DnsFailure as exc:
            code = 550 if exc.permanent else 451
            reply = Reply(code, exc.status, exc.text)
            return AttemptResult(dict.fromkeys(addresses, reply), hop.route.next_hop, 0.0)
        return await deliver(
            hosts,
            port=port,
            helo=self.config.hostname,
            sender=entry.mail_from,
            recipients=addresses,
            data=data,
            timeout=self.timeout,
        )

    async def _record(
        self, entry: SpoolEntry, txn: Transaction, hop: _Hop, result: AttemptResult
    ) -> None:
        for rcpt in hop.recipients:
            reply = result.replies.get(rcpt.address) or Reply(451, "4.3.0", "no reply recorded")
            log.info(
                "%s: to=<%s> relay=%s delay=%.2f reply=%r",
                entry.id,
                rcpt.address,
                result.host,
                result.seconds,
                str(reply),
            )
            if 200 <= reply.code < 300:
                rcpt.status = "delivered"
                rcpt.attempts += 1
                rcpt.last_reply = str(reply)
                log.info("%s: to=<%s> status=delivered", entry.id, rcpt.address)
                await self.hooks.observe(
                    "filterhost_delivered",
                    context=entry.id,
                    transaction=txn,
                    recipient=rcpt.address,
                    reply=reply,
                )
            elif reply.is_permanent:
                await self._bounce(entry, txn, rcpt, reply)
            else:
                await self._defer(entry, txn, rcpt, reply)

    async def _defer(
        self, entry: SpoolEntry, txn: Transaction, rcpt: RecipientState, reply: Reply
    ) -> None:
        now = time.time()
        rcpt.attempts += 1
        rcpt.last_reply = str(reply)
        if now - entry.received >= self.config.relay.max_queue_lifetime:
            expired = Reply(550, "5.4.7", f"delivery time expired; last reply: {reply}")
            await self._bounce(entry, txn, rcpt, expired)
            return
        rcpt.next_attempt = now + retry_delay(self.config.relay.retry_schedule, rcpt.attempts)
        log.info(
            "%s: to=<%s> status=deferred attempts=%d next_attempt_in=%.0fs reply=%r",
            entry.id,
            rcpt.address,
            rcpt.attempts,
            rcpt.next_attempt - now,
            str(reply),
        )
        await self.hooks.observe(
            "filterhost_deferred",
            context=entry.id,
            transaction=txn,
            recipient=rcpt.address,
            reply=reply,
        )

    async def _bounce(
        self, entry: SpoolEntry, txn: Transaction, rcpt: RecipientState, reply: Reply
    ) -> None:
        rcpt.status = "bounced"
        rcpt.last_reply = str(reply)
        # DSNs to the sender come with the delivery engine (issue 5); until then, the log says it.
        log.warning("%s: to=<%s> status=bounced reply=%r", entry.id, rcpt.address, str(reply))
        await self.hooks.observe(
            "filterhost_bounced",
            context=entry.id,
            transaction=txn,
            recipient=rcpt.address,
            reply=reply,
        )

    async def _save(self, entry: SpoolEntry) -> None:
        due = entry.next_attempt
        if due is None:
            await self.spool.remove(entry.id)
            log.info("%s: removed (all recipients done)", entry.id)
            return
        await self.spool.update(entry)
        self.schedule(entry.id, due)
