"""ESMTP parameters of MAIL FROM and RCPT TO: parsed, checked, and normalised for the spool.

Pure functions. MAIL takes SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8 (RFC 6531), RET and
ENVID (RFC 3461, DSN) and AUTH (RFC 4954); RCPT takes NOTIFY and ORCPT (RFC 3461). Keywords and
the values of BODY, RET and NOTIFY are case-insensitive and stored upper case; the values of
ENVID and ORCPT are kept exactly as sent, since they are echoed back in delivery status
notifications. Anything else gets 555 5.5.4 (RFC 5321 4.1.1.11).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from filterhost.smtp.address import AddressError
from filterhost.verdict import Reply

__all__ = ["MailParams", "is_xtext", "parse_mail_params", "parse_rcpt_params"]

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 5321 esmtp-value: CHAR except "=", SP and controls; RFC 6531 3.3 adds UTF-8.
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\ud7ff\ue000-\U0010ffff]+")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
# RFC 6533 utf-8-addr-xtext, loosely: xtext characters, "\x{HEX}" escapes and raw UTF-8.
_UTF8_XTEXT = re.compile(
    r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2}|[\u0080-\ud7ff\ue000-\U0010ffff])*"
)
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})
MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2


def is_xtext(value: str) -> bool:
    """True when ``value`` is RFC 3461 xtext (``+`` only as ``+XX``, no ``=``, no space)."""
    return _XTEXT.fullmatch(value) is not None


def _syntax(text: str) -> AddressError:
    return AddressError(Reply(501, "5.5.4", text))


def _split(tokens: Sequence[str], command: str) -> list[tuple[str, str | None]]:
    """``KEY[=value]`` tokens as (upper-case keyword, value or None); duplicates refused."""
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for token in tokens:
        key, eq, value = token.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            raise _syntax(f"Malformed {command} parameter (expected KEYWORD or KEYWORD=value)")
        key = key.upper()
        if key in seen:
            raise _syntax(f"Duplicate {command} parameter {key}")
        seen.add(key)
        out.append((key, value if eq else None))
    return out


def _unsupported(command: str, key: str) -> AddressError:
    return AddressError(Reply(555, "5.5.4", f"{command} parameter {key} is not supported"))


@dataclass(slots=True)
class MailParams:
    """The parameters of one MAIL FROM command."""

    size: int | None = None
    body: str | None = None
    """``"7BIT"`` or ``"8BITMIME"`` when given."""
    smtputf8: bool = False
    ret: str | None = None
    """``"FULL"`` or ``"HDRS"`` when given (RFC 3461 RET)."""
    envid: str | None = None
    """The envelope id (xtext, as sent) when given (RFC 3461 ENVID)."""
    auth: str | None = None
    """RFC 4954 ``AUTH=`` (accepted and not passed on: it speaks for the previous hop)."""
    stored: list[str] = field(default_factory=list)
    """What the spool keeps and the relay passes on: BODY, SMTPUTF8, RET, ENVID."""


def parse_mail_params(tokens: Sequence[str], *, max_size: int) -> MailParams:  # noqa: PLR0912
    """Check MAIL FROM's parameters; raise :class:`AddressError` with the reply on a problem.

    SIZE over ``max_size`` is 552 5.3.4 (RFC 1870 6.1).
    """
    params = MailParams()
    for key, value in _split(tokens, "MAIL FROM"):
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise _syntax("SIZE takes a number of octets: SIZE=12345")
            params.size = int(value)
            if params.size > max_size:
                raise AddressError(
                    Reply(552, "5.3.4", f"Message size exceeds fixed maximum of {max_size} octets")
                )
        elif key == "BODY":
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME"):
                raise _syntax("BODY must be 7BIT or 8BITMIME")
            params.body = body
            params.stored.append(f"BODY={body}")
        elif key == "SMTPUTF8":
            if value is not None:
                raise _syntax("SMTPUTF8 takes no value")
            params.smtputf8 = True
            params.stored.append("SMTPUTF8")
        elif key == "RET":
            ret = (value or "").upper()
            if ret not in ("FULL", "HDRS"):
                raise _syntax("RET must be FULL or HDRS (RFC 3461)")
            params.ret = ret
            params.stored.append(f"RET={ret}")
        elif key == "ENVID":
            if not value or len(value) > MAX_ENVID or not is_xtext(value):
                raise _syntax(f"ENVID must be xtext of at most {MAX_ENVID} characters (RFC 3461)")
            params.envid = value
            params.stored.append(f"ENVID={value}")
        elif key == "AUTH":
            if not value or not (value == "<>" or is_xtext(value)):
                raise _syntax("AUTH= takes an xtext mailbox or <> (RFC 4954)")
            params.auth = value
        else:
            raise _unsupported("MAIL FROM", key)
    return params


def parse_rcpt_params(tokens: Sequence[str], *, smtputf8: bool) -> list[str]:
    """Check RCPT TO's parameters; return them normalised (``["NOTIFY=FAILURE,DELAY", ...]``).

    Raises :class:`AddressError` with the reply on a problem. ``smtputf8``: the transaction
    declared SMTPUTF8, so ORCPT may use the ``utf-8`` address type (RFC 6533).
    """
    stored: list[str] = []
    for key, value in _split(tokens, "RCPT TO"):
        if key == "NOTIFY":
            items = (value or "").upper().split(",")
            if items != ["NEVER"] and (
                not all(i in _NOTIFY for i in items) or len(set(items)) != len(items)
            ):
                raise _syntax(
                    "NOTIFY must be NEVER, or SUCCESS, FAILURE and DELAY separated by ','"
                )
            stored.append(f"NOTIFY={','.join(items)}")
        elif key == "ORCPT":
            addr_type, semi, original = (value or "").partition(";")
            utf8 = addr_type.lower() == "utf-8"
            pattern = _UTF8_XTEXT if utf8 and smtputf8 else _XTEXT
            if (
                not semi
                or not _ATOM.fullmatch(addr_type)
                or not original
                or len(value or "") > MAX_ORCPT
                or not pattern.fullmatch(original)
            ):
                raise _syntax(
                    "ORCPT must be addr-type;xtext, such as ORCPT=rfc822;bob@example.org (RFC 3461)"
                )
            stored.append(f"ORCPT={value}")
        else:
            raise _unsupported("RCPT TO", key)
    return stored
