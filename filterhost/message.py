"""The message as plugins see it: raw bytes with an editable header block and a MIME view.

A message is kept as the bytes the client sent. Header fields are split out (each with its own raw
bytes, continuation lines included) so that a plugin can add, remove or replace a header without
the rest of the message being re-serialised: what a plugin did not touch leaves byte for byte as it
came in (DESIGN.md section 2, "Bytes are preserved").

The body and its MIME parts are read-only and parsed only when a plugin first asks
(:meth:`Message.text`, :meth:`Message.parts`, :meth:`Message.attachments`), so a chain of
header-only plugins never pays for a MIME parse.
"""

from __future__ import annotations

import email.errors
import email.header
import email.parser
import email.policy
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.message import Message as _EmailMessage
from typing import Literal

__all__ = ["HeaderEdit", "Message", "Part"]

_CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """One header change, recorded for the trace.

    ``op`` is ``"add"`` (``value`` added at the top or bottom), ``"remove"`` (every field
    ``name``; ``value`` is ``""``) or ``"replace"``.
    """

    op: Literal["add", "remove", "replace"]
    name: str
    value: str


def _field_name(raw: bytes) -> str:
    name, _, _ = raw.partition(b":")
    return name.decode("ascii", "replace").strip()


def _decoded_words(text: str) -> str:
    """``text`` with RFC 2047 encoded words decoded; as it was when they are malformed."""
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return text


def _field_value(raw: bytes) -> str:
    _, _, value = raw.partition(b":")
    # Unfold (RFC 5322 2.2.3): a CRLF followed by white space is not part of the value.
    text = value.decode("utf-8", "surrogateescape").replace("\r\n", "").replace("\n", "")
    return _decoded_words(text.strip())


_FIELD_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 2.2: printable ASCII except ":"
_LINE_BREAK = re.compile("[\r\n\0]")
_FOLD_AT = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
_MAX_LINE = 998  # ... and MUST be at most 998


def _fold(line: str) -> str:
    """Fold an ASCII header line at white space so that lines stay within 78 characters.

    Each line ends before the last space or tab that keeps it within the limit; a word longer
    than a line stays whole, on a line of its own. (The searches replace a split into words
    and a loop over them: a quarter of the time for a Received field, every message.)
    """
    if len(line) <= _FOLD_AT:
        return line
    out: list[str] = []
    start, end = 0, len(line)
    while end - start > _FOLD_AT:
        limit = start + _FOLD_AT + 1
        cut = max(line.rfind(" ", start + 1, limit), line.rfind("\t", start + 1, limit))
        if cut < 0:
            found = [c for c in (line.find(" ", limit), line.find("\t", limit)) if c >= 0]
            if not found:
                break
            cut = min(found)
        out.append(line[start:cut])
        start = cut
    out.append(line[start:])
    if any(len(part) > _MAX_LINE for part in out):
        raise ValueError("header value has a word longer than 998 characters; it cannot be folded")
    return "\r\n".join(out)


def _encode_field(name: str, value: str) -> bytes:
    if not _FIELD_NAME.match(name):
        raise ValueError(f"invalid header name {name!r}: printable ASCII, no ':' or spaces")
    if _LINE_BREAK.search(value):
        raise ValueError(f"invalid value for header {name}: it must be a single line")
    if value.isascii():
        return _fold(f"{name}: {value}").encode("ascii") + _CRLF
    encoded = email.header.Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}".encode("ascii") + _CRLF


class Part:
    """One MIME part of a message, read-only: its type, file name and decoded content.

    Leaf parts (``text/plain``, ``application/pdf``, ...) and attached messages
    (``message/rfc822``) are parts; ``multipart/*`` containers are not. Nothing here raises on
    malformed MIME: a value that cannot be read is ``None`` (or empty).
    """

    __slots__ = ("_part", "nested")

    def __init__(self, part: _EmailMessage, *, nested: bool = False) -> None:
        self._part = part
        self.nested = nested
        """True for the parts of an attached message: they are that message's text and
        files, not this one's (:meth:`Message.text` skips them; attachments include them)."""

    def __repr__(self) -> str:
        return f"Part({self.content_type!r}, filename={self.filename!r})"

    @property
    def content_type(self) -> str:
        """The MIME type in lower case, such as ``"application/pdf"`` (RFC 2045 defaults)."""
        return self._part.get_content_type()

    @property
    def filename(self) -> str | None:
        """The file name, decoded (RFC 2231 parameters and RFC 2047 words), or None.

        Taken from ``Content-Disposition: ...; filename=`` or else ``Content-Type: ...; name=``,
        as mail clients do. It is what the sender claims: never use it as a path.
        """
        try:
            name = self._part.get_filename()  # falls back to Content-Type's name itself
        except (ValueError, LookupError, UnicodeError, email.errors.MessageError):
            return None
        if not isinstance(name, str):
            return None
        return _decoded_words(name).strip() or None

    @property
    def disposition(self) -> str | None:
        """``"attachment"``, ``"inline"`` or None, from ``Content-Disposition``."""
        try:
            return self._part.get_content_disposition()
        except (ValueError, LookupError, email.errors.MessageError):
            return None

    @property
    def charset(self) -> str | None:
        """The ``charset`` parameter in lower case, or None."""
        try:
            return self._part.get_content_charset()
        except (ValueError, LookupError, email.errors.MessageError):
            return None

    @property
    def is_attachment(self) -> bool:
        """True when the part is a file: ``Content-Disposition: attachment`` or a file name.

        Inline parts with a file name count too: a mail client lets the reader open them.
        """
        return self.disposition == "attachment" or self.filename is not None

    def content(self) -> bytes:
        """The content with its transfer encoding (base64, quoted-printable) undone.

        For an attached message (or another ``message/*`` part), its bytes as the parser
        holds them, which may differ from the received bytes in line endings.
        """
        if self._part.is_multipart():
            inner = self._part.get_payload()
            if not isinstance(inner, list):
                return b""
            return b"\n".join(bytes(m.as_bytes()) for m in inner if isinstance(m, _EmailMessage))
        try:
            data = self._part.get_payload(decode=True)
        except (ValueError, LookupError, email.errors.MessageError):
            return b""
        return data if isinstance(data, bytes) else b""

    def text(self) -> str:
        """The content as text: decoded with its charset (UTF-8 when unknown), never raising.

        Line ends are newlines, as Python text has them (the message itself keeps its CRLF).
        """
        data = self.content()
        charset = self.charset or "utf-8"
        try:
            text = data.decode(charset, "replace")
        except LookupError:
            text = data.decode("utf-8", "replace")
        return text.replace("\r\n", "\n")


# Attached messages whose own parts are walked too (RFC 2046 5.2.1, RFC 6532 3.7).
_ENCAPSULATED = frozenset({"message/rfc822", "message/global"})


def _walk(part: _EmailMessage, nested: bool) -> Iterator[Part]:
    content_type = part.get_content_type()
    if part.get_content_maintype() == "message" or not part.is_multipart():
        yield Part(part, nested=nested)
        if content_type not in _ENCAPSULATED or not part.is_multipart():
            return
        nested = True
    payload = part.get_payload()
    if isinstance(payload, list):
        for inner in payload:
            if isinstance(inner, _EmailMessage):
                yield from _walk(inner, nested)


def _suffixes(suffix: str | Iterable[str]) -> tuple[str, ...]:
    items = (suffix,) if isinstance(suffix, str) else tuple(suffix)
    return tuple(s.lower() for s in items)


def _normalised_filename(name: str) -> str:
    # Windows drops trailing dots and spaces: "setup.exe. " runs as setup.exe.
    return name.strip().rstrip(". ").lower()


class Message:
    """An RFC 5322 message: editable header fields over the original bytes.

    Header names compare case-insensitively; values are returned unfolded and with RFC 2047
    encoded words decoded. Every edit is recorded in :attr:`edits`.
    """

    def __init__(self, raw: bytes) -> None:
        end = raw.find(b"\r\n\r\n")
        if raw.startswith(_CRLF):
            # No header section at all: the body starts after the empty line.
            head_end, self._separator, body_at = 0, _CRLF, 2
        elif end < 0:
            head_end, self._separator, body_at = len(raw), b"", len(raw)
        else:
            head_end, self._separator, body_at = end + 2, _CRLF, end + 4
        # The body stays in ``raw`` until someone asks for it: a 1 MB message is then copied
        # once on its way to the spool (as_bytes), not twice.
        self._raw = raw
        self._body_at = body_at
        self._body: bytes | None = None
        self._head_end = head_end
        self._split: list[bytes] | None = None
        self.edits: list[HeaderEdit] = []
        """Every header edit made so far, in order."""
        self._parsed: EmailMessage | None = None
        self._parts: list[Part] | None = None

    @property
    def _fields(self) -> list[bytes]:
        """The header fields (raw, folded lines kept), split when first needed.

        The queue runner makes a Message of every message it attempts, for plugins that may
        look; with none looking, the split was ~1% of a relayed 5 KB message's CPU.
        """
        fields = self._split
        if fields is None:
            fields = self._split = self._split_fields(self._raw[: self._head_end])
        return fields

    @_fields.setter
    def _fields(self, fields: list[bytes]) -> None:
        self._split = fields

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
        if self._body is None:
            self._body = self._raw[self._body_at :]
        return self._body

    @property
    def body_size(self) -> int:
        """Size of the body in bytes (without reading it out of the message)."""
        return len(self._raw) - self._body_at

    @property
    def size(self) -> int:
        """Size of the message in bytes, with the current headers."""
        return sum(map(len, self._fields)) + len(self._separator) + len(self._raw) - self._body_at

    def parsed(self) -> EmailMessage:
        """The message parsed with :mod:`email` (for MIME parts); parsed once, on first use.

        The parse is read-only: edits go through the header methods, never through this object.
        """
        if self._parsed is None:
            parser = email.parser.BytesParser(policy=email.policy.default)
            top = parser.parsebytes(b"".join(self._fields) + _CRLF, headersonly=True)
            if top.get_content_maintype() in ("multipart", "message") or top.get_payload():
                self._parsed = parser.parsebytes(self.as_bytes())
            else:
                # One part, its body: what the parser would make of it (the bytes as ASCII
                # with surrogates, line ends kept), without its line-by-line pass over a
                # body that may be megabytes (the MIME plugins' main cost at 1 MB).
                top.set_payload(self.body.decode("ascii", "surrogateescape"))
                self._parsed = top
        return self._parsed

    def parts(self) -> list[Part]:
        """Every MIME part, top to bottom, attached messages and their parts included.

        A message that is not multipart has one part: its body. Parsed on first use.
        """
        if self._parts is None:
            parsed = self.parsed()
            self._parts = list(_walk(parsed, False)) if parsed.is_multipart() else [Part(parsed)]
        return list(self._parts)

    def attachments(self) -> list[Part]:
        """The parts that are files (see :attr:`Part.is_attachment`), nested ones included."""
        return [p for p in self.parts() if p.is_attachment]

    def has_attachment(
        self, *, suffix: str | Iterable[str] = (), content_type: str | Iterable[str] = ()
    ) -> bool:
        """True when an attachment's file name ends with ``suffix`` or its type is ``content_type``.

        Both compare case-insensitively; give one value or several. The file name is compared
        the way Windows opens it (trailing dots and spaces dropped), so ``"setup.exe."`` matches
        ``".exe"``. With neither argument: True when there is any attachment.
        """
        suffixes = _suffixes(suffix)
        types = _suffixes(content_type)
        for part in self.attachments():
            if not suffixes and not types:
                return True
            name = part.filename
            if suffixes and name is not None and _normalised_filename(name).endswith(suffixes):
                return True
            if types and part.content_type in types:
                return True
        return False

    def text(self, subtype: str = "plain") -> str:
        """The readable text: the first ``text/<subtype>`` part that is not an attachment.

        Decoded (transfer encoding and charset); ``""`` when there is none. Use
        ``text("html")`` for the HTML version. Parts of an attached (forwarded) message are
        not this message's text.
        """
        wanted = f"text/{subtype.lower()}"
        for part in self.parts():
            if part.content_type == wanted and not part.is_attachment and not part.nested:
                return part.text()
        return ""

    def as_bytes(self) -> bytes:
        """The message as it will be stored and relayed."""
        body = memoryview(self._raw)[self._body_at :]
        return b"".join([*self._fields, self._separator, body])

    # -- editing ---------------------------------------------------------------------------

    def add_header(self, name: str, value: str, *, top: bool = True) -> None:
        """Add a header field at the top (the default, as trace fields go) or the bottom."""
        field = _encode_field(name, value)
        if top:
            self._fields.insert(0, field)
        else:
            self._fields.append(field)
        self._changed(HeaderEdit("add", name, value))

    def remove_header(self, name: str, *, where: Callable[[str], bool] | None = None) -> int:
        """Remove every field named ``name``; returns how many were removed.

        With ``where``, only the fields whose value (unfolded and decoded, as :meth:`get_all`
        returns it) makes ``where(value)`` true are removed; the others keep their bytes and
        places, e.g. ``remove_header("Received", where=lambda v: "[10." in v)``.
        """
        key = name.lower()
        before = len(self._fields)
        self._fields = [
            f
            for f in self._fields
            if _field_name(f).lower() != key or (where is not None and not where(_field_value(f)))
        ]
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

    def _checkpoint(self) -> tuple[list[bytes], int]:
        """The header state now, for :meth:`_rollback` (the runner undoes a failed plugin)."""
        return list(self._fields), len(self.edits)

    def _rollback(self, checkpoint: tuple[list[bytes], int]) -> None:
        fields, edits = checkpoint
        if len(self.edits) != edits or self._fields != fields:
            self._fields = fields
            del self.edits[edits:]
            self._parsed = None
            self._parts = None

    def _changed(self, edit: HeaderEdit) -> None:
        self.edits.append(edit)
        self._parsed = None
        self._parts = None
