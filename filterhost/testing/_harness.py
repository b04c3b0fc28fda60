"""The plugin test harness: a chain of plugins run on a transaction, without sockets.

It uses filterhost's own hook runner (order, timeouts, ``on_error``, verdict checks, edit
records) and the front end's rules at each phase (relay policy, content checks, the Received
field), and replaces only the two things that need the network: the client, which is the
:class:`~filterhost.Transaction` you pass, and the next hop, which is a :class:`FakeRelay` that
records what it would have sent. ``tests/test_harness_parity.py`` runs the same plugins through
the harness and through a real server and checks that they agree.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from filterhost.config import Config, Problem
from filterhost.dispatch import HookRunner
from filterhost.message import HeaderEdit, Message
from filterhost.model import EnvelopeEdit, PluginResult, Route, Session, Transaction
from filterhost.pluginmanager import Plugins
from filterhost.smtp.data import check_content, decode_body, header_size
from filterhost.smtp.policy import RELAY_DENIED, is_trusted, received_value, recipient_allowed
from filterhost.spool import new_queue_id
from filterhost.testing._builders import make_transaction
from filterhost.testing._config import PluginsArg, build
from filterhost.verdict import Action, Reply, Verdict

__all__ = ["FakeRelay", "Harness", "Outcome", "Phase", "Relayed"]

Phase = Literal["connect", "helo", "mail", "rcpt", "data"]
"""Where a session ended: the SMTP phase whose reply the outcome holds."""

_REFUSING = (Action.REJECT, Action.TEMPFAIL, Action.DISCONNECT)
_OK_RCPT = Reply(250, "2.1.5", "Ok")
_HELD = Reply(450, "4.3.2", "held by routing")
_STUFF = re.compile(rb"(\A|\r\n|\r|\n)\.")

HARNESS_DEFAULTS: Mapping[str, Any] = {"server": {"hostname": "filterhost.test"}}


@dataclass(frozen=True, slots=True)
class Relayed:
    """One SMTP transaction that a next hop received (or, from :class:`FakeRelay`, would have).

    ``next_hop`` is :attr:`filterhost.Route.next_hop` (``"mx:example.com"``,
    ``"host:10.0.0.5:25"``, ``"smarthost"``); ``data`` is the message as relayed.
    """

    next_hop: str
    mail_from: str
    recipients: list[str]
    data: bytes

    @property
    def message(self) -> Message:
        """``data`` as a :class:`~filterhost.Message`, to read its headers and parts."""
        return Message(self.data)


class FakeRelay:
    """Stands in for the next hops: records each message instead of sending it.

    :param replies: the reply for some recipients (say ``Reply(451, "4.2.0", "Mailbox busy")``
        to see ``filterhost_deferred`` called); every other recipient gets ``default``.
    """

    def __init__(
        self,
        replies: Mapping[str, Reply] | None = None,
        default: Reply = Reply(250, "2.0.0", "Ok"),  # noqa: B008 - a frozen value
    ) -> None:
        self.replies = dict(replies or {})
        self.default = default
        self.sent: list[Relayed] = []
        """Every message sent through this relay, in order, across runs."""

    async def deliver(
        self, route: Route, mail_from: str, recipients: list[str], data: bytes
    ) -> dict[str, Reply]:
        """Record one transaction to ``route``; the reply per recipient."""
        replies = {r: self.replies.get(r, self.default) for r in recipients}
        accepted = [r for r, reply in replies.items() if 200 <= reply.code < 300]
        if accepted:
            self.sent.append(Relayed(route.next_hop, mail_from, accepted, data))
        return replies


@dataclass(slots=True)
class Outcome:
    """What happened to one transaction in the harness.

    The session ended at ``phase`` with ``reply`` (what the client was told). ``verdict`` is the
    deciding plugin verdict, or None when no plugin decided (core policy refused, or the chain
    ran through and the message was queued).
    """

    phase: Phase
    reply: Reply
    verdict: Verdict | None
    transaction: Transaction
    """The transaction after the chain: edited message and envelope, notes, results."""
    trace: list[PluginResult] = field(default_factory=list)
    """One entry per plugin call, every phase and the route hook included, in order."""
    recipient_replies: dict[str, Reply] = field(default_factory=dict)
    """The RCPT reply per recipient (only with ``session_phases=True``)."""
    routes: dict[str, Route] = field(default_factory=dict)
    """The next hop chosen per recipient: route hooks first, then ``[relay] mode``."""
    route_errors: dict[str, str] = field(default_factory=dict)
    """Recipients whose routing plugin failed (the queue runner would defer them)."""
    deliveries: dict[str, Reply] = field(default_factory=dict)
    """The delivery result per recipient (from the relay, or from routing: hold, reject)."""
    relayed: list[Relayed] = field(default_factory=list)
    """What the relay received in this run; empty when the message was not queued."""
    queue_id: str = ""
    quarantined: bool = False
    """True when a QUARANTINE verdict kept the message aside: answered 250, not relayed."""

    @property
    def plugin(self) -> str | None:
        """The name of the plugin that decided, or None."""
        return self.verdict.plugin if self.verdict is not None else None

    @property
    def action(self) -> Action:
        """The deciding verdict's action; CONTINUE when no plugin decided."""
        return self.verdict.action if self.verdict is not None else Action.CONTINUE

    @property
    def accepted(self) -> bool:
        """True when the client got 250 at the end of DATA (queued, quarantined or discarded)."""
        return self.phase == "data" and self.reply.code == 250

    @property
    def message(self) -> Message:
        """The message as the chain left it (``Received`` field included)."""
        return self.transaction.message

    @property
    def header_edits(self) -> list[HeaderEdit]:
        """Every header edit the plugins made, in order."""
        return list(self.transaction.message.edits)

    @property
    def envelope_edits(self) -> list[EnvelopeEdit]:
        """Every envelope edit the plugins made, in order."""
        return [edit for result in self.trace for edit in result.envelope_edits]


class Harness:
    """Runs plugins on transactions the way filterhost does, with no sockets and no spool.

    :param plugins: the chain, in order: plugin objects (a module, a class, or an instance;
        named after their class or module, which is how ``outcome.plugin`` names them) or a
        mapping ``{name: plugin}`` to use the names from your entry points.
    :param config: conf.d settings as nested dicts, exactly as in the TOML files:
        ``{"plugins": {"noexe": {"suffixes": [".exe"]}}, "server": {"relay_domains": [...]}}``.
        ``plugins.order`` defaults to the order of ``plugins``; ``server.hostname`` to
        ``"filterhost.test"``. Checked as ``--check-config`` would: an error raises
        :class:`~filterhost.config.ConfigError`, warnings are in :attr:`problems`.
    :param relay: the next hops; by default a :class:`FakeRelay` that accepts everything.

    Use it as ``async with Harness(...) as harness:`` so that ``filterhost_shutdown`` runs, or
    let the ``filterhost_harness`` pytest fixture do that. :meth:`run` starts it if needed.
    """

    def __init__(
        self,
        plugins: PluginsArg,
        config: Mapping[str, Any] | None = None,
        *,
        relay: FakeRelay | None = None,
    ) -> None:
        self._setup(*build(plugins, config, HARNESS_DEFAULTS), relay)

    def _setup(
        self, config: Config, plugins: Plugins, problems: list[Problem], relay: FakeRelay | None
    ) -> None:
        self.config: Config = config
        """The checked configuration the plugins get."""
        self._plugins = plugins
        self.problems: list[Problem] = problems
        """Warnings from the configuration checks (errors raise instead)."""
        self.relay = relay if relay is not None else FakeRelay()
        self.hooks = HookRunner(self._plugins, self.config)
        self._started = False

    @classmethod
    def from_config(
        cls,
        config: Config,
        plugins: Plugins,
        *,
        relay: FakeRelay | None = None,
        problems: list[Problem] | None = None,
    ) -> Harness:
        """A harness on an already checked configuration and plugin set.

        ``filterhost replay`` runs a conf.d's own chain this way; the caller has checked them,
        as ``--check-config`` does.
        """
        harness = cls.__new__(cls)
        harness._setup(config, plugins, list(problems or []), relay)
        return harness

    @property
    def plugins(self) -> dict[str, object]:
        """The registered plugins by name (a class given to the harness is instantiated)."""
        return {name: info.plugin for name, info in self._plugins.installed.items()}

    async def start(self) -> None:
        """Configure the plugins and run ``filterhost_startup`` (once)."""
        if self._started:
            return
        self._started = True
        self._plugins.configure(self.config)
        await self.hooks.observe("filterhost_startup")

    async def stop(self) -> None:
        """Run ``filterhost_shutdown`` if the harness was started."""
        if self._started:
            self._started = False
            await self.hooks.observe("filterhost_shutdown", reverse=True)

    async def __aenter__(self) -> Harness:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def run(
        self,
        transaction: Transaction | Message | bytes | None = None,
        *,
        session_phases: bool = False,
        deliver: bool = True,
    ) -> Outcome:
        """Run one transaction through the chain and (if queued) through routing and delivery.

        :param transaction: what the client sends; a :class:`~filterhost.Message` or bytes get
            :func:`make_transaction`'s envelope, None a default message. It is not changed:
            the run works on a copy, which is :attr:`Outcome.transaction`.
        :param session_phases: also run connect, HELO, MAIL and RCPT (hooks and core relay
            policy) first, as a client session would; otherwise only the message phase runs.
        :param deliver: route and (fake) deliver an accepted message, calling the route and
            delivery outcome hooks.
        """
        if not isinstance(transaction, Transaction):
            transaction = make_transaction(transaction)
        await self.start()
        # A run changes its transaction (envelope, notes, results) as the server does; work on
        # a copy so that the caller's can be run again, or through a real server.
        given = transaction
        txn = Transaction(
            session=dataclasses.replace(given.session, notes=dict(given.session.notes)),
            mail_from=given.mail_from,
            recipients=list(given.recipients),
            message=given.message,
            mail_options=list(given.mail_options),
            notes=dict(given.notes),
        )
        session = txn.session
        session.trusted = (
            is_trusted(session.client_ip, self.config.server.networks)
            or session.authenticated_as is not None
        )
        trace: list[PluginResult] = []
        if session_phases:
            return await self._session(txn, trace, deliver=deliver)
        return await self._data(txn, trace, deliver=deliver, rcpt_replies={})

    # -- the phases, as filterhost.smtp.server and .handler run them -----------------------

    async def _refusal(
        self, hook: str, trace: list[PluginResult], context: str, **kwargs: Any
    ) -> Verdict | None:
        verdict = await self.hooks.chain(hook, context=context, record=trace, **kwargs)
        if verdict is not None and verdict.action in _REFUSING:
            return verdict
        return None

    async def _session(
        self, txn: Transaction, trace: list[PluginResult], *, deliver: bool
    ) -> Outcome:
        session = txn.session
        verdict = await self._refusal("filterhost_connect", trace, session.id, session=session)
        if verdict is not None:
            return self._ended("connect", verdict, txn, trace)
        session.helo = session.helo or "client.example.test"
        session.esmtp = True
        verdict = await self._refusal(
            "filterhost_helo", trace, session.id, session=session, name=session.helo
        )
        if verdict is not None:
            return self._ended("helo", verdict, txn, trace)
        verdict = await self._refusal(
            "filterhost_mail",
            trace,
            session.id,
            session=session,
            sender=txn.mail_from,
            options=txn.mail_options,
        )
        if verdict is not None:
            return self._ended("mail", verdict, txn, trace)
        replies: dict[str, Reply] = {}
        accepted: list[str] = []
        last: tuple[Reply, Verdict | None] | None = None
        limit = self.config.server.max_recipients
        for rcpt in txn.recipients:
            reply, verdict = await self._rcpt(txn, rcpt, trace, len(accepted) >= limit)
            replies[rcpt] = reply
            if reply.code == 250:
                accepted.append(rcpt)
                continue
            last = (reply, verdict)
            if verdict is not None and verdict.action is Action.DISCONNECT:
                break
        if last is not None and (not accepted or last[0].code == 421):
            outcome = self._ended("rcpt", last[1], txn, trace, reply=last[0])
            outcome.recipient_replies = replies
            return outcome
        txn.recipients = accepted
        return await self._data(txn, trace, deliver=deliver, rcpt_replies=replies)

    async def _rcpt(
        self, txn: Transaction, rcpt: str, trace: list[PluginResult], over_limit: bool
    ) -> tuple[Reply, Verdict | None]:
        session = txn.session
        if over_limit:
            limit = self.config.server.max_recipients
            return Reply(452, "4.5.3", f"Too many recipients (at most {limit} per message)"), None
        verdict = await self.hooks.chain(
            "filterhost_rcpt",
            context=session.id,
            record=trace,
            session=session,
            sender=txn.mail_from,
            recipient=rcpt,
            options=[],
        )
        if verdict is not None and verdict.action in _REFUSING:
            reply = verdict.effective_reply
            assert reply is not None
            return reply, verdict
        accepted = verdict is not None and verdict.action is Action.ACCEPT
        if not accepted and not recipient_allowed(
            rcpt, trusted=session.trusted, relay_domains=self.config.server.relay_domains
        ):
            return RELAY_DENIED, None
        if "@" not in rcpt:
            return Reply(550, "5.1.3", "Recipient address must include a domain"), None
        return _OK_RCPT, None

    def _ended(
        self,
        phase: Phase,
        verdict: Verdict | None,
        txn: Transaction,
        trace: list[PluginResult],
        *,
        reply: Reply | None = None,
    ) -> Outcome:
        if reply is None:
            assert verdict is not None
            reply = verdict.effective_reply
        assert reply is not None
        return Outcome(phase, reply, verdict, txn, trace)

    def _refusal_before_chain(self, txn: Transaction) -> Reply | None:
        """The front end's checks at DATA, before the chain; the message is re-read as bytes.

        Mirrors ``Handler.process`` and ``Handler._content`` in :mod:`filterhost.smtp.handler`.
        """
        server = self.config.server
        if not txn.recipients:  # the front end refuses DATA before reading the message
            return Reply(503, "5.5.1", "Error: need RCPT command")
        content = txn.message.as_bytes()
        if len(content) > server.max_message_size:
            return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        # What a client puts on the wire: dot-stuffed after every line end, bare ones included,
        # so that decode_body (which may normalise line ends first) gets back to ``content``.
        content = decode_body(_STUFF.sub(rb"\1..", content), server.line_endings)
        bad = check_content(content)
        if bad is not None:
            return bad
        if header_size(content) > server.max_header_size:
            return Reply(552, "5.3.4", f"Message header exceeds {server.max_header_size} bytes")
        # The front end parses the bytes it received; so does the harness, so that nothing a
        # test did to a Message object beforehand (edits, a cached parse) leaks into the run.
        txn.message = Message(content)
        if txn.message.count("Received") >= server.max_hops:
            return Reply(554, "5.4.6", "Too many hops (mail loop?)")
        return None

    async def _data(
        self,
        txn: Transaction,
        trace: list[PluginResult],
        *,
        deliver: bool,
        rcpt_replies: dict[str, Reply],
    ) -> Outcome:
        def ended(reply: Reply, verdict: Verdict | None = None) -> Outcome:
            outcome = Outcome("data", reply, verdict, txn, trace)
            outcome.recipient_replies = rcpt_replies
            outcome.queue_id = txn.queue_id
            return outcome

        refused = self._refusal_before_chain(txn)
        if refused is not None:
            return ended(refused)
        txn.queue_id = new_queue_id()
        txn.message.add_header(
            "Received",
            received_value(txn.session, self.config.hostname, txn.queue_id, txn.recipients),
        )
        txn.message.edits.clear()  # the front end's trace field is not a plugin's edit
        verdict = await self.hooks.chain(
            "filterhost_message", context=txn.queue_id, record=txn.results, transaction=txn
        )
        trace.extend(txn.results)
        action = verdict.action if verdict is not None else Action.CONTINUE
        if action in _REFUSING:
            assert verdict is not None
            reply = verdict.effective_reply
            assert reply is not None
            return ended(reply, verdict)
        outcome = ended(Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}"), verdict)
        if action is Action.DISCARD or not txn.recipients:
            return outcome
        if action is Action.QUARANTINE:
            outcome.quarantined = True
        elif deliver:
            await self._deliver(txn, outcome)
        return outcome

    # -- the queue runner's part ---------------------------------------------------------

    async def _deliver(self, accepted: Transaction, outcome: Outcome) -> None:
        data = accepted.message.as_bytes()
        # What the queue runner sees: the spooled message and envelope, no notes.
        txn = Transaction(
            session=Session(
                id="queue", client_ip=accepted.session.client_ip, helo=accepted.session.helo
            ),
            mail_from=accepted.mail_from,
            recipients=list(accepted.recipients),
            message=Message(data),
            mail_options=list(accepted.mail_options),
            queue_id=accepted.queue_id,
        )
        hops: dict[str, tuple[Route, list[str]]] = {}
        for rcpt in txn.recipients:
            try:
                route = await self.hooks.first_route(
                    context=txn.queue_id, record=outcome.trace, transaction=txn, recipient=rcpt
                )
            except RuntimeError as exc:
                outcome.route_errors[rcpt] = str(exc)
                await self._outcome(txn, outcome, rcpt, Reply(451, "4.3.0", str(exc)))
                continue
            if route is None:
                domain = rcpt.rpartition("@")[2]
                route = (
                    Route.smarthost() if self.config.relay.mode == "smarthost" else Route.mx(domain)
                )
            outcome.routes[rcpt] = route
            if route.kind == "discard":
                continue
            if route.kind == "reject":
                assert route.reply is not None
                await self._outcome(txn, outcome, rcpt, route.reply)
                continue
            if route.kind == "hold":
                await self._outcome(txn, outcome, rcpt, _HELD)
                continue
            hops.setdefault(route.next_hop, (route, []))[1].append(rcpt)
        for route, recipients in hops.values():
            sent_before = len(self.relay.sent)
            replies = await self.relay.deliver(route, txn.mail_from, recipients, data)
            outcome.relayed.extend(self.relay.sent[sent_before:])
            for rcpt in recipients:
                await self._outcome(txn, outcome, rcpt, replies[rcpt])

    async def _outcome(self, txn: Transaction, outcome: Outcome, rcpt: str, reply: Reply) -> None:
        outcome.deliveries[rcpt] = reply
        if 200 <= reply.code < 300:
            hook = "filterhost_delivered"
        elif reply.is_permanent:
            hook = "filterhost_bounced"
        else:
            hook = "filterhost_deferred"
        await self.hooks.observe(
            hook, context=txn.queue_id, transaction=txn, recipient=rcpt, reply=reply
        )
