"""A recording SMTP peer (next hop) that answers RCPT per recipient.

usage: python peer.py --dir DIR [--replies JSON] ADDR PORT

Runs in the foreground until SIGTERM/SIGINT. ``--replies`` is a JSON object mapping a
recipient local-part prefix to ``[code, "text"]``; the first matching prefix decides the
RCPT reply, any other recipient gets 250. Files written to DIR:

* ``NNNNNN.eml``: the DATA bytes exactly as received (dot-unstuffed, nothing else);
* ``NNNNNN.json``: helo, mail_from ("" for <>), mail_options, rcpt_tos (accepted only),
  rcpt_options; renamed into place after the .eml, so its presence means complete;
* ``rcpt.jsonl``: one ``{"address": ..., "code": ...}`` line per RCPT answered.

smtp-sink cannot refuse single recipients, and it rewrites line endings; this peer does
neither, at aiosmtpd's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class Recorder:
    """aiosmtpd handler: per-recipient replies, and every message saved to a directory."""

    def __init__(self, maildir: Path, replies: dict[str, tuple[int, str]]) -> None:
        self.maildir = maildir
        self.replies = replies
        self.seq = itertools.count(1)

    def _log_rcpt(self, address: str, code: int) -> None:
        with (self.maildir / "rcpt.jsonl").open("a") as f:
            f.write(json.dumps({"address": address, "code": code}) + "\n")

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Refuse by local-part prefix, otherwise accept."""
        local = address.rsplit("@", 1)[0].lower()
        for prefix, (code, text) in self.replies.items():
            if local.startswith(prefix.lower()):
                self._log_rcpt(address, code)
                return f"{code} {text}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        self._log_rcpt(address, 250)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Save the message, then accept it."""
        name = f"{next(self.seq):06d}"
        data = envelope.original_content or b""
        (self.maildir / f"{name}.eml").write_bytes(data)
        meta: dict[str, Any] = {
            "helo": session.host_name,
            # aiosmtpd keeps "<>" for the null sender; smtp-sink helpers say ""
            "mail_from": "" if envelope.mail_from == "<>" else envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "rcpt_options": envelope.rcpt_options,
        }
        tmp = self.maildir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.maildir / f"{name}.json")
        return f"250 2.0.0 OK queued as {name}"


async def serve(addr: str, port: int, handler: Recorder) -> None:
    """Serve SMTP on addr:port until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="peer.test", enable_SMTPUTF8=True),
        host=addr,
        port=port,
    )
    async with server:
        await stop.wait()


def main() -> None:
    """Parse the command line and run the peer."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--replies", default="{}")
    ap.add_argument("addr")
    ap.add_argument("port", type=int)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    replies = {k: (int(v[0]), str(v[1])) for k, v in json.loads(args.replies).items()}
    asyncio.run(serve(args.addr, args.port, Recorder(args.dir, replies)))


if __name__ == "__main__":
    main()
