"""The process model: one process, or a master and ``[server] workers`` worker processes.

One Python process uses one core. With ``workers = N > 1`` the master forks N workers; each is
a whole filterhost (listeners, chain, spool writer, queue runner) with its own event loop, and
the kernel spreads new connections over them (``SO_REUSEPORT`` on every listener).

Delivery is never doubled: an attempt holds the message's ``flock`` (:meth:`Spool.locked`), so
at most one process delivers a message at a time, and a message delivered is gone from the
spool. Nor do the workers fight over the queue: each delivers at once what it spooled itself,
and its rescans (start-up, every minute, ``SIGUSR1``) pick up only its share of the queue ids
(:func:`filterhost.relay.queue.share_of`); a worker that died is restarted with the same share,
so its messages are picked up again.

The master writes the pid file (the queue CLI's ``SIGUSR1`` goes to it) and passes SIGUSR1
and SIGHUP on to the workers; SIGTERM or SIGINT stops every worker gracefully and then the
master. A worker that dies is restarted (at most once a second).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import time
from types import FrameType

from filterhost.app import App
from filterhost.config import Config
from filterhost.loops import run_on
from filterhost.pluginmanager import Plugins
from filterhost.relay.agent import AgentSettings, fork_agent
from filterhost.spool import PIDFILE, RESCAN_SIGNAL

__all__ = ["serve"]

log = logging.getLogger("filterhost")
GC_THRESHOLD = 20_000  # allocations between young-generation collections (default 700)
RESTART_DELAY = 1.0  # seconds between restarts of one worker: a worker that dies at once
# must not turn the master into a fork loop


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running server.

    The default threshold (a collection every 700 net allocations) ran several collections
    per message, each walking every object of the process, loaded code included: a few
    percent of the CPU in the bench profiles (bench/PERF-LOG.md). ``freeze`` moves what
    exists at start-up out of the collector's view; a higher threshold collects less often.
    Reference counting still frees almost everything at once; only cycles wait longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


def serve(config: Config, plugins: Plugins) -> int:
    """Serve until SIGTERM; returns the exit status. Raises OSError when a listener fails."""
    _tune_gc()  # before fork: the workers inherit the frozen objects (and share their pages)
    workers = config.server.workers
    if workers <= 1:
        run_on(config.server.event_loop, App(config, plugins, agent=_fork_agent(config)).run())
        return 0
    return _Master(config, plugins, workers).run()


def _fork_agent(config: Config) -> tuple[int, socket.socket] | None:
    """The delivery agent, forked while this process has no loop, no thread and no socket yet."""
    if not config.relay.delivery_process:
        return None
    return fork_agent(AgentSettings.of(config))


def _worker_main(config: Config, plugins: Plugins, index: int, count: int) -> int:
    """The body of a forked worker (never returns to the master's code)."""
    # The master's handlers are not this process's: asyncio installs the worker's own.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, RESCAN_SIGNAL):
        signal.signal(sig, signal.SIG_DFL)
    try:
        agent = _fork_agent(config)
        app = App(config, plugins, worker=index, workers=count, agent=agent)
        run_on(config.server.event_loop, app.run())
    except OSError as exc:
        log.error("worker %d: cannot start: %s", index, exc)
        return 1
    except Exception:
        log.exception("worker %d: internal error", index)
        return 1
    return 0


class _Master:
    def __init__(self, config: Config, plugins: Plugins, count: int) -> None:
        self.config = config
        self.plugins = plugins
        self.count = count
        self.children: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> time of its last start
        self.stopping = False
        self.pidfile = config.spool_directory / PIDFILE

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                status = _worker_main(self.config, self.plugins, index, self.count)
            finally:
                logging.shutdown()
                os._exit(status)
        self.children[pid] = index
        self.started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, pid)

    def _forward(self, signum: int, _frame: FrameType | None = None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
            signum = signal.SIGTERM
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def run(self) -> int:
        self.config.spool_directory.mkdir(parents=True, exist_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, RESCAN_SIGNAL):
            signal.signal(sig, self._forward)
        for index in range(self.count):
            self._spawn(index)
        self.pidfile.write_text(f"{os.getpid()}\n")
        log.info("filterhost master ready: %d workers", self.count)
        status = 0
        try:
            while self.children:
                try:
                    pid, wait_status = os.wait()
                except ChildProcessError:
                    break
                if pid not in self.children:
                    continue
                index = self.children.pop(pid)
                code = os.waitstatus_to_exitcode(wait_status)
                if self.stopping:
                    if code != 0:
                        status = 1
                    continue
                log.error("worker %d (pid %d) exited with status %d; restarting", index, pid, code)
                if code == 1 and time.monotonic() - self.started[index] < RESTART_DELAY:
                    # Exit 1 at once is a worker that cannot start (a port in use, a spool
                    # it may not write): restarting it would only repeat the error.
                    log.error("worker %d failed at start; stopping", index)
                    self.stopping = True
                    self._forward(signal.SIGTERM)
                    status = 1
                    continue
                time.sleep(max(0.0, RESTART_DELAY - (time.monotonic() - self.started[index])))
                if not self.stopping:
                    self._spawn(index)
        finally:
            if self.pidfile.exists() and self.pidfile.read_text().strip() == str(os.getpid()):
                self.pidfile.unlink()
            log.info("stopped")
        return status
