"""The attachments plugin: banned names, types, content and zip members; reject or quarantine.

Unit tests call the configured plugin's message hook on real messages (configured from a real
conf.d); the end-to-end tests send through a running filterhost to an smtp-sink next hop.
"""

from __future__ import annotations

import asyncio
import base64
import io
import zipfile
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from filterhost_builtins.attachments import AttachmentsPlugin, is_windows_executable

from filterhost import Action, Message, Session, Transaction, Verdict
from filterhost.checks import check_configuration
from filterhost.pluginmanager import Plugins
from tests.components.fixtures import Sinks
from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import base_config, port_of, running_app, write_conf

SENDER = "alice@example.test"


def configure(tmp_path: Path, **settings: Any) -> AttachmentsPlugin:
    """An AttachmentsPlugin configured from a conf.d with ``settings`` as its table."""
    conf = base_config(
        tmp_path, free_port(), None, 25, plugins={"order": ["attachments"], "attachments": settings}
    )
    confdir = write_conf(tmp_path / f"conf{len(list(tmp_path.glob('conf*')))}.d", conf)
    plugin = AttachmentsPlugin()
    plugins = Plugins()
    plugins.add("attachments", plugin)
    config, plugins, problems = check_configuration(confdir, plugins)
    assert config is not None, problems
    assert [p for p in problems if p.severity == "error"] == []
    plugins.configure(config)
    return plugin


def mail(*attachments: tuple[str | None, bytes, str], body: str = "see attached\n") -> bytes:
    """A message with ``(filename, data, content type)`` attachments, CRLF line ends."""
    m = EmailMessage()
    m["From"] = SENDER
    m["To"] = "bob@mx.test"
    m["Subject"] = "files"
    m["Message-ID"] = "<1@example.test>"
    m.set_content(body)
    for name, data, ctype in attachments:
        maintype, subtype = ctype.split("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def raw_mail(parts: str) -> bytes:
    """A multipart/mixed message with ``parts`` (already MIME, boundary ``B``) as its body."""
    head = (
        f"From: {SENDER}\r\nTo: bob@mx.test\r\nSubject: raw\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
    )
    return (head + parts.replace("\n", "\r\n") + "\r\n--B--\r\n").encode()


def zipped(compression: int = zipfile.ZIP_DEFLATED, **members: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def pe_file() -> bytes:
    """The smallest bytes Windows' loader would take as a PE image: MZ, e_lfanew, PE\\0\\0."""
    data = bytearray(b"MZ" + bytes(126))
    data[0x3C:0x40] = (0x40).to_bytes(4, "little")
    data[0x40:0x44] = b"PE\0\0"
    return bytes(data)


async def verdict_for(plugin: AttachmentsPlugin, raw: bytes) -> Verdict | None:
    txn = Transaction(
        session=Session(id="s", client_ip="127.0.0.1"),
        mail_from=SENDER,
        recipients=["bob@mx.test"],
        message=Message(raw),
        queue_id="QTEST",
    )
    return await plugin.filterhost_message(txn)


def rejected(verdict: Verdict | None) -> str:
    """The reply text of a 554 5.7.1 reject (fails for anything else)."""
    assert verdict is not None
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (554, "5.7.1")
    return verdict.reply.text


@pytest.fixture
def plugin(tmp_path: Path) -> AttachmentsPlugin:
    """The plugin with its defaults."""
    return configure(tmp_path)


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("invoice.pdf.exe", 'Attachment "invoice.pdf.exe" is not allowed (double extension)'),
        ("INVOICE.PDF.EXE", 'Attachment "INVOICE.PDF.EXE" is not allowed (double extension)'),
        # Padding to push ".exe" out of sight in a mail client's list.
        ("scan.pdf          .exe", 'Attachment "scan.pdf          .exe" is not allowed (double '
         "extension)"),
        ("setup.exe", 'Attachment "setup.exe" is not allowed (file type .exe)'),
        ("v1.2.exe", 'Attachment "v1.2.exe" is not allowed (file type .exe)'),  # a version
        # Windows drops trailing dots and spaces: this opens as setup.exe.
        ("setup.exe.", 'Attachment "setup.exe." is not allowed (file type .exe)'),
        ("tool.ps1", 'Attachment "tool.ps1" is not allowed (file type .ps1)'),
        ("run.js", 'Attachment "run.js" is not allowed (file type .js)'),
        ("shortcut.lnk", 'Attachment "shortcut.lnk" is not allowed (file type .lnk)'),
        ("disk.iso", 'Attachment "disk.iso" is not allowed (file type .iso)'),
        ("..\\..\\evil.scr", 'Attachment "..\\..\\evil.scr" is not allowed (file type .scr)'),
    ],
)  # fmt: skip
async def test_banned_names_are_refused_with_the_name_in_the_reply(
    plugin: AttachmentsPlugin, name: str, text: str
) -> None:
    raw = mail(
        ("report.pdf", b"%PDF-1.4", "application/pdf"), (name, b"x", "application/octet-stream")
    )
    assert rejected(await verdict_for(plugin, raw)) == text


@pytest.mark.parametrize(
    "name", ["report.pdf", "photo.jpg", "notes.txt", "sheet.xlsx", "exe.pdf", "my.exe.notes.txt"]
)
async def test_ordinary_names_pass(plugin: AttachmentsPlugin, name: str) -> None:
    assert await verdict_for(plugin, mail((name, b"just data", "application/octet-stream"))) is None


async def test_rfc2231_encoded_name_is_decoded(plugin: AttachmentsPlugin) -> None:
    # RFC 2231 with a continuation: "Rechnung-März.pdf.exe" split in two parameters.
    raw = raw_mail(
        "--B\n"
        "Content-Type: application/octet-stream\n"
        "Content-Disposition: attachment;\n"
        " filename*0*=utf-8''Rechnung-M%C3%A4rz;\n"
        " filename*1*=.pdf.exe\n"
        "Content-Transfer-Encoding: base64\n\n"
        "eA==\n"
    )
    text = rejected(await verdict_for(plugin, raw))
    # Non-ASCII is shown as "?" in the reply: SMTP replies are ASCII.
    assert text == 'Attachment "Rechnung-M?rz.pdf.exe" is not allowed (double extension)'


async def test_rfc2047_encoded_name_is_decoded(plugin: AttachmentsPlugin) -> None:
    # What some mail clients send, against the RFC: an encoded word inside the parameter.
    encoded = base64.b64encode("Facture été.pdf.scr".encode()).decode()
    raw = raw_mail(
        "--B\n"
        f'Content-Type: application/octet-stream; name="=?utf-8?B?{encoded}?="\n'
        "Content-Transfer-Encoding: base64\n\n"
        "eA==\n"
    )
    assert rejected(await verdict_for(plugin, raw)) == (
        'Attachment "Facture ?t?.pdf.scr" is not allowed (double extension)'
    )


async def test_nested_multipart_and_attached_message(plugin: AttachmentsPlugin) -> None:
    inner = mail(("payload.vbs", b"MsgBox 1", "application/octet-stream"))
    raw = raw_mail(
        "--B\n"
        'Content-Type: multipart/alternative; boundary="C"\n\n'
        "--C\nContent-Type: text/plain\n\nhello\n"
        "--C\nContent-Type: text/html\n\n<p>hello</p>\n"
        "--C--\n"
        "--B\n"
        "Content-Type: message/rfc822\n"
        'Content-Disposition: attachment; filename="forwarded.eml"\n\n'
        + inner.decode().replace("\r\n", "\n")
    )
    assert rejected(await verdict_for(plugin, raw)) == (
        'Attachment "payload.vbs" is not allowed (file type .vbs)'
    )
    # Three levels of multipart, the file at the bottom.
    deep = raw_mail(
        '--B\nContent-Type: multipart/mixed; boundary="C"\n\n'
        '--C\nContent-Type: multipart/related; boundary="D"\n\n'
        "--D\nContent-Type: text/plain\n\nx\n"
        '--D\nContent-Type: application/octet-stream; name="deep.hta"\n\nx\n'
        "--D--\n--C--\n"
    )
    assert rejected(await verdict_for(plugin, deep)) == (
        'Attachment "deep.hta" is not allowed (file type .hta)'
    )


# ----------------------------------------------------------------------------- types, content


async def test_banned_content_type_with_and_without_a_name(plugin: AttachmentsPlugin) -> None:
    named = mail(("tool.bin", b"x", "application/x-msdownload"))
    assert rejected(await verdict_for(plugin, named)) == (
        'Attachment "tool.bin" is not allowed (type application/x-msdownload)'
    )
    unnamed = raw_mail("--B\nContent-Type: application/x-msdos-program\n\nx\n")
    assert rejected(await verdict_for(plugin, unnamed)) == (
        "A part of type application/x-msdos-program is not allowed "
        "(type application/x-msdos-program)"
    )


async def test_executable_content_under_an_innocent_name(tmp_path: Path) -> None:
    assert is_windows_executable(pe_file())
    assert not is_windows_executable(b"MZ is how this text file starts" + bytes(100))
    raw = mail(("report.pdf", pe_file(), "application/pdf"))
    assert rejected(await verdict_for(configure(tmp_path), raw)) == (
        'Attachment "report.pdf" is not allowed (Windows executable)'
    )
    off = configure(tmp_path, executable_content=False)
    assert await verdict_for(off, raw) is None


# ----------------------------------------------------------------------------- zip archives


async def test_banned_name_inside_a_zip(plugin: AttachmentsPlugin) -> None:
    raw = mail(
        ("docs.zip", zipped(**{"a/readme.txt": b"x", "a/invoice.pdf.exe": b"x"}), "application/zip")
    )
    assert rejected(await verdict_for(plugin, raw)) == (
        'Attachment "docs.zip" is not allowed (it contains "invoice.pdf.exe": double extension)'
    )
    clean = mail(
        ("docs.zip", zipped(**{"readme.txt": b"x", "data.csv": b"1,2"}), "application/zip")
    )
    assert await verdict_for(plugin, clean) is None


async def test_zip_inside_a_zip_down_to_archive_depth(tmp_path: Path) -> None:
    outer = zipped(**{"inner.zip": zipped(**{"run.bat": b"@echo off"})})
    raw = mail(("outer.zip", outer, "application/zip"))
    assert rejected(await verdict_for(configure(tmp_path), raw)) == (
        'Attachment "outer.zip" is not allowed (it contains "inner.zip": it contains "run.bat": '
        "file type .bat)"
    )
    assert await verdict_for(configure(tmp_path, archive_depth=1), raw) is None
    assert await verdict_for(configure(tmp_path, archives=False), raw) is None
    # An inner archive larger than archive_max_size is not unpacked (the outer one is read).
    inner = zipped(zipfile.ZIP_STORED, **{"pad.txt": bytes(100_000), "run.bat": b"x"})
    outer = zipped(**{"inner.zip": inner})
    assert len(outer) < 10_000 < len(inner)
    raw = mail(("outer.zip", outer, "application/zip"))
    assert rejected(await verdict_for(configure(tmp_path), raw))
    assert await verdict_for(configure(tmp_path, archive_max_size=10_000), raw) is None


async def test_unreadable_zip_is_not_an_error(plugin: AttachmentsPlugin) -> None:
    broken = b"PK\x03\x04" + b"\xff" * 200
    assert await verdict_for(plugin, mail(("x.zip", broken, "application/zip"))) is None


# ----------------------------------------------------------------------------- settings


async def test_operator_lists_and_patterns(tmp_path: Path) -> None:
    raw_js = mail(("build.js", b"x", "application/octet-stream"))
    raw_double = mail(("notes.txt.js", b"x", "application/octet-stream"))
    # .js allowed: a plain .js passes, but "notes.txt.js" is still a double extension.
    allow_js = configure(tmp_path, extensions=[".exe"])
    assert await verdict_for(allow_js, raw_js) is None
    assert rejected(await verdict_for(allow_js, raw_double)).endswith("(double extension)")
    no_double = configure(tmp_path, extensions=[".exe"], double_extensions=False)
    assert await verdict_for(no_double, raw_double) is None
    extra = configure(tmp_path, extra_extensions=["docm"], name_patterns=[r"^urgent.*\.html?$"])
    assert rejected(await verdict_for(extra, mail(("m.docm", b"x", "application/octet-stream"))))
    assert rejected(await verdict_for(extra, mail(("x.exe", b"x", "application/octet-stream"))))
    html = mail(("URGENT-payment.html", b"<p>", "text/html"))
    assert rejected(await verdict_for(extra, html)) == (
        'Attachment "URGENT-payment.html" is not allowed (banned file name)'
    )
    types = configure(tmp_path, extra_content_types=["application/x-sh"])
    assert rejected(await verdict_for(types, mail(("a.sh", b"x", "application/x-sh"))))


async def test_quarantine_action(tmp_path: Path) -> None:
    verdict = await verdict_for(
        configure(tmp_path, action="quarantine"), mail(("a.pdf.exe", b"x", "application/pdf"))
    )
    assert verdict is not None
    assert verdict.action is Action.QUARANTINE
    assert verdict.reason == 'Attachment "a.pdf.exe" is not allowed (double extension)'


def test_check_config_names_file_and_key(tmp_path: Path) -> None:
    conf = base_config(tmp_path, free_port(), None, 25, plugins={"order": ["attachments"]})
    confdir = write_conf(tmp_path / "conf.d", conf)
    (confdir / "50-attachments.toml").write_text(
        "[plugins.attachments]\n"
        'extensions = [".exe", "", "a b"]\n'
        'content_types = ["application/x-msdownload", "exe"]\n'
        'name_patterns = ["(unclosed", ""]\n'
        "archive_depth = -1\n"
        'action = "drop"\n'
    )
    plugins = Plugins()
    plugins.add("attachments", AttachmentsPlugin())
    _, _, problems = check_configuration(confdir, plugins)
    where = str(confdir / "50-attachments.toml")
    # The type check comes first: an unknown action stops the section.
    assert [(p.file, p.key) for p in problems] == [(where, "plugins.attachments.action")]
    assert "expected one of 'reject', 'quarantine', got 'drop'" in problems[0].message

    (confdir / "50-attachments.toml").write_text(
        (confdir / "50-attachments.toml").read_text().replace('action = "drop"', "")
    )
    _, _, problems = check_configuration(confdir, plugins)
    found = {(p.file, p.key, p.message) for p in problems}
    key = "plugins.attachments"
    assert found == {
        (where, f"{key}.extensions", "item 2: '' is not a file name ending, such as \".exe\""),
        (where, f"{key}.extensions", "item 3: 'a b' is not a file name ending, such as \".exe\""),
        (where, f"{key}.content_types",
         "item 2: 'exe' is not a MIME type such as \"application/x-foo\""),
        (where, f"{key}.name_patterns", "item 1: '(unclosed' is not a regular expression: "
         "missing ), unterminated subpattern at position 0"),
        (where, f"{key}.name_patterns", "item 2: an empty pattern would ban every file name"),
        (where, f"{key}.archive_depth", "must be 0 or more, got -1"),
    }  # fmt: skip


# ----------------------------------------------------------------------------- end to end


async def _send(port: int, data: bytes) -> tuple[int, str]:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        await client.mail(SENDER)
        await client.rcpt("bob@mx.test")
        try:
            reply = await client.data(data)
        except aiosmtplib.SMTPDataError as exc:
            return exc.code, exc.message
        return reply.code, reply.message
    finally:
        await client.quit()


async def test_end_to_end_reject_pass_and_quarantine(
    tmp_path: Path, dns_server: Dns, sinks: Sinks
) -> None:
    sink = sinks.start("127.0.0.2", free_port())
    conf = base_config(
        tmp_path, free_port(), dns_server, sink.port, plugins={"order": ["attachments"]}
    )
    async with running_app(tmp_path, conf, {"attachments": AttachmentsPlugin()}) as app:
        port = port_of(app)
        code, text = await _send(port, mail(("invoice.pdf.exe", b"x", "application/pdf")))
        assert (code, text) == (
            554,
            '5.7.1 Attachment "invoice.pdf.exe" is not allowed (double extension)',
        )
        clean = mail(("invoice.pdf", b"%PDF-1.4", "application/pdf"))
        code, _ = await _send(port, clean)
        assert code == 250
        (got,) = await asyncio.to_thread(sink.wait_for_count, 1)
    # The clean message arrives as sent, below filterhost's own Received field.
    assert got.data.startswith(b"Received: from client.test ([127.0.0.1]) by relay.test")
    assert got.data.endswith(clean)
    assert len(sink.messages()) == 1  # the refused one never left

    conf["plugins"]["attachments"] = {"action": "quarantine"}
    conf["server"]["listen"] = [f"127.0.0.1:{free_port()}"]
    async with running_app(tmp_path, conf, {"attachments": AttachmentsPlugin()}) as app:
        code, text = await _send(
            port_of(app), mail(("a.zip", zipped(**{"x.scr": b"x"}), "application/zip"))
        )
        assert code == 250, text
        (entry,) = list(app.front.quarantine.spool.entries())
        assert list(app.spool.entries()) == []
    assert entry.plugin == "attachments"
    assert entry.reason == 'Attachment "a.zip" is not allowed (it contains "x.scr": file type .scr)'
    assert len(sink.messages()) == 1


async def test_failure_policy_tempfails_when_the_check_cannot_finish(
    tmp_path: Path, dns_server: Dns, sinks: Sinks
) -> None:
    sink = sinks.start("127.0.0.2", free_port())
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        sink.port,
        # A 1 ms budget: a 400 KB message is parsed in a worker thread, which takes longer.
        plugins={"order": ["attachments"], "attachments": {"timeout": "1ms"}},
    )
    big = mail(("data.bin", bytes(range(256)) * 1_200, "application/octet-stream"))
    async with running_app(tmp_path, conf, {"attachments": AttachmentsPlugin()}) as app:
        code, text = await _send(port_of(app), big)
        assert list(app.spool.entries()) == []
    assert (code, text) == (451, "4.3.0 Temporary failure, please try again later")
    assert sink.messages() == []
