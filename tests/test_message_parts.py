"""The read-only MIME view of a message: text, parts, attachments, and that reading costs no bytes.

Uses the corpus (tests/corpus/*.eml, CRLF) and a few hostile shapes built here. Reading a
message's body and parts must never change what is relayed, and never raise on bad MIME.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import random
from pathlib import Path

import pytest

from filterhost import Message, Part
from filterhost.testing import make_message

CORPUS = Path(__file__).resolve().parent / "corpus"
CORPUS_FILES = sorted(CORPUS.glob("*.eml"))
IDS = [p.stem for p in CORPUS_FILES]


def corpus(name: str) -> Message:
    return Message((CORPUS / name).read_bytes())


@pytest.mark.parametrize("path", CORPUS_FILES, ids=IDS)
def test_reading_the_body_and_parts_changes_no_byte(path: Path) -> None:
    raw = path.read_bytes()
    message = Message(raw)
    message.text()
    message.text("html")
    for part in message.parts():
        part.content()
        part.text()
        _ = (part.filename, part.content_type, part.disposition, part.charset)
    message.has_attachment(suffix=".exe")
    assert message.as_bytes() == raw
    # An edit after the parse still touches only its own line.
    message.add_header("X-Checked", "yes")
    assert message.as_bytes() == b"X-Checked: yes\r\n" + raw
    assert message.edits[-1].name == "X-Checked"


def test_headers_alone_never_parse_the_body() -> None:
    message = corpus("01-multipart-attachment.eml")
    message.get("Subject")
    list(message.header_items())
    message.add_header("X-A", "1")
    message.remove_header("X-A")
    assert message._parsed is None  # the MIME parse waits until a plugin asks for it


def test_parts_of_a_multipart_message() -> None:
    message = corpus("01-multipart-attachment.eml")
    parts = message.parts()
    assert [p.content_type for p in parts] == ["text/plain", "text/html", "application/pdf"]
    assert all(isinstance(p, Part) for p in parts)
    (pdf,) = message.attachments()
    assert pdf.filename == "invoice-2026-11.pdf"
    assert pdf.disposition == "attachment"
    assert pdf.content().startswith(b"%PDF-1.4\n")  # base64 undone
    assert message.text() == (
        "Dear customer,\n\nplease find attached invoice 2026-11 (EUR 1\u202f250,00).\n\n"
        "Kind regards,\nSupplier Billing"
    )
    assert message.text("html").startswith("<html><body><p>Dear customer,</p>")
    assert message.has_attachment()
    assert message.has_attachment(suffix=".PDF")
    assert message.has_attachment(content_type="application/pdf")
    assert not message.has_attachment(suffix=(".exe", ".zip"))


def test_a_single_part_message_is_one_part() -> None:
    message = corpus("02-utf8-8bit-body.eml")
    (part,) = message.parts()
    assert part.content_type == "text/plain"
    assert part.charset == "utf-8"
    assert "東京オフィス" in message.text()
    assert "\r" not in message.text()
    assert message.attachments() == []
    assert not message.has_attachment()
    assert Message(b"Subject: no body\r\n").text() == ""


def test_a_dsn_report_has_its_parts_and_no_attachments() -> None:
    message = corpus("09-dsn-report.eml")
    assert [p.content_type for p in message.parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message.attachments() == []
    assert message.text().startswith("Your message could not be delivered")


def test_a_forwarded_message_its_encoded_names_and_its_hidden_executable() -> None:
    message = corpus("10-nested-forward.eml")
    assert [(p.content_type, p.nested) for p in message.parts()] == [
        ("text/plain", False),
        ("message/rfc822", False),
        ("text/html", True),
        ("application/vnd.ms-excel", True),
        ("application/octet-stream", True),
        ("image/png", False),
    ]
    names = [a.filename for a in message.attachments()]
    # RFC 2231 continuations with a charset, RFC 2047 in a quoted parameter, and a
    # right-to-left override that makes "setup\u202efdp.exe" display as "setupexe.pdf".
    assert names == ["original offer.eml", "Preisübersicht 2027.xls", "setup\u202efdp.exe"]
    assert message.has_attachment(suffix=".exe")
    assert not message.has_attachment(suffix=".pdf")
    assert message.has_attachment(content_type=["application/vnd.ms-excel", "x/y"])
    # An inline image without a file name is not an attachment.
    assert not message.has_attachment(content_type="image/png")
    # The message's own text is latin-1 8-bit; the forwarded message's HTML is not its text.
    assert message.text() == "Bonjour, voici l'offre transmise. François\n"
    assert message.text("html") == ""
    forwarded = message.parts()[1]
    assert forwarded.content().startswith(b"From: Supplier <offers@supplier.example>")


@pytest.mark.parametrize(
    "name",
    ["setup.exe", "SETUP.EXE", "setup.exe.", "setup.exe  ", "setup.exe . .", "a.b.Exe"],
)
def test_suffixes_match_the_way_windows_opens_files(name: str) -> None:
    message = make_message(attachments=[(name, b"MZ", "application/octet-stream")])
    assert message.has_attachment(suffix=".exe")
    assert message.has_attachment(suffix=[".zip", ".EXE"])


def test_suffix_is_not_a_substring_match() -> None:
    message = make_message(attachments=[("setup.exe.txt", b"x"), ("exe", b"x")])
    assert not message.has_attachment(suffix=".exe")


def test_parts_follow_header_edits() -> None:
    message = Message(b"Content-Type: text/plain; charset=utf-8\r\n\r\n<b>hi</b>\r\n")
    assert message.text() == "<b>hi</b>\n"
    assert message.text("html") == ""
    message.replace_header("Content-Type", "text/html; charset=utf-8")
    assert message.text("html") == "<b>hi</b>\n"
    assert message.text() == ""


@pytest.mark.parametrize(
    "raw",
    [
        # Broken base64, an unknown charset, a missing closing boundary, a nonsense type.
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/plain; charset=x-no-such-charset\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n--b\r\n"
        b"Content-Type: application/x; name*=bogus''%ZZ\r\n\r\nx\r\n",
        b"Content-Type: ///;;;===\r\n\r\nbody\r\n",
        b"Content-Type: multipart/mixed\r\n\r\nno boundary at all\r\n",
        b"Content-Type: message/rfc822\r\n\r\nnot really a message\r\n",
        b'Content-Disposition: attachment; filename="=?utf-8?b?!!?="\r\n\r\nx\r\n',
    ],
    ids=["broken-parts", "nonsense-type", "no-boundary", "bad-rfc822", "bad-encoded-word"],
)
def test_malformed_mime_never_raises(raw: bytes) -> None:
    message = Message(raw)
    message.text()
    for part in message.parts():
        _ = (part.content_type, part.filename, part.disposition, part.charset)
        part.content()
        part.text()
    message.has_attachment(suffix=".exe", content_type="application/x")
    assert message.as_bytes() == raw


def test_a_name_only_in_content_type_is_the_file_name() -> None:
    # Older clients put the name in Content-Type and send no Content-Disposition at all.
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
        b'Content-Type: application/octet-stream; name="only-in-type.EXE"\r\n\r\nMZ\r\n--b--\r\n'
    )
    message = Message(raw)
    (attachment,) = message.attachments()
    assert attachment.filename == "only-in-type.EXE"
    assert attachment.disposition is None
    assert message.has_attachment(suffix=".exe")


def test_a_single_part_message_reads_the_same_without_the_full_parse() -> None:
    """Message.parsed() takes the body as the payload when the message is not multipart;
    every Part property must be what the full parse of the same bytes gives."""
    rng = random.Random(21)
    types = [
        b"",
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Type: text/html; charset=iso-8859-1\r\n",
        b'Content-Type: application/pdf; name="a.pdf"\r\n',
        b"Content-Type: image/png; name*=utf-8''%E2%82%AC.png\r\n",
        b"Content-Type: application/octet-stream\r\n",
        b"Content-Type: bogus\r\n",
    ]
    encodings = [
        b"",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"Content-Transfer-Encoding: 8bit\r\n",
        b"Content-Transfer-Encoding: x-unknown\r\n",
    ]
    dispositions = [
        b"",
        b'Content-Disposition: attachment; filename="setup.exe"\r\n',
        b"Content-Disposition: inline\r\n",
        b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.doc\r\n",
    ]
    bodies = [
        b"",
        b"plain text\r\nsecond line\r\n",
        base64.encodebytes(b"\x00\x01binary\xff" * 20).replace(b"\n", b"\r\n"),
        b"caf=C3=A9 =\r\nsoft break\r\n",
        "naïve € text\r\n".encode(),
        b"\xff\xfe raw high bytes\r\n\r\n.dot line\r\n",
        b"bare\nline ends\r\nmixed\r",
    ]
    for _ in range(600):
        head = (
            b"From: a@example.test\r\nSubject: s\r\n"
            + rng.choice(types)
            + rng.choice(encodings)
            + rng.choice(dispositions)
        )
        raw = head + b"\r\n" + rng.choice(bodies)
        message = Message(raw)
        full = Part(email.parser.BytesParser(policy=email.policy.default).parsebytes(raw))
        (part,) = message.parts()
        for name in ("content_type", "filename", "disposition", "charset", "is_attachment"):
            assert getattr(part, name) == getattr(full, name), (name, raw)
        assert part.content() == full.content(), raw
        assert part.text() == full.text(), raw
