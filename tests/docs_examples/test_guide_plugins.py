"""Every example plugin of docs/plugins.md does what the guide says it does."""

from __future__ import annotations

from pathlib import Path

import pytest

from filterhost import Action, EnvelopeEdit, HeaderEdit, Reply, Route
from filterhost.testing import (
    ConfigError,
    FakeRelay,
    Harness,
    HarnessFactory,
    make_session,
    make_transaction,
)
from tests.docs_examples import nospam
from tests.docs_examples.guide_plugins import (
    Archive,
    Audit,
    BlockNetworks,
    Classify,
    HeaderHygiene,
    HeloCheck,
    RecipientPolicy,
    Reputation,
    RouteByDomain,
    SenderDomains,
    SizeCap,
)


async def test_quickstart(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness({"nospam": nospam})
    spam = await harness.run(make_transaction(headers={"X-Spam-Flag": "yes"}))
    assert (spam.action, spam.plugin, spam.reply.code) == (Action.REJECT, "nospam", 554)
    assert (await harness.run()).accepted


async def test_config_example(filterhost_harness: HarnessFactory) -> None:
    config = {"plugins": {"sizecap": {"max_bytes": 2000, "exempt": ["ceo@example.test"]}}}
    harness = await filterhost_harness({"sizecap": SizeCap}, config)
    big = make_transaction(body="x" * 3000 + "\n")
    outcome = await harness.run(big)
    assert outcome.reply == Reply(552, "5.3.4", "Message too big for this relay")
    exempt = make_transaction(mail_from="ceo@example.test", body="x" * 3000 + "\n")
    assert (await harness.run(exempt)).accepted
    # A limit that can never apply is worth a warning, not an error.
    useless = Harness({"sizecap": SizeCap}, {"plugins": {"sizecap": {"max_bytes": 10**9}}})
    (warning,) = useless.problems
    assert warning.severity == "warning"
    assert warning.key == "plugins.sizecap.max_bytes"
    with pytest.raises(ConfigError, match="expected integer"):
        Harness({"sizecap": SizeCap}, {"plugins": {"sizecap": {"max_bytes": "10M"}}})


async def test_lifecycle_and_outcome_examples(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    relay = FakeRelay({"busy@example.test": Reply(452, "4.2.2", "Mailbox full")})
    audit = Audit()
    async with Harness(
        {"audit": audit}, {"plugins": {"audit": {"path": str(log)}}}, relay=relay
    ) as h:
        assert audit.file is not None  # opened at startup
        outcome = await h.run(make_transaction(recipients=["ok@example.test", "busy@example.test"]))
    assert audit.file is None  # closed at shutdown
    lines = sorted(log.read_text().splitlines())
    assert lines == [
        f"{outcome.queue_id} deferred <busy@example.test> 452 4.2.2 Mailbox full",
        f"{outcome.queue_id} delivered <ok@example.test> 250 2.0.0 Ok",
    ]


async def test_connect_example(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness([BlockNetworks()])
    blocked = make_transaction(session=make_session(client_ip="192.0.2.7"))
    outcome = await harness.run(blocked, session_phases=True)
    assert (outcome.phase, outcome.reply.code) == ("connect", 554)
    fine = await harness.run(make_transaction(), session_phases=True)
    assert fine.transaction.session.notes == {"blocknetworks": {"checked": True}}


async def test_helo_example(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness(
        [HeloCheck()], {"server": {"relay_domains": ["example.test"]}}
    )
    outside = make_session(client_ip="198.51.100.1", helo="localhost")
    refused = await harness.run(make_transaction(session=outside), session_phases=True)
    assert (refused.phase, refused.reply.code) == ("helo", 550)
    inside = make_session(helo="localhost")  # 127.0.0.1: trusted
    assert (await harness.run(make_transaction(session=inside), session_phases=True)).accepted


async def test_mail_example(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness([SenderDomains()])
    refused = await harness.run(make_transaction(mail_from="a@gmail.example"), session_phases=True)
    assert (refused.phase, refused.reply.text) == ("mail", "Not allowed to send as gmail.example")
    ok = await harness.run(make_transaction(mail_from="a@corp.example"), session_phases=True)
    assert ok.accepted
    bounce = await harness.run(make_transaction(mail_from=""), session_phases=True)
    assert bounce.accepted


async def test_rcpt_example(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness([RecipientPolicy()])
    rcpts = ["a@competitor.example", *(f"u{i}@example.test" for i in range(101))]
    outcome = await harness.run(make_transaction(recipients=rcpts), session_phases=True)
    assert outcome.recipient_replies["a@competitor.example"].code == 550
    assert outcome.recipient_replies["u99@example.test"].code == 250  # the 100th counted
    assert outcome.recipient_replies["u100@example.test"].code == 451
    assert len(outcome.relayed[0].recipients) == 100


async def test_message_header_example(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness([HeaderHygiene()])
    txn = make_transaction(headers={"X-Originating-IP": "[10.1.1.1]", "X-Mailer": "Outlook 16"})
    outcome = await harness.run(txn)
    assert outcome.header_edits == [
        HeaderEdit("remove", "X-Originating-IP", ""),
        HeaderEdit("replace", "X-Mailer", "corp mail"),
        HeaderEdit("add", "X-Relay-Checked", "yes"),
    ]


async def test_message_body_and_envelope_examples(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness([Classify(), Archive()])
    txn = make_transaction(
        recipients=["a@example.test", "nobody@corp.example"],
        body="Confidential: Q3 numbers attached.\n",
        attachments=[("q3.xlsx", b"PK")],
    )
    outcome = await harness.run(txn)
    assert outcome.transaction.notes["classify"] == {
        "confidential": True,
        "attachments": ["q3.xlsx"],
    }
    assert outcome.envelope_edits == [
        EnvelopeEdit("add_recipient", "archive@corp.example"),
        EnvelopeEdit("remove_recipient", "nobody@corp.example"),
    ]
    relayed = sorted(rcpt for hop in outcome.relayed for rcpt in hop.recipients)
    assert relayed == ["a@example.test", "archive@corp.example"]
    zipped = make_transaction(body="confidential\n", attachments=[("x.zip", b"PK")])
    held = await harness.run(zipped)
    assert (held.action, held.quarantined, held.relayed) == (Action.QUARANTINE, True, [])


async def test_route_example(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness([RouteByDomain()], {"relay": {"mode": "mx"}})
    rcpts = ["a@legacy.corp.example", "b@partner.example", "c@retired.corp.example", "d@x.test"]
    outcome = await harness.run(make_transaction(recipients=rcpts))
    assert outcome.routes == {
        "a@legacy.corp.example": Route.host("10.1.2.3", 25),
        "b@partner.example": Route.smarthost(),
        "c@retired.corp.example": Route.reject("5.1.2", "This domain no longer receives mail"),
        "d@x.test": Route.mx("x.test"),
    }
    assert outcome.deliveries["c@retired.corp.example"].code == 550


async def test_timeouts_example(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness({"reputation": Reputation()})
    outcome = await harness.run()
    assert outcome.message.get("X-Reputation") == "0.0"

    class Down(Reputation):
        async def lookup(self, address: str) -> float:
            raise ConnectionRefusedError("reputation service down")

    down = await filterhost_harness({"reputation": Down()})
    outcome = await down.run()
    assert outcome.accepted  # on_error = "pass"
    assert outcome.trace[0].error == "ConnectionRefusedError: reputation service down"
    assert "X-Reputation" not in outcome.message
