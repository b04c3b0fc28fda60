"""Finding, registering and checking plugins.

pluggy registers, validates and orders hook implementations; filterhost's own runner
(:mod:`filterhost.dispatch`) calls the pipeline hooks. Plugins come from the entry-point group
``filterhost.plugins`` (the built-ins too) or are handed in directly (tests, the harness).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from filterhost import hookspecs
from filterhost.config import Config, ConfigRegistry, PluginSettings, Problem

__all__ = ["ENTRY_POINT_GROUP", "PluginInfo", "Plugins"]

ENTRY_POINT_GROUP = "filterhost.plugins"
log = logging.getLogger("filterhost.plugins")


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """An installed plugin: its name (the entry-point name), object, version and source."""

    name: str
    plugin: object
    version: str
    source: str
    declared: PluginSettings


def _declared_settings(name: str, plugin: object) -> tuple[PluginSettings, list[Problem]]:
    """The timeout and on_error a plugin declares as attributes (defaults: 30 s, tempfail).

    A declared value that cannot be used is reported (as a warning: the default applies).
    """
    default = PluginSettings()
    timeout = getattr(plugin, "timeout", default.timeout)
    on_error = getattr(plugin, "on_error", default.on_error)
    problems: list[Problem] = []
    key = f"plugins.{name}"
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        problems.append(
            Problem(
                None,
                key,
                f"the plugin declares timeout = {timeout!r}, not a positive number of seconds; "
                f"{default.timeout:g} s applies",
                severity="warning",
            )
        )
        timeout = default.timeout
    if on_error not in ("tempfail", "pass", "reject"):
        problems.append(
            Problem(
                None,
                key,
                f"the plugin declares on_error = {on_error!r}, not 'tempfail', 'pass' or "
                f"'reject'; {default.on_error!r} applies",
                severity="warning",
            )
        )
        on_error = default.on_error
    return PluginSettings(timeout=float(timeout), on_error=on_error), problems


class Plugins:
    """The installed plugins and the pluggy manager that holds them."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.installed: dict[str, PluginInfo] = {}
        self.load_problems: list[Problem] = []

    @classmethod
    def discover(cls, extra: Iterable[tuple[str, object]] = ()) -> Plugins:
        """Every plugin in the ``filterhost.plugins`` entry-point group, plus ``extra``."""
        plugins = cls()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            version = dist.version if dist is not None else "?"
            source = dist.metadata["Name"] if dist is not None else ep.value
            try:
                obj = ep.load()
            except Exception as exc:  # a broken third-party plugin must not stop the others
                plugins.load_problems.append(
                    Problem(
                        None,
                        f"plugins.{ep.name}",
                        f"plugin {ep.name!r} ({ep.value}, from {source}) failed to import: "
                        f"{type(exc).__name__}: {exc}",
                        # Only an error when the plugin is in the chain: check() says so then.
                        severity="warning",
                    )
                )
                continue
            plugins.add(ep.name, obj, version=version, source=f"{source} ({ep.value})")
        for name, obj in extra:
            plugins.add(name, obj, version="-", source="given")
        return plugins

    def add(self, name: str, obj: object, *, version: str = "-", source: str = "given") -> None:
        """Register ``obj`` (a module, an instance, or a class to instantiate) as ``name``."""
        if inspect.isclass(obj):
            obj = obj()
        if name in self.installed:
            self.load_problems.append(
                Problem(None, f"plugins.{name}", f"two plugins are named {name!r}; {source} lost")
            )
            return
        try:
            self.pm.register(obj, name=name)
        except pluggy.PluginValidationError as exc:
            self.load_problems.append(
                Problem(None, f"plugins.{name}", f"plugin {name!r} is invalid: {exc}")
            )
            return
        settings, problems = _declared_settings(name, obj)
        self.load_problems.extend(problems)
        self.installed[name] = PluginInfo(name, obj, version, source, settings)

    def registry(self) -> ConfigRegistry:
        """The config sections every installed plugin declares."""
        registry = ConfigRegistry()
        self.pm.hook.filterhost_add_config(registry=registry)
        return registry

    def check(self, config: Config) -> list[Problem]:
        """Problems with the plugin set under ``config``: names, hooks, wrappers, own checks."""
        problems = list(self.load_problems)
        order_file = config.where("plugins.order")
        seen: set[str] = set()
        for name in config.plugins.order:
            if name in seen:
                problems.append(Problem(order_file, "plugins.order", f"{name!r} is listed twice"))
            seen.add(name)
            if name not in self.installed:
                problems.append(
                    Problem(
                        order_file,
                        "plugins.order",
                        f"no installed plugin is named {name!r} (installed: "
                        f"{', '.join(sorted(self.installed)) or 'none'}); check the spelling "
                        "or install the plugin's package",
                    )
                )
        problems.extend(self._hook_problems())
        for impl in self._active_impls("filterhost_check_config", config):
            try:
                found = (
                    impl.function(config=config) if "config" in impl.argnames else (impl.function())
                )
            except Exception as exc:
                problems.append(
                    Problem(
                        config.where(f"plugins.{impl.plugin_name}"),
                        f"plugins.{impl.plugin_name}",
                        f"its config check failed: {type(exc).__name__}: {exc}",
                    )
                )
                continue
            if isinstance(found, list):
                problems.extend(p for p in found if isinstance(p, Problem))
        return problems

    def _active_impls(self, hook: str, config: Config) -> list[pluggy.HookImpl]:
        """The implementations of ``hook`` by plugins in ``[plugins] order``, in that order."""
        rank = {name: i for i, name in enumerate(config.plugins.order) if name in self.installed}
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        return sorted(
            (i for i in impls if i.plugin_name in rank), key=lambda i: rank[i.plugin_name]
        )

    def hook_order(self, config: Config) -> list[tuple[str, list[str]]]:
        """Every hook, in SMTP order, with the active plugins that implement it, in call order.

        What ``filterhost plugins`` prints: the chain as each hook will see it (shutdown runs
        in reverse). ``filterhost_add_config`` is asked of every installed plugin, active or
        not, so that an inactive plugin's table is still checked.
        """
        out: list[tuple[str, list[str]]] = []
        for hook in hookspecs.HOOKS_IN_ORDER:
            if hook == "filterhost_add_config":
                impls = getattr(self.pm.hook, hook).get_hookimpls()
                names = sorted(i.plugin_name for i in impls)
            else:
                names = [i.plugin_name for i in self._active_impls(hook, config)]
            if hook == "filterhost_shutdown":
                names.reverse()
            out.append((hook, names))
        return out

    def _unmarked_hooks(self) -> list[Problem]:
        """Methods named like a hook but not marked ``@hookimpl``: pluggy ignores them silently."""
        problems: list[Problem] = []
        for name, info in self.installed.items():
            marked = {caller.name for caller in self.pm.get_hookcallers(info.plugin) or []}
            for hook in hookspecs.HOOKS_IN_ORDER:
                if hook in marked or not callable(getattr(info.plugin, hook, None)):
                    continue
                problems.append(
                    Problem(
                        None,
                        f"plugins.{name}",
                        f"{hook} is not marked with @hookimpl, so it would never be called; "
                        "decorate it with @filterhost.hookimpl",
                    )
                )
        return problems

    def _hook_problems(self) -> list[Problem]:
        problems: list[Problem] = self._unmarked_hooks()
        # pluggy's check_pending() stops at the first unknown hook and names no plugin; this is
        # the same check, for every plugin, with a suggestion.
        for hook_name, caller in sorted(vars(self.pm.hook).items()):
            if hook_name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                close = difflib.get_close_matches(hook_name, hookspecs.HOOKS_IN_ORDER, n=1)
                hint = f"did you mean {close[0]}?" if close else "is the hook name misspelled?"
                problems.append(
                    Problem(
                        None,
                        f"plugins.{impl.plugin_name}",
                        f"{hook_name} is not a filterhost hook ({hint} hooks are listed in "
                        "filterhost.hookspecs)",
                    )
                )
        for hook_name in sorted(hookspecs.PIPELINE_HOOKS):
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.wrapper or impl.hookwrapper:
                    problems.append(
                        Problem(
                            None,
                            f"plugins.{impl.plugin_name}",
                            f"{hook_name} is implemented as a wrapper; pipeline hooks may be "
                            "async and pluggy cannot await, so wrappers are not supported there",
                        )
                    )
        return problems

    def configure(self, config: Config) -> None:
        """Give every active plugin the configuration (``filterhost_configure``), in order."""
        kwargs: dict[str, Any] = {"config": config}
        for impl in self._active_impls("filterhost_configure", config):
            impl.function(**{a: kwargs[a] for a in impl.argnames})
