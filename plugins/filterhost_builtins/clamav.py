"""The ``clamav`` plugin: scan each message with clamd before it is accepted.

A virus gets the message refused in-session (554 5.7.1) or quarantined. A clean message gets
``X-Virus-Scanned: ClamAV at <hostname>``, and only when clamd itself answered OK. When no scan
result can be had (every clamd down, a timeout, the message too large for clamd or for
``max_size``), ``on_failure`` decides: ``tempfail`` (451 4.7.0, the client retries) or ``pass``
(the message goes on with ``X-Virus-Status: Unscanned (<reason>)`` and never the scanned header).
Headers of those names that arrive with the message are removed first, so a client cannot make
its mail look scanned. See docs/plugins/clamav.md.

This plugin uses only the public API (``from filterhost import ...``); copy it as a template.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from filterhost import Config, ConfigRegistry, Duration, Problem, Transaction, Verdict, hookimpl
from filterhost_builtins.clamd_client import (
    REASON_TIMEOUT,
    REASON_TOO_LARGE,
    ClamdAddress,
    ClamdError,
    ClamdFailed,
    ClamdPool,
    ScanResult,
    command,
    stream_max_length,
)

__all__ = ["SCANNED_HEADER", "STATUS_HEADER", "ClamavConfig", "ClamavPlugin"]

SECTION = "clamav"
"""The ``[plugins.clamav]`` table, and the name the entry point registers."""

SCANNED_HEADER = "X-Virus-Scanned"
STATUS_HEADER = "X-Virus-Status"

STALE_SIGNATURES_DAYS = 7
"""Warn when clamd's official database is older than this: freshclam is probably not running."""

log = logging.getLogger("filterhost.plugins.clamav")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True)
class ClamavConfig:
    """``[plugins.clamav]``: which clamd to ask, how long to wait, what to do with the answer."""

    servers: list[str] = field(
        default_factory=lambda: ["unix:/var/run/clamav/clamd.ctl"],
        metadata=_help(
            'clamd addresses, "unix:/path" or "host:port", tried in order until one answers'
        ),
    )
    connect_timeout: Duration = field(
        default=Duration(5.0), metadata=_help("time to connect to one clamd before the next")
    )
    scan_timeout: Duration = field(
        default=Duration(30.0),
        metadata=_help("time for sending the message and clamd's answer, once connected"),
    )
    max_size: int = field(
        default=25 * 1024 * 1024,
        metadata=_help("bytes; larger messages are not sent to clamd and on_failure applies"),
    )
    on_virus: Literal["reject", "quarantine"] = field(
        default="reject",
        metadata=_help('"reject": 554 5.7.1 in-session; "quarantine": accept and keep aside'),
    )
    on_failure: Literal["tempfail", "pass"] = field(
        default="tempfail",
        metadata=_help(
            '"tempfail": 451 4.7.0 when no scan was possible; "pass": relay it, marked '
            '"X-Virus-Status: Unscanned"'
        ),
    )
    scanned_header: bool = field(
        default=True, metadata=_help(f"add {SCANNED_HEADER} to messages clamd found clean")
    )
    official_signatures: bool = field(
        default=True,
        metadata=_help(
            "--check-config warns when clamd has no (or stale) official signature database; "
            "false for sites that run clamd on their own signatures only"
        ),
    )


@dataclass(frozen=True, slots=True)
class _State:
    """What :meth:`ClamavPlugin.filterhost_configure` derived from the config."""

    config: ClamavConfig
    pools: tuple[ClamdPool, ...]
    """One per server, in the configured order."""
    hostname: str
    budget: float
    """Seconds for the whole scan, failover included; below the runner's timeout."""


def _parse_servers(servers: list[str]) -> tuple[list[ClamdAddress], list[str]]:
    """The addresses that parse, and an error message for each one that does not."""
    good, bad = [], []
    for i, text in enumerate(servers, 1):
        try:
            good.append(ClamdAddress.parse(text))
        except ValueError as exc:
            bad.append(f"item {i}: {exc}")
    return good, bad


def _runner_timeout(plugin: object, config: Config) -> float:
    """The per-call timeout the runner will apply: conf.d's ``timeout`` key, or ours."""
    # Config has no public "settings of plugin X" accessor; plugin_overrides is what
    # Config.settings_for reads.
    override = config.plugin_overrides.get(SECTION, {}).get("timeout")
    return float(override if override is not None else getattr(plugin, "timeout", 30.0))


def _budget(cfg: ClamavConfig, runner_timeout: float) -> float:
    """One connect and one scan, but ending before the runner would cut the call off.

    If the runner's timeout fired first, its ``on_error`` would apply instead of ``on_failure``
    (with ``pass``, the message would be refused rather than passed as unscanned).
    """
    margin = min(1.0, runner_timeout / 10)
    return max(0.001, min(cfg.connect_timeout + cfg.scan_timeout, runner_timeout - margin))


def _printable(text: str, limit: int = 200) -> str:
    """``text`` fit for a reply or a header: printable ASCII, one line, bounded."""
    clean = "".join(c if c.isascii() and c.isprintable() else "?" for c in text)
    return clean[:limit] or "unknown"


class ClamavPlugin:
    """Scan messages with clamd (INSTREAM); reject or quarantine viruses.

    Registered as ``clamav`` in the ``filterhost.plugins`` entry-point group. The runner
    instantiates the class and applies :attr:`timeout` and :attr:`on_error` to every hook call.
    """

    timeout: float = 60.0
    """Seconds per call. The plugin keeps its own scan (failover included) within
    connect_timeout + scan_timeout (35 s by default), and always ends a little before this, so
    that ``on_failure`` rather than ``on_error`` decides about a slow scanner."""

    on_error: Literal["tempfail", "pass", "reject"] = "tempfail"
    """An unexpected exception (a bug) refuses the message for now: never passes it unscanned."""

    def __init__(self) -> None:
        self._state: _State | None = None

    # -- setup hooks --------------------------------------------------------------------------

    @hookimpl
    def filterhost_add_config(self, registry: ConfigRegistry) -> None:
        """Declare ``[plugins.clamav]``."""
        registry.add(SECTION, ClamavConfig, "virus scanning with clamd")

    @hookimpl
    def filterhost_configure(self, config: Config) -> None:
        """Take ``[plugins.clamav]``.

        No connection is opened here: the first message opens one per scan in progress, and
        they are kept for the next ones (see :class:`ClamdPool`).
        """
        cfg = config.plugin_config(ClamavConfig)
        servers, bad = _parse_servers(cfg.servers)
        if bad:
            # --check-config reports these first and the server does not start with them.
            raise ValueError(f"plugins.{SECTION}.servers: {'; '.join(bad)}")
        self._close_pools()  # a reload: connections to the old servers are not reused
        self._state = _State(
            config=cfg,
            pools=tuple(ClamdPool(address) for address in servers),
            hostname=config.hostname,
            budget=_budget(cfg, _runner_timeout(self, config)),
        )

    @hookimpl
    def filterhost_check_config(self, config: Config) -> list[Problem]:
        """Check the settings, then ask each clamd: PING, version and signatures, size limit.

        Unreachable or badly set up scanners are warnings (mail is tempfailed or passed as
        unscanned while they are down, which may be what the operator expects during a
        maintenance); malformed settings are errors. This is a plain setup hook that runs
        before the event loop, so it uses blocking sockets, each bounded by connect_timeout.
        """
        cfg = config.plugin_config(ClamavConfig)
        prefix = f"plugins.{SECTION}"
        problems: list[Problem] = []

        def problem(key: str, message: str, severity: Literal["error", "warning"]) -> None:
            dotted = f"{prefix}.{key}"
            problems.append(Problem(config.where(dotted), dotted, message, severity=severity))

        servers, bad = _parse_servers(cfg.servers)
        for message in bad:
            problem("servers", message, "error")
        if not cfg.servers:
            problem("servers", 'give at least one clamd, such as ["127.0.0.1:3310"]', "error")
        for key in ("connect_timeout", "scan_timeout"):
            if getattr(cfg, key) <= 0:
                problem(key, "must be more than 0 seconds", "error")
        if cfg.max_size < 1:
            problem("max_size", f"must be at least 1 byte, got {cfg.max_size}", "error")
        elif cfg.max_size < config.server.max_message_size:
            problem(
                "max_size",
                f"{cfg.max_size} is below server.max_message_size "
                f"({config.server.max_message_size}): messages in between are accepted by the "
                f"front end but never scanned (on_failure = {cfg.on_failure!r} applies)",
                "warning",
            )
        runner = _runner_timeout(self, config)
        if cfg.connect_timeout + cfg.scan_timeout > runner:
            problem(
                "scan_timeout",
                f"connect_timeout + scan_timeout ({cfg.connect_timeout + cfg.scan_timeout:g}s) "
                f"is more than the plugin's timeout ({runner:g}s): scans are cut short at "
                f"{_budget(cfg, runner):g}s; raise [plugins.{SECTION}] timeout",
                "warning",
            )
        if any(p.severity == "error" for p in problems):
            return problems  # no point asking servers with a broken configuration
        for address in servers:
            for message in _server_problems(address, cfg):
                problem("servers", message, "warning")
        return problems

    # -- lifecycle ----------------------------------------------------------------------------

    @hookimpl
    def filterhost_shutdown(self) -> None:
        """Close the clamd connections kept for reuse."""
        self._close_pools()

    def _close_pools(self) -> None:
        if self._state is not None:
            for pool in self._state.pools:
                pool.close()

    # -- the message chain --------------------------------------------------------------------

    @hookimpl
    async def filterhost_message(self, transaction: Transaction) -> Verdict | None:
        """Scan the message; a virus ends the chain, a clean message gets the scanned header."""
        state = self._state
        if state is None:
            raise RuntimeError("clamav: filterhost_configure was not called")
        cfg = state.config
        message = transaction.message
        qid = transaction.queue_id or "-"
        # Only this plugin may say whether a message was scanned; whatever the client sent
        # under these names is removed before anything else happens.
        removed = message.remove_header(SCANNED_HEADER) + message.remove_header(STATUS_HEADER)
        if removed:
            log.info(
                "%s: clamav: removed %d %s/%s header(s) sent by the client",
                qid,
                removed,
                SCANNED_HEADER,
                STATUS_HEADER,
            )
        if message.size > cfg.max_size:
            return self._not_scanned(
                transaction,
                REASON_TOO_LARGE,
                f"message is {message.size} bytes, more than max_size {cfg.max_size}",
            )
        started = time.perf_counter()
        try:
            result, server = await self._scan(state, message.as_bytes(), qid)
        except ClamdError as exc:
            return self._not_scanned(transaction, exc.reason, str(exc))
        elapsed = time.perf_counter() - started
        transaction.notes[SECTION] = {
            "scanned": True,
            "virus": result.virus,
            "server": str(server),
            "seconds": round(elapsed, 6),
        }
        if result.virus is None:
            log.debug("%s: clamav: clean (%s, %.3fs)", qid, server, elapsed)
            if cfg.scanned_header:
                message.add_header(SCANNED_HEADER, f"ClamAV at {state.hostname}")
            return None
        name = _printable(result.virus)
        log.info(
            "%s: clamav: virus %s found by %s (%.3fs); on_virus=%s",
            qid,
            name,
            server,
            elapsed,
            cfg.on_virus,
        )
        if cfg.on_virus == "quarantine":
            message.add_header(STATUS_HEADER, f"Infected ({name})")
            return Verdict.quarantine(f"Virus found: {name}")
        return Verdict.reject("5.7.1", f"Virus found: {name}", reason=f"clamav: {name}")

    async def _scan(self, state: _State, data: bytes, qid: str) -> tuple[ScanResult, ClamdAddress]:
        """Ask the servers in order until one answers OK or FOUND, within ``state.budget``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + state.budget
        cfg = state.config
        error: ClamdError | None = None
        for pool in state.pools:
            if loop.time() >= deadline:
                break
            try:
                result = await pool.scan(
                    data,
                    connect_timeout=cfg.connect_timeout,
                    scan_timeout=cfg.scan_timeout,
                    deadline=deadline,
                )
            except ClamdError as exc:
                error = exc
                if not exc.retryable:
                    break
                if pool is not state.pools[-1]:
                    # Failover hides a dead scanner from the verdict; the log must not.
                    log.warning("%s: clamav: %s; trying the next server", qid, exc)
                continue
            return result, pool.address
        if error is None:  # no server configured, or the budget was gone before the first
            raise ClamdFailed(REASON_TIMEOUT, f"no clamd tried within {state.budget:g}s")
        raise error

    def _not_scanned(self, transaction: Transaction, reason: str, detail: str) -> Verdict | None:
        """Apply ``on_failure``: 451, or pass marked unscanned; never the scanned header."""
        assert self._state is not None
        policy = self._state.config.on_failure
        transaction.notes[SECTION] = {"scanned": False, "reason": reason, "detail": detail}
        log.warning(
            "%s: clamav: message not scanned: %s; on_failure=%s",
            transaction.queue_id or "-",
            detail,
            policy,
        )
        if policy == "pass":
            transaction.message.add_header(STATUS_HEADER, f"Unscanned ({reason})")
            return None
        return Verdict.tempfail(
            "4.7.0", "Virus scanner unavailable, try again later", reason=f"clamav: {detail}"
        )


def _server_problems(address: ClamdAddress, cfg: ClamavConfig) -> list[str]:
    """What is wrong with one clamd: unreachable, no INSTREAM, old or no signatures, size limit."""
    timeout = float(cfg.connect_timeout)
    try:
        pong = command(address, "PING", timeout)
    except OSError as exc:
        what = "tempfailed" if cfg.on_failure == "tempfail" else "passed unscanned"
        detail = exc.strerror or str(exc) or type(exc).__name__
        return [
            f"{address}: clamd is not reachable ({detail}); mail is {what} while no "
            "listed clamd answers"
        ]
    if pong != "PONG":
        return [f"{address}: answered {pong[:80]!r} to PING, not PONG: is this clamd?"]
    found: list[str] = []
    try:
        found += _version_problems(
            address, command(address, "VERSIONCOMMANDS", timeout), cfg.official_signatures
        )
        limit = stream_max_length(address, cfg.max_size, timeout)
    except OSError as exc:
        return [*found, f"{address}: answered PING but then failed: {exc}"]
    if limit is not None:
        found.append(
            f"{address}: clamd's StreamMaxLength is {limit} bytes, below max_size "
            f"({cfg.max_size}): messages in between fail at clamd (on_failure = "
            f"{cfg.on_failure!r} applies); raise StreamMaxLength in clamd.conf or lower max_size"
        )
    return found


def _version_problems(address: ClamdAddress, reply: str, official: bool = True) -> list[str]:
    """Problems in a VERSIONCOMMANDS reply.

    The reply looks like ``ClamAV 1.4.6/27000/Sat Nov 29 08:00:00 2026| COMMANDS: PING ...``.
    """
    version, _, commands = reply.partition("|")
    found: list[str] = []
    if "INSTREAM" not in commands.split():
        found.append(f"{address}: clamd ({version or reply[:80]!r}) does not offer INSTREAM")
    engine, *db = version.strip().split("/")
    if not official:
        return found
    if len(db) < 2:
        # Only the official daily database sets these fields; unofficial (.ndb, .hdb, ...)
        # signatures alone leave them out.
        found.append(
            f"{address}: {engine} reports no official signature database (only unofficial "
            "signatures are loaded, if any): real viruses will pass; run freshclam"
        )
        return found
    try:
        built = time.mktime(time.strptime(db[1].strip(), "%a %b %d %H:%M:%S %Y"))
    except ValueError:
        return found
    age_days = (time.time() - built) / 86400
    if age_days > STALE_SIGNATURES_DAYS:
        found.append(
            f"{address}: signatures are {age_days:.0f} days old (database {db[0]}): "
            "is freshclam running?"
        )
    return found
