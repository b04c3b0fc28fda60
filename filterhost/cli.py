"""The ``filterhost`` command: serve, check the configuration, inspect the queue and plugins."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import sys
import time
from pathlib import Path

from filterhost.app import App
from filterhost.checks import check_configuration
from filterhost.config import Config, Problem
from filterhost.logs import setup_logging
from filterhost.spool import Spool, SpoolEntry

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
    config, _, problems = check_configuration(confdir)
    if config is None:
        _print_problems(problems)
        raise SystemExit(2)
    return config


def _entry_dict(entry: SpoolEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "age": round(time.time() - entry.received),
        "size": entry.size,
        "sender": entry.mail_from,
        "hold": entry.hold,
        "recipients": [
            {
                "address": r.address,
                "status": r.status,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt if not r.done else None,
                "last_reply": r.last_reply,
            }
            for r in entry.recipients
        ],
    }


def _queue(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    spool = Spool(config.spool_directory)
    if not spool.queue_dir.is_dir():
        entries: list[SpoolEntry] = []
    else:
        entries = list(spool.entries())
    try:
        if args.action == "list":
            if args.json:
                print(json.dumps([_entry_dict(e) for e in entries], indent=1))
                return 0
            for e in entries:
                when = datetime.datetime.fromtimestamp(e.received).isoformat(timespec="seconds")
                flag = " (held)" if e.hold else ""
                print(f"{e.id}  {e.size:>9}  {when}  <{e.mail_from}>{flag}")
                for r in e.recipients:
                    print(f"    {r.status:<9} <{r.address}>  {r.last_reply}")
            print(f"-- {len(entries)} message(s)")
            return 0
        # show
        match = [e for e in entries if e.id == args.id]
        if not match:
            print(f"filterhost: no queued message {args.id}", file=sys.stderr)
            return 1
        print(json.dumps(_entry_dict(match[0]), indent=1))
        return 0
    finally:
        spool.close()


def _plugins(args: argparse.Namespace) -> int:
    config, plugins, problems = check_configuration(args.config)
    for info in sorted(plugins.installed.values(), key=lambda i: i.name):
        active = config is not None and info.name in config.plugins.order
        print(
            f"{info.name:<16} {info.version:<12} {'active' if active else 'inactive':<9}"
            f"{info.source}"
        )
    if config is not None:
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
    queue = sub.add_parser("queue", help="inspect the queue", parents=[common])
    qsub = queue.add_subparsers(dest="action", required=True)
    qlist = qsub.add_parser("list", help="list queued messages", parents=[common])
    qlist.add_argument("--json", action="store_true")
    qshow = qsub.add_parser("show", help="show one message's state", parents=[common])
    qshow.add_argument("id")
    sub.add_parser("plugins", help="list installed plugins and the chain order", parents=[common])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``filterhost`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "queue":
            return _queue(args)
        if args.command == "plugins":
            return _plugins(args)
        if args.check_config:
            return _check(args.config)
        return _serve(args.config, args.log_level)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
