"""Prometheus metrics and a health check, served by the event loop on a loopback address.

``[metrics] listen = "127.0.0.1:9125"`` turns it on: ``GET /metrics`` is the Prometheus text
format, ``GET /health`` is ``200 ok`` or ``503`` with one line per problem (the spool is not
writable, the queue runner is stuck). The HTTP server is a few lines of asyncio on the same
loop as the SMTP sessions, not prometheus_client's threaded server: counters are updated and read
on one thread, and the gauges (sessions, queue) are computed at scrape time from the live state.

Label values are bounded on purpose, so that a scrape stays small however much mail flows:
``reason`` is the reply's enhanced status code (``5.7.1``), not the plugin's free text, and
deliveries are counted per next hop for smart host and host routes but as one ``mx`` hop for MX
routes (one label per destination domain would grow without end; the logs have the domain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from filterhost.config import parse_host_port
from filterhost.verdict import Action, Verdict

if TYPE_CHECKING:
    from filterhost.app import App
    from filterhost.model import Route
    from filterhost.spool import RecipientState

__all__ = ["Metrics", "MetricsServer", "health_problems", "start_metrics"]

log = logging.getLogger("filterhost.metrics")

# Plugin calls range from microseconds (a header rule) to seconds (a scan of a large message).
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
_MAX_REQUEST = 8192
_PROBE = ".health-probe-{pid}"


class Metrics:
    """The counters and histograms of one server, in their own registry (not the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Counter(
            "filterhost_sessions",
            "SMTP connections, admitted or refused by the connection limits",
            ["result"],
            registry=self.registry,
        )
        self.messages = Counter(
            "filterhost_messages",
            "Messages at the end of DATA by outcome (accepted, rejected, tempfailed, discarded, "
            "quarantined), deciding plugin ('-': core) and reason (enhanced status code)",
            ["outcome", "plugin", "reason"],
            registry=self.registry,
        )
        self.plugin_seconds = Histogram(
            "filterhost_plugin_duration_seconds",
            "Time of each plugin call, per plugin and hook (the clamav plugin's includes clamd)",
            ["plugin", "hook"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.plugin_verdicts = Counter(
            "filterhost_plugin_verdicts",
            "Plugin calls by plugin, hook and action (continue, accept, reject, ... , error)",
            ["plugin", "hook", "action"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "filterhost_deliveries",
            "Recipients after a delivery attempt: delivered, deferred or bounced, per next hop",
            ["next_hop", "outcome"],
            registry=self.registry,
        )

    def plugin_call(
        self, plugin: str, hook: str, seconds: float, verdict: Verdict | None, *, failed: bool
    ) -> None:
        """One plugin call (from the hook runner)."""
        self.plugin_seconds.labels(plugin, hook).observe(seconds)
        action = "error" if failed else (verdict.action.value if verdict else "continue")
        self.plugin_verdicts.labels(plugin, hook, action).inc()

    def message(self, verdict: Verdict | None, *, queued: bool = False) -> None:
        """One message at the end of DATA: ``verdict`` is the chain's (None: it ran through)."""
        if verdict is None or queued:
            outcome = "accepted"
        else:
            outcome = {
                Action.REJECT: "rejected",
                Action.TEMPFAIL: "tempfailed",
                Action.DISCONNECT: "tempfailed",
                Action.DISCARD: "discarded",
                Action.QUARANTINE: "quarantined",
            }.get(verdict.action, "accepted")
        reply = verdict.effective_reply if verdict is not None else None
        plugin = (verdict.plugin or "-") if verdict is not None else "-"
        self.messages.labels(outcome, plugin, reply.status if reply else "2.0.0").inc()

    def refused(self, status: str) -> None:
        """A message the core refused at the end of DATA (size, line endings, hops)."""
        self.messages.labels(
            "tempfailed" if status.startswith("4") else "rejected", "-", status
        ).inc()

    def delivered(self, route: Route, recipients: list[RecipientState]) -> None:
        """Recipients after one attempt to ``route`` (their status says how it went)."""
        hop = "mx" if route.kind == "mx" else route.next_hop
        for rcpt in recipients:
            outcome = {"pending": "deferred"}.get(rcpt.status, rcpt.status)
            self.deliveries.labels(hop, outcome).inc()


class _LiveState(Collector):
    """Gauges read at scrape time: open sessions, queue size, age of the oldest message."""

    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        """The gauges now."""
        front = self.app.front
        yield GaugeMetricFamily(
            "filterhost_sessions_active", "SMTP sessions open now", value=len(front.sessions)
        )
        # Files, and what is still in the journal (the first attempt, which may be slow).
        ids = sorted({*self.app.spool.queue_ids(), *self.app.spool.journal_ids()})
        yield GaugeMetricFamily(
            "filterhost_queue_messages", "Messages in the queue (held ones included)", len(ids)
        )
        age = 0.0
        if ids:
            # A queue id starts with its time in milliseconds (spool.new_queue_id), and the
            # list is sorted: the first is the oldest, no need to read any entry.
            with contextlib.suppress(ValueError):
                age = max(0.0, time.time() - int(ids[0][:11], 16) / 1000)
        yield GaugeMetricFamily(
            "filterhost_queue_oldest_age_seconds", "Age of the oldest queued message", age
        )
        # Group commit at work: operations per sync (journal records, file writes).
        spool = self.app.spool
        journal = spool.journal
        commits = CounterMetricFamily(
            "filterhost_spool_syncs",
            "Group commits made durable (one fdatasync or directory fsync each)",
            labels=["store"],
        )
        records = CounterMetricFamily(
            "filterhost_spool_synced_operations",
            "Spool writes those commits covered (their ratio: the mean batch)",
            labels=["store"],
        )
        commits.add_metric(["files"], spool.batches)
        records.add_metric(["files"], spool.batched_ops)
        if journal is not None:
            commits.add_metric(["journal"], journal.batches)
            records.add_metric(["journal"], journal.batched)
        yield commits
        yield records
        agent = self.app.queue.agent
        if agent is not None:  # [relay] delivery_process
            yield CounterMetricFamily(
                "filterhost_delivery_agent_starts",
                "Delivery agent processes started (more than one: an agent died and was replaced)",
                value=agent.starts,
            )


def _probe_spool(directory: Path) -> str | None:
    """Write, fsync and remove a file in the spool (in a worker thread): the problem, or None."""
    path = directory / _PROBE.format(pid=os.getpid())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
    except OSError as exc:
        return f"spool {directory} is not writable: {exc.strerror or exc}"
    return None


async def health_problems(app: App) -> list[str]:
    """What is wrong with the server now; empty when healthy."""
    problems = []
    spool_problem = await asyncio.to_thread(_probe_spool, app.spool.queue_dir)
    if spool_problem:
        problems.append(spool_problem)
    stuck = app.queue.stuck_for()
    if stuck is not None and stuck > float(app.config.metrics.stuck_after):
        problems.append(f"queue runner stuck: work due {stuck:.0f}s ago has not started")
    return problems


class MetricsServer:
    """The HTTP endpoint: ``/metrics`` and ``/health``, one request per connection."""

    def __init__(self, app: App, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.server: asyncio.Server | None = None

    async def start(self, listen: str) -> None:
        """Listen on ``listen`` (``host:port``)."""
        address = parse_host_port(listen)
        self.server = await asyncio.start_server(self._serve, address.host, address.port)
        log.info("metrics and health on http://%s/metrics and /health", address)

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body = await self._respond(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _respond(self, head: bytes) -> tuple[str, str, bytes]:
        if len(head) > _MAX_REQUEST:
            return "431 Request Header Fields Too Large", "text/plain", b"too large\n"
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_PLAIN_0_0_4, generate_latest(self.metrics.registry)
        if path == "/health":
            problems = await health_problems(self.app)
            if problems:
                return "503 Service Unavailable", "text/plain", "\n".join(problems).encode() + b"\n"
            return "200 OK", "text/plain", b"ok\n"
        return "404 Not Found", "text/plain", b"try /metrics or /health\n"


async def start_metrics(app: App) -> MetricsServer | None:
    """Start counting and serving when ``[metrics] listen`` is set; None when it is off."""
    listen = app.config.metrics.listen
    if not listen:
        return None
    metrics = Metrics()
    metrics.registry.register(_LiveState(app))
    app.hooks.metrics = metrics
    server = MetricsServer(app, metrics)
    await server.start(listen)
    return server
