"""The async hook runner: calls pipeline hooks in the operator's order, with timeouts.

pluggy cannot await (pluggy#320), so filterhost calls the implementations itself: it takes them
from pluggy, orders them by ``[plugins] order``, passes each only the arguments it asks for
(pluggy's opt-in arguments), awaits what is awaitable under the plugin's timeout, and turns an
exception, a timeout or an invalid result into the plugin's ``on_error`` policy.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from filterhost.config import Config, PluginSettings
from filterhost.message import HeaderEdit
from filterhost.model import EnvelopeEdit, PluginResult, Route, Transaction, envelope_edits
from filterhost.pluginmanager import Plugins
from filterhost.verdict import Action, InvalidVerdictError, Reply, Verdict

if TYPE_CHECKING:
    from filterhost.metrics import Metrics

__all__ = ["HookRunner"]

log = logging.getLogger("filterhost.dispatch")


@dataclass(frozen=True, slots=True)
class _Impl:
    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    settings: PluginSettings


class _PluginError(Exception):
    """A plugin raised, timed out or returned something invalid."""


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """A transaction's headers and envelope before one plugin ran."""

    headers: tuple[list[bytes], int] | None = None
    envelope: tuple[str, list[str]] = ("", [])

    @classmethod
    def take(cls, txn: Transaction | None) -> _Snapshot:
        if txn is None:
            return cls()
        return cls(txn.message._checkpoint(), (txn.mail_from, list(txn.recipients)))

    def settle(
        self, txn: Transaction | None, error: str | None
    ) -> tuple[tuple[HeaderEdit, ...], tuple[EnvelopeEdit, ...], str | None]:
        """The plugin's edits, or (when it failed, or left a bad envelope) undo them."""
        if txn is None or self.headers is None:
            return (), (), error
        if error is None:
            found, problem = envelope_edits(self.envelope, txn)
            if problem is None:
                return tuple(txn.message.edits[self.headers[1] :]), tuple(found), None
            error = f"left an invalid envelope: {problem}"
        txn.message._rollback(self.headers)
        txn.mail_from, txn.recipients = self.envelope[0], list(self.envelope[1])
        return (), (), error


class HookRunner:
    """Runs pipeline hooks for the plugins in ``[plugins] order``."""

    def __init__(self, plugins: Plugins, config: Config) -> None:
        self.plugins = plugins
        self.order = [n for n in config.plugins.order if n in plugins.installed]
        self._settings = {
            n: config.settings_for(n, plugins.installed[n].declared) for n in self.order
        }
        self._cache: dict[str, list[_Impl]] = {}
        self.metrics: Metrics | None = None
        """Set by :func:`filterhost.metrics.start_metrics`: every plugin call is counted."""

    def impls(self, hook: str) -> list[_Impl]:
        """The implementations of ``hook`` by active plugins, in the operator's order."""
        found = self._cache.get(hook)
        if found is None:
            rank = {name: i for i, name in enumerate(self.order)}
            caller = getattr(self.plugins.pm.hook, hook)
            found = sorted(
                (
                    _Impl(
                        i.plugin_name, i.function, tuple(i.argnames), self._settings[i.plugin_name]
                    )
                    for i in caller.get_hookimpls()
                    if i.plugin_name in rank
                ),
                key=lambda impl: rank[impl.plugin],
            )
            self._cache[hook] = found
        return found

    async def _call(self, impl: _Impl, kwargs: dict[str, Any]) -> Any:
        try:
            result = impl.function(**{a: kwargs[a] for a in impl.argnames})
            if inspect.isawaitable(result):
                async with asyncio.timeout(impl.settings.timeout):
                    result = await result
        except TimeoutError:
            raise _PluginError(f"timed out after {impl.settings.timeout:g}s") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _PluginError(f"{type(exc).__name__}: {exc}") from exc
        return result

    def _on_error(self, impl: _Impl, hook: str, error: str, context: str) -> Verdict | None:
        policy = impl.settings.on_error
        log.log(
            logging.WARNING if policy == "pass" else logging.ERROR,
            "%s: plugin=%s hook=%s error=%r on_error=%s",
            context or "-",
            impl.plugin,
            hook,
            error,
            policy,
        )
        if policy == "pass":
            return None
        if policy == "reject":
            return Verdict(
                Action.REJECT, Reply(554, "5.3.0", "Message refused by filter"), error, impl.plugin
            )
        return Verdict(
            Action.TEMPFAIL,
            Reply(451, "4.3.0", "Temporary failure, please try again later"),
            error,
            impl.plugin,
        )

    async def chain(
        self,
        hook: str,
        *,
        context: str = "",
        record: list[PluginResult] | None = None,
        **kwargs: Any,
    ) -> Verdict | None:
        """Call ``hook`` plugin by plugin; the first verdict other than CONTINUE decides.

        With a ``transaction`` argument (the message hook), each plugin's header and envelope
        edits are recorded in its :class:`PluginResult`; a plugin that fails has its edits
        undone, so a half-done change (say, a "scanned" header before the scan broke) never
        leaves with the message.
        """
        txn = kwargs.get("transaction")
        tracked = txn if isinstance(txn, Transaction) else None
        for impl in self.impls(hook):
            started = time.perf_counter()
            before = _Snapshot.take(tracked)
            verdict: Verdict | None = None
            error: str | None = None
            try:
                result = await self._call(impl, kwargs)
                if result is not None and not isinstance(result, Verdict):
                    raise _PluginError(
                        f"returned {type(result).__name__}, expected a Verdict or None"
                    )
                verdict = result.by(impl.plugin) if result is not None else None
            except _PluginError as exc:
                error = str(exc)
            except InvalidVerdictError as exc:
                error = f"invalid verdict: {exc}"
            header_edits, env_edits, error = before.settle(tracked, error)
            if error is not None:
                verdict = self._on_error(impl, hook, error, context)
            elapsed = time.perf_counter() - started
            if record is not None:
                record.append(
                    PluginResult(
                        impl.plugin, hook, verdict, elapsed, error, header_edits, env_edits
                    )
                )
            if self.metrics is not None:
                self.metrics.plugin_call(
                    impl.plugin, hook, elapsed, verdict, failed=error is not None
                )
            terminal = verdict is not None and verdict.action.is_terminal
            if not terminal and tracked is not None and log.isEnabledFor(logging.INFO):
                # The message chain's story: each plugin's verdict, not only the deciding one.
                log.info(
                    "%s: verdict plugin=%s hook=%s action=%s edits=%d duration=%.3f",
                    context or "-",
                    impl.plugin,
                    hook,
                    verdict.action.value if verdict is not None else "continue",
                    len(header_edits) + len(env_edits),
                    elapsed,
                )
            if verdict is not None and verdict.action.is_terminal:
                reply = verdict.effective_reply
                log.info(
                    "%s: verdict plugin=%s hook=%s action=%s reply=%r reason=%r duration=%.3f",
                    context or "-",
                    impl.plugin,
                    hook,
                    verdict.action.value,
                    str(reply) if reply else "",
                    verdict.reason,
                    elapsed,
                )
                return verdict
        return None

    async def first_route(
        self, *, context: str = "", record: list[PluginResult] | None = None, **kwargs: Any
    ) -> Route | None:
        """Call ``filterhost_route`` plugin by plugin; the first Route wins.

        Raises :class:`RuntimeError` when a plugin fails, so the caller defers the recipient.
        """
        for impl in self.impls("filterhost_route"):
            started = time.perf_counter()
            error: str | None = None
            result: Any = None
            try:
                result = await self._call(impl, kwargs)
            except _PluginError as exc:
                log.error("%s: plugin=%s hook=filterhost_route error=%r", context, impl.plugin, exc)
                error = f"routing plugin {impl.plugin} failed: {exc}"
            else:
                if result is not None and not isinstance(result, Route):
                    error = (
                        f"routing plugin {impl.plugin} returned {type(result).__name__}, "
                        "not a Route"
                    )
            elapsed = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.plugin_call(
                    impl.plugin, "filterhost_route", elapsed, None, failed=error is not None
                )
            if record is not None:
                route = result if error is None else None
                record.append(
                    PluginResult(impl.plugin, "filterhost_route", None, elapsed, error, route=route)
                )
            if error is not None:
                raise RuntimeError(error)
            if isinstance(result, Route):
                return result
        return None

    async def observe(
        self, hook: str, *, context: str = "", reverse: bool = False, **kwargs: Any
    ) -> None:
        """Call ``hook`` on every plugin; failures are logged and change nothing."""
        impls = self.impls(hook)
        for impl in reversed(impls) if reverse else impls:
            try:
                await self._call(impl, kwargs)
            except _PluginError as exc:
                log.error("%s: plugin=%s hook=%s error=%r", context or "-", impl.plugin, hook, exc)
