"""A recording SMTP peer (next hop) that answers RCPT per recipient.

usage: python peer.py --dir DIR [--replies JSON] [--tls-cert PEM --tls-key PEM
                      [--implicit-tls]] [--auth USER:PASSWORD] ADDR PORT

Runs in the foreground until SIGTERM/SIGINT. ``--replies`` is a JSON object mapping a
recipient local-part prefix to ``[code, "text"]``; the first matching prefix decides the
RCPT reply, any other recipient gets 250. Files written to DIR:

* ``NNNNNN.eml``: the DATA bytes exactly as received (dot-unstuffed, nothing else);
* ``NNNNNN.json``: helo, mail_from ("" for <>), mail_options, rcpt_tos (accepted only),
  rcpt_options, tls (the TLS version, or null), auth (the user name, or null); renamed into
  place after the .eml, so its presence means complete;
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
import ssl
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


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
            "tls": server.transport.get_extra_info("ssl_object").version()
            if server.transport is not None
            and server.transport.get_extra_info("ssl_object") is not None
            else None,
            "auth": session.auth_data.decode()
            if isinstance(session.auth_data, bytes)
            else session.auth_data,
        }
        tmp = self.maildir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.maildir / f"{name}.json")
        return f"250 2.0.0 OK queued as {name}"


def _authenticator(user: str, password: str) -> Any:
    def check(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            user.encode(),
            password.encode(),
        )
        # handled=False: aiosmtpd sends the 235 or 535 itself
        return AuthResult(success=ok, handled=False, auth_data=data.login if ok else None)

    return check


async def serve(
    addr: str,
    port: int,
    handler: Recorder,
    tls: ssl.SSLContext | None = None,
    implicit: bool = False,
    auth: str | None = None,
) -> None:
    """Serve SMTP on addr:port until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    options: dict[str, Any] = {"hostname": "peer.test", "enable_SMTPUTF8": True}
    if tls is not None and not implicit:
        options["tls_context"] = tls
    if auth is not None:
        user, _, password = auth.partition(":")
        options["authenticator"] = _authenticator(user, password)
        options["auth_require_tls"] = True
        options["auth_required"] = True
    server = await loop.create_server(
        lambda: SMTP(handler, **options),
        host=addr,
        port=port,
        ssl=tls if implicit else None,
    )
    async with server:
        await stop.wait()


def main() -> None:
    """Parse the command line and run the peer."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--replies", default="{}")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--implicit-tls", action="store_true")
    ap.add_argument("--auth", help="USER:PASSWORD; AUTH is then required, over TLS")
    ap.add_argument("addr")
    ap.add_argument("port", type=int)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    replies = {k: (int(v[0]), str(v[1])) for k, v in json.loads(args.replies).items()}
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    asyncio.run(
        serve(args.addr, args.port, Recorder(args.dir, replies), tls, args.implicit_tls, args.auth)
    )


if __name__ == "__main__":
    main()
