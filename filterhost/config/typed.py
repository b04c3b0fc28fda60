"""Typed config sections: TOML tables checked against dataclasses, with errors in words.

Core sections and plugin sections are both plain frozen dataclasses. Each field's type annotation
says what the key accepts; ``field(metadata={"help": ...})`` says what it means. Supported types:
``str``, ``int``, ``float``, ``bool``, :class:`~filterhost.durations.Duration`, ``Literal[...]``,
``list[X]``, ``dict[str, X]`` and ``X | None`` of those, and nested dataclasses: a dataclass field
is a TOML table, a ``list[SomeDataclass]`` field an array of tables (``[[plugins.NAME.rules]]``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from filterhost.durations import Duration

__all__ = ["Problem", "SectionError", "build_section", "describe_type"]

T = TypeVar("T")


class SectionError(ValueError):
    """Raised by a section's ``__post_init__``: ``key`` (within the section) and what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """One configuration problem: where (file, dotted key) and what is wrong, in words."""

    file: str | None
    key: str
    message: str
    severity: Literal["error", "warning"] = "error"
    """An error stops the server from starting; a warning (say, a scanner that is down right
    now) is reported by ``--check-config`` and logged at start-up."""

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        level = "warning: " if self.severity == "warning" else ""
        return f"{where}{self.key}: {level}{self.message}"


def describe_type(tp: Any) -> str:  # noqa: PLR0911 - one answer per kind of type
    """What a value of type ``tp`` looks like, for error messages."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if _is_table(tp):
        return f"a table (keys: {', '.join(_init_fields(tp))})"
    if origin is list:
        (inner,) = get_args(tp)
        if _is_table(inner):
            return f"an array of tables (keys: {', '.join(_init_fields(inner))})"
        return f"a list of {describe_type(inner)}s" if get_origin(inner) is None else "a list"
    if origin is dict:
        return f"a table of {describe_type(get_args(tp)[1])} values"
    if origin in (types.UnionType, typing.Union):
        return " or ".join(describe_type(a) for a in get_args(tp) if a is not type(None))
    if tp is Duration:
        return 'duration (such as "30s", "5m", "1h")'
    names = {str: "string", int: "integer", float: "number", bool: "boolean (true/false)"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any) -> Any:  # noqa: PLR0911, PLR0912 - one branch per type
    """``value`` as type ``tp``; raises ValueError (message in words) when it does not fit."""
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                continue
            try:
                return _coerce(arm, value)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"expected {describe_type(tp)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ValueError(f"expected {describe_type(tp)}, got {value!r}")
    if _is_table(tp):
        if not isinstance(value, dict):
            raise ValueError(f"expected {describe_type(tp)}, got {value!r}")
        return _build_table(tp, value)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"expected {describe_type(tp)}, got {value!r}")
        (inner,) = get_args(tp)
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_coerce(inner, item))
            except ValueError as exc:
                raise ValueError(f"item {i + 1}: {exc}") from None
        return out
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected {describe_type(tp)}, got {value!r}")
        _, inner = get_args(tp)
        table = {}
        for key, item in value.items():
            try:
                table[str(key)] = _coerce(inner, item)
            except ValueError as exc:
                raise ValueError(f"{key!r}: {exc}") from None
        return table
    if tp is Duration:
        return Duration.parse(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r}")
    raise ValueError(f"expected {describe_type(tp)}, got {value!r}")


def _is_table(tp: Any) -> bool:
    """True for a dataclass type: a value of it is written as a TOML table."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _init_fields(cls: Any) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _build_table(cls: Any, value: Mapping[str, Any]) -> Any:
    """An instance of dataclass ``cls`` from a nested table; ValueError names the inner key.

    The same rules as a section (unknown keys and missing required keys are errors, a
    :class:`SectionError` from ``__post_init__`` names its key), but the first problem is
    raised, as for any other value: the caller puts it under the key that holds the table
    (``plugins.headers.rules: item 2: pattern: ...``).
    """
    hints = get_type_hints(cls)
    fields = _init_fields(cls)
    kwargs: dict[str, Any] = {}
    for key, item in value.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ValueError(f"unknown key {key!r} (known keys here: {known})")
        try:
            kwargs[key] = _coerce(hints[key], item)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            raise ValueError(f"{name}: required key missing: expected {describe_type(hints[name])}")
    try:
        return cls(**kwargs)
    except SectionError as exc:
        raise ValueError(f"{exc.key}: {exc}") from None
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def build_section(
    cls: type[T],
    data: Mapping[str, Any],
    prefix: str,
    origin: Mapping[str, str],
    problems: list[Problem],
    *,
    reserved: frozenset[str] = frozenset(),
) -> T | None:
    """An instance of dataclass ``cls`` from ``data``, or None after appending to ``problems``.

    ``prefix`` is the dotted table name (``"server"``); ``origin`` maps dotted keys to the file
    that set them; keys in ``reserved`` are skipped (handled by the caller).
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    ok = True
    for key, value in data.items():
        dotted = f"{prefix}.{key}"
        if key in reserved:
            continue
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            problems.append(
                Problem(origin.get(dotted), dotted, f"unknown key (known keys here: {known})")
            )
            ok = False
            continue
        try:
            kwargs[key] = _coerce(hints[key], value)
        except ValueError as exc:
            problems.append(Problem(origin.get(dotted), dotted, str(exc)))
            ok = False
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs and name not in data and f.init:
            dotted = f"{prefix}.{name}"
            problems.append(
                Problem(
                    origin.get(prefix),
                    dotted,
                    f"required key missing: expected {describe_type(hints[name])}",
                )
            )
            ok = False
    if not ok:
        return None
    try:
        return cls(**kwargs)
    except SectionError as exc:
        dotted = f"{prefix}.{exc.key}"
        problems.append(Problem(origin.get(dotted, origin.get(prefix)), dotted, str(exc)))
    except (TypeError, ValueError) as exc:
        problems.append(Problem(origin.get(prefix), prefix, str(exc)))
    return None
