"""``filterhost --check-config``: everything that can be known to be wrong before serving."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from filterhost.config import Config, Problem, apply_plugin_sections, load_config
from filterhost.pluginmanager import Plugins
from filterhost.smtp.auth import parse_user_file
from filterhost.smtp.tls import certificate_problems

__all__ = ["check_configuration", "load_everything"]

# Networks wider than this that are not private ranges would let much of the Internet relay.
_MIN_PUBLIC_PREFIX = {4: 16, 6: 32}


def _open_relay_problems(config: Config) -> list[Problem]:
    problems: list[Problem] = []
    where = config.where("server.mynetworks")
    for net in config.server.networks:
        if net.is_private or net.is_loopback or net.is_link_local:
            continue
        if net.prefixlen < _MIN_PUBLIC_PREFIX[net.version]:
            problems.append(
                Problem(
                    where,
                    "server.mynetworks",
                    f"{net} lets clients from much of the Internet relay to any domain (an open "
                    'relay); list only your internal networks, such as "10.0.0.0/8"',
                )
            )
    where = config.where("server.relay_domains")
    for domain in config.server.relay_domains:
        if not domain or "*" in domain or domain.strip(".") == "":
            problems.append(
                Problem(
                    where,
                    "server.relay_domains",
                    f"{domain!r} is not a domain name; wildcards would make an open relay",
                )
            )
    return problems


def _spool_problems(config: Config) -> list[Problem]:
    where = config.where("spool.directory")
    try:
        return _spool_path_problems(config.spool_directory, where)
    except (OSError, ValueError) as exc:
        return [Problem(where, "spool.directory", f"cannot be used: {exc}")]


def _spool_path_problems(path: Path, where: str | None) -> list[Problem]:
    name_max = os.pathconf("/", "PC_NAME_MAX")
    path_max = os.pathconf("/", "PC_PATH_MAX")
    if len(os.fsencode(path)) >= path_max:
        return [Problem(where, "spool.directory", f"path is longer than {path_max} bytes")]
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            return [
                Problem(where, "spool.directory", f"{part[:20]}...: a name over {name_max} bytes")
            ]
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [Problem(where, "spool.directory", f"{existing} is not a directory")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [
            Problem(
                where,
                "spool.directory",
                f"{existing} is not writable by this user (uid {os.getuid()}); "
                "fix its ownership or choose another directory",
            )
        ]
    return []


def _listen_problems(config: Config) -> list[Problem]:
    problems = []
    for key, addresses in (
        ("server.listen", config.server.listen_addresses),
        ("server.tls_listen", config.server.tls_listen_addresses),
    ):
        for hp in addresses:
            try:
                ipaddress.ip_address(hp.host)
            except ValueError:
                if hp.host != "localhost":
                    problems.append(
                        Problem(
                            config.where(key),
                            key,
                            f'{hp}: listen on an IP address (such as "10.0.0.1:25"), not a name',
                        )
                    )
    return problems


def _tls_auth_problems(config: Config) -> list[Problem]:
    """The certificate and key load and match; the credentials file is readable and sound."""
    server = config.server
    problems: list[Problem] = []
    if server.tls_cert:
        # Relative paths start from the working directory, as the server opens them.
        cert, key = Path(server.tls_cert), Path(server.tls_key)
        for name, message in certificate_problems(cert, key):
            dotted = f"server.{name}"
            problems.append(Problem(config.where(dotted), dotted, message))
    if server.auth_file:
        where = config.where("server.auth_file")
        path = Path(server.auth_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            return [*problems, Problem(where, "server.auth_file", f"{path}: {reason}")]
        users, bad_lines = parse_user_file(text)
        for bad in bad_lines:
            problems.append(Problem(where, "server.auth_file", f"{path} {bad}"))
        if not users and not bad_lines:
            problems.append(
                Problem(
                    where,
                    "server.auth_file",
                    f"{path} has no users (add one with: filterhost passwd {path} USER)",
                    severity="warning",
                )
            )
    return problems


def load_everything(
    confdir: Path, plugins: Plugins | None = None
) -> tuple[Config | None, Plugins, list[Problem]]:
    """Load the config and the plugins, and check the plugin sections against their schemas."""
    config, problems = load_config(confdir)
    plugins = plugins if plugins is not None else Plugins.discover()
    if config is None:
        return None, plugins, problems + plugins.load_problems
    problems += apply_plugin_sections(config, plugins.registry(), set(plugins.installed))
    return config, plugins, problems


def check_configuration(
    confdir: Path, plugins: Plugins | None = None
) -> tuple[Config | None, Plugins, list[Problem]]:
    """Every problem with the configuration in ``confdir``; binds no socket, changes nothing."""
    config, plugins, problems = load_everything(confdir, plugins)
    if config is None:
        return None, plugins, problems
    problems += _open_relay_problems(config)
    problems += _spool_problems(config)
    problems += _listen_problems(config)
    problems += _tls_auth_problems(config)
    problems += plugins.check(config)
    return config, plugins, problems
