"""The noexe plugin through filterhost's harness: no sockets, the real hook runner."""

from __future__ import annotations

import pytest
from filterhost_example_plugin import NoExecutables

from filterhost import Action, HeaderEdit
from filterhost.testing import ConfigError, HarnessFactory, make_message, make_transaction

PLUGINS = {"noexe": NoExecutables}  # the entry-point name, as operators write it


async def test_the_plugin_is_installed() -> None:
    from importlib.metadata import entry_points  # noqa: PLC0415 - the point of the test

    (ep,) = [ep for ep in entry_points(group="filterhost.plugins") if ep.name == "noexe"]
    assert ep.load() is NoExecutables


@pytest.mark.parametrize(
    "filename",
    ["setup.exe", "SETUP.EXE", "invoice.pdf.exe", "run.exe. ", "script.js", "Grüße.scr"],
)
async def test_executable_names_are_refused(
    filterhost_harness: HarnessFactory, filename: str
) -> None:
    harness = await filterhost_harness(PLUGINS)
    outcome = await harness.run(make_transaction(attachments=[(filename, b"not really")]))
    assert outcome.action is Action.REJECT
    assert outcome.plugin == "noexe"
    assert (outcome.reply.code, outcome.reply.status) == (554, "5.7.1")
    assert outcome.reply.text == "Executable attachments are not accepted"
    assert outcome.relayed == []
    assert outcome.header_edits == []  # nothing stamped on a refused message


async def test_a_renamed_executable_is_found_by_its_content(
    filterhost_harness: HarnessFactory,
) -> None:
    harness = await filterhost_harness(PLUGINS)
    renamed = make_transaction(attachments=[("invoice.pdf", b"MZ\x90\x00\x03", "application/pdf")])
    assert (await harness.run(renamed)).action is Action.REJECT
    relaxed = await filterhost_harness(PLUGINS, {"plugins": {"noexe": {"check_content": False}}})
    assert (await relaxed.run(renamed)).accepted


async def test_an_executable_inside_a_forwarded_message_is_found(
    filterhost_harness: HarnessFactory,
) -> None:
    inner = make_message(attachments=[("tool.exe", b"MZ")]).as_bytes()
    harness = await filterhost_harness(PLUGINS)
    outcome = await harness.run(make_transaction(attachments=[("fwd.eml", inner)]))
    assert outcome.action is Action.REJECT


async def test_a_clean_message_is_stamped_and_relayed(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness(PLUGINS)
    txn = make_transaction(
        headers={"X-Attachment-Check": "passed (forged by the sender)"},
        attachments=[("report.pdf", b"%PDF-1.4"), ("notes.txt", b"hello")],
    )
    outcome = await harness.run(txn)
    assert outcome.accepted
    assert outcome.verdict is None
    assert outcome.header_edits == [
        HeaderEdit("remove", "X-Attachment-Check", ""),
        HeaderEdit("add", "X-Attachment-Check", "passed (2 attachments)"),
    ]
    (relayed,) = outcome.relayed
    assert relayed.recipients == ["rcpt@example.test"]
    assert relayed.message.get_all("X-Attachment-Check") == ["passed (2 attachments)"]


async def test_quarantine_instead_of_reject(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness(PLUGINS, {"plugins": {"noexe": {"action": "quarantine"}}})
    outcome = await harness.run(make_transaction(attachments=[("x.exe", b"MZ")]))
    assert outcome.action is Action.QUARANTINE
    assert outcome.accepted
    assert outcome.quarantined
    assert outcome.relayed == []


async def test_own_suffixes(filterhost_harness: HarnessFactory) -> None:
    harness = await filterhost_harness(PLUGINS, {"plugins": {"noexe": {"suffixes": [".zip"]}}})
    assert (await harness.run(make_transaction(attachments=[("a.zip", b"PK")]))).action is (
        Action.REJECT
    )
    assert (await harness.run(make_transaction(attachments=[("a.bat", b"@echo")]))).accepted


def test_bad_settings_are_config_errors() -> None:
    from filterhost.testing import Harness  # noqa: PLC0415

    with pytest.raises(ConfigError) as info:
        Harness(PLUGINS, {"plugins": {"noexe": {"suffixes": ["exe"], "header": "X Bad"}}})
    messages = [str(p) for p in info.value.problems]
    assert messages == [
        "<test config>: plugins.noexe.suffixes: 'exe' does not start with a dot; "
        'write it as ".exe"',
        "<test config>: plugins.noexe.header: 'X Bad' is not a header field name",
    ]
    with pytest.raises(ConfigError, match=r"plugins\.noexe\.action"):
        Harness(PLUGINS, {"plugins": {"noexe": {"action": "bounce"}}})
