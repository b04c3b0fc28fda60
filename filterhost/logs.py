"""Logging set-up: one line per event, queue id first, so ``grep QUEUEID`` tells the story.

Every event line is ``ID: words key=value key=value``: the queue id (or session id ``S…``) first,
then what happened, then its fields. Values with spaces are quoted (``reply='250 2.0.0 Ok'``),
addresses are in angle brackets (``to=<bob@example.com>``). That one convention is what makes
the JSON output possible without a second set of log calls: :class:`JsonFormatter` reads the
fields back out of the line, so every event (the core's and the plugins') comes out as one JSON
object with ``id``, ``event`` and one member per field.

What is never logged: message bodies and header values (only sizes, counts and addresses), and
secrets (AUTH logs the user name on success only; passwords never reach a log call).
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
import time
from typing import Any, Literal

__all__ = ["JsonFormatter", "LogFormat", "TextFormatter", "parse_event", "setup_logging"]

LogFormat = Literal["text", "json"]

# "QUEUEID: rest" (spool.new_queue_id: hex) or "S1234-5: rest" (a session before its first
# message); anything else ("config: ...", "listening on ...") is about the server as a whole.
_ID = re.compile(r"^(?P<id>[0-9A-F]{12,}|S\d+-\d+): (?P<rest>.*)$", re.DOTALL)
# key=value where value is <...>, a Python-quoted string, or a run of non-blanks.
_FIELD = re.compile(
    r"""(?<![^\s(;,])(?P<key>[a-z_][a-z0-9_]*)=(?P<value><[^>]*>|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s;,]+)"""
)


def _value(text: str) -> Any:  # noqa: PLR0911 - one return per kind of value
    """A field's value as JSON wants it: unquoted, unbracketed, numbers as numbers."""
    if text[:1] in ("'", '"'):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if text.startswith("<") and text.endswith(">"):
        return text[1:-1]
    if text in ("True", "False"):
        return text == "True"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d+", text):
        return float(text)
    return text


def parse_event(message: str) -> dict[str, Any]:
    """Split one log message into ``id``, ``event`` (the words) and its ``key=value`` fields."""
    out: dict[str, Any] = {}
    match = _ID.match(message)
    rest = message
    if match is not None:
        out["id"] = match["id"]
        rest = match["rest"]
    words = _FIELD.sub(" ", rest)
    out["event"] = " ".join(words.split()).strip(" :;,")
    fields: dict[str, Any] = {}
    for field in _FIELD.finditer(rest):
        key = field["key"]
        if key in ("id", "event", "time", "level", "logger", "pid", "message"):
            key = f"{key}_"  # never let a field overwrite the line's own members
        fields[key] = _value(field["value"])
    # "QUEUEID: to=<x> status=delivered": the status is what happened.
    if not out["event"] and isinstance(fields.get("status"), str):
        out["event"] = fields["status"]
    out.update(fields)
    return out


class TextFormatter(logging.Formatter):
    """``time filterhost[pid] LEVEL logger: ID: event key=value ...`` (the default)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s filterhost[%(process)d] %(levelname)s %(name)s: %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: the text line's fields as members.

    ``message`` keeps the whole text line, so nothing is lost when a line has words that are
    not fields; an exception's traceback is in ``exc``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        message = record.getMessage()
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
        }
        out.update(parse_event(message))
        out["message"] = message
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Log to stderr (journald picks it up under systemd), as text or as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every peer and command at INFO; ours says what matters once.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
