"""Finding, registering and checking plugins.

pluggy registers, validates and orders hook implementations; filterhost's own runner
(:mod:`filterhost.dispatch`) calls the pipeline hooks. Plugins come from the entry-point group
``filterhost.plugins`` (the built-ins too) or are handed in directly (tests, the harness).
"""

from __future__ import annotations

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


def _declared_settings(plugin: object) -> PluginSettings:
    """The timeout and on_error a plugin declares as attributes (defaults: 30 s, tempfail)."""
    default = PluginSettings()
    timeout = getattr(plugin, "timeout", default.timeout)
    on_error = getattr(plugin, "on_error", default.on_error)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        timeout = default.timeout
    if on_error not in ("tempfail", "pass", "reject"):
        on_error = default.on_error
    return PluginSettings(timeout=float(timeout), on_error=on_error)


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
        self.installed[name] = PluginInfo(name, obj, version, source, _declared_settings(obj))

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
        active = [self.installed[n].plugin for n in config.plugins.order if n in self.installed]
        for impl in self.pm.hook.filterhost_check_config.get_hookimpls():
            if impl.plugin not in active:
                continue
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

    def _hook_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            problems.append(
                Problem(
                    None,
                    f"plugins.{exc.plugin_name if hasattr(exc, 'plugin_name') else '?'}",
                    f"{exc} (a misspelled hook name? hooks are listed in filterhost.hookspecs)",
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
        """Give every active plugin the configuration (``filterhost_configure``)."""
        active = {self.installed[n].plugin for n in config.plugins.order if n in self.installed}
        for impl in self.pm.hook.filterhost_configure.get_hookimpls():
            if impl.plugin in active:
                kwargs: dict[str, Any] = {"config": config}
                impl.function(**{a: kwargs[a] for a in impl.argnames})
