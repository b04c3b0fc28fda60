"""The queue runner: takes spooled messages to their next hops, retries, gives up, reports.

Each pending recipient is routed (routing plugins first, then ``[relay] mode``), recipients with
the same next hop travel together (at most ``destination_recipients`` per transaction, at most
``destination_concurrency`` connections per next hop), and each gets its own result: 2xx
delivered, 4xx or a network/DNS failure deferred on ``retry_schedule``, 5xx (or a permanent DNS
answer, or an expired ``max_queue_lifetime``) bounced, with an RFC 3464 DSN to the sender.
Every change of state is written to the spool before the next step, so a crash loses nothing and
repeats at most the delivery it interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import ipaddress
import logging
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from filterhost.config import Config
from filterhost.dispatch import HookRunner
from filterhost.message import Message
from filterhost.model import Route, Session, Transaction
from filterhost.relay.agent import DeliveryAgent
from filterhost.relay.client import (
    AttemptResult,
    ConnectionPool,
    Credentials,
    Delivery,
    TlsSettings,
    deliver,
)
from filterhost.relay.dsn import RecipientReport, build_dsn, should_notify
from filterhost.relay.resolver import DnsFailure, MxHost, Resolver
from filterhost.spool import Checked, RecipientState, Spool, SpoolEntry, new_queue_id
from filterhost.verdict import Reply

__all__ = ["QueueRunner", "load_credentials", "retry_delay", "share_of"]

log = logging.getLogger("filterhost.queue")
HISTORY = 20  # attempts kept per recipient


def retry_delay(schedule: Sequence[float], attempts: int, *, jitter: float = 0.1) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt; the last interval repeats.

    A little random jitter keeps messages deferred together from retrying in lock step.
    """
    base = schedule[min(max(attempts, 1), len(schedule)) - 1]
    return base * (1 + random.uniform(0, jitter))  # noqa: S311 - jitter, not crypto


def share_of(queue_id: str, count: int) -> int:
    """Which of ``count`` workers rescans ``queue_id``: the same answer in every process."""
    return zlib.crc32(queue_id.encode()) % count


def load_credentials(path: str) -> Credentials | None:
    """``user:password`` from the first non-comment line of ``path`` (None for no path)."""
    if not path:
        return None
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            user, sep, password = line.partition(":")
            if not sep or not user:
                raise ValueError(f'{path}: expected a line "user:password"')
            return Credentials(user, password)
    raise ValueError(f'{path}: no "user:password" line')


@dataclass(slots=True)
class _Hop:
    route: Route
    recipients: list[RecipientState]


class _Limiter:
    """One semaphore per next hop, dropped when nobody uses it.

    Plain ``acquire``/``release`` rather than an async context manager: the generator-based
    one cost ~1% of a relayed 5 KB message's CPU.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._sems: dict[str, _Slots] = {}

    async def acquire(self, key: str) -> None:
        """Take one of ``key``'s slots (wait for one); give it back with :meth:`release`."""
        held = self._sems.get(key)
        if held is None:
            held = self._sems[key] = _Slots(asyncio.Semaphore(self.size))
        held.users += 1
        try:
            await held.sem.acquire()
        except BaseException:
            self._leave(key, held)
            raise

    def release(self, key: str) -> None:
        """Give back a slot taken with :meth:`acquire`."""
        held = self._sems[key]
        held.sem.release()
        self._leave(key, held)

    def _leave(self, key: str, held: _Slots) -> None:
        held.users -= 1
        if held.users <= 0:
            del self._sems[key]


@dataclass(slots=True)
class _Slots:
    sem: asyncio.Semaphore
    users: int = 0  # holding or waiting


# A message in the journal this long without its first attempt is moved to files at a rescan.
_SPILL_AFTER_MS = 1000.0


def _age_ms(queue_id: str, now_ms: float) -> float:
    try:
        return now_ms - int(queue_id[:11], 16)  # a queue id starts with its time in ms
    except ValueError:
        return 0.0


class QueueRunner:
    """Schedules and runs delivery attempts for the spool, in this process."""

    def __init__(
        self,
        spool: Spool,
        config: Config,
        hooks: HookRunner,
        resolver: Resolver,
        agent: DeliveryAgent | None = None,
    ) -> None:
        relay = config.relay
        self.spool = spool
        self.config = config
        self.hooks = hooks
        self.resolver = resolver
        self.pool = ConnectionPool(relay.connection_reuse_time)
        """Connections kept for attempts made in this process (no ``agent``)."""
        self.agent = agent
        """The delivery agent that makes the attempts (``[relay] delivery_process``), if any."""
        self._deliver: Callable[..., Awaitable[AttemptResult]] = (
            agent.deliver if agent is not None else functools.partial(deliver, pool=self.pool)
        )
        self.credentials = load_credentials(relay.smarthost_auth_file)
        self._hops = _Limiter(relay.destination_concurrency)
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(relay.concurrency)
        self._active: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._scan_task: asyncio.Task[None] | None = None
        self.rescan_interval = 60.0
        self._mtimes: dict[str, int] = {}
        self._spilling: asyncio.Task[None] | None = None
        self._local = {(hp.host, hp.port) for hp in config.server.listen_addresses}
        self._local_hosts: dict[tuple[MxHost, int, str], bool] = {}
        self.share = (0, 1)
        """(index, count): with worker processes, rescans take only this worker's share."""

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
        if self.agent is not None:
            self.agent.start()
        count = self.rescan()
        log.info("queue runner started: %d message(s) in the queue", count)
        self._loop_task = asyncio.create_task(self._run(), name="queue-runner")
        self._scan_task = asyncio.create_task(self._periodically(), name="queue-rescan")

    def rescan_requested(self) -> None:
        """A rescan the queue CLI (or an operator, with SIGUSR1) asked for.

        It also moves every message that waits in the journal to files now, whatever its age,
        for the command to act on.
        """
        self.rescan(spill_after_ms=0.0)

    def rescan(self, *, spill_after_ms: float = _SPILL_AFTER_MS) -> int:
        """Schedule every queued message this runner does not know yet; returns how many.

        Messages come into the queue behind the runner's back when the queue CLI releases or
        flushes them, or when another process spooled them.
        """
        count = 0
        seen: dict[str, int] = {}
        index, workers = self.share
        for queue_id in self.spool.queue_ids():
            if queue_id in self._active:
                continue  # its attempt in flight reschedules it from what it saves
            if workers > 1 and share_of(queue_id, workers) != index:
                continue  # another worker's (it delivers what it spooled at once anyway)
            try:
                mtime = self.spool.entry_path(queue_id).stat().st_mtime_ns
                seen[queue_id] = mtime
                if self._mtimes.get(queue_id) == mtime and queue_id in self._due:
                    continue  # unchanged since we scheduled it: no need to read it again
                entry = self.spool.read_entry(queue_id)
            except (FileNotFoundError, ValueError):
                continue
            due = entry.next_attempt
            if any(r.status == "bounced" and not r.notified for r in entry.recipients):
                due = 0.0  # bounced by the operator: the sender is still to be told
            if due is None or entry.hold:
                continue
            # A message known already is looked at too: the queue CLI may have made it due
            # sooner (flush, release) than the time this runner has for it.
            current = self._due.get(queue_id)
            if current is None or due < current:
                self.schedule(entry.id, due)
                count += 1
        self._mtimes = seen
        self._spill_waiting(spill_after_ms)
        return count

    def _spill_waiting(self, after_ms: float) -> None:
        """Move messages waiting in the journal for their first attempt to files.

        A message in the journal is only this process's to change; one that waits (behind
        the concurrency limits, say) moves to files at the next rescan, where the queue CLI
        can hold or delete it: the CLI asks for a rescan when it finds one in the journal.
        """
        if self._spilling is not None and not self._spilling.done():
            return
        now_ms = time.time() * 1000
        waiting = [
            queue_id
            for queue_id in self.spool.journal_ids()
            if queue_id not in self._active and _age_ms(queue_id, now_ms) >= after_ms
        ]
        if waiting:
            self._spilling = asyncio.get_running_loop().create_task(
                self._spill(waiting), name="journal-spill"
            )
            self._tasks.add(self._spilling)
            self._spilling.add_done_callback(self._tasks.discard)

    async def _spill(self, queue_ids: list[str]) -> None:
        for queue_id in queue_ids:
            if queue_id in self._active or not self.spool.in_journal(queue_id):
                continue  # its attempt started, or it is done
            self._active.add(queue_id)  # no attempt starts while it moves
            try:
                await self.spool.move_to_files(queue_id)
            except Exception:
                log.exception("%s: could not move the message from the journal", queue_id)
            finally:
                self._active.discard(queue_id)
                if queue_id not in self._due:
                    # Popped (and skipped) while it moved: due now, as it was.
                    self.schedule(queue_id, time.time())

    async def _periodically(self) -> None:
        tick = min(self.rescan_interval, max(self.pool.idle_time, 1.0))
        last_scan = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            await self.pool.expire()
            if time.monotonic() - last_scan >= self.rescan_interval:
                last_scan = time.monotonic()
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
        await self.pool.close()
        if self.agent is not None:
            await self.agent.close()

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

    def stuck_for(self) -> float | None:
        """Seconds that due work has waited without being started; None when nothing waits.

        The loop pops due items as soon as a delivery slot is free, so an item long overdue at
        the top of the heap means the loop died or every slot hangs (the health check's cue).
        A dead loop counts as stuck from the start.
        """
        if self._loop_task is not None and self._loop_task.done():
            return float("inf")
        if not self._heap:
            return None
        overdue = time.time() - self._heap[0][0]
        return overdue if overdue > 0 else None

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
                checked = self.spool.checked(queue_id)
            except FileNotFoundError:
                return  # deleted meanwhile
            if entry.hold:
                return
            await self._attempt(entry, data, checked=checked)

    async def _attempt(
        self, entry: SpoolEntry, data: bytes, *, checked: Checked | None = None
    ) -> None:
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
        if len(hops) == 1:
            # One next hop (the common case): no gather, whose task per hop costs a loop turn.
            (hop,) = hops.values()
            await self._deliver_hop(entry, txn, hop, data, checked)
        elif hops:
            await asyncio.gather(
                *(self._deliver_hop(entry, txn, hop, data, checked) for hop in hops.values())
            )
        await self._finish(entry, data)

    async def _route(self, txn: Transaction, recipient: str) -> Route:
        route = await self.hooks.first_route(
            context=txn.queue_id, transaction=txn, recipient=recipient
        )
        if route is not None:
            return route
        if self.config.relay.mode == "smarthost":
            return Route.smarthost()
        return Route.mx(recipient.rpartition("@")[2])

    def _tls_for(self, route: Route) -> TlsSettings:
        relay = self.config.relay
        if route.kind == "smarthost":
            return TlsSettings(
                relay.smarthost_tls_policy, relay.tls_ca_file, relay.smarthost_tls == "implicit"
            )
        name = (route.domain or route.hostname).lower().rstrip(".")
        policy = relay.tls_policies.get(name)
        labels = name.split(".")
        for i in range(1, len(labels)):
            if policy is not None:
                break
            policy = relay.tls_policies.get("." + ".".join(labels[i:]))
        return TlsSettings(policy or relay.tls_policy, relay.tls_ca_file)

    def _is_local(self, host: MxHost, port: int) -> bool:
        # Asked for every host of every attempt: remembered (its checks were ~1% of a relayed
        # 5 KB message's CPU). The key holds what the answer depends on that a reload changes.
        key = (host, port, self.config.hostname)
        known = self._local_hosts.get(key)
        if known is None:
            if len(self._local_hosts) >= 4096:
                self._local_hosts.clear()
            known = self._local_hosts[key] = self._check_local(host, port)
        return known

    def _check_local(self, host: MxHost, port: int) -> bool:
        if host.name.lower().rstrip(".") == self.config.hostname.lower():
            return True
        for address in host.addresses:
            if (address, port) in self._local:
                return True
            for local, local_port in self._local:
                if local_port == port and local in ("0.0.0.0", "::"):  # noqa: S104
                    with contextlib.suppress(ValueError):
                        if ipaddress.ip_address(address).is_loopback:
                            return True
        return False

    def _without_self(self, domain: str, hosts: list[MxHost], port: int) -> list[MxHost]:
        """RFC 5321 5.1: drop MX hosts as preferred as this one, or less; none left is a loop."""
        for i, host in enumerate(hosts):
            if self._is_local(host, port):
                kept = [h for h in hosts[:i] if h.preference < host.preference]
                if not kept:
                    raise DnsFailure(True, "5.4.6", f"mail for {domain} loops back to myself")
                return kept
        return hosts

    async def _hosts(self, route: Route) -> tuple[list[MxHost], int]:
        relay = self.config.relay
        if route.kind == "smarthost":
            target = relay.smarthost_address
            hosts = [MxHost(target.host, 0, await self.resolver.addresses(target.host))]
            return self._without_self(target.host, hosts, target.port), target.port
        if route.kind == "host":
            addresses = await self.resolver.addresses(route.hostname)
            hosts = [MxHost(route.hostname, 0, addresses)]
            return self._without_self(route.hostname, hosts, route.port), route.port
        hosts = await self.resolver.mx_hosts(route.domain)
        return self._without_self(route.domain, hosts, relay.mx_port), relay.mx_port

    async def _deliver_hop(
        self,
        entry: SpoolEntry,
        txn: Transaction,
        hop: _Hop,
        data: bytes,
        checked: Checked | None,
    ) -> None:
        relay = self.config.relay
        try:
            hosts, port = await self._hosts(hop.route)
        except DnsFailure as exc:
            reply = Reply(550 if exc.permanent else 451, exc.status, exc.text)
            addresses = [r.address for r in hop.recipients]
            result = AttemptResult(dict.fromkeys(addresses, reply), hop.route.next_hop, 0.0)
            await self._record(entry, txn, hop.recipients, result)
            if self.hooks.metrics is not None:
                self.hooks.metrics.delivered(hop.route, hop.recipients)
            return
        size = relay.destination_recipients
        for start in range(0, len(hop.recipients), size):
            batch = hop.recipients[start : start + size]
            delivery = Delivery(
                sender=entry.mail_from,
                recipients=[r.address for r in batch],
                data=data,
                mail_options=entry.mail_options,
                rcpt_options={r.address: r.options for r in batch},
                checked=checked,
            )
            await self._hops.acquire(hop.route.next_hop)
            try:
                result = await self._deliver(
                    hosts,
                    delivery,
                    port=port,
                    helo=self.config.hostname,
                    tls=self._tls_for(hop.route),
                    credentials=self.credentials if hop.route.kind == "smarthost" else None,
                    connect_timeout=relay.connect_timeout,
                    timeout=relay.smtp_timeout,
                )
            finally:
                self._hops.release(hop.route.next_hop)
            await self._record(entry, txn, batch, result)
            if self.hooks.metrics is not None:
                self.hooks.metrics.delivered(hop.route, batch)

    async def _record(
        self,
        entry: SpoolEntry,
        txn: Transaction,
        recipients: list[RecipientState],
        result: AttemptResult,
    ) -> None:
        now = time.time()
        for rcpt in recipients:
            reply = result.replies.get(rcpt.address) or Reply(451, "4.3.0", "no reply recorded")
            log.info(
                "%s: attempt to=<%s> relay=%s tls=%s conn=%s delay=%.3f reply=%r",
                entry.id,
                rcpt.address,
                result.host,
                result.tls or "none",
                "reused" if result.reused else "new",
                result.seconds,
                str(reply),
            )
            rcpt.history = [
                *rcpt.history[-(HISTORY - 1) :],
                {"at": round(now, 3), "host": result.host, "reply": str(reply)},
            ]
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
                rcpt.attempts += 1
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
        log.warning("%s: to=<%s> status=bounced reply=%r", entry.id, rcpt.address, str(reply))
        await self.hooks.observe(
            "filterhost_bounced",
            context=entry.id,
            transaction=txn,
            recipient=rcpt.address,
            reply=reply,
        )

    async def _finish(self, entry: SpoolEntry, data: bytes) -> None:
        """Send what the sender must be told, then save or remove the entry."""
        newly_bounced = any(r.status == "bounced" and not r.notified for r in entry.recipients)
        await self.notify_sender(entry, data)
        due = entry.next_attempt
        if due is None:
            if entry.mail_from == "" and newly_bounced:
                # A bounce that cannot be delivered is kept for the operator, never bounced.
                entry.hold = True
                entry.reason = "undeliverable bounce"
                await self.spool.update(entry)
                log.warning("%s: undeliverable bounce kept on hold", entry.id)
                return
            await self.spool.remove(entry.id)
            log.info("%s: removed (all recipients done)", entry.id)
            return
        await self.spool.update(entry)
        self.schedule(entry.id, due)

    async def notify_sender(self, entry: SpoolEntry, data: bytes) -> None:
        """Spool the DSN this entry's state calls for, before that state is saved.

        Failures (once) and, with ``delay_warning``, delays (once) are reported in one RFC 3464
        message to the envelope sender, as NOTIFY allows; never to the null sender. The DSN is
        durable before the recipients are marked notified: a crash repeats a DSN, never loses it.
        """
        relay = self.config.relay
        now = time.time()
        reports: list[RecipientReport] = []
        marks: list[tuple[RecipientState, str]] = []
        for rcpt in entry.recipients:
            remote = rcpt.history[-1]["host"].partition("[")[0] if rcpt.history else None
            if rcpt.status == "bounced" and not rcpt.notified:
                marks.append((rcpt, "notified"))
                if should_notify(entry, rcpt, "failed"):
                    reports.append(
                        RecipientReport.from_state(
                            rcpt, "failed", remote_mta=remote, last_attempt=now
                        )
                    )
            elif (
                relay.delay_warning > 0
                and rcpt.status == "pending"
                and not rcpt.delay_notified
                and now - entry.received >= relay.delay_warning
            ):
                marks.append((rcpt, "delay_notified"))
                if should_notify(entry, rcpt, "delayed"):
                    reports.append(
                        RecipientReport.from_state(
                            rcpt,
                            "delayed",
                            remote_mta=remote,
                            last_attempt=now,
                            will_retry_until=entry.received + relay.max_queue_lifetime,
                        )
                    )
        if reports:
            dsn = build_dsn(
                entry=entry,
                original=data,
                reports=reports,
                reporting_mta=self.config.hostname,
                now=now,
                max_original=relay.bounce_original_max,
            )
            notice = SpoolEntry(
                id=new_queue_id(),
                mail_from="",
                recipients=[RecipientState(entry.mail_from)],
                received=now,
                size=len(dsn),
                helo=self.config.hostname,
                mail_options=[] if dsn.isascii() else ["BODY=8BITMIME"],
            )
            await self.spool.store(notice, dsn)
            kinds = sorted({r.action for r in reports})
            log.info(
                "%s: sender notified (%s) to=<%s> dsn=%s",
                entry.id,
                "+".join(kinds),
                entry.mail_from,
                notice.id,
            )
            self.schedule(notice.id, 0.0)
        elif marks and not entry.mail_from:
            log.info(
                "%s: no notification: the sender is null (a bounce is never bounced)", entry.id
            )
        for rcpt, flag in marks:
            setattr(rcpt, flag, True)
