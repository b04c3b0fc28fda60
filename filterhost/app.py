"""The running server: front end listeners, queue runner, plugins, and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from filterhost.config import Config
from filterhost.dispatch import HookRunner
from filterhost.metrics import MetricsServer, start_metrics
from filterhost.pluginmanager import Plugins
from filterhost.relay.agent import AgentSettings, DeliveryAgent
from filterhost.relay.queue import QueueRunner
from filterhost.relay.resolver import Resolver
from filterhost.reload import Reloader
from filterhost.smtp.server import FrontEnd
from filterhost.spool import PIDFILE, RESCAN_SIGNAL, Spool

__all__ = ["App"]

log = logging.getLogger("filterhost")


class App:
    """One filterhost process."""

    def __init__(
        self,
        config: Config,
        plugins: Plugins,
        *,
        drain_seconds: float = 30.0,
        worker: int = 0,
        workers: int = 1,
        agent: tuple[int, socket.socket] | None = None,
    ) -> None:
        self.config = config
        self.plugins = plugins
        self.drain_seconds = drain_seconds
        self.worker = worker
        """This process's index among ``workers`` (:mod:`filterhost.workers`)."""
        self.workers = workers
        self.hooks = HookRunner(plugins, config)
        self.spool = Spool(config.spool_directory)
        if config.spool.journal:
            self.spool.use_journal(worker, workers)
        self.resolver = Resolver(config.relay.nameserver_addresses)
        delivery_agent = None
        if config.relay.delivery_process:
            # ``agent``: one forked before the loop started (workers.serve); else it is spawned.
            delivery_agent = DeliveryAgent(AgentSettings.of(config), agent)
        self.queue = QueueRunner(self.spool, config, self.hooks, self.resolver, delivery_agent)
        self.front = FrontEnd(config, self.hooks, self.spool, self._queued)
        if workers > 1:
            # Several processes on the same ports; the queue rescans split by queue id.
            self.front.reuse_port = True
            self.queue.share = (worker, workers)
        self.servers: list[asyncio.Server] = []
        self.reloader = Reloader(self)
        """SIGHUP: reload conf.d (see :mod:`filterhost.reload`)."""
        self.metrics_server: MetricsServer | None = None
        self._stop = asyncio.Event()

    def _queued(self, queue_id: str) -> None:
        self.queue.schedule(queue_id, 0.0)

    async def start(self) -> None:
        """Open the spool, start plugins and the queue runner, then listen."""
        self.spool.open()
        self.front.quarantine.open()
        self.plugins.configure(self.config)
        await self.hooks.observe("filterhost_startup")
        self.queue.start()
        if self.worker == 0:  # one metrics listener per host, not one per worker
            self.metrics_server = await start_metrics(self)
        # Plain (STARTTLS) listeners first, then implicit-TLS ones; each is kept as it opens.
        await self.front.listen(self.servers)

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (signal handlers call this)."""
        self._stop.set()

    async def stop(self) -> None:
        """Stop accepting, let sessions finish (up to ``drain_seconds``), keep the spool."""
        for server in self.servers:
            server.close()
        await self.front.drain(self.drain_seconds)
        for server in self.servers:
            await server.wait_closed()
        await self.queue.stop()
        await self.reloader.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        await self.hooks.observe("filterhost_shutdown", reverse=True)
        self.spool.close()
        self.front.quarantine.close()
        pidfile = self.spool.directory / PIDFILE
        if pidfile.exists() and pidfile.read_text().strip() == str(os.getpid()):
            pidfile.unlink()
        log.info("stopped")

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(RESCAN_SIGNAL, self.queue.rescan_requested)
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
        await self.start()
        # Only a process that handles RESCAN_SIGNAL may name itself here: the queue CLI signals
        # it (an App embedded in another program, such as a test, must not be signalled).
        if self.workers == 1:  # with workers, the master is the one to signal
            (self.spool.directory / PIDFILE).write_text(f"{os.getpid()}\n")
        log.info("filterhost ready (hostname %s)", self.config.hostname)
        await self._stop.wait()
        log.info("stopping: no new connections; draining sessions")
        await self.stop()
