"""filterhost.testing.Harness: the hook runner's semantics, as plugin authors see them.

Chain order, short-circuit, async and sync hooks mixed, timeouts, exceptions, invalid results,
each on_error policy, the edit records and their undoing, envelope edits, session phases,
routing and the fake relay. tests/test_harness_parity.py checks the harness against a real
server; this file checks what the harness (and so the runner) does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import filterhost_example_plugin
import pytest

from filterhost import (
    Action,
    Config,
    ConfigRegistry,
    EnvelopeEdit,
    HeaderEdit,
    Reply,
    Route,
    Session,
    Transaction,
    Verdict,
    hookimpl,
)
from filterhost.testing import (
    ConfigError,
    FakeRelay,
    Harness,
    HarnessFactory,
    make_message,
    make_session,
    make_transaction,
)


class Stamp:
    """Adds ``X-<name>: yes`` at the bottom, records the call, returns a fixed result."""

    def __init__(self, name: str, calls: list[str], result: Verdict | None = None) -> None:
        self.name = name
        self.calls = calls
        self.result = result

    @hookimpl
    async def filterhost_message(self, transaction: Transaction) -> Verdict | None:
        self.calls.append(self.name)
        transaction.message.add_header(f"X-{self.name}", "yes", top=False)
        return self.result


class SyncNote:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> None:
        self.calls.append("sync")
        transaction.notes["sync"] = True


# -- chain semantics -----------------------------------------------------------------------------


async def test_operator_order_decides_and_sync_and_async_hooks_mix(
    filterhost_harness: HarnessFactory,
) -> None:
    calls: list[str] = []
    plugins = {"a": Stamp("a", calls), "b": SyncNote(calls), "c": Stamp("c", calls)}
    harness = await filterhost_harness(plugins, {"plugins": {"order": ["c", "b", "a"]}})
    outcome = await harness.run()
    assert calls == ["c", "sync", "a"]
    assert outcome.transaction.notes == {"sync": True}
    assert [(r.plugin, r.hook, r.verdict, r.error) for r in outcome.trace] == [
        ("c", "filterhost_message", None, None),
        ("b", "filterhost_message", None, None),
        ("a", "filterhost_message", None, None),
    ]
    assert [r.header_edits for r in outcome.trace] == [
        (HeaderEdit("add", "X-c", "yes"),),
        (),
        (HeaderEdit("add", "X-a", "yes"),),
    ]
    assert outcome.header_edits == [
        HeaderEdit("add", "X-c", "yes"),
        HeaderEdit("add", "X-a", "yes"),
    ]


async def test_a_plugin_left_out_of_the_order_is_never_called(
    filterhost_harness: HarnessFactory,
) -> None:
    calls: list[str] = []
    plugins = {"in": Stamp("in", calls), "out": Stamp("out", calls)}
    harness = await filterhost_harness(plugins, {"plugins": {"order": ["in"]}})
    await harness.run()
    assert calls == ["in"]


async def test_the_first_terminal_verdict_ends_the_chain_and_names_its_plugin(
    filterhost_harness: HarnessFactory,
) -> None:
    calls: list[str] = []
    plugins = {
        "a": Stamp("a", calls),
        "b": Stamp("b", calls, Verdict.reject("5.7.1", "No thanks")),
        "c": Stamp("c", calls),
    }
    harness = await filterhost_harness(plugins)
    outcome = await harness.run()
    assert calls == ["a", "b"]
    assert outcome.plugin == "b"
    assert outcome.action is Action.REJECT
    assert (outcome.phase, outcome.reply) == ("data", Reply(554, "5.7.1", "No thanks"))
    assert not outcome.accepted
    assert outcome.relayed == []
    assert outcome.routes == {}


async def test_accept_skips_the_rest_and_queues(filterhost_harness: HarnessFactory) -> None:
    calls: list[str] = []
    plugins = {"ok": Stamp("ok", calls, Verdict.accept("trusted")), "later": Stamp("later", calls)}
    harness = await filterhost_harness(plugins)
    outcome = await harness.run()
    assert calls == ["ok"]
    assert outcome.accepted
    assert outcome.action is Action.ACCEPT
    assert len(outcome.relayed) == 1


async def test_discard_answers_250_and_relays_nothing(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness({"drop": Stamp("drop", [], Verdict.discard("test"))})
    outcome = await harness.run()
    assert outcome.accepted
    assert outcome.reply.text == f"Ok: queued as {outcome.queue_id}"
    assert outcome.relayed == []
    assert not outcome.quarantined


async def test_quarantine_is_held_not_relayed(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness({"q": Stamp("q", [], Verdict.quarantine("suspicious"))})
    outcome = await harness.run()
    assert outcome.accepted
    assert outcome.quarantined
    assert outcome.relayed == []


class Raises:
    timeout = 5.0

    @hookimpl
    async def filterhost_message(self, transaction: Transaction) -> None:
        transaction.message.add_header("X-Virus-Scanned", "yes")  # then the scan breaks
        transaction.add_recipient("extra@example.test")
        raise RuntimeError("boom")


class Sleeps:
    timeout = 0.2

    @hookimpl
    async def filterhost_message(self) -> None:
        await asyncio.sleep(30)


class ReturnsJunk:
    @hookimpl
    def filterhost_message(self) -> str:
        return "250 OK"


class BadVerdict:
    @hookimpl
    def filterhost_message(self) -> Verdict:
        return Verdict(Action.REJECT, Reply(451, "4.7.1", "a reject with a 4xx code"))


@pytest.mark.parametrize(
    ("plugin", "error"),
    [
        (Raises(), "RuntimeError: boom"),
        (Sleeps(), "timed out after 0.2s"),
        (ReturnsJunk(), "returned str, expected a Verdict or None"),
        (BadVerdict(), "InvalidVerdictError: a reject needs a 5xx reply, not 451"),
    ],
    ids=["exception", "timeout", "junk-result", "invalid-verdict"],
)
async def test_a_failing_plugin_tempfails_by_default_and_its_edits_are_undone(
    filterhost_harness: HarnessFactory,
    caplog: pytest.LogCaptureFixture,
    plugin: object,
    error: str,
) -> None:
    harness = await filterhost_harness({"flaky": plugin})
    started = time.monotonic()
    outcome = await harness.run()
    assert time.monotonic() - started < 5  # the timeout, not the plugin's 30 s sleep
    assert outcome.action is Action.TEMPFAIL
    assert outcome.plugin == "flaky"
    assert (outcome.reply.code, outcome.reply.status) == (451, "4.3.0")
    (result,) = outcome.trace
    assert result.error is not None
    assert error in result.error
    assert result.header_edits == ()
    assert result.envelope_edits == ()
    # Never "scanned" when not scanned: the half-done edits are gone.
    assert "X-Virus-Scanned" not in outcome.message
    assert outcome.transaction.recipients == ["rcpt@example.test"]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("plugin=flaky" in m and "on_error=tempfail" in m for m in logged), logged


@pytest.mark.parametrize(
    ("policy", "action", "code"),
    [("tempfail", Action.TEMPFAIL, 451), ("pass", None, 250), ("reject", Action.REJECT, 554)],
)
async def test_on_error_policy_from_the_config(
    filterhost_harness: HarnessFactory,
    caplog: pytest.LogCaptureFixture,
    policy: str,
    action: Action | None,
    code: int,
) -> None:
    calls: list[str] = []
    harness = await filterhost_harness(
        {"flaky": Raises(), "after": Stamp("after", calls)},
        {"plugins": {"flaky": {"on_error": policy}}},
    )
    outcome = await harness.run()
    assert outcome.reply.code == code
    assert (outcome.verdict.action if outcome.verdict else None) is action
    assert calls == (["after"] if policy == "pass" else [])
    (record,) = [r for r in caplog.records if "plugin=flaky" in r.getMessage()]
    assert record.levelno == (logging.WARNING if policy == "pass" else logging.ERROR)
    assert f"on_error={policy}" in record.getMessage()
    if policy == "pass":
        assert outcome.trace[0].error == "RuntimeError: boom"
        assert outcome.trace[0].verdict is None
        assert "X-Virus-Scanned" not in outcome.relayed[0].message


class DeclaresReject:
    on_error = "reject"
    timeout = 0.05

    @hookimpl
    async def filterhost_message(self) -> None:
        await asyncio.sleep(30)


async def test_on_error_and_timeout_declared_by_the_plugin_and_overridden_by_the_operator(
    filterhost_harness: HarnessFactory,
) -> None:
    declared = await filterhost_harness({"p": DeclaresReject()})
    outcome = await declared.run()
    assert (outcome.action, outcome.reply.status) == (Action.REJECT, "5.3.0")
    overridden = await filterhost_harness(
        {"p": DeclaresReject()}, {"plugins": {"p": {"on_error": "tempfail", "timeout": "10ms"}}}
    )
    outcome = await overridden.run()
    assert outcome.action is Action.TEMPFAIL
    assert outcome.trace[0].error == "timed out after 0.01s"


# -- envelope edits ------------------------------------------------------------------------------


class Envelope:
    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> None:
        transaction.set_sender("bounces@example.test")
        transaction.add_recipient("archive@example.test")
        transaction.remove_recipient("drop@example.test")
        transaction.recipients.append("direct@example.test")  # a plain list edit counts too


async def test_envelope_edits_are_recorded_and_relayed(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness({"env": Envelope()})
    txn = make_transaction(recipients=["keep@example.test", "drop@example.test"])
    outcome = await harness.run(txn)
    assert outcome.envelope_edits == [
        EnvelopeEdit("sender", "bounces@example.test"),
        EnvelopeEdit("add_recipient", "archive@example.test"),
        EnvelopeEdit("add_recipient", "direct@example.test"),
        EnvelopeEdit("remove_recipient", "drop@example.test"),
    ]
    (relayed,) = outcome.relayed
    assert relayed.mail_from == "bounces@example.test"
    assert relayed.recipients == [
        "keep@example.test",
        "archive@example.test",
        "direct@example.test",
    ]
    assert set(outcome.routes) == set(relayed.recipients)


class BadEnvelope:
    def __init__(self, edit: str) -> None:
        self.edit = edit

    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> None:
        if self.edit == "sender":
            transaction.mail_from = "a@b\r\nRCPT TO:<victim@example.net>"
        elif self.edit == "recipient":
            transaction.recipients.append("no-domain")
        elif self.edit == "twice":
            transaction.recipients.append(transaction.recipients[0])
        else:
            transaction.recipients = "x@example.test"  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ("sender", "invalid sender"),
        ("recipient", "is not of the form local@domain"),
        ("twice", "is listed twice"),
        ("type", "recipients must be a list"),
    ],
)
async def test_an_invalid_envelope_edit_fails_the_plugin_and_is_undone(
    filterhost_harness: HarnessFactory, edit: str, words: str
) -> None:
    harness = await filterhost_harness({"bad": BadEnvelope(edit)})
    outcome = await harness.run()
    assert outcome.action is Action.TEMPFAIL
    error = outcome.trace[0].error
    assert error is not None
    assert error.startswith("left an invalid envelope: ")
    assert words in error
    assert outcome.transaction.mail_from == "sender@example.test"
    assert outcome.transaction.recipients == ["rcpt@example.test"]


def test_transaction_envelope_methods_check_addresses() -> None:
    txn = make_transaction(recipients=["a@example.test"])
    assert txn.add_recipient("b@example.test")
    assert not txn.add_recipient("b@example.test")
    assert txn.remove_recipient("a@example.test")
    assert not txn.remove_recipient("a@example.test")
    assert txn.recipients == ["b@example.test"]
    txn.set_sender("")  # the null sender is a valid sender
    assert txn.mail_from == ""
    for bad in ("", "no-at-sign", "a@b c", "<a@b>", "a@b\n", "@example.test", "x" * 260 + "@b"):
        with pytest.raises(ValueError, match="invalid recipient"):
            txn.add_recipient(bad)
    with pytest.raises(ValueError, match="invalid sender"):
        txn.set_sender("a@b\r\n")


class DropsAll:
    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> None:
        for rcpt in list(transaction.recipients):
            transaction.remove_recipient(rcpt)


async def test_removing_every_recipient_drops_the_message(
    filterhost_harness: HarnessFactory,
) -> None:
    harness = await filterhost_harness({"drop": DropsAll()})
    outcome = await harness.run()
    assert outcome.accepted
    assert outcome.relayed == []


# -- session phases ------------------------------------------------------------------------------


class Policy:
    """Refuses one client name, one sender, one recipient; vouches for one outside recipient."""

    @hookimpl
    def filterhost_connect(self, session: Session) -> Verdict | None:
        session.notes["policy"] = "seen"
        if session.client_ip == "192.0.2.66":
            return Verdict.reject("5.7.1", "Not from you", code=554)
        return None

    @hookimpl
    def filterhost_helo(self, name: str) -> Verdict | None:
        return Verdict.reject("5.7.1", "Go away", code=550) if name == "bad.test" else None

    @hookimpl
    async def filterhost_mail(self, sender: str) -> Verdict | None:
        return Verdict.tempfail("4.7.1", "Slow down") if sender.startswith("slow@") else None

    @hookimpl
    def filterhost_rcpt(self, recipient: str) -> Verdict | None:
        if recipient == "blocked@example.test":
            return Verdict.reject("5.1.1", "No such user", code=550)
        if recipient == "special@elsewhere.test":
            return Verdict.accept("vouched for")
        return None


async def test_session_phases_run_in_smtp_order_with_core_relay_policy(
    filterhost_harness: HarnessFactory,
) -> None:
    harness = await filterhost_harness(
        {"policy": Policy()}, {"server": {"mynetworks": ["10.0.0.0/8"]}}
    )
    client = make_session(client_ip="192.0.2.10", helo="bad.test")
    refused = await harness.run(make_transaction(session=client), session_phases=True)
    assert (refused.phase, refused.reply.code, refused.plugin) == ("helo", 550, "policy")

    slow = make_transaction(
        mail_from="slow@example.test", session=make_session(client_ip="192.0.2.10")
    )
    refused = await harness.run(slow, session_phases=True)
    assert (refused.phase, refused.reply.code) == ("mail", 451)

    rcpts = ["blocked@example.test", "other@elsewhere.test", "special@elsewhere.test"]
    txn = make_transaction(recipients=rcpts, session=make_session(client_ip="192.0.2.10"))
    outcome = await harness.run(txn, session_phases=True)
    assert outcome.recipient_replies == {
        "blocked@example.test": Reply(550, "5.1.1", "No such user"),
        "other@elsewhere.test": Reply(554, "5.7.1", "Relay access denied"),
        "special@elsewhere.test": Reply(250, "2.1.5", "Ok"),
    }
    assert outcome.accepted
    assert outcome.transaction.session.notes == {"policy": "seen"}
    assert outcome.relayed[0].recipients == ["special@elsewhere.test"]
    hooks = [r.hook for r in outcome.trace]
    assert hooks[:3] == ["filterhost_connect", "filterhost_helo", "filterhost_mail"]
    assert hooks[3:6] == ["filterhost_rcpt"] * 3


async def test_connect_refusal_and_all_recipients_refused(
    filterhost_harness: HarnessFactory,
) -> None:
    harness = await filterhost_harness(
        {"policy": Policy()}, {"server": {"mynetworks": ["10.0.0.0/8"]}}
    )
    banned = make_transaction(session=make_session(client_ip="192.0.2.66"))
    outcome = await harness.run(banned, session_phases=True)
    assert (outcome.phase, outcome.reply) == ("connect", Reply(554, "5.7.1", "Not from you"))
    untrusted = make_transaction(
        recipients=["x@elsewhere.test"], session=make_session(client_ip="192.0.2.10")
    )
    outcome = await harness.run(untrusted, session_phases=True)
    assert (outcome.phase, outcome.reply) == ("rcpt", Reply(554, "5.7.1", "Relay access denied"))
    assert outcome.verdict is None  # core policy, not a plugin, refused it
    assert outcome.relayed == []


async def test_trust_follows_mynetworks_as_on_a_real_connection(
    filterhost_harness: HarnessFactory,
) -> None:
    harness = await filterhost_harness([], {"server": {"relay_domains": ["corp.example"]}})
    inside = await harness.run(
        make_transaction(recipients=["x@anywhere.test"]), session_phases=True
    )
    assert inside.accepted
    assert inside.transaction.session.trusted
    outside = make_transaction(
        recipients=["x@anywhere.test", "y@corp.example"],
        session=make_session(client_ip="198.51.100.7"),
    )
    outcome = await harness.run(outside, session_phases=True)
    assert outcome.recipient_replies["x@anywhere.test"].code == 554
    assert outcome.relayed[0].recipients == ["y@corp.example"]


# -- content checks and the Received field -------------------------------------------------------


async def test_the_front_ends_content_rules_apply(filterhost_harness: HarnessFactory) -> None:
    calls: list[str] = []
    harness = await filterhost_harness({"s": Stamp("s", calls)}, {"server": {"max_hops": 2}})
    bare_lf = await harness.run(b"Subject: x\r\n\r\nbare\nlf\r\n")
    assert (bare_lf.reply.code, bare_lf.reply.status) == (554, "5.6.0")
    loop = b"Received: a\r\nReceived: b\r\nSubject: x\r\n\r\nloop\r\n"
    assert (await harness.run(loop)).reply == Reply(554, "5.4.6", "Too many hops (mail loop?)")
    assert calls == []  # refused before the chain, as the front end does


async def test_the_chain_sees_the_received_field_and_the_body_is_untouched(
    filterhost_harness: HarnessFactory,
) -> None:
    seen: list[str | None] = []

    class Reader:
        @hookimpl
        def filterhost_message(self, transaction: Transaction) -> None:
            seen.append(transaction.message.get("Received"))

    harness = await filterhost_harness([Reader()])
    raw = make_message(body="Grüße\n", attachments=[("a.pdf", b"%PDF")]).as_bytes()
    outcome = await harness.run(raw)
    assert seen[0] is not None
    assert seen[0].startswith("from client.example.test ([127.0.0.1]) by filterhost.test")
    assert f"id {outcome.queue_id} for <rcpt@example.test>;" in seen[0]
    assert outcome.header_edits == []  # the front end's field is not a plugin's edit
    assert outcome.relayed[0].data.endswith(raw)
    assert outcome.relayed[0].data.startswith(b"Received: from client.example.test")


# -- routing, relay and delivery outcome hooks ---------------------------------------------------


class Router:
    @hookimpl
    async def filterhost_route(self, transaction: Transaction, recipient: str) -> Route | None:
        assert transaction.notes == {}  # as in the queue runner: notes are not spooled
        if recipient.endswith("@routed.test"):
            return Route.host("10.0.0.5", 2525)
        if recipient.endswith("@dropped.test"):
            return Route.discard()
        if recipient.endswith("@refused.test"):
            return Route.reject("5.1.2", "No route")
        if recipient.endswith("@held.test"):
            return Route.hold()
        if recipient.endswith("@broken.test"):
            raise RuntimeError("routing table missing")
        return None


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int]] = []

    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> None:
        transaction.notes["outcomes"] = "message phase only"

    @hookimpl
    def filterhost_delivered(self, recipient: str, reply: Reply) -> None:
        self.seen.append(("delivered", recipient, reply.code))
        raise RuntimeError("an observer's bug changes nothing")

    @hookimpl
    def filterhost_deferred(self, recipient: str, reply: Reply) -> None:
        self.seen.append(("deferred", recipient, reply.code))

    @hookimpl
    def filterhost_bounced(self, recipient: str, reply: Reply) -> None:
        self.seen.append(("bounced", recipient, reply.code))


async def test_routes_the_fake_relay_and_the_outcome_hooks(
    filterhost_harness: HarnessFactory,
) -> None:
    outcomes = Outcomes()
    relay = FakeRelay({"busy@example.test": Reply(451, "4.2.0", "Mailbox busy")})
    harness = await filterhost_harness(
        {"outcomes": outcomes, "router": Router()}, {"relay": {"mode": "mx"}}, relay=relay
    )
    rcpts = [
        "a@routed.test",
        "b@example.test",
        "busy@example.test",
        "c@dropped.test",
        "d@refused.test",
        "e@held.test",
        "f@broken.test",
    ]
    outcome = await harness.run(make_transaction(recipients=rcpts))
    assert outcome.routes == {
        "a@routed.test": Route.host("10.0.0.5", 2525),
        "b@example.test": Route.mx("example.test"),
        "busy@example.test": Route.mx("example.test"),
        "c@dropped.test": Route.discard(),
        "d@refused.test": Route.reject("5.1.2", "No route"),
        "e@held.test": Route.hold(),
    }
    assert outcome.route_errors["f@broken.test"].startswith("routing plugin router failed")
    assert sorted((r.next_hop, tuple(r.recipients)) for r in outcome.relayed) == [
        ("host:10.0.0.5:2525", ("a@routed.test",)),
        ("mx:example.test", ("b@example.test",)),
    ]
    assert relay.sent == outcome.relayed
    assert sorted(outcomes.seen) == [
        ("bounced", "d@refused.test", 550),
        ("deferred", "busy@example.test", 451),
        ("deferred", "e@held.test", 450),
        ("deferred", "f@broken.test", 451),
        ("delivered", "a@routed.test", 250),
        ("delivered", "b@example.test", 250),
    ]
    routed = [(r.plugin, r.route) for r in outcome.trace if r.hook == "filterhost_route"]
    assert ("router", Route.hold()) in routed


async def test_smarthost_mode_is_the_default_route_there(
    filterhost_harness: HarnessFactory,
) -> None:
    harness = await filterhost_harness(
        [], {"relay": {"mode": "smarthost", "smarthost": "10.0.0.9:587"}}
    )
    outcome = await harness.run()
    assert outcome.routes == {"rcpt@example.test": Route.smarthost()}
    assert outcome.relayed[0].next_hop == "smarthost"


@pytest.mark.parametrize("session_phases", [False, True])
async def test_deliver_false_stops_after_the_chain(
    filterhost_harness: HarnessFactory, session_phases: bool
) -> None:
    harness = await filterhost_harness([Router()])
    outcome = await harness.run(deliver=False, session_phases=session_phases)
    assert outcome.accepted
    assert outcome.routes == {}
    assert outcome.relayed == []


# -- configuration and lifecycle -----------------------------------------------------------------


class Lifecycle:
    def __init__(self) -> None:
        self.events: list[str] = []

    @hookimpl
    def filterhost_configure(self, config: Config) -> None:
        self.events.append(f"configure {config.hostname}")

    @hookimpl
    async def filterhost_startup(self) -> None:
        self.events.append("startup")

    @hookimpl
    async def filterhost_shutdown(self) -> None:
        self.events.append("shutdown")


async def test_lifecycle_hooks_run_once_around_the_runs() -> None:
    plugin = Lifecycle()
    async with Harness([plugin], {"server": {"hostname": "relay.example.net"}}) as harness:
        await harness.run()
        await harness.run()
        assert plugin.events == ["configure relay.example.net", "startup"]
    assert plugin.events[-1] == "shutdown"
    assert harness.plugins == {"Lifecycle": plugin}


def test_plugins_are_named_after_their_class_or_module() -> None:
    harness = Harness([Lifecycle, SyncNote([]), filterhost_example_plugin])
    assert list(harness.plugins) == ["Lifecycle", "SyncNote", "filterhost_example_plugin"]
    assert isinstance(harness.plugins["Lifecycle"], Lifecycle)  # a class is instantiated
    assert harness.config.plugins.order == list(harness.plugins)
    with pytest.raises(ValueError, match="pass a mapping"):
        Harness([SyncNote([]), SyncNote([])])


@dataclass(frozen=True)
class WsSettings:
    level: int = 5


class WithSettings:
    @hookimpl
    def filterhost_add_config(self, registry: ConfigRegistry) -> None:
        registry.add("ws", WsSettings, "test settings")


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"plugins": {"ws": {"level": "high"}}}, "plugins.ws.level: expected integer"),
        ({"plugins": {"ws": {"colour": "red"}}}, "plugins.ws.colour: unknown key"),
        ({"plugins": {"order": ["ws", "nosuch"]}}, "no installed plugin is named 'nosuch'"),
        ({"relay": {"mode": "carrier-pigeon"}}, "relay.mode: expected one of"),
        ({"sever": {}}, "sever: unknown table"),
    ],
)
def test_config_errors_are_raised_with_the_key(config: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        Harness({"ws": WithSettings()}, config)
    assert any(words in str(p) for p in info.value.problems), info.value.problems


class BadDeclarations:
    timeout = "5s"
    on_error = "ignore"

    @hookimpl
    def filterhost_message(self) -> None:
        pass


def test_unusable_declared_settings_are_reported_and_the_defaults_apply() -> None:
    harness = Harness({"bad": BadDeclarations()})
    assert [(p.key, p.severity) for p in harness.problems] == [
        ("plugins.bad", "warning"),
        ("plugins.bad", "warning"),
    ]
    assert "timeout = '5s', not a positive number of seconds; 30 s applies" in str(
        harness.problems[0]
    )
    settings = harness.hooks.impls("filterhost_message")[0].settings
    assert (settings.timeout, settings.on_error) == (30.0, "tempfail")


async def test_a_transaction_can_be_run_twice(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness([Envelope()])
    txn = make_transaction(recipients=["drop@example.test", "keep@example.test"])
    first = await harness.run(txn)
    second = await harness.run(txn)
    assert txn.recipients == ["drop@example.test", "keep@example.test"]
    assert txn.results == []
    assert first.envelope_edits == second.envelope_edits
    assert len(second.trace) == 1
    assert first.queue_id != second.queue_id


async def test_no_recipients_no_data(filterhost_harness: HarnessFactory) -> None:
    calls: list[str] = []
    harness = await filterhost_harness([Stamp("s", calls)])
    outcome = await harness.run(make_transaction(recipients=[]))
    assert (outcome.phase, outcome.reply) == (
        "data",
        Reply(503, "5.5.1", "Error: need RCPT command"),
    )
    assert calls == []
