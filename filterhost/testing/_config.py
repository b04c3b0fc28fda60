"""Configuration for the harness and the test server: a conf.d-shaped mapping, checked for real.

The mapping goes through the same loader, schemas and plugin checks as ``conf.d/*.toml``, so a
setting that the harness accepts is one that ``filterhost --check-config`` accepts.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from filterhost.config import Config, ConfigError, Problem, apply_plugin_sections, load_config
from filterhost.config.loader import RawConfig
from filterhost.pluginmanager import Plugins

__all__ = ["PluginsArg", "build"]

PluginsArg = Sequence[object] | Mapping[str, object]
"""Plugins in chain order: objects (named after their class or module) or ``{name: plugin}``."""

SOURCE = "<test config>"


def plugin_name(plugin: object) -> str:
    """The name a plugin gets when none is given: its module's or class's name."""
    if inspect.ismodule(plugin):
        return plugin.__name__.rpartition(".")[2]
    if inspect.isclass(plugin):
        return plugin.__name__
    return type(plugin).__name__


def named(plugins: PluginsArg) -> dict[str, object]:
    """``plugins`` as ``{name: plugin}``, in chain order."""
    if isinstance(plugins, Mapping):
        return dict(plugins)
    out: dict[str, object] = {}
    for plugin in plugins:
        name = plugin_name(plugin)
        if name in out:
            raise ValueError(
                f"two plugins would be named {name!r}; pass a mapping {{name: plugin}} instead"
            )
        out[name] = plugin
    return out


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    # A later value overrides an earlier one key by key, as a later conf.d file does.
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)


def _origins(data: Mapping[str, Any], prefix: str, origin: dict[str, str]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        origin[dotted] = SOURCE
        if isinstance(value, Mapping):
            _origins(value, dotted + ".", origin)


def build(
    plugins: PluginsArg, config: Mapping[str, Any] | None, defaults: Mapping[str, Any]
) -> tuple[Config, Plugins, list[Problem]]:
    """Register ``plugins`` and check ``defaults`` overridden by ``config``.

    Raises :class:`~filterhost.config.ConfigError` listing every error; returns the config, the
    plugins and the warnings.
    """
    registered = Plugins()
    names = named(plugins)
    for name, plugin in names.items():
        registered.add(name, plugin)
    data: dict[str, Any] = {"plugins": {"order": list(names)}}
    _merge(data, defaults)
    _merge(data, config or {})
    origin: dict[str, str] = {}
    _origins(data, "", origin)
    raw = RawConfig(Path(SOURCE), data=data, origin=origin)
    loaded, problems = load_config(Path(SOURCE), raw)
    if loaded is None:
        raise ConfigError([p for p in problems if p.severity == "error"])
    problems += apply_plugin_sections(loaded, registered.registry(), set(registered.installed))
    problems += registered.check(loaded)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(errors)
    return loaded, registered, problems
