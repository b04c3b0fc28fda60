"""The ``filterhost`` command: serve, check the configuration, inspect the queue and plugins."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from filterhost.app import App
from filterhost.checks import check_configuration
from filterhost.config import Config, Problem, load_config
from filterhost.logs import setup_logging
from filterhost.quarantine import QuarantineControl, run_quarantine_command
from filterhost.queuectl import LOCK_TIMEOUT, QueueControl, act_as_spool_owner, run_command
from filterhost.smtp.auth import passwd_main
from filterhost.spool import Spool

__all__ = ["main"]


def _print_problems(problems: list[Problem]) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)


def _serve(confdir: Path, log_level: str) -> int:
    setup_logging(log_level)
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
        asyncio.run(App(config, plugins).run())
    except OSError as exc:
        print(f"filterhost: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _check(confdir: Path) -> int:
    _, _, problems = check_configuration(confdir)
    if problems:
        _print_problems(problems)
        print(f"{len(problems)} problem(s) found in {confdir}", file=sys.stderr)
        return 1
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
    for action, text in (
        ("release", "move messages into the queue, due now (they are not scanned again)"),
        ("delete", "remove messages from the quarantine for good, without a bounce"),
    ):
        zchange = zsub.add_parser(action, help=text, parents=[change])
        zchange.add_argument("ids", nargs="+", metavar="ID", help="queue ids or unique prefixes")
    sub.add_parser("plugins", help="list installed plugins and the chain order", parents=[common])
    passwd = sub.add_parser(
        "passwd",
        help="add or change an AUTH user in a credentials file (password from stdin or tty)",
    )
    passwd.add_argument("file", type=Path, help="the credentials file ([server] auth_file)")
    passwd.add_argument("user", help="the user name")
    passwd.add_argument("--delete", action="store_true", help="remove the user instead")
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
        if args.command == "plugins":
            return _plugins(args)
        if args.check_config:
            return _check(args.config)
        return _serve(args.config, args.log_level)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
