"""filterhost.relay.dsn: RFC 3464 delivery status notifications, checked with the stdlib parser.

Every DSN built here is parsed back with ``email.message_from_bytes(..., policy=default)`` and
with filterhost's own :class:`Message`; the original's bytes are looked for verbatim in the DSN.
"""

from __future__ import annotations

import email
import email.policy
import re
import secrets
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.message import Message as StdMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, cast

import pytest

from filterhost.message import Message
from filterhost.relay.dsn import (
    RecipientReport,
    build_dsn,
    should_notify,
    status_from_reply,
    xtext_decode,
    xtext_encode,
)
from filterhost.spool import RecipientState, SpoolEntry
from filterhost.verdict import Reply

CORPUS = Path(__file__).resolve().parent / "corpus"
MTA = "relay.corp.example"
ARRIVAL = datetime(2026, 11, 29, 8, 0, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 29, 9, 40, 0, tzinfo=UTC)

ORIGINAL = (
    b"Received: from ws1.corp.example ([10.0.0.5]) by relay.corp.example (filterhost)"
    b" with ESMTP id 0001; Sat, 29 Nov 2026 09:00:00 +0100\r\n"
    b"From: Alice <alice@corp.example>\r\n"
    b"To: bob@example.org, carol@example.net\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Message-ID: <q3@corp.example>\r\n"
    b"Date: Sat, 29 Nov 2026 09:00:00 +0100\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"the figures are in. BODY-MARKER\r\n"
)
HEADERS = ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2]


# -- helpers -------------------------------------------------------------------------------------


def entry(
    *,
    mail_from: str = "alice@corp.example",
    mail_options: list[str] | None = None,
    recipients: list[RecipientState] | None = None,
) -> SpoolEntry:
    return SpoolEntry(
        id="0001ABCDEF",
        mail_from=mail_from,
        recipients=recipients or [RecipientState("bob@example.org")],
        received=ARRIVAL.timestamp(),
        size=len(ORIGINAL),
        client_ip="10.0.0.5",
        helo="ws1.corp.example",
        mail_options=mail_options or [],
    )


def failed(
    address: str = "bob@example.org", reply: str = "550 5.1.1 <bob@example.org>: no such user"
) -> RecipientReport:
    return RecipientReport(
        recipient=address,
        action="failed",
        status=status_from_reply(reply, "failed"),
        remote_mta="mx1.example.org",
        diagnostic=reply,
        last_attempt=NOW - timedelta(seconds=5),
    )


def delayed(address: str = "carol@example.net") -> RecipientReport:
    return RecipientReport(
        recipient=address,
        action="delayed",
        status="4.2.2",
        remote_mta="mx.example.net",
        diagnostic="452 4.2.2 mailbox full",
        last_attempt=NOW - timedelta(minutes=1),
        will_retry_until=ARRIVAL + timedelta(days=5),
    )


def build(
    reports: list[RecipientReport] | None = None,
    *,
    original: bytes = ORIGINAL,
    **kw: Any,
) -> bytes:
    opts = {k: kw.pop(k) for k in ("mail_from", "mail_options") if k in kw}
    return build_dsn(
        entry=kw.pop("entry", None) or entry(**opts),
        original=original,
        reports=reports or [failed()],
        reporting_mta=MTA,
        arrival=kw.pop("arrival", ARRIVAL),
        now=NOW,
        **kw,
    )


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(raw: bytes) -> list[EmailMessage]:
    msg = parse(raw)
    assert msg.is_multipart()
    payload = msg.get_payload()
    assert isinstance(payload, list)
    assert all(isinstance(p, EmailMessage) for p in payload)
    return cast("list[EmailMessage]", payload)


def inner_message(part: EmailMessage) -> EmailMessage:
    """The message inside a message/rfc822 part."""
    (inner,) = cast("list[EmailMessage]", part.get_payload())
    assert isinstance(inner, EmailMessage)
    return inner


def status_groups(raw: bytes) -> list[StdMessage]:
    """The delivery-status part's field groups: per-message first, then one per recipient."""
    (part,) = [p for p in parts(raw) if p.get_content_type() == "message/delivery-status"]
    groups = part.get_payload()
    assert isinstance(groups, list)
    return cast("list[StdMessage]", groups)


def text_of(raw: bytes) -> str:
    first = parts(raw)[0]
    assert first.get_content_type() == "text/plain"
    content = first.get_content()
    assert isinstance(content, str)
    return content


def assert_wire_clean(raw: bytes) -> None:
    """CRLF line endings only, no NUL, no line over 998 octets (RFC 5322 2.1.1, 2.3)."""
    assert raw.endswith(b"\r\n")
    assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")
    assert b"\0" not in raw
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def assert_no_defects(raw: bytes) -> None:
    for part in parse(raw).walk():
        assert not part.defects, (part.get_content_type(), part.defects)


# -- structure -----------------------------------------------------------------------------------


def test_multipart_report_structure_and_headers() -> None:
    raw = build()
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(raw)] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["To"].addresses[0].addr_spec == "alice@corp.example"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(msg["Date"]) == NOW
    assert re.fullmatch(rf"<[^@<>\s]+@{re.escape(MTA)}>", msg["Message-ID"])
    assert msg["Content-Transfer-Encoding"] is None  # 7-bit: an ASCII original, ASCII report
    assert raw.isascii()
    assert_no_defects(raw)
    assert_wire_clean(raw)


def test_message_ids_are_unique() -> None:
    assert parse(build())["Message-ID"] != parse(build())["Message-ID"]


def test_delivery_status_fields_per_message_and_per_recipient() -> None:
    rcpt = RecipientState(
        "bob@example.org", options=["NOTIFY=FAILURE", "ORCPT=rfc822;bob+2Bsales@example.org"]
    )
    report = RecipientReport.from_state(
        rcpt,
        "failed",
        reply=Reply(550, "5.1.1", "<bob@example.org>: no such user"),
        remote_mta="mx1.example.org",
        last_attempt=NOW.timestamp() - 5,
    )
    raw = build(
        [report],
        entry=entry(mail_options=["RET=FULL", "ENVID=QQ314159+2Bx"], recipients=[rcpt]),
    )
    per_message, per_rcpt = status_groups(raw)
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert per_message["Original-Envelope-Id"] == "QQ314159+x"  # xtext-decoded (RFC 3461 4)
    assert parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL
    assert per_message["Received-From-MTA"] == "dns; ws1.corp.example"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.org"
    assert per_rcpt["Original-Recipient"] == "rfc822; bob+sales@example.org"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx1.example.org"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.org>: no such user"
    assert parsedate_to_datetime(per_rcpt["Last-Attempt-Date"]) == NOW - timedelta(seconds=5)
    assert per_rcpt["Will-Retry-Until"] is None  # only for delayed (RFC 3464 2.3.9)


def test_without_envid_orcpt_or_remote_mta_those_fields_are_absent() -> None:
    report = RecipientReport(
        "bob@example.org", "failed", "5.1.2", diagnostic="Host or domain name not found"
    )
    per_message, per_rcpt = status_groups(build([report]))
    assert per_message["Original-Envelope-Id"] is None
    assert per_rcpt["Original-Recipient"] is None
    assert per_rcpt["Remote-MTA"] is None
    assert per_rcpt["Last-Attempt-Date"] is None
    # A local reason is not an SMTP reply, so it does not claim to be one.
    assert per_rcpt["Diagnostic-Code"] == "X-Filterhost; Host or domain name not found"


def test_text_part_explains_per_recipient() -> None:
    text = text_of(build([failed(), delayed()]))
    assert MTA in text
    assert "<bob@example.org>: could not be delivered" in text
    assert "mx1.example.org said: 550 5.1.1 <bob@example.org>: no such user" in text
    assert "<carol@example.net>: delayed" in text
    assert "452 4.2.2 mailbox full" in text
    assert "will retry until" in text
    assert "0001ABCDEF" in text  # the queue id, for the postmaster


# -- what of the original is returned ------------------------------------------------------------


@pytest.mark.parametrize("options", [["RET=FULL"], [], ["ret=full"]])
def test_full_original_is_included_byte_for_byte(options: list[str]) -> None:
    raw = build(mail_options=options)
    assert ORIGINAL in raw
    third = parts(raw)[2]
    assert third.get_content_type() == "message/rfc822"
    inner = inner_message(third)
    assert inner["Subject"] == "Quarterly figures"
    assert "BODY-MARKER" in inner.get_content()
    # The original sits between its part header and the closing delimiter, nothing added.
    assert re.search(
        rb"Content-Description: Undelivered Message\r\n\r\n"
        + re.escape(ORIGINAL)
        + rb"\r\n--=_filterhost_dsn_[0-9a-f]+--\r\n$",
        raw,
    )


@pytest.mark.parametrize("options", [["RET=HDRS"], ["RET=hdrs"]])
def test_ret_hdrs_gives_headers_only(options: list[str]) -> None:
    raw = build(mail_options=options)
    third = parts(raw)[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert HEADERS in raw
    assert b"BODY-MARKER" not in raw
    content = third.get_content()
    assert "Subject: Quarterly figures" in content
    assert "attached" in text_of(raw)


def test_original_over_max_original_gets_headers_only_and_says_so() -> None:
    big = HEADERS + b"\r\n" + b"BODY-MARKER\r\n" * 100
    raw = build(original=big, max_original=len(big) - 1)
    assert parts(raw)[2].get_content_type() == "text/rfc822-headers"
    assert HEADERS in raw
    assert b"BODY-MARKER" not in raw
    text = " ".join(text_of(raw).split())
    assert f"Your message was {len(big):,} bytes" in text
    assert "only its headers are attached" in text
    # At the limit exactly, it is returned in full.
    assert big in build(original=big, max_original=len(big))


def test_a_report_without_failure_returns_headers_only() -> None:
    # RFC 3461 4.3: a DSN with no failure in it SHOULD return only the headers.
    raw = build([delayed()], mail_options=["RET=FULL"])
    assert parse(raw)["Subject"] == "Delayed Mail (still being retried)"
    assert parts(raw)[2].get_content_type() == "text/rfc822-headers"
    assert b"BODY-MARKER" not in raw


def test_original_with_bare_lf_is_not_copied_verbatim() -> None:
    # The front end refuses these; should one reach the queue anyway, the DSN stays clean.
    bad = HEADERS + b"\r\nline one\nline two\r\n"
    raw = build(original=bad)
    assert_wire_clean(raw)
    assert parts(raw)[2].get_content_type() == "text/rfc822-headers"
    assert HEADERS in raw
    assert "only its headers are" in " ".join(text_of(raw).split())


def test_original_with_overlong_header_line_is_left_out() -> None:
    bad = b"X-Long: " + b"a" * 2000 + b"\r\n\r\nbody\r\n"
    raw = build(original=bad, mail_options=["RET=HDRS"])
    assert_wire_clean(raw)
    assert [p.get_content_type() for p in parts(raw)] == [
        "text/plain",
        "message/delivery-status",
    ]
    assert "could not be attached" in text_of(raw)


def test_boundary_never_occurs_in_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["a" * 24, "b" * 24, "c" * 12])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(tokens))
    original = HEADERS + b"\r\n--=_filterhost_dsn_" + b"a" * 24 + b"\r\n"
    raw = build(original=original)
    assert parse(raw).get_boundary() == "=_filterhost_dsn_" + "b" * 24
    assert original in raw
    inner = inner_message(parts(raw)[2])
    assert inner["Subject"] == "Quarterly figures"


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.eml")), ids=lambda p: p.stem)
def test_corpus_messages_come_back_verbatim(path: Path) -> None:
    original = path.read_bytes()
    raw = build(original=original)
    assert original in raw
    assert_wire_clean(raw)
    assert len(parts(raw)) == 3
    Message(raw).parsed()  # filterhost's own parser takes it too


# -- several recipients --------------------------------------------------------------------------


def test_one_failed_one_delayed() -> None:
    raw = build([failed(), delayed()], mail_options=["RET=FULL"])
    assert parse(raw)["Subject"] == "Undelivered Mail Returned to Sender"
    assert ORIGINAL in raw  # there is a failure, so the message comes back
    per_message, bob, carol = status_groups(raw)
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert (bob["Final-Recipient"], bob["Action"], bob["Status"]) == (
        "rfc822; bob@example.org",
        "failed",
        "5.1.1",
    )
    assert bob["Will-Retry-Until"] is None
    assert (carol["Final-Recipient"], carol["Action"], carol["Status"]) == (
        "rfc822; carol@example.net",
        "delayed",
        "4.2.2",
    )
    assert carol["Remote-MTA"] == "dns; mx.example.net"
    assert carol["Diagnostic-Code"] == "smtp; 452 4.2.2 mailbox full"
    assert parsedate_to_datetime(carol["Will-Retry-Until"]) == ARRIVAL + timedelta(days=5)


def test_success_report() -> None:
    report = RecipientReport("bob@example.org", "relayed", "2.0.0", remote_mta="mx1.example.org")
    raw = build([report])
    assert parse(raw)["Subject"] == "Successful Mail Delivery Report"
    (_, rcpt) = status_groups(raw)
    assert rcpt["Action"] == "relayed"
    assert parts(raw)[2].get_content_type() == "text/rfc822-headers"


# -- the wire form -------------------------------------------------------------------------------


def test_crlf_only_and_short_lines_even_with_hostile_values() -> None:
    hostile = RecipientReport(
        recipient="bob@example.org",
        action="failed",
        status="5.0.0",
        remote_mta="mx1.example.org\r\nBcc: eve@evil.example",
        diagnostic="550 first line\r\n550-second\nline\rthird\0 " + "x" * 3000 + " " + "y" * 50,
        last_attempt=NOW,
    )
    raw = build([hostile, delayed()], mail_options=["ENVID=a+0D+0ABcc:+20eve"])
    assert_wire_clean(raw)
    assert_no_defects(raw)
    msg = parse(raw)
    assert msg["Bcc"] is None
    per_message, rcpt, _ = status_groups(raw)
    assert rcpt["Bcc"] is None
    assert per_message["Bcc"] is None
    # A decoded ENVID with a CRLF in it stays in its (ASCII, harmless) xtext form.
    assert per_message["Original-Envelope-Id"] == "a+0D+0ABcc:+20eve"
    diagnostic = rcpt["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 first line 550-second line third ")
    assert diagnostic.replace(" ", "").endswith("x" * 3000 + "y" * 50)
    for line in raw.split(b"\r\n"):
        assert len(line) <= 998


def test_non_ascii_in_the_original_headers_does_not_break_the_dsn() -> None:
    original = (
        "From: Jörg Müller <joerg@corp.example>\r\n"
        "To: bob@example.org\r\n"
        "Subject: Grüße aus Köln ☃\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Schöne Grüße\r\n"
    ).encode()
    for options in (["RET=FULL"], ["RET=HDRS"]):
        raw = build(original=original, mail_options=options)
        assert_wire_clean(raw)
        assert original[: original.index(b"\r\n\r\n") + 2] in raw
        msg = parse(raw)
        assert msg["Content-Transfer-Encoding"] == "8bit"
        assert msg["Subject"] == "Undelivered Mail Returned to Sender"
        third = parts(raw)[2]
        assert third["Content-Transfer-Encoding"] == "8bit"
        _, rcpt = status_groups(raw)
        assert rcpt["Status"] == "5.1.1"
        assert "bob@example.org" in text_of(raw)
        Message(raw).parsed()
    assert original in build(original=original)


def test_non_ascii_recipient_and_diagnostic_stay_readable() -> None:
    report = failed("jörg@bücher.example", "550 5.1.1 Benutzer unbekannt: jörg")
    raw = build([report])
    assert_wire_clean(raw)
    assert raw.isascii()  # quoted-printable text, RFC 6533 escapes in the status part
    assert "<jörg@bücher.example>: could not be delivered" in text_of(raw)
    _, rcpt = status_groups(raw)
    assert rcpt["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.example"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt: j\\x{F6}rg"


def test_filterhost_message_parses_the_dsn() -> None:
    raw = build([failed(), delayed()], mail_options=["RET=FULL"])
    message = Message(raw)
    assert message.as_bytes() == raw
    assert message.get("Subject") == "Undelivered Mail Returned to Sender"
    assert message.get("Auto-Submitted") == "auto-replied"
    assert message.get("From") == f"Mail Delivery System <MAILER-DAEMON@{MTA}>"
    parsed = message.parsed()
    assert parsed.get_content_type() == "multipart/report"
    assert [p.get_content_type() for p in parsed.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]


def test_naive_and_epoch_times_are_utc() -> None:
    report = RecipientReport(
        "bob@example.org",
        "failed",
        "5.0.0",
        last_attempt=datetime(2026, 11, 29, 9, 0, 0),  # naive on purpose
    )
    raw = build([report], arrival=ARRIVAL.timestamp())
    per_message, rcpt = status_groups(raw)
    assert parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL
    assert parsedate_to_datetime(rcpt["Last-Attempt-Date"]) == datetime(
        2026, 11, 29, 9, 0, 0, tzinfo=UTC
    )


def test_arrival_defaults_to_the_entry() -> None:
    raw = build_dsn(
        entry=entry(), original=ORIGINAL, reports=[failed()], reporting_mta=MTA, now=NOW
    )
    per_message, _ = status_groups(raw)
    assert parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL


# -- who is notified -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "action", "expected"),
    [
        # No NOTIFY: failures and delays, not successes (RFC 3461 4.1, MTA's discretion).
        (None, "failed", True),
        (None, "delayed", True),
        (None, "delivered", False),
        (None, "relayed", False),
        ("NEVER", "failed", False),
        ("NEVER", "delayed", False),
        ("NEVER", "delivered", False),
        ("never", "failed", False),
        ("SUCCESS", "failed", False),
        ("SUCCESS", "delayed", False),
        ("SUCCESS", "delivered", True),
        ("SUCCESS", "relayed", True),
        ("SUCCESS", "expanded", True),
        ("FAILURE", "failed", True),
        ("FAILURE", "delayed", False),
        ("FAILURE", "delivered", False),
        ("DELAY", "delayed", True),
        ("DELAY", "failed", False),
        ("FAILURE,DELAY", "failed", True),
        ("FAILURE,DELAY", "delayed", True),
        ("success,failure", "failed", True),
        ("SUCCESS,FAILURE,DELAY", "delivered", True),
        ("NEVER,FAILURE", "failed", False),  # invalid combination: silence wins
        ("BOGUS", "failed", True),  # nothing we know: as if absent
    ],
)
def test_should_notify(notify: str | None, action: Any, expected: bool) -> None:
    options = ["ORCPT=rfc822;bob@example.org"]
    if notify is not None:
        options.append(f"NOTIFY={notify}")
    rcpt = RecipientState("bob@example.org", options=options)
    assert should_notify(entry(recipients=[rcpt]), rcpt, action) is expected


@pytest.mark.parametrize("null", ["", "<>"])
@pytest.mark.parametrize("notify", [None, "SUCCESS,FAILURE,DELAY"])
@pytest.mark.parametrize("action", ["failed", "delayed", "delivered"])
def test_null_sender_is_never_notified(null: str, notify: str | None, action: Any) -> None:
    rcpt = RecipientState("bob@example.org", options=[f"NOTIFY={notify}"] if notify else [])
    assert should_notify(entry(mail_from=null, recipients=[rcpt]), rcpt, action) is False


@pytest.mark.parametrize("null", ["", "<>"])
def test_no_dsn_is_built_for_the_null_sender(null: str) -> None:
    with pytest.raises(ValueError, match="null sender"):
        build(mail_from=null)


def test_no_dsn_without_reports() -> None:
    with pytest.raises(ValueError, match="at least one"):
        build_dsn(entry=entry(), original=ORIGINAL, reports=[], reporting_mta=MTA, now=NOW)


def test_should_notify_rejects_unknown_action() -> None:
    rcpt = RecipientState("bob@example.org")
    with pytest.raises(ValueError, match="unknown DSN action"):
        should_notify(entry(), rcpt, "bounced")  # type: ignore[arg-type]


# -- reports and helpers -------------------------------------------------------------------------


def test_report_from_spool_state() -> None:
    rcpt = RecipientState(
        "bob@example.org",
        status="bounced",
        last_reply="550 5.7.1 relaying denied",
        options=["notify=FAILURE", "orcpt=rfc822;Bob@Example.org"],
    )
    report = RecipientReport.from_state(rcpt, "failed", remote_mta="mx1.example.org")
    assert report.recipient == "bob@example.org"
    assert report.status == "5.7.1"
    assert report.diagnostic == "550 5.7.1 relaying denied"
    assert report.original_recipient == "rfc822;Bob@Example.org"
    assert report.will_retry_until is None
    later = NOW + timedelta(days=4)
    waiting = RecipientReport.from_state(
        RecipientState("c@example.net", last_reply="421 4.4.2 timeout"),
        "delayed",
        will_retry_until=later,
    )
    assert (waiting.status, waiting.will_retry_until) == ("4.4.2", later)


@pytest.mark.parametrize(
    ("reply", "action", "status"),
    [
        ("550 5.1.1 no such user", "failed", "5.1.1"),
        ("550-5.1.1 no such user", "failed", "5.1.1"),
        ("550 no such user", "failed", "5.0.0"),
        ("550 4.1.1 mismatched class", "failed", "5.0.0"),
        ("451 4.3.0 try later", "delayed", "4.3.0"),
        ("452 too many", "delayed", "4.0.0"),
        ("250 2.0.0 ok", "delivered", "2.0.0"),
        ("5501 5.1.1 not a reply", "failed", "5.0.0"),
        ("", "failed", "5.0.0"),
        (None, "delayed", "4.0.0"),
        (None, "relayed", "2.0.0"),
        ("Host or domain name not found", "failed", "5.0.0"),
        (Reply(554, "5.7.1", "rejected"), "failed", "5.7.1"),
    ],
)
def test_status_from_reply(reply: str | Reply | None, action: Any, status: str) -> None:
    assert status_from_reply(reply, action) == status


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "bounced"}, "unknown DSN action"),
        ({"status": "550"}, "X.Y.Z"),
        ({"status": "3.1.1"}, "X.Y.Z"),
        ({"recipient": ""}, "recipient"),
    ],
)
def test_report_validation(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"recipient": "bob@example.org", "action": "failed", "status": "5.1.1"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RecipientReport(**args)


@pytest.mark.parametrize(
    ("plain", "encoded"),
    [
        ("bob@example.org", "bob@example.org"),
        ("a+b=c", "a+2Bb+3Dc"),
        ("two words", "two+20words"),
        ("tab\there\r\n", "tab+09here+0D+0A"),
        ("jörg", "j+C3+B6rg"),
        ("", ""),
    ],
)
def test_xtext_round_trip(plain: str, encoded: str) -> None:
    assert xtext_encode(plain) == encoded
    assert xtext_decode(encoded) == plain
    assert xtext_encode(plain.encode()) == encoded


def test_xtext_decode_accepts_lower_case_hex() -> None:
    assert xtext_decode("a+2bb") == "a+b"


@pytest.mark.parametrize("bad", ["a+", "a+2", "a+ZZ", "a b", "a=b", "+FF"])
def test_xtext_decode_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        xtext_decode(bad)


def test_malformed_envid_and_orcpt_do_not_break_the_report() -> None:
    rcpt = RecipientState("bob@example.org", options=["ORCPT=no-semicolon"])
    report = RecipientReport.from_state(rcpt, "failed", reply="550 5.1.1 gone")
    raw = build([report], mail_options=["ENVID=bad+Z"])
    per_message, per_rcpt = status_groups(raw)
    assert per_message["Original-Envelope-Id"] == "bad+Z"  # not xtext: kept as received
    assert per_rcpt["Original-Recipient"] is None  # not "type;address": nothing to report
    assert_wire_clean(raw)


def test_final_log_id_is_reported() -> None:
    report = RecipientReport(
        "bob@example.org", "delivered", "2.0.0", final_log_id="4ZyQ1 at mx1.example.org"
    )
    _, rcpt = status_groups(build([report]))
    assert rcpt["Final-Log-ID"] == "4ZyQ1 at mx1.example.org"


def test_non_ascii_sender_is_addressed_in_utf8() -> None:
    raw = build(mail_from="jörg@bücher.example")
    assert_wire_clean(raw)
    assert "To: <jörg@bücher.example>\r\n".encode() in raw
    # The stdlib reads 8-bit header bytes as surrogate escapes; the bytes underneath are UTF-8.
    to = parse(raw)["To"].addresses[0].addr_spec
    assert to.encode("utf-8", "surrogateescape").decode() == "jörg@bücher.example"
    assert_no_defects(raw)
