"""Envelope addresses: a strict RFC 5321 path parser and the relay-hygiene checks.

Pure functions without I/O. The front end calls :func:`parse_path` at MAIL and RCPT and
:func:`check_mailbox` for what depends on the client; a faster command parser can call the same
two, so that every way into the server refuses the same addresses.

Refused, whoever the client (each trick has been used to turn MTAs into open relays or to
make two MTAs disagree about where a message goes):

- source routes (``<@a,@b:user@c>``): RFC 5321 4.1.1.3 lets a server ignore them; we refuse them
  so that nobody can think they were honoured;
- the ``%`` hack (``user%other@relay``) and bang paths (``host!user@relay``);
- quoted local parts that hide ``@``, ``%`` or ``!`` (``"user@other"@relay``), and several ``@``;
- a domain with a trailing dot, or one that is all digits at the end (an IP address in disguise);
- control characters (CR, LF, NUL, TAB, ...), a local part over 64 octets, a path over 256.

Refused for clients that are not trusted (:func:`check_mailbox`): address literals
(``user@[192.0.2.1]``). Non-ASCII addresses need the SMTPUTF8 parameter (RFC 6531).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from filterhost.verdict import Reply

__all__ = [
    "MAX_LOCAL_PART",
    "MAX_PATH",
    "AddressError",
    "Mailbox",
    "ParsedPath",
    "canonical_domain",
    "check_mailbox",
    "parse_path",
]

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1, octets
MAX_PATH = 256  # RFC 5321 4.5.3.1.3, octets with the angle brackets
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_LABEL = 63

# RFC 5322 atext without "%" and "!", which are refused anyway: the common case in one regex.
_ATOM = r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_FAST = re.compile(rf"({_ATOM}(?:\.{_ATOM})*)@((?:{_LABEL}\.)*{_LABEL})")
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LDH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Bytes that were not UTF-8 on the wire arrive as lone surrogates (surrogateescape).
_SURROGATE = re.compile("[\udc80-\udcff]")
_ROUTING = "@%!"


class AddressError(ValueError):
    """A refused MAIL or RCPT argument (address or parameter); ``reply`` says why (RFC 3463)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed ``local@domain``: the local part as written (quotes kept) and the domain."""

    local: str
    domain: str
    literal: bool = False
    """True when the domain is an address literal such as ``[192.0.2.1]``."""

    @property
    def address(self) -> str:
        """``local@domain``, as the client wrote it."""
        return f"{self.local}@{self.domain}"

    @property
    def is_ascii(self) -> bool:
        """False when the address needs SMTPUTF8 (RFC 6531)."""
        return self.local.isascii() and self.domain.isascii()


@dataclass(frozen=True, slots=True)
class ParsedPath:
    """A MAIL or RCPT argument: the mailbox (None for the null path ``<>``) and the parameters."""

    mailbox: Mailbox | None
    params: list[str]

    @property
    def address(self) -> str:
        """The address without angle brackets; ``""`` for the null path."""
        return self.mailbox.address if self.mailbox is not None else ""


def _refuse(sender: bool, text: str, code: int = 553) -> AddressError:
    # RFC 3463: 5.1.7 bad sender's mailbox syntax, 5.1.3 bad destination mailbox syntax.
    return AddressError(Reply(code, "5.1.7" if sender else "5.1.3", text))


def parse_path(text: str, *, sender: bool) -> ParsedPath:
    """Parse what follows ``MAIL FROM:`` (``sender``) or ``RCPT TO:``.

    Accepts ``<local@domain>`` followed by ESMTP parameters, tolerating spaces after the colon
    and (like Postfix) an address without angle brackets. Raises :class:`AddressError` with a
    553 reply for anything in the module docstring's list.
    """
    text = text.lstrip(" ")
    if text.startswith("<"):
        close = _closing_bracket(text)
        if close < 0:
            raise _refuse(sender, "Malformed address: no closing '>'", 501)
        inner, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(" "):
            raise _refuse(sender, "Malformed address: text after '>' must be parameters", 501)
    else:
        inner, _, rest = text.partition(" ")
        if not inner:
            raise _refuse(sender, "Syntax: give the address as <local@domain>", 501)
        if inner.endswith(">") or inner.startswith('"'):
            raise _refuse(sender, "Malformed address: unbalanced '<' or quotes", 501)
    params = [p for p in rest.split(" ") if p]
    if len(inner.encode("utf-8", "surrogateescape")) + 2 > MAX_PATH:
        raise _refuse(sender, f"Address is longer than {MAX_PATH} octets (RFC 5321 4.5.3.1.3)")
    if not inner:
        if sender:
            return ParsedPath(None, params)
        raise _refuse(sender, "A recipient cannot be the null address <>")
    fast = _FAST.fullmatch(inner)
    if fast is not None:
        local, domain = fast.group(1), fast.group(2)
        mailbox = Mailbox(local, domain)
        _check_lengths(mailbox, sender)
        if _is_numeric_domain(domain):
            raise _numeric_domain(sender)
        return ParsedPath(mailbox, params)
    return ParsedPath(_slow_mailbox(inner, sender), params)


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` that closes the path at ``text[0]``, skipping quoted strings."""
    if '"' not in text:
        return text.find(">")
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
    return -1


def _slow_mailbox(inner: str, sender: bool) -> Mailbox:  # noqa: PLR0912 - one refusal each
    """The careful parse, with a precise reason for each refusal."""
    if _CONTROL.search(inner):
        raise _refuse(sender, "Address contains a control character (CR, LF, NUL, TAB, ...)")
    if _SURROGATE.search(inner):
        raise AddressError(Reply(553, "5.6.7", "Address is not valid UTF-8"))
    if inner.startswith("@"):
        raise _refuse(sender, "Source routes (<@host:user@domain>) are not accepted")
    if inner.startswith('"'):
        end = _closing_quote(inner)
        if end < 0:
            raise _refuse(sender, "Malformed address: unterminated quoted local part")
        local, after = inner[: end + 1], inner[end + 1 :]
        unquoted = _unquote(local, sender)
        if any(c in unquoted for c in _ROUTING):
            raise _refuse(sender, "A quoted local part may not contain '@', '%' or '!'")
        if not after.startswith("@"):
            raise _refuse(sender, "Malformed address: expected '@' after the quoted local part")
        domain = after[1:]
    else:
        local, at, domain = inner.partition("@")
        if not at:
            raise _refuse(sender, "Address must include a domain (local@domain)")
        if not local:
            raise _refuse(sender, "Address has an empty local part")
        if "%" in local:
            raise _refuse(sender, "Address may not contain '%' (percent-hack routing)")
        if "!" in local:
            raise _refuse(sender, "Address may not contain '!' (bang-path routing)")
        _check_dot_string(local, sender)
    if "@" in domain:
        raise _refuse(sender, "Address has more than one '@'")
    if not domain:
        raise _refuse(sender, "Address must include a domain (local@domain)")
    literal = domain.startswith("[")
    if literal:
        _check_literal(domain, sender)
    else:
        _check_domain(domain, sender)
    mailbox = Mailbox(local, domain, literal)
    _check_lengths(mailbox, sender)
    return mailbox


def _closing_quote(text: str) -> int:
    escaped = False
    for i, char in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return i
    return -1


def _unquote(quoted: str, sender: bool) -> str:
    """The content of an RFC 5321 Quoted-string (qtextSMTP and quoted-pairSMTP)."""
    out = []
    escaped = False
    for char in quoted[1:-1]:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            raise _refuse(sender, "Malformed address: a quote inside the quoted local part")
        else:
            out.append(char)
    return "".join(out)


def _check_dot_string(local: str, sender: bool) -> None:
    for atom in local.split("."):
        if not atom:
            raise _refuse(sender, "Malformed address: empty part between dots in the local part")
        bad = next((c for c in atom if c not in _ATEXT and c.isascii()), None)
        if bad is not None:
            raise _refuse(sender, f"Malformed address: {bad!r} is not allowed in a local part")


def _check_domain(domain: str, sender: bool) -> None:
    if domain.endswith("."):
        raise _refuse(sender, "Domain may not end with a dot")
    if len(domain.encode()) > MAX_DOMAIN:
        raise _refuse(sender, f"Domain is longer than {MAX_DOMAIN} octets")
    for label in domain.split("."):
        if not label:
            raise _refuse(sender, "Malformed domain: empty label")
        if len(label.encode()) > MAX_LABEL:
            raise _refuse(sender, f"Malformed domain: a label is longer than {MAX_LABEL} octets")
        if label.startswith("-") or label.endswith("-"):
            raise _refuse(sender, "Malformed domain: a label may not start or end with '-'")
        if any(c not in _LDH and c.isascii() for c in label):
            raise _refuse(sender, "Malformed domain: use letters, digits, '-' and dots")
    if _is_numeric_domain(domain):
        raise _numeric_domain(sender)


def _is_numeric_domain(domain: str) -> bool:
    # RFC 3696 2: a top-level domain is never all digits; "user@192.0.2.1" is an IP address
    # dressed as a name, which some MTAs would deliver to. It must be a literal, [192.0.2.1].
    return domain.rpartition(".")[2].isdigit()


def _numeric_domain(sender: bool) -> AddressError:
    return _refuse(sender, "Domain is an IP address; write it as an address literal: [192.0.2.1]")


def _check_literal(domain: str, sender: bool) -> None:
    if not domain.endswith("]"):
        raise _refuse(sender, "Malformed address literal: no closing ']'")
    body = domain[1:-1]
    try:
        if body[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(body[5:])
        else:
            ipaddress.IPv4Address(body)
    except ValueError:
        raise _refuse(
            sender, "Malformed address literal: expected [192.0.2.1] or [IPv6:2001:db8::1]"
        ) from None


def _check_lengths(mailbox: Mailbox, sender: bool) -> None:
    if len(mailbox.local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART:
        raise _refuse(
            sender, f"Local part is longer than {MAX_LOCAL_PART} octets (RFC 5321 4.5.3.1.1)"
        )


def check_mailbox(
    mailbox: Mailbox | None, *, sender: bool, trusted: bool, smtputf8: bool
) -> Reply | None:
    """What depends on the client and the transaction: the refusal, or None when acceptable.

    Address literals only from ``trusted`` clients (mynetworks or authenticated); non-ASCII
    addresses only in an SMTPUTF8 transaction (RFC 6531 3.7.4.1 recommends 553 5.6.7).
    """
    if mailbox is None:
        return None
    if mailbox.literal and not trusted:
        return Reply(
            550 if not sender else 553,
            "5.7.1",
            "Address literals such as [192.0.2.1] are accepted from trusted clients only",
        )
    if not smtputf8 and not mailbox.is_ascii:
        return Reply(553, "5.6.7", "A non-ASCII address needs the SMTPUTF8 parameter of MAIL")
    return None


def canonical_domain(domain: str) -> str:
    """``domain`` for comparisons: lower case, no trailing dot, IDNA A-labels when it can."""
    domain = domain.lower().rstrip(".")
    if not domain.isascii():
        try:
            return domain.encode("idna").decode("ascii")
        except UnicodeError:
            return domain
    return domain
