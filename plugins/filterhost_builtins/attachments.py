"""The ``attachments`` plugin: refuse (or quarantine) mail carrying banned file names and types.

Amavis-style banning, at the end of DATA: every MIME part of the message is looked at, nested
multiparts and attached messages (``message/rfc822``) included, with file names decoded (RFC 2231
parameters, RFC 2047 encoded words) and compared the way Windows opens files (case-insensitive,
trailing dots and spaces dropped, directories in the name ignored). A part is banned for:

1. a name matching one of ``name_patterns`` (regular expressions);
2. a double extension ending in an executable one (``invoice.pdf.exe``), ``double_extensions``;
3. a banned extension (``extensions`` + ``extra_extensions``: ``.exe``, ``.js``, ``.lnk``, ...);
4. a banned declared type (``content_types`` + ``extra_content_types``:
   ``application/x-msdownload``, ...);
5. content that is a Windows executable (the ``MZ``/``PE`` headers), whatever the part is
   called, ``executable_content``;
6. a zip archive holding a member banned by 1-3 (or a zip inside that zip, down to
   ``archive_depth``), ``archives``. Only the archive's directory is read (no decompression),
   except for a zip inside a zip no larger than ``archive_max_size``.

The first banned part decides: ``554 5.7.1 Attachment "invoice.pdf.exe" is not allowed (double
extension)`` in-session (``action = "reject"``), or the message is accepted and kept in the
quarantine (``action = "quarantine"``) with that text as the reason. See
docs/plugins/attachments.md.

This plugin uses only the public API (``from filterhost import ...``).
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Literal

from filterhost import Config, ConfigRegistry, Part, Problem, Transaction, Verdict, hookimpl

__all__ = [
    "DEFAULT_CONTENT_TYPES",
    "DEFAULT_EXTENSIONS",
    "AttachmentsConfig",
    "AttachmentsPlugin",
    "Banned",
]

SECTION = "attachments"
"""The ``[plugins.attachments]`` table, and the name the entry point registers."""

# Executables, scripts, installers, shortcuts and the like: what Windows runs (or hands to an
# interpreter) on a double click. Amavis's long list, plus what Microsoft 365's default
# attachment filter adds (PowerShell, MSIX/AppX, XLL add-ins, disk images that get past the
# "mark of the web"). Archives and Office documents are not banned by name: they are looked into.
DEFAULT_EXTENSIONS = (
    ".ade", ".adp", ".appx", ".appxbundle", ".bas", ".bat", ".chm", ".cmd", ".com", ".cpl",
    ".dll", ".exe", ".gadget", ".hlp", ".hta", ".inf", ".ins", ".isp", ".jar", ".jnlp", ".js",
    ".jse", ".lnk", ".mde", ".msc", ".msi", ".msix", ".msixbundle", ".msp", ".mst", ".ocx",
    ".pif", ".ps1", ".ps1xml", ".ps2", ".ps2xml", ".psc1", ".psc2", ".psm1", ".reg", ".scf",
    ".scr", ".sct", ".shb", ".shs", ".sys", ".vb", ".vbe", ".vbs", ".vxd", ".wsc", ".wsf",
    ".wsh", ".xll", ".iso", ".img", ".vhd", ".vhdx",
)  # fmt: skip

DEFAULT_CONTENT_TYPES = (
    "application/x-msdownload",
    "application/x-msdos-program",
    "application/x-dosexec",
    "application/x-ms-dos-executable",
    "application/vnd.microsoft.portable-executable",
    "application/x-msi",
    "application/x-ms-installer",
    "application/x-ms-shortcut",
    "application/hta",
)

_CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_MAX_SHOWN = 100  # characters of a file name in a reply
_MAX_MEMBERS = 10_000  # zip members looked at per archive; beyond that the rest is skipped
_THREAD_ABOVE = 256 * 1024  # bytes: larger messages are parsed off the event loop

log = logging.getLogger("filterhost.plugins.attachments")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True)
class AttachmentsConfig:
    """``[plugins.attachments]``: which parts are banned, and what happens to the message."""

    extensions: list[str] = field(
        default_factory=lambda: list(DEFAULT_EXTENSIONS),
        metadata=_help('banned file name endings, such as ".exe" (replaces the built-in list)'),
    )
    extra_extensions: list[str] = field(
        default_factory=list,
        metadata=_help("more banned endings, added to extensions (keeps the built-in list)"),
    )
    content_types: list[str] = field(
        default_factory=lambda: list(DEFAULT_CONTENT_TYPES),
        metadata=_help("banned declared MIME types (replaces the built-in list)"),
    )
    extra_content_types: list[str] = field(
        default_factory=list, metadata=_help("more banned MIME types, added to content_types")
    )
    double_extensions: bool = field(
        default=True,
        metadata=_help(
            'ban "name.doc.exe": a name with two extensions, the last one executable '
            "(built-in list or extensions), even if that extension is otherwise allowed"
        ),
    )
    name_patterns: list[str] = field(
        default_factory=list,
        metadata=_help("regular expressions searched in file names (case-insensitive)"),
    )
    executable_content: bool = field(
        default=True,
        metadata=_help("ban parts whose content is a Windows executable, whatever their name"),
    )
    archives: bool = field(
        default=True, metadata=_help("look for banned names inside zip attachments")
    )
    archive_depth: int = field(
        default=2,
        metadata=_help("zip levels looked into: 1 the attachment's own list, 2 a zip in it, ..."),
    )
    archive_max_size: int = field(
        default=25 * 1024 * 1024,
        metadata=_help("bytes; larger zips (or zips inside zips) are not looked into"),
    )
    action: Literal["reject", "quarantine"] = field(
        default="reject",
        metadata=_help('"reject": 554 5.7.1 in-session; "quarantine": accept and keep aside'),
    )


@dataclass(frozen=True, slots=True)
class Banned:
    """Why a part is banned: ``name`` (None for a part without one) and ``why`` in words."""

    name: str | None
    why: str
    content_type: str

    @property
    def text(self) -> str:
        """The reply text: ``Attachment "x.pdf.exe" is not allowed (double extension)``."""
        if self.name is None:
            return f"A part of type {self.content_type} is not allowed ({self.why})"
        return f'Attachment "{_shown(self.name)}" is not allowed ({self.why})'


def _shown(name: str) -> str:
    """A sender-chosen name fit for a reply: printable ASCII, no quotes, one line, bounded."""
    clean = "".join(c if c.isascii() and c.isprintable() and c != '"' else "?" for c in name)
    return clean if len(clean) <= _MAX_SHOWN else clean[: _MAX_SHOWN - 3] + "..."


def _normalised(name: str) -> str:
    """The name as Windows would open it: last path component, no trailing dots or spaces."""
    base = re.split(r"[/\\]", name)[-1]
    return base.strip().rstrip(". ").lower()


def _extension(ext: str) -> str:
    ext = ext.strip().lower()
    return ext if ext.startswith(".") else "." + ext


def is_windows_executable(data: bytes) -> bool:
    """True when ``data`` starts with a DOS header that points to a PE header (EXE, DLL, SCR).

    ``MZ`` alone is too weak (a text may start with it); the PE signature at the offset the DOS
    header gives (``e_lfanew``, at 0x3C) is what Windows' loader checks.
    """
    if len(data) < 0x40 or not data.startswith(b"MZ"):
        return False
    offset = int.from_bytes(data[0x3C:0x40], "little")
    return data[offset : offset + 4] == b"PE\0\0"


@dataclass(frozen=True, slots=True)
class _Rules:
    """The configuration compiled for checking."""

    extensions: tuple[str, ...]
    executable: tuple[str, ...]
    """Endings that make a double extension: the built-in list and the operator's."""
    content_types: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]
    config: AttachmentsConfig

    @classmethod
    def build(cls, cfg: AttachmentsConfig) -> _Rules:
        extensions = tuple(
            dict.fromkeys(_extension(e) for e in [*cfg.extensions, *cfg.extra_extensions])
        )
        return cls(
            extensions=extensions,
            executable=tuple(dict.fromkeys([*DEFAULT_EXTENSIONS, *extensions])),
            content_types=frozenset(
                t.strip().lower() for t in [*cfg.content_types, *cfg.extra_content_types]
            ),
            patterns=tuple(re.compile(p, re.IGNORECASE) for p in cfg.name_patterns),
            config=cfg,
        )

    def name_problem(self, name: str) -> str | None:
        """Why a file called ``name`` is banned, or None."""
        norm = _normalised(name)
        if not norm:
            return None
        for pattern in self.patterns:
            if pattern.search(norm):
                return "banned file name"
        if self.config.double_extensions:
            stem, dot, _ = norm.rpartition(".")
            if dot and stem and norm.endswith(self.executable):
                _, dot2, previous = stem.rpartition(".")
                # Amavis: the extension before must have a letter (not "v1.2.exe", a version).
                if dot2 and any(c.isalpha() for c in previous):
                    return "double extension"
        for ext in self.extensions:
            if norm.endswith(ext):
                return f"file type {ext}"
        return None

    def part_problem(self, part: Part) -> Banned | None:  # noqa: PLR0911 - one per rule
        """Why ``part`` is banned, or None."""
        name = part.filename
        ctype = part.content_type
        if name is not None:
            why = self.name_problem(name)
            if why is not None:
                return Banned(name, why, ctype)
        if ctype in self.content_types:
            return Banned(name, f"type {ctype}", ctype)
        if ctype.startswith(("message/", "multipart/")):
            return None
        cfg = self.config
        if name is None and ctype.startswith("text/"):
            return None  # the message's own text, not a file
        if not (cfg.executable_content or cfg.archives):
            return None
        data = part.content()
        if cfg.executable_content and is_windows_executable(data):
            return Banned(name, "Windows executable", ctype)
        if cfg.archives and cfg.archive_depth > 0 and data.startswith(_ZIP_MAGIC):
            inner = self.archive_problem(data, cfg.archive_depth)
            if inner is not None:
                return Banned(name, inner, ctype)
        return None

    def archive_problem(self, data: bytes, depth: int) -> str | None:
        """Why the zip archive ``data`` is banned (a member's name), looking ``depth`` levels."""
        if len(data) > self.config.archive_max_size:
            return None
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError):
            return None  # not an archive we can read: nothing to say about its names
        with archive:
            members = archive.infolist()[:_MAX_MEMBERS]
            for info in members:
                if info.is_dir():
                    continue
                why = self.name_problem(info.filename)
                if why is not None:
                    return f'it contains "{_shown(_normalised(info.filename))}": {why}'
            if depth <= 1:
                return None
            for info in members:
                if info.is_dir() or not _normalised(info.filename).endswith(".zip"):
                    continue
                if info.file_size > self.config.archive_max_size or info.flag_bits & 0x1:
                    continue  # too large to unpack here, or encrypted
                try:
                    # ZipExtFile stops at the declared file_size, checked above.
                    inner = archive.read(info)
                except (
                    zipfile.BadZipFile,
                    ValueError,
                    OSError,
                    EOFError,
                    RuntimeError,
                    NotImplementedError,
                    zlib.error,
                ):
                    continue
                why = self.archive_problem(inner, depth - 1)
                if why is not None:
                    return f'it contains "{_shown(_normalised(info.filename))}": {why}'
        return None


def _problems(cfg: AttachmentsConfig, config: Config) -> list[Problem]:
    """What is wrong with ``cfg``: each problem with the file and key that set it."""
    prefix = f"plugins.{SECTION}"
    problems: list[Problem] = []

    def problem(key: str, message: str) -> None:
        dotted = f"{prefix}.{key}"
        problems.append(Problem(config.where(dotted), dotted, message))

    for key in ("extensions", "extra_extensions"):
        for i, ext in enumerate(getattr(cfg, key), 1):
            body = ext.strip().lstrip(".")
            if not body or any(c.isspace() or c in "/\\" for c in body) or not body.isprintable():
                problem(key, f'item {i}: {ext!r} is not a file name ending, such as ".exe"')
    for key in ("content_types", "extra_content_types"):
        for i, ctype in enumerate(getattr(cfg, key), 1):
            if not _CONTENT_TYPE.match(ctype.strip().lower()):
                problem(key, f'item {i}: {ctype!r} is not a MIME type such as "application/x-foo"')
    for i, pattern in enumerate(cfg.name_patterns, 1):
        if not pattern:
            problem("name_patterns", f"item {i}: an empty pattern would ban every file name")
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            problem("name_patterns", f"item {i}: {pattern!r} is not a regular expression: {exc}")
    if cfg.archive_depth < 0:
        problem("archive_depth", f"must be 0 or more, got {cfg.archive_depth}")
    if cfg.archive_max_size < 0:
        problem("archive_max_size", f"must be 0 or more bytes, got {cfg.archive_max_size}")
    return problems


class AttachmentsPlugin:
    """Ban attachments by name, extension, type, content and zip contents.

    Registered as ``attachments`` in the ``filterhost.plugins`` entry-point group.
    """

    timeout: float = 30.0
    """Seconds per call; parsing and looking into the parts of a 25 MB message takes well
    under one second."""

    edits_headers = False
    """It only decides (reject, quarantine): it may run after dkim without breaking a signature."""

    on_error: Literal["tempfail", "pass", "reject"] = "tempfail"
    """If the check itself fails, the client retries later: mail is never passed unchecked."""

    def __init__(self) -> None:
        self._rules: _Rules | None = None

    @hookimpl
    def filterhost_add_config(self, registry: ConfigRegistry) -> None:
        """Declare ``[plugins.attachments]``."""
        registry.add(SECTION, AttachmentsConfig, "banned attachment names and types")

    @hookimpl
    def filterhost_check_config(self, config: Config) -> list[Problem]:
        """Each extension, type and pattern must be usable; depth and size not negative."""
        return _problems(config.plugin_config(AttachmentsConfig), config)

    @hookimpl
    def filterhost_configure(self, config: Config) -> None:
        """Compile the settings once, before serving."""
        cfg = config.plugin_config(AttachmentsConfig)
        problems = _problems(cfg, config)
        if problems:
            # --check-config reports these first, and the server does not start with them.
            raise ValueError("; ".join(str(p) for p in problems))
        self._rules = _Rules.build(cfg)

    @hookimpl
    async def filterhost_message(self, transaction: Transaction) -> Verdict | None:
        """Refuse or quarantine the message if one of its parts is banned."""
        rules = self._rules
        if rules is None:
            raise RuntimeError("attachments: filterhost_configure was not called")
        message = transaction.message
        if message.size > _THREAD_ABOVE:
            # MIME parsing and base64 decoding of a large message would stall every other
            # session on the event loop; the chain waits for this plugin either way.
            banned = await asyncio.to_thread(self._first_banned, rules, transaction)
        else:
            banned = self._first_banned(rules, transaction)
        if banned is None:
            return None
        log.info(
            "%s: attachments: banned part name=%r type=%s (%s); action=%s",
            transaction.queue_id or "-",
            banned.name,
            banned.content_type,
            banned.why,
            rules.config.action,
        )
        if rules.config.action == "quarantine":
            return Verdict.quarantine(banned.text)
        return Verdict.reject("5.7.1", banned.text)

    @staticmethod
    def _first_banned(rules: _Rules, transaction: Transaction) -> Banned | None:
        for part in transaction.message.parts():
            banned = rules.part_problem(part)
            if banned is not None:
                return banned
        return None
