"""The message as plugins see it: raw bytes with an editable header block.

A message is kept as the bytes the client sent. Header fields are split out (each with its own raw
bytes, continuation lines included) so that a plugin can add, remove or replace a header without
the rest of the message being re-serialised: what a plugin did not touch leaves byte for byte as it
came in (DESIGN.md section 2, "Bytes are preserved").
"""

from __future__ import annotations

import email.errors
import email.header
import email.parser
import email.policy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage

__all__ = ["HeaderEdit", "Message"]

_CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """One header change, recorded for the trace: ``op`` is ``add``, ``remove`` or ``replace``."""

    op: str
    name: str
    value: str


def _field_name(raw: bytes) -> str:
    name, _, _ = raw.partition(b":")
    return name.decode("ascii", "replace").strip()


def _field_value(raw: bytes) -> str:
    _, _, value = raw.partition(b":")
    # Unfold (RFC 5322 2.2.3): a CRLF followed by white space is not part of the value.
    text = value.decode("utf-8", "surrogateescape").replace("\r\n", "").replace("\n", "")
    text = text.strip()
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return text


_FIELD_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 2.2: printable ASCII except ":"
_FOLD_AT = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
_MAX_LINE = 998  # ... and MUST be at most 998


def _fold(line: str) -> str:
    """Fold an ASCII header line at white space so that lines stay within 78 characters."""
    if len(line) <= _FOLD_AT:
        return line
    out: list[str] = []
    current = ""
    for word in re.split(r"(?=[ \t])", line):
        if current and len(current) + len(word) > _FOLD_AT:
            out.append(current)
            current = word
        else:
            current += word
    out.append(current)
    if any(len(part) > _MAX_LINE for part in out):
        raise ValueError("header value has a word longer than 998 characters; it cannot be folded")
    return "\r\n".join(out)


def _encode_field(name: str, value: str) -> bytes:
    if not _FIELD_NAME.match(name):
        raise ValueError(f"invalid header name {name!r}: printable ASCII, no ':' or spaces")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"invalid value for header {name}: it must be a single line")
    if value.isascii():
        return _fold(f"{name}: {value}").encode("ascii") + _CRLF
    encoded = email.header.Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}".encode("ascii") + _CRLF


class Message:
    """An RFC 5322 message: editable header fields over the original bytes.

    Header names compare case-insensitively; values are returned unfolded and with RFC 2047
    encoded words decoded. Every edit is recorded in :attr:`edits`.
    """

    def __init__(self, raw: bytes) -> None:
        end = raw.find(b"\r\n\r\n")
        if raw.startswith(_CRLF):
            # No header section at all: the body starts after the empty line.
            head, self._separator, self._body = b"", _CRLF, raw[2:]
        elif end < 0:
            head, self._separator, self._body = raw, b"", b""
        else:
            head, self._separator, self._body = raw[: end + 2], _CRLF, raw[end + 4 :]
        self._fields: list[bytes] = self._split_fields(head)
        self.edits: list[HeaderEdit] = []
        self._parsed: EmailMessage | None = None

    @staticmethod
    def _split_fields(head: bytes) -> list[bytes]:
        fields: list[bytes] = []
        for line in head.splitlines(keepends=True):
            if fields and line[:1] in (b" ", b"\t"):
                fields[-1] += line
            else:
                fields.append(line)
        return fields

    # -- reading ---------------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name``, or ``default``."""
        values = self.get_all(name)
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name``, top to bottom."""
        key = name.lower()
        return [_field_value(f) for f in self._fields if _field_name(f).lower() == key]

    def header_items(self) -> Iterator[tuple[str, str]]:
        """(name, value) for every header field, top to bottom."""
        for f in self._fields:
            yield _field_name(f), _field_value(f)

    def count(self, name: str) -> int:
        """How many fields named ``name`` the header has."""
        key = name.lower()
        return sum(1 for f in self._fields if _field_name(f).lower() == key)

    @property
    def body(self) -> bytes:
        """The body bytes, exactly as received."""
        return self._body

    @property
    def size(self) -> int:
        """Size of the message in bytes, with the current headers."""
        return sum(map(len, self._fields)) + len(self._separator) + len(self._body)

    def parsed(self) -> EmailMessage:
        """The message parsed with :mod:`email` (for MIME parts); parsed once, on first use.

        The parse is read-only: edits go through the header methods, never through this object.
        """
        if self._parsed is None:
            parser = email.parser.BytesParser(policy=email.policy.default)
            self._parsed = parser.parsebytes(self.as_bytes())
        return self._parsed

    def as_bytes(self) -> bytes:
        """The message as it will be stored and relayed."""
        return b"".join(self._fields) + self._separator + self._body

    # -- editing ---------------------------------------------------------------------------

    def add_header(self, name: str, value: str, *, top: bool = True) -> None:
        """Add a header field at the top (the default, as trace fields go) or the bottom."""
        field = _encode_field(name, value)
        if top:
            self._fields.insert(0, field)
        else:
            self._fields.append(field)
        self._changed(HeaderEdit("add", name, value))

    def remove_header(self, name: str) -> int:
        """Remove every field named ``name``; returns how many were removed."""
        key = name.lower()
        before = len(self._fields)
        self._fields = [f for f in self._fields if _field_name(f).lower() != key]
        removed = before - len(self._fields)
        if removed:
            self._changed(HeaderEdit("remove", name, ""))
        return removed

    def replace_header(self, name: str, value: str) -> None:
        """Replace the first field named ``name`` in place (added at the top if absent).

        Further fields of the same name are removed.
        """
        key = name.lower()
        field = _encode_field(name, value)
        out: list[bytes] = []
        done = False
        for f in self._fields:
            if _field_name(f).lower() == key:
                if not done:
                    out.append(field)
                    done = True
                continue
            out.append(f)
        if not done:
            out.insert(0, field)
        self._fields = out
        self._changed(HeaderEdit("replace", name, value))

    def _changed(self, edit: HeaderEdit) -> None:
        self.edits.append(edit)
        self._parsed = None
