"""filterhost plugin ``noexe``: refuse messages with executable attachments.

An attachment is executable when its file name ends with one of ``suffixes`` (compared the way
Windows opens files: case-insensitive, trailing dots and spaces ignored), when its MIME type is
an executable one, or when its content starts like a Windows executable (``MZ``), whatever it
is called. Such a message is refused in-session (554 5.7.1) or, with ``action = "quarantine"``,
kept aside and not relayed. Every other message gets ``X-Attachment-Check: passed (N
attachments)``; a field of that name that arrives with the message is removed first, so a
sender cannot forge it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from filterhost import (
    Config,
    ConfigRegistry,
    Part,
    Problem,
    Transaction,
    Verdict,
    hookimpl,
)

__all__ = ["DEFAULT_SUFFIXES", "SECTION", "NoExeConfig", "NoExecutables"]
__version__ = "0.1.0"

SECTION = "noexe"
"""The entry-point name, and so the ``[plugins.noexe]`` table."""

DEFAULT_SUFFIXES = (
    ".exe", ".scr", ".com", ".pif", ".bat", ".cmd", ".vbs", ".vbe", ".js", ".jse",
    ".wsf", ".hta", ".msi", ".msp", ".ps1", ".jar", ".lnk", ".dll", ".cpl",
)  # fmt: skip
EXECUTABLE_TYPES = frozenset(
    {
        "application/x-msdownload",
        "application/x-msdos-program",
        "application/x-dosexec",
        "application/x-executable",
        "application/vnd.microsoft.portable-executable",
    }
)
_PE_MAGIC = b"MZ"

log = logging.getLogger("filterhost.plugins.noexe")


@dataclass(frozen=True, slots=True)
class NoExeConfig:
    """``[plugins.noexe]``: which attachments are refused, and what happens then."""

    suffixes: list[str] = field(
        default_factory=lambda: list(DEFAULT_SUFFIXES),
        metadata={"help": 'file name endings that are refused, such as ".exe"'},
    )
    action: Literal["reject", "quarantine"] = field(
        default="reject",
        metadata={"help": '"reject": 554 5.7.1 in-session; "quarantine": accept, keep aside'},
    )
    header: str = field(
        default="X-Attachment-Check",
        metadata={"help": "header field stamped on messages that pass"},
    )
    check_content: bool = field(
        default=True,
        metadata={"help": "also refuse attachments whose content is a Windows executable"},
    )


class NoExecutables:
    """The plugin object the ``noexe`` entry point names (filterhost instantiates the class)."""

    timeout = 10.0
    """Seconds per call: parsing the MIME parts of a large message is the slowest part."""
    on_error = "tempfail"
    """If the check itself fails, the client is asked to retry: never pass unchecked mail."""

    def __init__(self) -> None:
        self.settings = NoExeConfig()

    @hookimpl
    def filterhost_add_config(self, registry: ConfigRegistry) -> None:
        """Declare ``[plugins.noexe]``."""
        registry.add(SECTION, NoExeConfig, "refuse executable attachments")

    @hookimpl
    def filterhost_check_config(self, config: Config) -> list[Problem]:
        """Suffixes must start with a dot; a header name must be a field name."""
        settings = config.plugin_config(NoExeConfig)
        key = f"plugins.{SECTION}"
        problems = [
            Problem(
                config.where(f"{key}.suffixes"),
                f"{key}.suffixes",
                f'{suffix!r} does not start with a dot; write it as ".{suffix.lstrip(".")}"',
            )
            for suffix in settings.suffixes
            if not suffix.startswith(".") or suffix == "."
        ]
        if not settings.header or any(c in settings.header for c in ": \t\r\n"):
            problems.append(
                Problem(
                    config.where(f"{key}.header"),
                    f"{key}.header",
                    f"{settings.header!r} is not a header field name",
                )
            )
        return problems

    @hookimpl
    def filterhost_configure(self, config: Config) -> None:
        """Read the typed settings once, before serving."""
        self.settings = config.plugin_config(NoExeConfig)

    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> Verdict | None:
        """Refuse (or quarantine) a message with an executable attachment; stamp the rest."""
        message = transaction.message
        message.remove_header(self.settings.header)
        attachments = message.attachments()
        bad = next((part for part in attachments if self.is_executable(part)), None)
        if bad is not None:
            # The file name comes from the sender: it goes to the log (repr), not to the reply.
            reason = f"executable attachment {bad.filename!r} ({bad.content_type})"
            if self.settings.action == "quarantine":
                return Verdict.quarantine(reason)
            return Verdict.reject("5.7.1", "Executable attachments are not accepted", reason=reason)
        message.add_header(self.settings.header, f"passed ({len(attachments)} attachments)")
        return None

    def is_executable(self, part: Part) -> bool:
        """True when ``part`` is an executable by name, by type or (if enabled) by content."""
        name = (part.filename or "").strip().rstrip(". ").lower()
        if name.endswith(tuple(s.lower() for s in self.settings.suffixes)):
            return True
        if part.content_type in EXECUTABLE_TYPES:
            return True
        return self.settings.check_content and part.content().startswith(_PE_MAGIC)
