"""Snippets for docs/plugins.md: find them in files, find the guide's blocks, copy one to the other.

``python -m tests.docs_examples.snippets`` rewrites each included block of the guide from its
source; the test in tests/test_hookspecs_documented.py fails while any block differs.
"""

from __future__ import annotations

import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "plugins.md"

_MARKER = re.compile(r"^\s*# -- (start|end) ([\w-]+) --\s*$")
_INCLUDE = re.compile(r"^<!-- include: (?P<path>[^#\s]+)(?:#(?P<name>[\w-]+))? -->$")
_FENCE = re.compile(r"^```(\w*)\s*$")


def snippet(path: str, name: str | None) -> str:
    """The text of snippet ``name`` in ``path`` (relative to the repository), dedented.

    Without ``name``: the whole file.
    """
    lines = (REPO / path).read_text(encoding="utf-8").splitlines()
    if name is None:
        return "\n".join(lines).strip("\n")
    inside: list[str] | None = None
    for line in lines:
        match = _MARKER.match(line)
        if match and match.group(2) == name:
            if match.group(1) == "start":
                inside = []
                continue
            if inside is None:
                break
            return textwrap.dedent("\n".join(inside)).strip("\n")
        if inside is not None:
            inside.append(line)
    raise LookupError(f"{path}: no snippet {name!r} (# -- start {name} -- ... # -- end {name} --)")


@dataclass(frozen=True)
class Block:
    """A fenced code block of the guide and the include comment above it, if any."""

    line: int
    """1-based line of the opening fence."""
    lang: str
    code: str
    include: tuple[str, str | None] | None


def blocks(text: str) -> list[Block]:
    """Every fenced block in ``text``, in order."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == "```")
        above = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        include = _INCLUDE.match(above)
        found.append(
            Block(
                i + 1,
                fence.group(1),
                "\n".join(lines[i + 1 : end]),
                (include.group("path"), include.group("name")) if include else None,
            )
        )
        i = end + 1
    return found


def synced(text: str) -> str:
    """``text`` with every included block replaced by its snippet."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    include: tuple[str, str | None] | None = None
    while i < len(lines):
        line = lines[i]
        match = _INCLUDE.match(line)
        if match is not None:
            include = (match.group("path"), match.group("name"))
        elif _FENCE.match(line) and include is not None:
            end = next(j for j in range(i + 1, len(lines)) if lines[j] == "```")
            out.append(line)
            out.extend(snippet(*include).splitlines())
            out.append("```")
            include = None
            i = end + 1
            continue
        elif line.strip():
            include = None
        out.append(line)
        i += 1
    return "\n".join(out) + "\n"


def main() -> int:
    """Rewrite the guide's included blocks from their sources."""
    text = GUIDE.read_text(encoding="utf-8")
    new = synced(text)
    if new != text:
        GUIDE.write_text(new, encoding="utf-8")
        print(f"{GUIDE.relative_to(REPO)}: blocks updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
