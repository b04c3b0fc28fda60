"""RFC 3463 enhanced status codes on every reply (RFC 2034 ENHANCEDSTATUSCODES).

filterhost's own replies are built with a code (:class:`~filterhost.verdict.Reply`); a few
still come from aiosmtpd's code paths (STARTTLS, HELP, NOOP, RSET, QUIT, "send HELO first").
:func:`with_status` gives those one, by their text where it says more than the code, else by
the code. RFC 2034 exempts the greeting and the replies to HELO and EHLO (the front end sends
those without this function); 334 (AUTH challenge) and 354 (go ahead with DATA) carry none.
"""

from __future__ import annotations

import re

__all__ = ["with_status"]

_HAS_STATUS = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_NONE = frozenset({"334", "354"})
_BY_TEXT = {
    "Command refused due to lack of security": "5.7.0",
    "Must issue a STARTTLS command first": "5.7.0",
    "TLS not available": "4.7.0",
}
_BY_CODE = {
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.0",
    "554": "5.0.0",
    "555": "5.5.4",
}


def with_status(line: str) -> str:
    """``line`` (one reply line, ``"NNN text"`` or ``"NNN-text"``) with an enhanced code."""
    code = line[:3]
    if len(line) < 3 or not code.isdigit() or code in _NONE or _HAS_STATUS.match(line):
        return line
    sep, text = line[3:4] or " ", line[4:]
    status = _BY_TEXT.get(text) or _BY_CODE.get(code) or f"{code[0]}.0.0"
    return f"{code}{sep}{status} {text}" if text else f"{code}{sep}{status}"
