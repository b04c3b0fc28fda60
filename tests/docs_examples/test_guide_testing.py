"""The testing section of docs/plugins.md: these tests are the guide's examples."""

from __future__ import annotations

from filterhost import Action
from filterhost.testing import (
    HarnessFactory,
    ServerFactory,
    make_session,
    make_transaction,
)
from tests.docs_examples.guide_plugins import SenderDomains, SizeCap


# -- start test-harness --
async def test_refuses_big_messages(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness(
        {"sizecap": SizeCap}, {"plugins": {"sizecap": {"max_bytes": 1000}}}
    )
    outcome = await harness.run(make_transaction(body="x" * 2000 + "\n"))
    assert outcome.action is Action.REJECT
    assert outcome.plugin == "sizecap"
    assert (outcome.reply.code, outcome.reply.status) == (552, "5.3.4")
    assert outcome.relayed == []  # nothing would have left

    small = await harness.run(make_transaction(body="hello\n"))
    assert small.accepted
    (relayed,) = small.relayed
    assert relayed.recipients == ["rcpt@example.test"]


# -- end test-harness --


# -- start test-session --
async def test_refuses_foreign_senders_at_mail_from(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness([SenderDomains()])
    txn = make_transaction(
        mail_from="someone@elsewhere.example",
        session=make_session(client_ip="10.1.2.3", helo="pc17.corp.example"),
    )
    outcome = await harness.run(txn, session_phases=True)
    assert outcome.phase == "mail"
    assert outcome.reply.text == "Not allowed to send as elsewhere.example"
    assert [r.hook for r in outcome.trace] == ["filterhost_mail"]


# -- end test-session --


# -- start test-server --
async def test_end_to_end(filterhost_server: ServerFactory) -> None:
    server = await filterhost_server(
        {"sizecap": SizeCap}, {"plugins": {"sizecap": {"max_bytes": 1000}}}
    )
    refused = await server.send(make_transaction(body="x" * 2000 + "\n"))
    assert (refused.phase, refused.reply.code) == ("data", 552)

    accepted = await server.send(make_transaction(body="hello\n"))
    assert accepted.accepted
    (relayed,) = await server.wait_relayed(1)
    assert relayed.message.get("Received", "").startswith("from client.example.test")


# -- end test-server --
