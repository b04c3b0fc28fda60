"""SIGHUP: read conf.d again and switch to it between messages, or keep the old one.

The new configuration goes through the same checks as ``--check-config`` (in a worker thread:
a plugin's check may ask a scanner over the network). Any error, and the server keeps serving
with the configuration it has, after logging each problem. Otherwise a new set of plugins is
configured and started, and the front end and the queue runner are switched to it in one step
on the event loop: sessions stay connected, and their next command or message uses the new
configuration. A message already in the chain finishes with the plugins it started with; those
get ``filterhost_shutdown`` once no call of theirs can still be running (their timeouts bound it).

A few settings are bound to things made at start-up (sockets, the spool directory, the relay's
connection limits); a change to one of them is refused with a message saying a restart is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filterhost.checks import check_configuration
from filterhost.config import Config
from filterhost.dispatch import HookRunner
from filterhost.relay.queue import load_credentials
from filterhost.relay.resolver import Resolver
from filterhost.smtp.auth import Credentials

if TYPE_CHECKING:
    from filterhost.app import App

__all__ = ["RESTART_KEYS", "Reloader", "restart_needed"]

log = logging.getLogger("filterhost")

# (section, key) pairs a running server cannot change: they shaped sockets, threads, semaphores.
RESTART_KEYS = (
    ("server", "listen"),
    ("server", "tls_listen"),
    ("server", "workers"),  # the master forks the workers once, at start
    ("spool", "directory"),
    ("spool", "journal"),  # the journal is opened (and recovered) at start
    ("server", "event_loop"),  # the loop runs the whole process
    ("relay", "concurrency"),
    ("relay", "destination_concurrency"),
    ("relay", "connection_reuse_time"),
    ("relay", "delivery_process"),  # the agent is started (or not) with the process
    ("metrics", "listen"),
)
_RETIRE_LIMIT = 900.0  # seconds: the longest wait before old plugins are shut down


def restart_needed(old: Config, new: Config) -> list[str]:
    """The dotted keys whose change needs a restart, not a reload."""
    changed = [
        f"{section}.{key}"
        for section, key in RESTART_KEYS
        if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)
    ]
    if bool(old.server.tls_cert) != bool(new.server.tls_cert):
        changed.append("server.tls_cert")  # TLS on or off changes what each listener offers
    return changed


class Reloader:
    """Runs reloads for one :class:`~filterhost.app.App`, one at a time."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[object]] = set()
        self._retired: list[HookRunner] = []

    def request(self) -> None:
        """Start a reload (the SIGHUP handler: it must not block, so it starts a task)."""
        self._spawn(self._guarded(), "reload")

    async def _guarded(self) -> None:
        try:
            await self.reload()
        except Exception:
            # Nothing was switched yet when anything here fails: the old config stays.
            log.exception("reload failed; still serving with the old configuration")

    def _spawn(self, coro: Coroutine[Any, Any, object], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, confdir: Path | None = None) -> bool:
        """Switch to the configuration in ``confdir`` (default: the one started with).

        Returns True when the new configuration is in effect, False when the old one is kept.
        """
        async with self._lock:
            return await self._reload(confdir or self.app.config.directory)

    async def _reload(self, confdir: Path) -> bool:
        app = self.app
        log.info("reload: reading %s", confdir)
        config, plugins, problems = await asyncio.to_thread(check_configuration, confdir)
        errors = [p for p in problems if p.severity == "error"]
        for problem in errors:
            log.error("reload: %s", problem)
        if config is None or errors:
            log.error(
                "reload refused: %d configuration problem(s); still serving with the old "
                "configuration",
                len(errors),
            )
            return False
        restart = restart_needed(app.config, config)
        if restart:
            log.error(
                "reload refused: %s cannot change while running (restart filterhost); still "
                "serving with the old configuration",
                ", ".join(restart),
            )
            return False
        for problem in problems:
            log.warning("reload: %s", problem)
        hooks = HookRunner(plugins, config)
        hooks.metrics = app.hooks.metrics
        try:
            plugins.configure(config)
        except Exception:
            log.exception("reload refused: a plugin failed to configure; keeping the old one")
            return False
        await hooks.observe("filterhost_startup")
        front = app.front
        if front.tls_context is not None and config.server.tls_cert:
            # Load the renewed certificate into the context the listeners already hold: new
            # handshakes (STARTTLS and implicit TLS) use it, sessions under way keep theirs.
            # load_cert_chain replaces the chain only when both files load and match.
            try:
                front.tls_context.load_cert_chain(config.server.tls_cert, config.server.tls_key)
            except (OSError, ssl.SSLError) as exc:
                log.error("reload refused: server.tls_cert cannot be loaded: %s", exc)
                await hooks.observe("filterhost_shutdown", reverse=True)
                return False
        self._switch(config, hooks)
        log.info(
            "reload: configuration from %s in effect; order: %s",
            confdir,
            " -> ".join(config.plugins.order) or "(none)",
        )
        return True

    def _switch(self, config: Config, hooks: HookRunner) -> None:
        """Point everything at the new config and plugins; no await, so no message sees half."""
        app = self.app
        old_hooks = app.hooks
        # A chain under way may still call the old plugins; each call ends by its timeout.
        wait = min(
            sum(
                app.config.settings_for(name, app.plugins.installed[name].declared).timeout
                for name in old_hooks.order
            ),
            _RETIRE_LIMIT,
        )
        server = config.server
        front, queue = app.front, app.queue
        if server.auth_file != app.config.server.auth_file:
            front.credentials = Credentials(Path(server.auth_file)) if server.auth_file else None
        front.networks = server.networks
        front.config = config
        front.hooks = hooks
        if config.relay.nameservers != app.config.relay.nameservers:
            app.resolver = Resolver(config.relay.nameserver_addresses)
            queue.resolver = app.resolver
        queue.credentials = load_credentials(config.relay.smarthost_auth_file)
        queue.config = config
        queue.hooks = hooks
        app.config, app.plugins, app.hooks = config, hooks.plugins, hooks
        self._retired.append(old_hooks)
        self._spawn(self._retire(old_hooks, wait), "retire-plugins")

    async def _retire(self, hooks: HookRunner, wait: float) -> None:
        await asyncio.sleep(wait)
        await self._shutdown(hooks)

    async def _shutdown(self, hooks: HookRunner) -> None:
        if hooks in self._retired:
            self._retired.remove(hooks)
            await hooks.observe("filterhost_shutdown", reverse=True)

    async def close(self) -> None:
        """At stop: cancel pending reloads and shut down retired plugins now."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for hooks in list(self._retired):
            await self._shutdown(hooks)
