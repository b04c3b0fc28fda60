"""``filterhost --check-config``: everything that can be known to be wrong before serving."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import aiosmtplib
import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.resolver

from filterhost.config import Config, Problem, apply_plugin_sections, load_config
from filterhost.dispatch import HookRunner
from filterhost.pluginmanager import Plugins
from filterhost.relay.client import TlsSettings
from filterhost.relay.queue import load_credentials
from filterhost.smtp.auth import parse_user_file
from filterhost.smtp.tls import certificate_problems

__all__ = ["check_configuration", "deep_problems", "load_everything"]

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


# -- the checks only `--check-config` makes (serving does not wait for them) -----------------

_CERT_WARN_DAYS = 14
# Filesystems where rename and fsync are not what the spool's guarantee needs (network and
# userspace filesystems may acknowledge before the data is durable, or rename non-atomically).
_DOUBTFUL_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse", "sshfs", "glusterfs", "ceph")


def consistency_problems(config: Config, plugins: Plugins) -> list[Problem]:
    """Settings that are each fine but do not fit together.

    The message chain runs after the last DATA byte, while the client waits for the reply: if
    the plugins' timeouts add up to more than ``server.data_timeout`` (the time the server
    itself allows for one message), a slow scanner makes clients give up and send again, and
    the message arrives twice.
    """
    problems: list[Problem] = []
    data_timeout = float(config.server.data_timeout)
    chain = [
        impl
        for impl in HookRunner(plugins, config).impls("filterhost_message")
        if impl.plugin in config.plugins.order
    ]
    total = 0.0
    for impl in chain:
        total += impl.settings.timeout
        if impl.settings.timeout >= data_timeout:
            key = f"plugins.{impl.plugin}.timeout"
            problems.append(
                Problem(
                    config.where(key) or config.where("plugins"),
                    key,
                    f"{impl.settings.timeout:g}s is not shorter than server.data_timeout "
                    f"({data_timeout:g}s): clients may give up waiting for the reply and send "
                    "the message again",
                    severity="warning",
                )
            )
    if len(chain) > 1 and total >= data_timeout and not problems:
        problems.append(
            Problem(
                config.where("server.data_timeout"),
                "server.data_timeout",
                f"the message chain's timeouts add up to {total:g}s, not less than "
                f"{data_timeout:g}s: lower the plugins' timeouts or raise data_timeout",
                severity="warning",
            )
        )
    return problems


def _filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (Linux: /proc/self/mounts), if known."""
    try:
        mounts = Path("/proc/self/mounts").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    best, kind = "", None
    resolved = str(path.resolve())
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def spool_durability_problems(config: Config) -> list[Problem]:
    """Write, fsync, rename and fsync the directory, for real, in the spool directory.

    Skipped (no problem) when the directory does not exist yet: the server creates it.
    """
    key = "spool.directory"
    where = config.where(key)
    directory = config.spool_directory
    if not directory.is_dir():
        return []
    problems: list[Problem] = []
    kind = _filesystem_type(directory)
    if kind is not None and kind.split(".")[0] in _DOUBTFUL_FS:
        problems.append(
            Problem(
                where,
                key,
                f"{directory} is on a {kind} filesystem: fsync and rename may not be durable "
                "or atomic there; keep the spool on a local filesystem (ext4, xfs, btrfs)",
                severity="warning",
            )
        )
    tmp = directory / f".check-{os.getpid()}.tmp"
    final = directory / f".check-{os.getpid()}"
    payload = b"filterhost --check-config probe\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if tmp.exists() or final.read_bytes() != payload:
            problems.append(
                Problem(where, key, f"{directory}: rename did not replace the file atomically")
            )
    except OSError as exc:
        problems.append(
            Problem(
                where, key, f"{directory}: write, fsync or rename failed: {exc.strerror or exc}"
            )
        )
    finally:
        for path in (tmp, final):
            with contextlib.suppress(OSError):
                path.unlink()
    return problems


def _not_after(cert: Path) -> float | None:
    """The certificate's expiry (epoch seconds), read by ``openssl x509``; None if unknown."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603 - fixed arguments, no shell
            [openssl, "x509", "-noout", "-enddate", "-in", str(cert)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = done.stdout.strip().partition("=")[2]
    if done.returncode != 0 or not text:
        return None
    return float(ssl.cert_time_to_seconds(text))


def certificate_expiry_problems(config: Config, now: float | None = None) -> list[Problem]:
    """``server.tls_cert`` expired (error) or expiring within two weeks (warning).

    Needs the ``openssl`` command (Python's ssl module cannot read a certificate file's dates
    without a private API); without it, this check is skipped.
    """
    if not config.server.tls_cert:
        return []
    key = "server.tls_cert"
    not_after = _not_after(Path(config.server.tls_cert))
    if not_after is None:
        return []
    left = not_after - (time.time() if now is None else now)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_after))
    if left <= 0:
        return [Problem(config.where(key), key, f"{config.server.tls_cert} expired on {stamp}")]
    if left < _CERT_WARN_DAYS * 86400:
        return [
            Problem(
                config.where(key),
                key,
                f"{config.server.tls_cert} expires on {stamp} (in {left / 86400:.1f} days); "
                "renew it, then reload (SIGHUP)",
                severity="warning",
            )
        ]
    return []


async def _dns_problem(config: Config, host: str, port: int) -> Problem | None:
    """The problem with one nameserver: it must answer NOERROR or NXDOMAIN to a question."""
    key = "relay.nameservers"
    query = dns.message.make_query("localhost.", "A")
    try:
        answer = await dns.asyncquery.udp(query, host, port=port, timeout=3.0)
    except (TimeoutError, dns.exception.Timeout):
        text = "does not answer (timed out after 3s)"
    except (OSError, dns.exception.DNSException) as exc:
        text = f"cannot be asked: {exc}"
    else:
        rcode = answer.rcode()
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return None
        text = f"answers {dns.rcode.to_text(rcode)}"
    who = f"{host}:{port}" if port != 53 else host
    if not config.relay.nameservers:
        who += " (from /etc/resolv.conf)"
    return Problem(config.where(key), key, f"nameserver {who} {text}", severity="warning")


async def dns_problems(config: Config) -> list[Problem]:
    """Every nameserver filterhost would use answers a query."""
    servers = [(hp.host, hp.port) for hp in config.relay.nameserver_addresses]
    if not servers:
        with contextlib.suppress(dns.exception.DNSException, OSError):
            servers = [(str(ns), 53) for ns in dns.resolver.Resolver().nameservers]
    found = await asyncio.gather(*(_dns_problem(config, h, p) for h, p in servers))
    return [p for p in found if p is not None]


async def smarthost_problems(config: Config) -> list[Problem]:
    """The smart host accepts a connection, says EHLO, and TLS (and AUTH) work as configured.

    Nothing is sent: the session ends with QUIT after EHLO (and AUTH, when a credentials file
    is set).
    """
    relay = config.relay
    if relay.mode != "smarthost":
        return []
    key = "relay.smarthost"
    target = relay.smarthost_address
    implicit = relay.smarthost_tls == "implicit"
    tls = TlsSettings(relay.smarthost_tls_policy, relay.tls_ca_file, implicit)
    smtp = aiosmtplib.SMTP(
        hostname=target.host,
        port=target.port,
        local_hostname=config.hostname,
        timeout=float(min(relay.connect_timeout, 10)),
        use_tls=implicit,
        start_tls=False,
        tls_context=tls.context() if implicit else None,
    )
    step = "connect"
    transport: asyncio.BaseTransport | None = None
    try:
        await smtp.connect()
        step = "EHLO"
        await smtp.ehlo()
        if not implicit and tls.policy != "none":
            if smtp.supports_extension("starttls"):
                step = "STARTTLS"
                await smtp.starttls(server_hostname=target.host, tls_context=tls.context())
                await smtp.ehlo()
            elif tls.policy in ("encrypt", "verify"):
                return [
                    Problem(
                        config.where("relay.smarthost_tls_policy"),
                        "relay.smarthost_tls_policy",
                        f"{target} does not offer STARTTLS, and the policy is {tls.policy}: "
                        "every message would be deferred",
                    )
                ]
        credentials = load_credentials(relay.smarthost_auth_file)
        if credentials is not None:
            step = "AUTH"
            methods = smtp.server_auth_methods
            if "plain" in methods:
                await smtp.auth_plain(credentials.username, credentials.password)
            elif "login" in methods:
                await smtp.auth_login(credentials.username, credentials.password)
            else:
                raise aiosmtplib.SMTPException("neither AUTH PLAIN nor LOGIN is offered")
        transport = smtp.transport
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()
    except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError, ValueError) as exc:
        dotted = "relay.smarthost_auth_file" if step == "AUTH" else key
        return [
            Problem(
                config.where(dotted) or config.where(key),
                dotted,
                f"{target}: {step} failed: {exc}",
                severity="warning" if step == "connect" else "error",
            )
        ]
    finally:
        # abort, not close: closing TLS waits for the server's close_notify, which can outlive
        # this check's event loop (a leaked socket); abort closes it in the loop's next turn.
        transport = smtp.transport or transport
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        smtp.close()
    return []


def deep_problems(config: Config, plugins: Plugins, *, online: bool) -> list[Problem]:
    """The checks beyond :func:`check_configuration`, for ``--check-config`` only.

    Consistency, spool durability, TLS certificate dates and, with ``online``, the nameservers
    and the smart host (network checks are opt-in: ``--check-config`` also runs before every
    start, where a smart host that is down for a minute must not stop the server queueing).
    """
    problems = consistency_problems(config, plugins)
    problems += spool_durability_problems(config)
    problems += certificate_expiry_problems(config)
    if online:

        async def network() -> list[Problem]:
            found = await asyncio.gather(dns_problems(config), smarthost_problems(config))
            return [p for group in found for p in group]

        problems += asyncio.run(network())
    return problems
