"""Durations in configuration: ``"30s"``, ``"5m"``, ``"1h"``, ``"5d"``; a number is seconds."""

from __future__ import annotations

import math
import re

__all__ = ["Duration", "format_duration", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


class Duration(float):
    """Seconds, parsed from a duration string; a float, so it can be used as a timeout."""

    @classmethod
    def parse(cls, value: object) -> Duration:
        """Parse ``"30s"``-style text or a number of seconds; raise ValueError otherwise."""
        return cls(parse_duration(value))


def parse_duration(value: object) -> float:
    """Seconds in ``value``; raises ValueError with the accepted forms when it is not a duration."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "30s", "5m", "1h" or "5d"')
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"a duration must be a finite number of seconds, got {value!r}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _RE.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2) or "s"]
    raise ValueError(f'expected a duration such as "30s", "5m", "1h" or "5d", got {value!r}')


def format_duration(seconds: float) -> str:
    """The shortest exact form of ``seconds`` in the largest whole unit (``300`` -> ``"5m"``)."""
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
