"""Configuration: ``conf.d/*.toml`` merged, checked against typed sections, errors in words."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any, Literal, TypeVar

from filterhost.config.loader import RawConfig, read_conf_dir
from filterhost.config.schema import (
    HostPort,
    MetricsSection,
    PluginsSection,
    RelaySection,
    ServerSection,
    SpoolSection,
    parse_host_port,
)
from filterhost.config.typed import Problem, SectionError, build_section, describe_type
from filterhost.durations import Duration

__all__ = [
    "Config",
    "ConfigError",
    "ConfigRegistry",
    "HostPort",
    "OnError",
    "PluginSettings",
    "Problem",
    "SectionError",
    "apply_plugin_sections",
    "describe_type",
    "load_config",
    "parse_host_port",
]

T = TypeVar("T")
OnError = Literal["tempfail", "pass", "reject"]

# Keys every [plugins.NAME] table may carry, whatever the plugin declares.
PLUGIN_RESERVED = frozenset({"timeout", "on_error"})


class ConfigError(Exception):
    """The configuration has problems; ``problems`` lists each one with file and key."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True, slots=True)
class PluginSettings:
    """The settings the runner applies to every plugin: per-call timeout and error policy."""

    timeout: float = 30.0
    on_error: OnError = "tempfail"


class ConfigRegistry:
    """Where plugins declare their ``[plugins.NAME]`` section (``filterhost_add_config`` hook)."""

    def __init__(self) -> None:
        self.sections: dict[str, tuple[type[Any], str]] = {}

    def add(self, name: str, schema: type[Any], description: str = "") -> None:
        """Declare that ``[plugins.<name>]`` is checked against dataclass ``schema``."""
        if not dataclasses.is_dataclass(schema):
            raise TypeError(f"config schema for {name!r} must be a dataclass, not {schema!r}")
        self.sections[name] = (schema, description)


@dataclasses.dataclass(slots=True)
class Config:
    """The checked configuration: core sections, plugin sections, and where each key came from."""

    directory: Path
    server: ServerSection
    spool: SpoolSection
    relay: RelaySection
    plugins: PluginsSection
    plugin_tables: dict[str, dict[str, Any]]
    origin: dict[str, str]
    plugin_sections: dict[str, Any] = dataclasses.field(default_factory=dict)
    plugin_overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    metrics: MetricsSection = dataclasses.field(default_factory=MetricsSection)

    @property
    def hostname(self) -> str:
        """The server's name: ``server.hostname`` or the machine's FQDN."""
        return self.server.hostname or socket.getfqdn()

    @property
    def spool_directory(self) -> Path:
        """``spool.directory`` as an absolute path (relative ones start from the cwd)."""
        return Path(self.spool.directory).absolute()

    def where(self, dotted_key: str) -> str | None:
        """The file that set ``dotted_key`` (or its table), if any."""
        key = dotted_key
        while key:
            if key in self.origin:
                return self.origin[key]
            key = key.rpartition(".")[0]
        return None

    def plugin_config(self, schema: type[T]) -> T:
        """The typed config of the plugin that declared ``schema`` (its defaults if unset)."""
        for value in self.plugin_sections.values():
            if isinstance(value, schema):
                return value
        return schema()

    def settings_for(self, plugin: str, declared: PluginSettings) -> PluginSettings:
        """The timeout and error policy of ``plugin``: ``declared``, with conf.d's overrides."""
        return dataclasses.replace(declared, **self.plugin_overrides.get(plugin, {}))


_CORE_TABLES: dict[str, type[Any]] = {
    "server": ServerSection,
    "spool": SpoolSection,
    "relay": RelaySection,
    "plugins": PluginsSection,
    "metrics": MetricsSection,
}


def load_config(
    directory: Path, raw: RawConfig | None = None
) -> tuple[Config | None, list[Problem]]:
    """Read and check the core part of ``directory``; plugin sections are checked later.

    ``raw`` is already-read data to use instead of the files (the plugin test harness).
    Returns the config (None when a core section is broken) and every problem found.
    """
    raw = raw if raw is not None else read_conf_dir(directory)
    problems = list(raw.problems)
    sections: dict[str, Any] = {}
    for key in raw.data:
        if key not in _CORE_TABLES:
            problems.append(
                Problem(
                    raw.origin.get(key),
                    key,
                    f"unknown table (known: {', '.join(_CORE_TABLES)})",
                )
            )
    plugin_tables: dict[str, dict[str, Any]] = {}
    for name, cls in _CORE_TABLES.items():
        table = raw.data.get(name, {})
        if not isinstance(table, dict):
            problems.append(
                Problem(raw.origin.get(name), name, f"expected a table ([{name}]), got {table!r}")
            )
            sections[name] = None
            continue
        if name == "plugins":
            plugin_tables = {k: v for k, v in table.items() if isinstance(v, dict)}
            table = {k: v for k, v in table.items() if not isinstance(v, dict)}
        sections[name] = build_section(cls, table, name, raw.origin, problems)
    if any(v is None for v in sections.values()):
        return None, problems
    config = Config(
        directory=directory,
        server=sections["server"],
        spool=sections["spool"],
        relay=sections["relay"],
        plugins=sections["plugins"],
        plugin_tables=plugin_tables,
        origin=raw.origin,
        metrics=sections["metrics"],
    )
    return config, problems


def apply_plugin_sections(
    config: Config, registry: ConfigRegistry, installed: set[str]
) -> list[Problem]:
    """Check ``[plugins.NAME]`` tables against the schemas plugins declared; fill ``config``."""
    problems: list[Problem] = []
    for name, table in config.plugin_tables.items():
        prefix = f"plugins.{name}"
        if name not in installed:
            problems.append(
                Problem(
                    config.where(prefix),
                    prefix,
                    f"no installed plugin is named {name!r} (installed: "
                    f"{', '.join(sorted(installed)) or 'none'})",
                )
            )
            continue
        config.plugin_overrides[name] = _plugin_overrides(table, prefix, config, problems)
        schema = registry.sections.get(name, (None, ""))[0]
        own = {k: v for k, v in table.items() if k not in PLUGIN_RESERVED}
        if schema is None:
            for key in own:
                problems.append(
                    Problem(
                        config.where(f"{prefix}.{key}"),
                        f"{prefix}.{key}",
                        f"unknown key: plugin {name!r} declares no settings besides "
                        "timeout and on_error",
                    )
                )
            continue
        section = build_section(schema, own, prefix, config.origin, problems)
        if section is not None:
            config.plugin_sections[name] = section
    for name, (schema, _) in registry.sections.items():
        if name not in config.plugin_sections and name not in config.plugin_tables:
            try:
                config.plugin_sections[name] = schema()
            except TypeError:
                problems.append(
                    Problem(
                        config.where("plugins"),
                        f"plugins.{name}",
                        "this plugin has required settings: add a [plugins."
                        f"{name}] table (see its documentation)",
                    )
                )
    return problems


def _plugin_overrides(
    table: dict[str, Any], prefix: str, config: Config, problems: list[Problem]
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if "timeout" in table:
        key = f"{prefix}.timeout"
        try:
            timeout = float(Duration.parse(table["timeout"]))
        except ValueError as exc:
            problems.append(Problem(config.where(key), key, str(exc)))
        else:
            if timeout <= 0:
                problems.append(
                    Problem(config.where(key), key, 'must be more than 0, such as "30s"')
                )
            else:
                kwargs["timeout"] = timeout
    if "on_error" in table:
        value = table["on_error"]
        if value not in ("tempfail", "pass", "reject"):
            problems.append(
                Problem(
                    config.where(f"{prefix}.on_error"),
                    f"{prefix}.on_error",
                    f"expected one of 'tempfail', 'pass', 'reject', got {value!r}",
                )
            )
        else:
            kwargs["on_error"] = value
    return kwargs
