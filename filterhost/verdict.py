"""Verdicts: what a plugin (or core policy) decides about a session, a recipient or a message.

A hook returns ``None`` to let the chain go on, or a :class:`Verdict`. Replies are built from a
code, an RFC 3463 enhanced status code and a text; only the SMTP front end turns them into wire
text, so a plugin never writes ``"550 ..."`` strings itself.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace

__all__ = ["Action", "InvalidVerdictError", "Reply", "Verdict"]

_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_LINE_BREAK = re.compile("[\r\n\0]")


class InvalidVerdictError(ValueError):
    """A verdict or reply that breaks the rules (a reject with a 4xx code, say)."""


class Action(enum.Enum):
    """What happens to the session, recipient or message."""

    CONTINUE = "continue"
    """Go on with the next plugin (the same as returning ``None``)."""
    ACCEPT = "accept"
    """Accept now: the rest of the chain is skipped (at RCPT: the recipient may be relayed)."""
    REJECT = "reject"
    """Refuse permanently (5xx)."""
    TEMPFAIL = "tempfail"
    """Refuse for now (4xx); the client is expected to retry."""
    DISCARD = "discard"
    """Answer as if accepted, then drop the message (logged)."""
    QUARANTINE = "quarantine"
    """Answer as if accepted, and keep the message aside instead of relaying it."""
    DISCONNECT = "disconnect"
    """Answer with a 421 and close the connection."""

    @property
    def is_terminal(self) -> bool:
        """True for every action that ends the chain."""
        return self is not Action.CONTINUE


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: ``code`` (e.g. 554), ``status`` (RFC 3463, e.g. ``"5.7.1"``) and ``text``.

    The text must not contain the code; the front end formats the reply.
    """

    code: int
    status: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise InvalidVerdictError(f"reply code {self.code} is not an SMTP code (200-599)")
        if not _STATUS_RE.match(self.status):
            raise InvalidVerdictError(
                f"enhanced status {self.status!r} is not of the form 'X.Y.Z' (RFC 3463)"
            )
        if ord(self.status[0]) - 48 != self.code // 100:
            raise InvalidVerdictError(
                f"enhanced status {self.status} does not match reply code {self.code}"
            )
        if _LINE_BREAK.search(self.text):
            raise InvalidVerdictError("reply text must be a single line")

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def is_permanent(self) -> bool:
        """True for a 5xx reply."""
        return self.code >= 500

    @property
    def is_transient(self) -> bool:
        """True for a 4xx reply."""
        return 400 <= self.code < 500


# The reply each action gets when a plugin gives none.
_DEFAULT_REPLIES: dict[Action, Reply] = {
    Action.REJECT: Reply(550, "5.7.1", "Rejected by policy"),
    Action.TEMPFAIL: Reply(451, "4.3.0", "Temporary failure, try again later"),
    Action.DISCONNECT: Reply(421, "4.7.0", "Closing connection"),
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision: an :class:`Action`, the reply the client gets, and a reason for the log.

    Build verdicts with the constructors (:meth:`reject`, :meth:`tempfail`, ...). ``plugin`` is
    filled in by the runner with the name of the plugin that decided.
    """

    action: Action
    reply: Reply | None = None
    reason: str = ""
    plugin: str | None = None

    def __post_init__(self) -> None:
        reply = self.reply
        if reply is None:
            return
        if self.action is Action.REJECT and not reply.is_permanent:
            raise InvalidVerdictError(f"a reject needs a 5xx reply, not {reply.code}")
        if self.action is Action.TEMPFAIL and not reply.is_transient:
            raise InvalidVerdictError(f"a tempfail needs a 4xx reply, not {reply.code}")
        if self.action is Action.DISCONNECT and reply.code != 421:
            raise InvalidVerdictError(f"a disconnect replies 421, not {reply.code}")
        if self.action in (Action.ACCEPT, Action.DISCARD, Action.QUARANTINE) and reply.code >= 400:
            raise InvalidVerdictError(f"{self.action.value} needs a 2xx reply, not {reply.code}")

    @classmethod
    def accept(cls, reason: str = "") -> Verdict:
        """Accept, skipping the rest of the chain."""
        return cls(Action.ACCEPT, None, reason)

    @classmethod
    def reject(
        cls, status: str, text: str, *, code: int | None = None, reason: str = ""
    ) -> Verdict:
        """Refuse for good: ``Verdict.reject("5.7.1", "Virus found")`` (code 554 unless given)."""
        return cls(Action.REJECT, Reply(code or 554, status, text), reason or text)

    @classmethod
    def tempfail(
        cls, status: str, text: str, *, code: int | None = None, reason: str = ""
    ) -> Verdict:
        """Refuse for now: ``Verdict.tempfail("4.7.0", "Scanner busy")`` (code 451 unless given)."""
        return cls(Action.TEMPFAIL, Reply(code or 451, status, text), reason or text)

    @classmethod
    def discard(cls, reason: str) -> Verdict:
        """Answer as if accepted and drop the message; ``reason`` is logged."""
        return cls(Action.DISCARD, None, reason)

    @classmethod
    def quarantine(cls, reason: str) -> Verdict:
        """Answer as if accepted and keep the message aside; ``reason`` is logged."""
        return cls(Action.QUARANTINE, None, reason)

    @classmethod
    def disconnect(cls, text: str = "Closing connection", *, reason: str = "") -> Verdict:
        """Reply 421 4.7.0 and close the connection."""
        return cls(Action.DISCONNECT, Reply(421, "4.7.0", text), reason or text)

    @property
    def effective_reply(self) -> Reply | None:
        """The reply to send: the verdict's own, or the default for its action."""
        return self.reply or _DEFAULT_REPLIES.get(self.action)

    def by(self, plugin: str) -> Verdict:
        """The same verdict, recorded as decided by ``plugin``."""
        return replace(self, plugin=plugin)
