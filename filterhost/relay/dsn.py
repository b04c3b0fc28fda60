"""Delivery status notifications (RFC 3464) for the delivery engine: pure functions, no I/O.

The queue runner decides *when* to report; this module decides *whether* the sender asked for it
and *what* the report says::

    report = RecipientReport.from_state(rcpt, "failed", remote_mta=result.host, last_attempt=now)
    if should_notify(entry, rcpt, "failed"):
        dsn = build_dsn(entry=entry, original=data, reports=[report],
                        reporting_mta=config.hostname, now=now)
        # spool ``dsn`` as a new message: MAIL FROM:<> (a DSN is never answered by a DSN),
        # one recipient, ``entry.mail_from``.

API
---
``RecipientReport``
    One recipient's line in the report (frozen dataclass): ``recipient``, ``action``
    (``failed``, ``delayed``, ``delivered``, ``relayed``, ``expanded``), ``status``
    (RFC 3463), ``remote_mta``, ``diagnostic`` (the remote reply, e.g. ``"550 5.1.1 no such
    user"``, or a local reason), ``diagnostic_type`` (``"smtp"``, or ``"X-Filterhost"`` for a
    local reason; guessed from ``diagnostic`` when None), ``last_attempt``,
    ``original_recipient`` (the ORCPT value as received, ``"rfc822;bob+2Bx@example.org"``),
    ``will_retry_until`` (delayed only) and ``final_log_id``.
    ``RecipientReport.from_state(state, action, ...)`` fills it from a spool
    :class:`~filterhost.spool.RecipientState` (status from ``last_reply``, ORCPT from
    ``options``).
``should_notify(entry, state, action) -> bool``
    The sender's NOTIFY wish (RFC 3461 4.1) for that recipient and outcome. Never for the null
    sender: that is what keeps a bounce from bouncing.
``build_dsn(*, entry, original, reports, reporting_mta, now, arrival=None, max_original=100_000)``
    The complete notification as bytes: CRLF line endings, no line over 998 octets,
    ``multipart/report; report-type=delivery-status`` with a text part, a
    ``message/delivery-status`` part and the original (``message/rfc822``) or its headers
    (``text/rfc822-headers``).
``xtext_encode`` / ``xtext_decode``
    RFC 3461 section 4 xtext (ENVID and ORCPT values travel xtext-encoded).

Timestamps are aware datetimes or epoch seconds; a naive datetime is taken as UTC.

What is returned
----------------
The original, or its header section, is copied in byte for byte (DESIGN.md section 2: bytes are
preserved), never re-serialised through :mod:`email.generator`. If it does not fit (more than
``max_original`` bytes), the sender asked for headers only (``RET=HDRS``), or the report holds no
failure (RFC 3461 4.3: a report without a failure SHOULD return headers only), only the header
section is attached. A copy that cannot be carried safely (bare CR or LF, NUL, a line over 998
octets: the front end normally refuses such messages) is downgraded to headers, or left out, and
the text part says so.

The report itself is 7-bit ASCII unless the original carries 8-bit bytes (an 8BITMIME body or
UTF-8 headers): then the attached part and the whole message are labelled
``Content-Transfer-Encoding: 8bit`` and ``dsn.isascii()`` is False, so the relay must send it
with ``BODY=8BITMIME`` (and ``SMTPUTF8`` when the sender's address is not ASCII).
"""

from __future__ import annotations

import binascii
import re
import secrets
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Literal, TypeAlias, get_args

from filterhost.spool import RecipientState, SpoolEntry
from filterhost.verdict import Reply

__all__ = [
    "DsnAction",
    "RecipientReport",
    "build_dsn",
    "should_notify",
    "status_from_reply",
    "xtext_decode",
    "xtext_encode",
]

DsnAction = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
Timestamp: TypeAlias = datetime | float

_ACTIONS: frozenset[str] = frozenset(get_args(DsnAction))
_SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded"})
_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
# "550 5.1.1 text" or "550-5.1.1 text": the reply code, then (maybe) an enhanced status code.
_REPLY_RE = re.compile(r"^([245])\d\d(?:[ -]|$)(?:([245]\.\d{1,3}\.\d{1,3})(?:\s|$))?")
_CRLF = b"\r\n"
_FOLD_AT = 78  # RFC 5322 2.1.1: header lines SHOULD stay within 78 characters ...
_MAX_LINE = 998  # ... and MUST stay within 998
_HARD_SPLIT = 900  # a "word" longer than this is cut so that no line can exceed _MAX_LINE
_TEXT_WIDTH = 76
_NOTIFY_KEYWORDS = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})


# -- xtext (RFC 3461 section 4) ------------------------------------------------------------------


def xtext_encode(value: str | bytes) -> str:
    """``value`` as RFC 3461 xtext: ``!`` to ``~`` except ``+`` and ``=`` as is, else ``+XX``.

    A str is encoded as UTF-8 first.
    """
    data = value.encode("utf-8") if isinstance(value, str) else value
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}" for b in data
    )


_XTEXT_RE = re.compile(r"\+([0-9A-Fa-f]{2})")


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext (``"a+2Bb"`` is ``"a+b"``); octets are read as UTF-8.

    Raises ValueError for a ``+`` not followed by two hex digits, a character outside ``!``..``~``
    or bytes that are not UTF-8. (The RFC asks for upper-case hex; lower case is accepted, as
    Postfix does, since refusing it would only lose the value.)
    """
    out = bytearray()
    pos = 0
    while pos < len(value):
        char = value[pos]
        if char == "+":
            m = _XTEXT_RE.match(value, pos)
            if m is None:
                raise ValueError(f"invalid xtext {value!r}: '+' must be followed by two hex digits")
            out.append(int(m.group(1), 16))
            pos = m.end()
            continue
        if not "!" <= char <= "~" or char == "=":
            raise ValueError(f"invalid xtext {value!r}: character {char!r} must be +XX encoded")
        out.append(ord(char))
        pos += 1
    return out.decode("utf-8")


# -- DSN parameters ------------------------------------------------------------------------------


def _param(options: Iterable[str], keyword: str) -> str | None:
    """The value of ESMTP parameter ``keyword`` (case-insensitive, as SMTP keywords are)."""
    prefix = keyword.upper() + "="
    for option in options:
        if option[: len(prefix)].upper() == prefix:
            return option[len(prefix) :]
    return None


def _orcpt(options: Iterable[str]) -> str | None:
    return _param(options, "ORCPT")


def should_notify(entry: SpoolEntry, recipient_state: RecipientState, action: DsnAction) -> bool:
    """Whether the sender of ``entry`` wants a DSN saying ``action`` about this recipient.

    RFC 3461 4.1: ``NOTIFY=NEVER`` never; otherwise ``failed`` needs FAILURE, ``delayed`` needs
    DELAY, and ``delivered``/``relayed``/``expanded`` need SUCCESS. Without NOTIFY (or with no
    keyword we know), failures and delays are reported, successes are not: the RFC leaves delay
    notices to the MTA's discretion and, like Postfix, we send them. The null sender is never
    notified: a DSN goes out from ``<>``, so this is what stops a bounce of a bounce.
    """
    if action not in _ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")
    if entry.mail_from in ("", "<>"):
        return False
    notify = _param(recipient_state.options, "NOTIFY")
    keywords = {k.strip().upper() for k in notify.split(",")} if notify is not None else set()
    keywords &= _NOTIFY_KEYWORDS
    if not keywords:
        return action in ("failed", "delayed")
    # NEVER may not be combined with anything (RFC 3461 4.1); if a client did, honour NEVER:
    # the sender explicitly asked for silence.
    if "NEVER" in keywords:
        return False
    if action == "failed":
        return "FAILURE" in keywords
    if action == "delayed":
        return "DELAY" in keywords
    return "SUCCESS" in keywords


def status_from_reply(reply: str | Reply | None, action: DsnAction) -> str:
    """The RFC 3463 status for a recipient: the reply's enhanced code, else one from its class.

    ``"550 5.1.1 no such user"`` gives ``5.1.1``; ``"550 no such user"`` gives ``5.0.0``; no
    reply at all gives ``5.0.0``, ``4.0.0`` or ``2.0.0`` by ``action``.
    """
    if isinstance(reply, Reply):
        return reply.status
    if reply:
        m = _REPLY_RE.match(reply.strip())
        if m:
            if m.group(2) and m.group(2)[0] == m.group(1):
                return m.group(2)
            return f"{m.group(1)}.0.0"
    if action == "failed":
        return "5.0.0"
    if action == "delayed":
        return "4.0.0"
    return "2.0.0"


# -- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What happened to one recipient: one per-recipient block of the delivery-status part."""

    recipient: str
    action: DsnAction
    status: str
    """RFC 3463 status, e.g. ``"5.1.1"``."""
    remote_mta: str | None = None
    """Host name of the next hop that gave the reply (None for a local decision)."""
    diagnostic: str | None = None
    """The remote reply (``"550 5.1.1 no such user"``) or a local reason."""
    last_attempt: Timestamp | None = None
    original_recipient: str | None = None
    """The ORCPT parameter as received (``"rfc822;bob@example.org"``, xtext-encoded)."""
    will_retry_until: Timestamp | None = None
    """For ``delayed``: when the message will be given up (RFC 3464 Will-Retry-Until)."""
    diagnostic_type: str | None = None
    """``"smtp"`` for a reply, else e.g. ``"X-Filterhost"``; None: ``smtp`` if it looks like one."""
    final_log_id: str | None = None

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"unknown DSN action {self.action!r}")
        if not _STATUS_RE.match(self.status):
            raise ValueError(f"status {self.status!r} is not of the form 'X.Y.Z' (RFC 3463)")
        if not self.recipient:
            raise ValueError("a recipient report needs a recipient address")

    @classmethod
    def from_state(
        cls,
        state: RecipientState,
        action: DsnAction,
        *,
        reply: str | Reply | None = None,
        remote_mta: str | None = None,
        last_attempt: Timestamp | None = None,
        will_retry_until: Timestamp | None = None,
    ) -> RecipientReport:
        """A report for a spooled recipient: ``reply`` defaults to ``state.last_reply``.

        The status comes from the reply (see :func:`status_from_reply`) and the original
        recipient from the ORCPT parameter in ``state.options``.
        """
        text = str(reply) if reply is not None else state.last_reply
        return cls(
            recipient=state.address,
            action=action,
            status=status_from_reply(reply if reply is not None else text, action),
            remote_mta=remote_mta,
            diagnostic=text or None,
            last_attempt=last_attempt,
            original_recipient=_orcpt(state.options),
            will_retry_until=will_retry_until if action == "delayed" else None,
        )


# -- formatting helpers --------------------------------------------------------------------------


def _as_datetime(value: Timestamp) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(value, UTC)


def _date(value: Timestamp) -> str:
    return format_datetime(_as_datetime(value))


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


def _one_line(value: str) -> str:
    """``value`` with control characters (CR, LF, tabs, NUL) as single spaces.

    A value comes from a remote server or an SMTP client; a CRLF in it must not start a new
    header field in our report.
    """
    return " ".join(_CONTROL_RE.sub(" ", value).split())


def _ascii(value: str) -> str:
    r"""``value`` on one line, non-ASCII as RFC 6533 ``\x{HEX}``: delivery-status is 7-bit."""
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in _one_line(value))


def _fold(line: str) -> str:
    """Fold a header line at white space (continuation lines start with a space).

    A word too long to fit any line is cut, which adds a space to the unfolded value: a
    diagnostic a little mangled is better than a report no MTA will carry.
    """
    words: list[str] = []
    for piece in re.split(r"(?= )", line):
        rest = piece
        while len(rest) > _HARD_SPLIT:
            words.append(rest[:_HARD_SPLIT])
            rest = " " + rest[_HARD_SPLIT:]
        words.append(rest)
    out: list[str] = []
    current = ""
    for word in words:
        if current.strip() and len(current) + len(word) > _FOLD_AT:
            out.append(current)
            current = word if word.startswith(" ") else " " + word
        else:
            current += word
    out.append(current)
    return "\r\n".join(out)


def _field(name: str, value: str) -> bytes:
    return (_fold(f"{name}: {_ascii(value)}") + "\r\n").encode("ascii")


def _address_type(address: str) -> str:
    """``rfc822; a@b``, or RFC 6533's ``utf-8;`` form for an internationalised address."""
    if address.isascii():
        return f"rfc822; {_one_line(address)}"
    return f"utf-8; {_ascii(address)}"


def _decoded(xtext: str) -> str:
    """An xtext value decoded for a report field, or kept encoded when decoding would not do.

    Kept as received when it is not valid xtext, or when the decoded text holds control
    characters or non-ASCII, which a 7-bit report field cannot carry faithfully.
    """
    try:
        text = xtext_decode(xtext)
    except ValueError:
        return _ascii(xtext)
    if all(" " <= c <= "~" for c in text):
        return text
    return _ascii(xtext)


def _original_recipient(orcpt: str) -> str | None:
    addr_type, sep, address = orcpt.partition(";")
    addr_type = addr_type.strip()
    if not sep or not addr_type or not address.strip():
        return None  # malformed ORCPT: the front end should have refused it; nothing to report
    return f"{_ascii(addr_type)}; {_decoded(address.strip())}"


def _diagnostic_type(report: RecipientReport) -> str:
    if report.diagnostic_type:
        return _ascii(report.diagnostic_type)
    assert report.diagnostic is not None
    return "smtp" if _REPLY_RE.match(report.diagnostic.strip()) else "X-Filterhost"


# -- the original --------------------------------------------------------------------------------


def _header_section(original: bytes) -> bytes:
    """The original's header fields, each with its CRLF, without the empty line after them."""
    if original.startswith(_CRLF):
        return b""
    end = original.find(b"\r\n\r\n")
    return original if end < 0 else original[: end + 2]


_BAD_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")


def _carriable(data: bytes) -> bool:
    """True when ``data`` can go into the report verbatim: CRLF only, no NUL, short lines."""
    if _BAD_LINE_END.search(data):
        return False
    return all(len(line) <= _MAX_LINE for line in data.split(_CRLF))


@dataclass(frozen=True, slots=True)
class _Attachment:
    content_type: str  # "" when nothing of the original is attached
    data: bytes
    note: str


def _attachment(
    original: bytes, *, ret: str | None, any_failed: bool, max_original: int
) -> _Attachment:
    headers_note = "The headers of your message are attached."
    if ret == "HDRS":
        want_full, why = False, ""
    elif not any_failed:
        # RFC 3461 4.3: a report with no failure in it SHOULD return headers only.
        want_full, why = False, ""
    elif len(original) > max_original:
        want_full = False
        why = (
            f"Your message was {len(original):,} bytes, more than the {max_original:,}"
            " bytes returned in full; only its headers are attached."
        )
    else:
        want_full, why = True, ""
    if want_full and _carriable(original):
        return _Attachment("message/rfc822", original, "Your message is attached.")
    if want_full:
        why = "Your message could not be attached as it was; only its headers are."
    head = _header_section(original)
    if head and _carriable(head):
        return _Attachment("text/rfc822-headers", head, why or headers_note)
    return _Attachment("", b"", "Your message could not be attached to this report.")


# -- the notification ----------------------------------------------------------------------------


def _subject(reports: Sequence[RecipientReport]) -> str:
    actions = {r.action for r in reports}
    if "failed" in actions:
        return "Undelivered Mail Returned to Sender"
    if "delayed" in actions:
        return "Delayed Mail (still being retried)"
    return "Successful Mail Delivery Report"


_OUTCOME = {
    "failed": "could not be delivered",
    "delayed": "delayed, still being retried",
    "delivered": "delivered",
    "relayed": "relayed to a system that does not send delivery reports",
    "expanded": "delivered, and forwarded on to further recipients",
}


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(
        text,
        width=_TEXT_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


def _text_part(
    *,
    entry: SpoolEntry,
    reports: Sequence[RecipientReport],
    reporting_mta: str,
    arrival: datetime,
    attachment: _Attachment,
) -> bytes:
    """The human-readable first part (RFC 3464 2.1): what happened, per recipient, in words."""
    actions = {r.action for r in reports}
    paras: list[list[str]] = [_wrap(f"This is the mail system at host {reporting_mta}.")]
    if "failed" in actions:
        paras.append(
            _wrap(
                "Your message could not be delivered to one or more recipients. The mail"
                " system has given up on them."
            )
        )
    if "delayed" in actions:
        paras.append(
            _wrap(
                "Delivery of your message to one or more recipients has been delayed. The mail"
                " system will keep trying; you do not need to send it again."
            )
        )
    if actions & _SUCCESS_ACTIONS:
        paras.append(_wrap("Your message was delivered to the recipients marked so below."))
    paras.append(
        _wrap(f"Message received {format_datetime(arrival)}, queue id {_one_line(entry.id)}.")
    )
    for report in reports:
        lines = _wrap(f"<{_one_line(report.recipient)}>: {_OUTCOME[report.action]}")
        if report.diagnostic:
            where = f"{_one_line(report.remote_mta)} said" if report.remote_mta else "reason"
            lines += _wrap(f"{where}: {_one_line(report.diagnostic)}", "    ")
        if report.action == "delayed" and report.will_retry_until is not None:
            lines += _wrap(f"will retry until {_date(report.will_retry_until)}", "    ")
        paras.append(lines)
    paras.append(_wrap(attachment.note))
    text = "\n\n".join("\n".join(p) for p in paras) + "\n"
    if text.isascii():
        body = text.replace("\n", "\r\n").encode("ascii")
        return (
            b"Content-Type: text/plain; charset=us-ascii\r\n"
            b"Content-Description: Notification\r\n\r\n" + body
        )
    # An internationalised address or reply: quoted-printable keeps the report 7-bit.
    encoded = binascii.b2a_qp(text.encode("utf-8"), istext=True).replace(b"\n", _CRLF)
    return (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Description: Notification\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded
    )


def _status_part(
    *,
    entry: SpoolEntry,
    reports: Sequence[RecipientReport],
    reporting_mta: str,
    arrival: datetime,
) -> bytes:
    """The machine-readable second part, ``message/delivery-status`` (RFC 3464 2.2, 2.3)."""
    out = bytearray(
        b"Content-Type: message/delivery-status\r\nContent-Description: Delivery report\r\n\r\n"
    )
    out += _field("Reporting-MTA", f"dns; {reporting_mta}")
    out += _field("X-Filterhost-Queue-ID", entry.id)
    envid = _param(entry.mail_options, "ENVID")
    if envid:
        # RFC 3461 4.4 / RFC 3464 2.2.1: the ENVID the sender gave, decoded from xtext.
        out += _field("Original-Envelope-Id", _decoded(envid))
    if entry.helo:
        out += _field("Received-From-MTA", f"dns; {entry.helo}")
    out += _field("Arrival-Date", format_datetime(arrival))
    for report in reports:
        out += _CRLF  # RFC 3464 2.1: per-recipient groups are separated by an empty line
        orcpt = _original_recipient(report.original_recipient or "")
        if orcpt:
            out += _field("Original-Recipient", orcpt)
        out += _field("Final-Recipient", _address_type(report.recipient))
        out += _field("Action", report.action)
        out += _field("Status", report.status)
        if report.remote_mta:
            out += _field("Remote-MTA", f"dns; {report.remote_mta}")
        if report.diagnostic:
            out += _field(
                "Diagnostic-Code", f"{_diagnostic_type(report)}; {_one_line(report.diagnostic)}"
            )
        if report.last_attempt is not None:
            out += _field("Last-Attempt-Date", _date(report.last_attempt))
        if report.final_log_id:
            out += _field("Final-Log-ID", report.final_log_id)
        if report.action == "delayed" and report.will_retry_until is not None:
            out += _field("Will-Retry-Until", _date(report.will_retry_until))
    return bytes(out)


def _original_part(attachment: _Attachment) -> bytes:
    eightbit = not attachment.data.isascii()
    head = f"Content-Type: {attachment.content_type}\r\n"
    if attachment.content_type == "message/rfc822":
        head += "Content-Description: Undelivered Message\r\n"
    else:
        head += "Content-Description: Message Headers\r\n"
    if eightbit:
        # message/rfc822 may not be base64 or quoted-printable (RFC 2046 5.2.1), and the bytes
        # stay as they are anyway: 8-bit is declared, and the relay needs 8BITMIME.
        head += "Content-Transfer-Encoding: 8bit\r\n"
    return head.encode("ascii") + _CRLF + attachment.data


def _boundary(parts: Sequence[bytes]) -> str:
    """A boundary that occurs in none of the parts (RFC 2046 5.1.1)."""
    while True:
        # "=_" cannot start a quoted-printable line, so the text part cannot hold it either.
        boundary = f"=_filterhost_dsn_{secrets.token_hex(12)}"
        token = boundary.encode("ascii")
        if not any(token in part for part in parts):
            return boundary


def build_dsn(
    *,
    entry: SpoolEntry,
    original: bytes,
    reports: Sequence[RecipientReport],
    reporting_mta: str,
    now: Timestamp,
    arrival: Timestamp | None = None,
    max_original: int = 100_000,
) -> bytes:
    """A complete RFC 3464 delivery status notification for ``entry``, to its envelope sender.

    ``original`` is the spooled message (CRLF line endings); ``reports`` the recipients to
    report on (filter them with :func:`should_notify` first); ``reporting_mta`` this host's
    name; ``now`` the report's Date; ``arrival`` when the message was received (default:
    ``entry.received``). RET (``entry.mail_options``) and ``max_original`` decide how much of
    the original is returned, ENVID gives Original-Envelope-Id.

    Raises ValueError for the null sender (never report to ``<>``) or an empty ``reports``.
    """
    if entry.mail_from in ("", "<>"):
        raise ValueError("a delivery status notification is never sent to the null sender")
    if not reports:
        raise ValueError("a delivery status notification needs at least one recipient report")
    mta = _ascii(reporting_mta)
    arrived = _as_datetime(entry.received if arrival is None else arrival)
    ret = (_param(entry.mail_options, "RET") or "").strip().upper()
    attachment = _attachment(
        original,
        ret=ret or None,
        any_failed=any(r.action == "failed" for r in reports),
        max_original=max_original,
    )
    parts = [
        _text_part(
            entry=entry,
            reports=reports,
            reporting_mta=mta,
            arrival=arrived,
            attachment=attachment,
        ),
        _status_part(entry=entry, reports=reports, reporting_mta=mta, arrival=arrived),
    ]
    if attachment.content_type:
        parts.append(_original_part(attachment))
    boundary = _boundary(parts)
    eightbit = not all(part.isascii() for part in parts)

    stamp = _as_datetime(now)
    message_id = f"<{stamp:%Y%m%d%H%M%S}.{_ascii(entry.id)}.{secrets.token_hex(6)}@{mta}>"
    sender = _one_line(entry.mail_from)
    head = [
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>"),
        # The sender's address as given; a non-ASCII one goes out as UTF-8 (RFC 6532), the
        # same form the original needed SMTPUTF8 for.
        _fold(f"To: <{sender}>").encode("utf-8") + _CRLF,
        _field("Subject", _subject(reports)),
        _field("Date", format_datetime(stamp)),
        _field("Message-ID", message_id),
        # RFC 3834 5: keeps vacation responders and other robots from answering the report.
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        (
            "Content-Type: multipart/report; report-type=delivery-status;\r\n"
            f' boundary="{boundary}"\r\n'
        ).encode("ascii"),
    ]
    if eightbit:
        head.append(b"Content-Transfer-Encoding: 8bit\r\n")
    delimiter = b"\r\n--" + boundary.encode("ascii")
    out = bytearray(b"".join(head))
    out += _CRLF + b"This is a MIME-encapsulated message (a delivery status notification).\r\n"
    for part in parts:
        # The CRLF before "--boundary" belongs to the delimiter, so each part's bytes, the
        # original's included, come out of a parser exactly as they went in.
        out += delimiter + _CRLF + part
    out += delimiter + b"--\r\n"
    return bytes(out)
