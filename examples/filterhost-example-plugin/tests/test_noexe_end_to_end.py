"""The noexe plugin in a real filterhost: SMTP in, the chain, the spool, the relay, SMTP out."""

from __future__ import annotations

from filterhost_example_plugin import NoExecutables

from filterhost.testing import ServerFactory, make_transaction


async def test_refused_in_session_and_clean_mail_relayed(
    filterhost_server: ServerFactory,
) -> None:
    server = await filterhost_server({"noexe": NoExecutables})

    refused = await server.send(make_transaction(attachments=[("setup.exe", b"MZ")]))
    assert refused.phase == "data"
    assert (refused.reply.code, refused.reply.status) == (554, "5.7.1")

    clean = make_transaction(
        recipients=["a@example.test", "b@example.test"],
        attachments=[("report.pdf", b"%PDF-1.4")],
    )
    result = await server.send(clean)
    assert result.accepted
    assert result.queue_id
    (relayed,) = await server.wait_relayed(1)
    assert sorted(relayed.recipients) == ["a@example.test", "b@example.test"]
    assert relayed.message.get("X-Attachment-Check") == "passed (1 attachments)"
    # Only the front end's Received field and the stamp were added; the rest is as sent.
    assert relayed.data.endswith(clean.message.as_bytes())
