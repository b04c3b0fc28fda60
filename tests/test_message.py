"""filterhost.message.Message: bytes preserved, header edits touch only their own lines.

The corpus (tests/corpus/*.eml, CRLF line endings, kept by ``-text`` in .gitattributes) holds
real-world-shaped messages. The oracle below splits a message into header fields and "the rest"
independently of filterhost, so every edit can be checked against the original bytes.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from filterhost.message import HeaderEdit, Message, _fold

CORPUS = Path(__file__).resolve().parent / "corpus"
CORPUS_FILES = sorted(CORPUS.glob("*.eml"))
IDS = [p.stem for p in CORPUS_FILES]


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def split_message(raw: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its continuation lines and CRLF) and everything after them.

    "Everything after" starts with the empty line that ends the header block (if any).
    """
    if raw.startswith(b"\r\n"):
        return [], raw
    end = raw.find(b"\r\n\r\n")
    head, rest = (raw, b"") if end < 0 else (raw[: end + 2], raw[end + 2 :])
    fields: list[bytes] = []
    for line in head.split(b"\r\n")[:-1]:
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    assert b"".join(fields) == head
    return fields, rest


def name_of(field: bytes) -> str:
    return field.partition(b":")[0].decode("ascii").strip()


# -- the corpus itself ---------------------------------------------------------------------------


def test_corpus_is_there_and_uses_crlf_only() -> None:
    assert len(CORPUS_FILES) >= 8
    attributes = (CORPUS / ".gitattributes").read_text()
    assert "*.eml -text" in attributes.split("\n")
    for path in CORPUS_FILES:
        raw = path.read_bytes()
        # No bare LF or bare CR: git (or an editor) converting line endings shows up here.
        assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r"), path.name
        assert raw.endswith(b"\r\n"), path.name


def test_corpus_has_the_shapes_the_tests_rely_on() -> None:
    long_lines = [line for line in corpus("07-long-headers.eml").split(b"\r\n") if len(line) >= 900]
    assert len(long_lines) == 2
    assert b"\r\n\r\n" not in corpus("08-header-only.eml")
    assert corpus("05-no-body.eml").endswith(b">\r\n\r\n")
    assert split_message(corpus("06-dot-body.eml"))[1].startswith(b"\r\n.\r\n..hidden")
    assert b"X-Mailer: PartnerMail 4.2   \r\n" in corpus("03-folded-headers.eml")


# -- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CORPUS_FILES, ids=IDS)
def test_parse_and_serialise_is_byte_identical(path: Path) -> None:
    raw = path.read_bytes()
    message = Message(raw)
    assert message.as_bytes() == raw
    assert message.size == len(raw)
    assert message.edits == []
    # Reading headers and parsing MIME changes nothing either.
    list(message.header_items())
    message.get("Subject")
    message.parsed()
    assert message.as_bytes() == raw


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\nbody only, no header section\r\n",
        b"Subject: x\r\n\r\n",
        b"Subject: x\r\n\r\n\r\n\r\nbody after empty lines\r\n",
        b"Subject: x\r\n",
        b" folded-first-line: odd\r\nSubject: y\r\n\r\nb\r\n",
    ],
    ids=["empty", "no-header", "empty-body", "blank-lines-body", "header-only", "odd-start"],
)
def test_edge_shapes_round_trip(raw: bytes) -> None:
    assert Message(raw).as_bytes() == raw


def test_body_is_exactly_what_follows_the_empty_line() -> None:
    raw = corpus("06-dot-body.eml")
    assert Message(raw).body == b".\r\n..hidden-file\r\n.profile changed\r\nbuild OK\r\n.\r\n"
    assert Message(corpus("05-no-body.eml")).body == b""
    assert Message(corpus("08-header-only.eml")).body == b""


# -- edits touch only their own lines ------------------------------------------------------------

ADDED = b"X-Filterhost-Test: yes\r\n"


@pytest.mark.parametrize("path", CORPUS_FILES, ids=IDS)
def test_add_header_at_top_changes_only_that_line(path: Path) -> None:
    raw = path.read_bytes()
    fields, rest = split_message(raw)
    message = Message(raw)
    message.add_header("X-Filterhost-Test", "yes")
    out = message.as_bytes()
    new_fields, new_rest = split_message(out)
    assert new_rest == rest  # everything after the header block, byte for byte
    assert new_fields == [ADDED, *fields]
    assert out == ADDED + raw


@pytest.mark.parametrize("path", CORPUS_FILES, ids=IDS)
def test_add_header_at_bottom_changes_only_that_line(path: Path) -> None:
    raw = path.read_bytes()
    fields, rest = split_message(raw)
    message = Message(raw)
    message.add_header("X-Filterhost-Test", "yes", top=False)
    out = message.as_bytes()
    new_fields, new_rest = split_message(out)
    assert new_rest == rest
    assert new_fields == [*fields, ADDED]
    assert out == b"".join(fields) + ADDED + rest


@pytest.mark.parametrize("path", CORPUS_FILES, ids=IDS)
def test_remove_header_removes_only_those_fields(path: Path) -> None:
    raw = path.read_bytes()
    fields, rest = split_message(raw)
    # The last field: the one next to the body, where an off-by-one would eat the empty line.
    name = name_of(fields[-1])
    expected = [f for f in fields if name_of(f).lower() != name.lower()]
    message = Message(raw)
    assert message.remove_header(name.upper()) == len(fields) - len(expected)
    out = message.as_bytes()
    new_fields, new_rest = split_message(out)
    assert new_rest == rest
    assert new_fields == expected
    assert out == b"".join(expected) + rest


@pytest.mark.parametrize("path", CORPUS_FILES, ids=IDS)
def test_replace_header_changes_only_that_field(path: Path) -> None:
    raw = path.read_bytes()
    fields, rest = split_message(raw)
    name = name_of(fields[len(fields) // 2])
    replacement = f"{name}: replaced by filterhost\r\n".encode()
    expected: list[bytes] = []
    for f in fields:
        if name_of(f).lower() == name.lower():
            if replacement not in expected:
                expected.append(replacement)
            continue
        expected.append(f)
    message = Message(raw)
    message.replace_header(name, "replaced by filterhost")
    out = message.as_bytes()
    new_fields, new_rest = split_message(out)
    assert new_rest == rest
    assert new_fields == expected
    assert message.get(name) == "replaced by filterhost"


def test_remove_both_received_fields_keeps_every_other_byte() -> None:
    raw = corpus("01-multipart-attachment.eml")
    fields, rest = split_message(raw)
    received = [f for f in fields if name_of(f) == "Received"]
    assert len(received) == 2
    assert all(b"\r\n\t" in f for f in received)  # folded: continuation lines go too
    message = Message(raw)
    assert message.remove_header("received") == 2
    expected = raw
    for f in received:
        expected = expected.replace(f, b"", 1)
    assert message.as_bytes() == expected
    assert message.get_all("Received") == []
    assert message.body == rest[2:]


def test_replace_folded_field_in_place_keeps_neighbours() -> None:
    raw = corpus("03-folded-headers.eml")
    message = Message(raw)
    message.replace_header("subject", "Maintenance moved to Sunday")
    out = message.as_bytes()
    old_subject = (
        b"Subject: Scheduled maintenance of the\r\n\tVPN concentrator\r\n  on Saturday\r\n"
    )
    assert old_subject in raw
    assert out == raw.replace(old_subject, b"subject: Maintenance moved to Sunday\r\n")


def test_replace_absent_header_adds_it_at_the_top() -> None:
    raw = corpus("06-dot-body.eml")
    message = Message(raw)
    message.replace_header("X-Virus-Scanned", "ClamAV at relay.test")
    assert message.as_bytes() == b"X-Virus-Scanned: ClamAV at relay.test\r\n" + raw


def test_remove_absent_header_changes_nothing_and_records_nothing() -> None:
    raw = corpus("02-utf8-8bit-body.eml")
    message = Message(raw)
    assert message.remove_header("X-Not-There") == 0
    assert message.as_bytes() == raw
    assert message.edits == []


def test_size_follows_edits() -> None:
    message = Message(corpus("01-multipart-attachment.eml"))
    message.add_header("X-A", "1")
    message.remove_header("DKIM-Signature")
    assert message.size == len(message.as_bytes())


# -- reading headers -----------------------------------------------------------------------------


def test_get_is_case_insensitive_and_returns_the_first() -> None:
    message = Message(corpus("01-multipart-attachment.eml"))
    assert message.get("SUBJECT") == message.get("subject") == "Invoice 2026-11 for order 48151"
    assert message.get("received", "").startswith("from mail.supplier.example ")
    assert message.get("X-Absent") is None
    assert message.get("X-Absent", "fallback") == "fallback"
    assert "message-id" in message
    assert "X-Absent" not in message
    assert message.count("RECEIVED") == 2
    # A lower-case field name in the message is found by any spelling.
    assert Message(corpus("08-header-only.eml")).get("Subject") == "ping"


def test_get_all_returns_every_field_top_to_bottom_unfolded() -> None:
    message = Message(corpus("01-multipart-attachment.eml"))
    received = message.get_all("Received")
    assert received == [
        "from mail.supplier.example (mail.supplier.example [203.0.113.25])"
        "\tby mx.corp.example (Postfix) with ESMTPS id 4ZxK2L1d0pz9sWq"
        "\tfor <ap@corp.example>; Mon, 24 Nov 2026 09:14:03 +0100 (CET)",
        "from billing01.internal.supplier.example (billing01 [10.20.0.14])"
        "\tby mail.supplier.example (Postfix) with ESMTP id 7F2A11C0042"
        "\tfor <ap@corp.example>; Mon, 24 Nov 2026 08:14:01 +0000 (UTC)",
    ]
    assert message.get_all("rEcEiVeD") == received


def test_values_are_unfolded_per_rfc5322() -> None:
    message = Message(corpus("03-folded-headers.eml"))
    # Unfolding removes each CRLF and keeps the white space after it (RFC 5322 2.2.3).
    assert message.get("Subject") == "Scheduled maintenance of the\tVPN concentrator  on Saturday"
    assert message.get("To") == "it@corp.example, helpdesk@corp.example,\tops@corp.example"
    for _, value in message.header_items():
        assert "\r" not in value
        assert "\n" not in value


def test_trailing_white_space_is_not_part_of_the_value() -> None:
    message = Message(corpus("03-folded-headers.eml"))
    assert message.get("X-Mailer") == "PartnerMail 4.2"
    assert message.get("X-Ticket") == "PS-2026-11-0042"


def test_rfc2047_words_are_decoded() -> None:
    message = Message(corpus("04-rfc2047-subject.eml"))
    # Two encoded words in two charsets, folded: the white space between them is dropped.
    assert message.get("Subject") == "Grüße aus Köln à bientôt"
    assert message.get("From") == "Renée Dupré <renee@partner.example>"
    assert Message(corpus("02-utf8-8bit-body.eml")).get("from") == (
        "Jürgen Müller <juergen.mueller@corp.example>"
    )


def test_raw_utf8_header_values_are_decoded() -> None:
    # RFC 6532: SMTPUTF8 mail carries UTF-8 in header values as is.
    message = Message("Subject: Grüße aus Köln\r\nTo: x@example.net\r\n\r\nb\r\n".encode())
    assert message.get("subject") == "Grüße aus Köln"


@pytest.mark.parametrize(
    "value",
    ["=?utf-8?b?A?=", "=?utf-8?b?QUJD?", "=?x-unknown-charset?q?abc?=", "=?utf-8?q?=FF?="],
)
def test_malformed_encoded_words_come_back_undecoded(value: str) -> None:
    # Header values come from anyone on the Internet: reading one must never raise.
    message = Message(f"Subject: {value}\r\nFrom: a@example.net\r\n\r\nbody\r\n".encode())
    assert message.get("Subject") == value


def test_header_items_lists_every_field_in_order() -> None:
    message = Message(corpus("05-no-body.eml"))
    assert [name for name, _ in message.header_items()] == [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
    ]


# -- adding values -------------------------------------------------------------------------------


def test_non_ascii_values_are_encoded_per_rfc2047() -> None:
    raw = corpus("05-no-body.eml")
    message = Message(raw)
    value = "Prüfung bestanden ✓, Grüße aus Köln"
    message.add_header("X-Note", value)
    out = message.as_bytes()
    assert out.endswith(raw)
    added = out[: len(out) - len(raw)]
    assert added.isascii()
    assert added.startswith(b"X-Note: =?utf-8?")
    assert all(len(line) <= 78 for line in added.split(b"\r\n"))
    assert message.get("x-note") == value
    assert message.parsed()["X-Note"] == value


def test_long_ascii_values_are_folded_below_the_line_limit() -> None:
    # RFC 5322 2.1.1: lines must be at most 998 characters; an SMTP hop may refuse longer ones.
    message = Message(corpus("05-no-body.eml"))
    value = " ".join(f"token{i:04d}" for i in range(200))
    message.add_header("X-Long", value)
    assert all(len(line) <= 998 for line in message.as_bytes().split(b"\r\n"))
    assert message.get("X-Long") == value


def _greedy_fold(line: str) -> list[str]:
    """The folding rule, word by word: a line takes words while it stays within 78."""
    out: list[str] = []
    current = ""
    for word in re.split(r"(?=[ \t])", line):
        if current and len(current) + len(word) > 78:
            out.append(current)
            current = word
        else:
            current += word
    return [*out, current]


def test_folding_cuts_where_the_word_by_word_rule_does() -> None:
    # Random values of every shape: short words, runs of blanks, tabs, words longer than a
    # line, a leading blank. The fold must cut exactly where filling lines word by word does.
    rnd = random.Random(5322)
    for _ in range(3000):
        blank = rnd.choice([0.002, 0.02, 0.1, 0.4])
        value = "".join(
            rnd.choice(" \t") if rnd.random() < blank else rnd.choice("abc<>@.;")
            for _ in range(rnd.randint(0, 900))
        )
        line = f"X-Test: {value}"
        assert _fold(line).split("\r\n") == _greedy_fold(line), line


@pytest.mark.parametrize(
    "value",
    ["ok\r\nBcc: victim@example.net", "ok\nBcc: victim@example.net", "ok\rx", "ok\r\n", "a\0b"],
    ids=["crlf", "lf", "cr", "trailing-crlf", "nul"],
)
def test_values_with_line_breaks_are_refused(value: str) -> None:
    raw = corpus("03-folded-headers.eml")
    message = Message(raw)
    with pytest.raises(ValueError):
        message.add_header("X-Test", value)
    with pytest.raises(ValueError):
        message.add_header("X-Test", value, top=False)
    with pytest.raises(ValueError):
        message.replace_header("Subject", value)
    assert message.as_bytes() == raw
    assert message.edits == []


@pytest.mark.parametrize("name", ["X-Bad:Name", "X Bad", "X-Bad\r\n", "", "X-Tab\t"])
def test_invalid_header_names_are_refused(name: str) -> None:
    raw = corpus("05-no-body.eml")
    message = Message(raw)
    with pytest.raises(ValueError):
        message.add_header(name, "value")
    assert message.as_bytes() == raw


# -- the edit record and the MIME view ----------------------------------------------------------


def test_edits_are_recorded_in_order() -> None:
    message = Message(corpus("01-multipart-attachment.eml"))
    message.add_header("X-Virus-Scanned", "ClamAV at relay.test")
    message.remove_header("DKIM-Signature")
    message.replace_header("Subject", "[EXTERNAL] Invoice")
    message.add_header("X-Footer", "1", top=False)
    assert message.edits == [
        HeaderEdit("add", "X-Virus-Scanned", "ClamAV at relay.test"),
        HeaderEdit("remove", "DKIM-Signature", ""),
        HeaderEdit("replace", "Subject", "[EXTERNAL] Invoice"),
        HeaderEdit("add", "X-Footer", "1"),
    ]


def test_parsed_gives_the_mime_parts() -> None:
    message = Message(corpus("01-multipart-attachment.eml"))
    parsed = message.parsed()
    types = [part.get_content_type() for part in parsed.walk()]
    assert types == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/pdf",
    ]
    filenames = [part.get_filename() for part in parsed.walk() if part.get_filename()]
    assert filenames == ["invoice-2026-11.pdf"]
    attachment = next(p for p in parsed.walk() if p.get_filename())
    assert attachment.get_payload(decode=True).startswith(b"%PDF-1.4\n")
    assert parsed["Subject"] == "Invoice 2026-11 for order 48151"
    assert message.parsed() is parsed  # parsed once


def test_parsed_decodes_the_8bit_body() -> None:
    parsed = Message(corpus("02-utf8-8bit-body.eml")).parsed()
    assert "東京オフィス" in parsed.get_content()


def test_parsed_is_refreshed_after_an_edit() -> None:
    message = Message(corpus("09-dsn-report.eml"))
    before = message.parsed()
    assert before["X-Virus-Scanned"] is None
    assert before.get_content_type() == "multipart/report"
    message.add_header("X-Virus-Scanned", "ClamAV at relay.test")
    after = message.parsed()
    assert after is not before
    assert after["X-Virus-Scanned"] == "ClamAV at relay.test"
    message.remove_header("Subject")
    assert message.parsed()["Subject"] is None
    message.replace_header("Auto-Submitted", "auto-generated")
    assert message.parsed()["Auto-Submitted"] == "auto-generated"
    parts = [p.get_content_type() for p in message.parsed().walk()]
    assert parts[:3] == ["multipart/report", "text/plain", "message/delivery-status"]
    assert parts[-1] == "text/rfc822-headers"


@pytest.mark.parametrize(
    "raw",
    [b"A: b\r\n\r\nbody\r\n", b"\r\nonly a body\r\n", b"A: b\r\n", b"A: b\r\n\r\n", b""],
)
def test_body_size_and_bytes_agree_whatever_the_shape(raw: bytes) -> None:
    message = Message(raw)
    assert message.body_size == len(message.body)
    assert message.as_bytes() == raw
    message.add_header("X-New", "1")
    assert message.as_bytes().endswith(message.body)
    assert message.size == len(message.as_bytes())
