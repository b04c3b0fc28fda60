"""Read ``conf.d/*.toml`` in file-name order; a later file overrides an earlier one key by key.

Every leaf key remembers the file that set it, so that every error can name the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filterhost.config.typed import Problem

__all__ = ["RawConfig", "read_conf_dir"]


@dataclass(slots=True)
class RawConfig:
    """The merged TOML data, where each dotted key came from, and the problems met reading it."""

    directory: Path
    data: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _merge(
    into: dict[str, Any], new: dict[str, Any], prefix: str, source: str, origin: dict[str, str]
) -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            origin.setdefault(dotted, source)
            sub = into.get(key)
            if not isinstance(sub, dict):
                sub = into[key] = {}
            _merge(sub, value, dotted + ".", source, origin)
        else:
            into[key] = value
            origin[dotted] = source


def read_conf_dir(directory: Path) -> RawConfig:
    """Read and merge every ``*.toml`` file in ``directory``, in file-name order."""
    raw = RawConfig(directory)
    if not directory.is_dir():
        raw.problems.append(
            Problem(str(directory), "-", "not a directory (give the conf.d directory with -c)")
        )
        return raw
    raw.files = sorted(p for p in directory.glob("*.toml") if p.is_file())
    if not raw.files:
        raw.problems.append(
            Problem(str(directory), "-", "no *.toml files (copy the shipped conf.d to start)")
        )
    for path in raw.files:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raw.problems.append(Problem(str(path), "-", f"TOML syntax error: {exc}"))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raw.problems.append(Problem(str(path), "-", f"cannot read: {exc}"))
            continue
        _merge(raw.data, data, "", str(path), raw.origin)
    return raw
