"""A recipient mail server for the demo: stores every message it accepts in a directory.

usage: python mailserver.py --dir DIR [--name NAME] [--defer-domain DOMAIN ...] ADDR PORT

Runs in the foreground until SIGTERM or SIGINT. Recipients in a ``--defer-domain`` get
``450 4.3.2`` (the server is "busy" for that domain); every other recipient is accepted.
Files written to DIR, one pair per accepted message:

* ``NNNN.eml``: the message exactly as received (dot-unstuffed, nothing else);
* ``NNNN.json``: ``{"mail_from": ..., "rcpt_tos": [...], "helo": ..., "client": ...}``, renamed
  into place after the ``.eml``, so its presence means the message is complete.

Each RCPT answer is also appended to ``rcpt.log`` (``address code``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session


class Mailbox:
    """aiosmtpd handler: defers the listed domains, stores everything else."""

    def __init__(self, directory: Path, defer_domains: set[str]) -> None:
        self.directory = directory
        self.defer_domains = defer_domains
        self.seq = itertools.count(1)

    def _note(self, address: str, code: int) -> None:
        with (self.directory / "rcpt.log").open("a") as f:
            f.write(f"{address} {code}\n")

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """450 for a deferred domain, 250 otherwise."""
        domain = address.rpartition("@")[2].lower()
        if domain in self.defer_domains:
            self._note(address, 450)
            return f"450 4.3.2 {domain}: too busy right now, try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        self._note(address, 250)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Store the message and its envelope, then accept it."""
        name = f"{next(self.seq):04d}"
        (self.directory / f"{name}.eml").write_bytes(envelope.original_content or b"")
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        meta = {
            "mail_from": "" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "helo": session.host_name,
            "client": peer,
        }
        tmp = self.directory / f".{name}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.directory / f"{name}.json")
        return f"250 2.0.0 OK stored as {name}.eml"


async def serve(addr: str, port: int, name: str, handler: Mailbox) -> None:
    """Serve SMTP on addr:port until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=name, enable_SMTPUTF8=True), host=addr, port=port
    )
    async with server:
        await stop.wait()


def main() -> None:
    """Parse the command line and serve."""
    ap = argparse.ArgumentParser(description="a demo recipient server that stores its mail")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--name", default="mx.test", help="the greeting host name")
    ap.add_argument("--defer-domain", action="append", default=[])
    ap.add_argument("addr")
    ap.add_argument("port", type=int)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    handler = Mailbox(args.dir, {d.lower() for d in args.defer_domain})
    asyncio.run(serve(args.addr, args.port, args.name, handler))


if __name__ == "__main__":
    main()
