"""``filterhost replay``: what the configured chain would do with a message, delivering nothing.

Built on the plugin authors' harness (:class:`filterhost.testing.Harness`), so replay runs
exactly the code a test runs: filterhost's own hook runner, the front end's rules at each phase,
routing, and a :class:`~filterhost.testing.FakeRelay` in place of the next hops. What it prints:
each hook call with its verdict and duration, the reply the client would get, the header diff
(what the chain, and the front end's ``Received`` field, changed), and the route per recipient.

Plugins run for real: a scanner is asked, a routing lookup is made. Nothing is spooled and
nothing is sent; plugins that record state of their own (a rate counter, say) do record it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from filterhost.config import Config
from filterhost.message import Message
from filterhost.model import Route, Session, Transaction
from filterhost.pluginmanager import Plugins
from filterhost.relay.resolver import DnsFailure, Resolver
from filterhost.testing import Harness, Outcome

__all__ = ["ReplayRequest", "print_outcome", "replay"]

_LINE_END = re.compile(rb"\r?\n")


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """The envelope and client to replay a message with."""

    sender: str
    recipients: Sequence[str]
    client_ip: str = "127.0.0.1"
    helo: str = "replay.invalid"


def as_crlf(raw: bytes) -> bytes:
    """A saved ``.eml`` has the file's line ends (often LF); on the wire every one is CRLF.

    A bare CR stays as it is, so that a message with one is refused as the front end would.
    """
    return _LINE_END.sub(b"\r\n", raw)


async def replay(config: Config, plugins: Plugins, raw: bytes, request: ReplayRequest) -> Outcome:
    """Run ``raw`` through every phase of ``config``'s chain and routing; deliver nothing."""
    transaction = Transaction(
        session=Session(id="replay", client_ip=request.client_ip, helo=request.helo),
        mail_from=request.sender,
        recipients=list(request.recipients),
        message=Message(as_crlf(raw)),
    )
    async with Harness.from_config(config, plugins) as harness:
        return await harness.run(transaction, session_phases=True, deliver=True)


def _header_lines(data: bytes) -> list[str]:
    """The header fields of ``data``, one per item, folded lines joined."""
    head = data.split(b"\r\n\r\n", 1)[0]
    fields: list[str] = []
    for line in head.split(b"\r\n"):
        text = line.decode("utf-8", "replace")
        if text[:1] in (" ", "\t") and fields:
            fields[-1] += " " + text.strip()
        elif text:
            fields.append(text)
    return fields


def header_diff(before: bytes, after: bytes) -> list[str]:
    """``+ Name: value`` and ``- Name: value`` lines: what changed in the header."""
    diff = difflib.unified_diff(_header_lines(before), _header_lines(after), n=0, lineterm="")
    return [
        f"{line[0]} {line[1:]}"
        for line in diff
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]


def _route_text(route: Route, config: Config) -> str:
    if route.kind == "smarthost":
        return f"smarthost {config.relay.smarthost_address}"
    if route.kind == "mx":
        return f"mx {route.domain} (port {config.relay.mx_port})"
    if route.kind == "host":
        return f"host {route.hostname}:{route.port}"
    if route.kind == "reject" and route.reply is not None:
        return f"reject {route.reply}"
    return route.kind


async def resolve_routes(outcome: Outcome, config: Config) -> dict[str, str]:
    """For MX routes: the MX hosts the resolver finds now (``--resolve``)."""
    resolver = Resolver(config.relay.nameserver_addresses)
    found: dict[str, str] = {}
    for rcpt, route in outcome.routes.items():
        if route.kind != "mx":
            continue
        try:
            hosts = await resolver.mx_hosts(route.domain)
        except DnsFailure as exc:
            found[rcpt] = f"DNS: {exc.status} {exc.text}"
            continue
        found[rcpt] = ", ".join(
            f"{h.name} (pref {h.preference}: {' '.join(h.addresses) or 'no address'})"
            for h in hosts
        )
    return found


def print_outcome(  # noqa: PLR0912 - one branch per part of the report
    outcome: Outcome,
    original: bytes,
    config: Config,
    out: TextIO,
    resolved: dict[str, str] | None = None,
) -> None:
    """The report an operator reads: hooks, reply, header diff, routes."""
    txn = outcome.transaction
    print(f"queue id: {outcome.queue_id or '-'}", file=out)
    print("hooks:", file=out)
    if not outcome.trace:
        print("  (no plugin ran)", file=out)
    for result in outcome.trace:
        if result.error is not None:
            what = f"error: {result.error}"
            if result.verdict is not None:
                what += f" -> {result.verdict.action.value}"
        elif result.route is not None:
            what = f"route {result.route.next_hop}"
        elif result.verdict is not None:
            what = result.verdict.action.value
            reply = result.verdict.effective_reply
            if reply is not None:
                what += f" {reply}"
            if result.verdict.reason:
                what += f" ({result.verdict.reason})"
        else:
            what = "no route (next plugin)" if result.hook == "filterhost_route" else "continue"
        edits = len(result.header_edits) + len(result.envelope_edits)
        more = f" edits={edits}" if edits else ""
        ms = result.seconds * 1000
        print(f"  {result.hook:<22} {result.plugin:<14} {ms:8.1f} ms  {what}{more}", file=out)
    state = "accepted" if outcome.accepted else "refused"
    if outcome.quarantined:
        state = "quarantined"
    print(f"result: {outcome.phase} {outcome.reply} ({state})", file=out)
    for rcpt, reply in outcome.recipient_replies.items():
        if reply.code != 250:
            print(f"  rcpt <{rcpt}>: {reply}", file=out)
    for edit in outcome.envelope_edits:
        print(f"envelope: {edit.op} <{edit.address}>", file=out)
    print("header diff:", file=out)
    diff = header_diff(as_crlf(original), outcome.message.as_bytes()) if outcome.accepted else []
    for line in diff or ["  (none)"]:
        print(f"  {line}", file=out)
    print("routes:", file=out)
    if not outcome.routes and not outcome.route_errors:
        print("  (none: the message would not be queued)", file=out)
    for rcpt in txn.recipients:
        if rcpt in outcome.route_errors:
            print(f"  <{rcpt}>: routing failed: {outcome.route_errors[rcpt]}", file=out)
            continue
        route = outcome.routes.get(rcpt)
        if route is None:
            continue
        line = f"  <{rcpt}>: {_route_text(route, config)}"
        if resolved and rcpt in resolved:
            line += f" -> {resolved[rcpt]}"
        print(line, file=out)
