"""The ``filterhost`` command: serve, check the configuration, inspect the queue and plugins."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from filterhost.checks import check_configuration, deep_problems
from filterhost.config import Config, Problem, load_config
from filterhost.logs import LogFormat, setup_logging
from filterhost.quarantine import QuarantineControl, run_quarantine_command
from filterhost.queuectl import LOCK_TIMEOUT, QueueControl, act_as_spool_owner, run_command
from filterhost.smtp.auth import passwd_main
from filterhost.spool import Spool, server_running
from filterhost.workers import serve

__all__ = ["main"]


def _print_problems(problems: list[Problem]) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)


def _serve(confdir: Path, log_level: str, log_format: LogFormat = "text") -> int:
    setup_logging(log_level, log_format)
    config, plugins, problems = check_configuration(confdir)
    for warning in (p for p in problems if p.severity == "warning"):
        logging.getLogger("filterhost").warning("config: %s", warning)
    problems = [p for p in problems if p.severity == "error"]
    if problems or config is None:
        _print_problems(problems)
        print(
            f"filterhost: {len(problems)} configuration problem(s); not starting",
            file=sys.stderr,
        )
        return 2
    try:
        status = serve(config, plugins)  # one process, or a master and its workers
    except OSError as exc:
        print(f"filterhost: cannot start: {exc}", file=sys.stderr)
        return 1
    return status


def _check(
    confdir: Path, *, as_json: bool = False, online: bool = False, errors_only: bool = False
) -> int:
    config, plugins, problems = check_configuration(confdir)
    if config is not None and not any(p.severity == "error" for p in problems):
        problems += deep_problems(config, plugins, online=online)
    # --errors-only: warnings (a scanner still starting at boot) are shown but do not fail
    # the check, which is what a unit's ExecStartPre needs.
    failing = [p for p in problems if p.severity == "error" or not errors_only]
    if as_json:
        # For automation: every problem, with the same exit status as the text output.
        rows = [
            {"file": p.file, "key": p.key, "message": p.message, "severity": p.severity}
            for p in problems
        ]
        print(json.dumps(rows, indent=2))
        return 1 if failing else 0
    if problems:
        _print_problems(problems)
        print(f"{len(problems)} problem(s) found in {confdir}", file=sys.stderr)
        if failing:
            return 1
        print(f"{confdir}: configuration OK apart from the warnings above")
        return 0
    print(f"{confdir}: configuration OK")
    return 0


def _load_or_exit(confdir: Path) -> Config:
    # The core sections only: the queue commands need no plugin, and must not wait for a
    # scanner that is down (check_configuration would ask clamd).
    config, problems = load_config(confdir)
    errors = [p for p in problems if p.severity == "error"]
    if config is None or errors:
        # Never guess: a broken or mistyped conf.d could name another (empty) spool.
        _print_problems(errors or problems)
        raise SystemExit(2)
    return config


def _queue(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    ids: list[str] = getattr(args, "ids", [])
    domains: list[str] = getattr(args, "domain", [])
    flush_all: bool = getattr(args, "all", False)
    if args.action == "flush" and [bool(ids), bool(domains), flush_all].count(True) != 1:
        print("filterhost queue flush: give queue ids, --domain D or --all", file=sys.stderr)
        return 2
    spool = Spool(config.spool_directory)
    act_as_spool_owner(spool)
    try:
        if (spool.directory / "journal").is_dir() and not server_running(spool.directory):
            # No server to finish them: what it left in its journal becomes queue files now.
            spool.recover_journal()
        wait: float = getattr(args, "wait", LOCK_TIMEOUT)
        ctl = QueueControl(
            spool,
            lock_timeout=wait,
            on_wait=lambda queue_id: print(
                f"filterhost: {queue_id} is being delivered; waiting (up to {wait:g}s)",
                file=sys.stderr,
                flush=True,
            ),
        )
        return run_command(
            ctl,
            args.action,
            ids=ids,
            as_json=getattr(args, "json", False),
            body=getattr(args, "body", False),
            domains=domains,
            all_messages=flush_all,
        )
    except OSError as exc:  # e.g. a spool this user may not read
        print(f"filterhost: {exc}", file=sys.stderr)
        return 1
    finally:
        spool.close()


def _quarantine(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    # Each release and delete is logged, one line with the queue id, as the server logs.
    setup_logging(args.log_level)
    wait: float = getattr(args, "wait", LOCK_TIMEOUT)
    ctl = QuarantineControl(
        config.spool_directory,
        lock_timeout=wait,
        on_wait=lambda queue_id: print(
            f"filterhost: {queue_id} is busy; waiting (up to {wait:g}s)",
            file=sys.stderr,
            flush=True,
        ),
    )
    act_as_spool_owner(ctl.queue)
    try:
        return run_quarantine_command(
            ctl,
            args.action,
            ids=getattr(args, "ids", []),
            as_json=getattr(args, "json", False),
            body=getattr(args, "body", False),
        )
    except OSError as exc:  # e.g. a spool this user may not read
        print(f"filterhost: {exc}", file=sys.stderr)
        return 1
    finally:
        ctl.close()


def _plugins(args: argparse.Namespace) -> int:
    config, plugins, problems = check_configuration(args.config)
    for info in sorted(plugins.installed.values(), key=lambda i: i.name):
        active = config is not None and info.name in config.plugins.order
        print(
            f"{info.name:<16} {info.version:<12} {'active' if active else 'inactive':<9}"
            f"{info.source}"
        )
    if config is not None:
        # The effective chain per hook, as `haraka -o` prints it: who runs, in which order.
        print("hooks:")
        for hook, names in plugins.hook_order(config):
            print(f"  {hook:<24}{' -> '.join(names) or '-'}")
        print("order: " + " -> ".join(config.plugins.order or ["(none)"]))
    _print_problems(problems)
    return 1 if problems else 0


def _replay(args: argparse.Namespace) -> int:
    # Imported here: only this command needs the harness.
    from filterhost.replay import (  # noqa: PLC0415
        ReplayRequest,
        print_outcome,
        replay,
        resolve_routes,
    )

    config, plugins, problems = check_configuration(args.config)
    errors = [p for p in problems if p.severity == "error"]
    if config is None or errors:
        _print_problems(errors or problems)
        return 2
    try:
        raw = args.message.read_bytes()
    except OSError as exc:
        print(f"filterhost replay: {args.message}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    request = ReplayRequest(args.sender, args.to, args.client_ip, args.helo)

    async def run() -> int:
        outcome = await replay(config, plugins, raw, request)
        resolved = await resolve_routes(outcome, config) if args.resolve else None
        print_outcome(outcome, raw, config, sys.stdout, resolved)
        return 0 if outcome.accepted else 1

    return asyncio.run(run())


def _operations_arguments(
    parser: argparse.ArgumentParser,
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """``--log-format``, ``--check-config --json/--online`` and ``filterhost replay``."""
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines as text (default) or one JSON object per line",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="with --check-config: the problems as a JSON list (file, key, message, severity)",
    )
    parser.add_argument(
        "--errors-only",
        action="store_true",
        help="with --check-config: exit 1 only for errors; warnings are printed (ExecStartPre)",
    )
    parser.add_argument(
        "--online",
        action="store_true",
        help="with --check-config: also ask each nameserver and the smart host (EHLO, TLS, AUTH)",
    )
    rep = sub.add_parser(
        "replay",
        help="run a message through the configured chain and routing; deliver nothing",
        parents=[common],
    )
    rep.add_argument("message", type=Path, metavar="MESSAGE.eml", help="the message file")
    rep.add_argument("--from", dest="sender", required=True, metavar="ADDRESS")
    rep.add_argument("--to", action="append", required=True, metavar="ADDRESS")
    rep.add_argument("--client-ip", default="127.0.0.1", metavar="IP")
    rep.add_argument("--helo", default="replay.invalid", metavar="NAME")
    rep.add_argument("--resolve", action="store_true", help="look up the MX hosts of MX routes")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="filterhost",
        description="SMTP smart host: scans, shapes and relays outgoing mail.",
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=Path("conf.d"),
        help="the conf.d directory (default: ./conf.d)",
    )
    # -c may also come after a subcommand (`filterhost queue list -c DIR`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS)
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the configuration and exit: 0 when clean, 1 with one line per problem",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    sub = parser.add_subparsers(dest="command")
    queue = sub.add_parser("queue", help="inspect and change the queue", parents=[common])
    qsub = queue.add_subparsers(dest="action", required=True)
    qlist = qsub.add_parser("list", help="list queued messages", parents=[common])
    qlist.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    qshow = qsub.add_parser(
        "show", help="one message: envelope, recipients' state, headers", parents=[common]
    )
    qshow.add_argument("ids", nargs=1, metavar="ID", help="a queue id or an unambiguous prefix")
    qshow.add_argument("--body", action="store_true", help="the whole message, not only headers")
    qshow.add_argument("--json", action="store_true", help="the state as JSON")
    # Changes are made under the message's delivery lock; then the server rescans.
    change = argparse.ArgumentParser(add_help=False, parents=[common])
    change.add_argument(
        "--wait",
        type=float,
        default=LOCK_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for a message that is being delivered (default %(default)g)",
    )
    qflush = qsub.add_parser(
        "flush", help="make pending recipients due now (IDs, --domain or --all)", parents=[change]
    )
    qflush.add_argument("ids", nargs="*", metavar="ID")
    qflush.add_argument("--domain", action="append", default=[], help="recipients in this domain")
    qflush.add_argument("--all", action="store_true", help="every message that is not held")
    for action, text in (
        ("hold", "keep messages queued, unattempted, until released"),
        ("release", "undo hold; the pending recipients are due now"),
        ("delete", "remove messages from the queue, without a bounce"),
        ("bounce", "give up on the pending recipients: bounced, the sender gets a DSN"),
    ):
        qchange = qsub.add_parser(action, help=text, parents=[change])
        qchange.add_argument("ids", nargs="+", metavar="ID", help="queue ids or unique prefixes")
    quarantine = sub.add_parser(
        "quarantine", help="inspect, release or delete quarantined messages", parents=[common]
    )
    zsub = quarantine.add_subparsers(dest="action", required=True)
    zlist = zsub.add_parser("list", help="list quarantined messages", parents=[common])
    zlist.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    zshow = zsub.add_parser(
        "show", help="one message: who quarantined it, why, envelope, headers", parents=[common]
    )
    zshow.add_argument("ids", nargs=1, metavar="ID", help="a queue id or an unambiguous prefix")
    zshow.add_argument("--body", action="store_true", help="the whole message, not only headers")
    zshow.add_argument("--json", action="store_true", help="the entry as JSON")
    zwait = argparse.ArgumentParser(add_help=False, parents=[common])
    zwait.add_argument(
        "--wait",
        type=float,
        default=LOCK_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait while another command works on a message (default %(default)g)",
    )
    for action, text in (
        ("release", "move messages into the queue, due now (they are not scanned again)"),
        ("delete", "remove messages from the quarantine for good, without a bounce"),
    ):
        zchange = zsub.add_parser(action, help=text, parents=[zwait])
        zchange.add_argument("ids", nargs="+", metavar="ID", help="queue ids or unique prefixes")
    sub.add_parser("plugins", help="list installed plugins and the chain order", parents=[common])
    _operations_arguments(parser, sub, common)
    passwd = sub.add_parser(
        "passwd",
        help="add or change an AUTH user in a credentials file (password from stdin or tty)",
    )
    passwd.add_argument("file", type=Path, help="the credentials file ([server] auth_file)")
    passwd.add_argument("user", help="the user name")
    passwd.add_argument("--delete", action="store_true", help="remove the user instead")
    dkim = sub.add_parser("dkim", help="DKIM keys for the dkim plugin")
    dsub = dkim.add_subparsers(dest="action", required=True)
    keygen = dsub.add_parser(
        "keygen", help="write a new signing key (mode 0600) and print its DNS TXT record"
    )
    keygen.add_argument("--domain", required=True, help="the signing domain (d=)")
    keygen.add_argument("--selector", required=True, help="the selector (s=), e.g. 2026a")
    keygen.add_argument("--type", choices=["rsa", "ed25519"], default="rsa", dest="key_type")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument(
        "--dir", type=Path, default=Path(), help="where the key file goes (default: .)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0911 - one per subcommand
    """Entry point of the ``filterhost`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "queue":
            return _queue(args)
        if args.command == "quarantine":
            return _quarantine(args)
        if args.command == "passwd":
            return passwd_main(args.file, args.user, delete=args.delete)
        if args.command == "dkim":
            # Imported here: only this subcommand needs the dkim plugin (and dkimpy).
            from filterhost_builtins.dkim import keygen_main  # noqa: PLC0415

            return keygen_main(args.domain, args.selector, args.key_type, args.bits, args.dir)
        if args.command == "plugins":
            return _plugins(args)
        if args.command == "replay":
            return _replay(args)
        if args.check_config:
            return _check(
                args.config, as_json=args.json, online=args.online, errors_only=args.errors_only
            )
        return _serve(args.config, args.log_level, args.log_format)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
