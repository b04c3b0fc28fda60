"""Small helpers for run.sh and profile.sh (standard library only).

Sub-commands:

- ``count SINK_OUT``: smtp-sink's message counter now (0 before any).
- ``wait SINK_OUT TARGET TIMEOUT``: poll the counter every 10 ms until it reaches TARGET; print
  the epoch time it was seen, or "timeout COUNT" and exit 1.
- ``record OUT.jsonl KEY=VALUE...``: append one JSON object; numbers are parsed, and a value
  "@path" is the JSON document in that file.
- ``env OUT.json ROOT KEY=VALUE...``: the machine and the versions under test, plus the given keys
  (the knobs of the run).
- ``top COLLAPSED [N]``: the N functions with the most samples (own and total) in a py-spy "raw"
  (collapsed stacks) profile.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

MESG = re.compile(rb"mesg=(\d+)")
LINE_NO = re.compile(r":\d+\)$")
POLL_S = 0.01


def count(path: str) -> int:
    """The last ``mesg=N`` counter that ``smtp-sink -c`` printed to ``path``."""
    # smtp-sink rewrites its counter line in place ("\r"), so only the tail of the file matters.
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 256))
            tail = f.read()
    except OSError:
        return 0
    found = MESG.findall(tail)
    return int(found[-1]) if found else 0


def wait(path: str, target: int, timeout: float) -> int:
    """Print the epoch time at which the counter reached ``target``; 1 on timeout."""
    deadline = time.monotonic() + timeout
    while (seen := count(path)) < target:
        if time.monotonic() > deadline:
            print(f"timeout {seen}")
            return 1
        time.sleep(POLL_S)
    print(f"{time.time():.3f}")
    return 0


def parse_value(text: str) -> object:
    """A number if ``text`` is one, the JSON document of a file for ``@path``, else the text."""
    if text.startswith("@"):
        try:
            return json.loads(Path(text[1:]).read_text())
        except (OSError, ValueError):
            return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def pairs(args: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` arguments as a dict."""
    return {k: parse_value(v) for k, _, v in (a.partition("=") for a in args)}


def record(out: str, args: list[str]) -> int:
    """Append one run's numbers to the JSONL file."""
    with open(out, "a") as f:
        f.write(json.dumps(pairs(args)) + "\n")
    return 0


def _run(*cmd: str) -> str:
    """A command's first output line (stdout, else stderr); "" when it cannot run."""
    try:
        # Fixed argument lists of installed tools (git, postconf, clamd): no shell, no input.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else ""


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def _mount_of(path: str) -> str:
    """``fstype device`` of the mount that holds ``path``, from /proc/mounts."""
    best = ("", "?", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype = line.split()[:3]
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
            best = (mnt, fstype, dev)
    return f"{best[1]} on {best[2]} (mounted at {best[0]})"


def env(out: str, root: str, args: list[str]) -> int:
    """Write what a reader needs to judge the numbers: machine, load, versions."""
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    os_name = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            os_name = line.split("=", 1)[1].strip('"')
    commit = _run("git", "-C", root, "rev-parse", "--short", "HEAD")
    dirty = _run("git", "-C", root, "status", "--porcelain", "--untracked-files=no")
    knobs = pairs(args)
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "os": os_name,
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kb / 2**20, 1),
        "work_fs": _mount_of(str(knobs.get("work_dir", "/"))),
        "python": platform.python_version(),
        "aiosmtpd": _version("aiosmtpd"),
        "aiosmtplib": _version("aiosmtplib"),
        "uvloop": _version("uvloop"),
        "filterhost": _version("filterhost"),
        "filterhost_commit": commit + (" (uncommitted changes)" if dirty else ""),
        "postfix": _run("postconf", "-d", "-h", "mail_version"),
        "clamd": _run("clamd", "--version"),
        **knobs,
    }
    Path(out).write_text(json.dumps(info, indent=1) + "\n")
    return 0


def top(path: str, n: int) -> int:
    """Print the functions that held the CPU most (own samples) and longest (total samples).

    Frames are counted per function (line numbers dropped: one function's lines add up), and
    py-spy's per-process root frame is left out. py-spy samples every thread that is not idle,
    so a thread blocked in fsync or an executor's queue counts too (PROFILE_GIL=1: only the
    thread that holds the GIL).
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in Path(path).read_text().splitlines():
        stack, _, weight = line.rpartition(" ")
        if not stack or not weight.isdigit():
            continue
        k = int(weight)
        samples += k
        frames = [LINE_NO.sub(")", f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        own[frames[-1]] += k
        for frame in set(frames):  # once per stack: recursion must not count twice
            total[frame] += k
    if not samples:
        print("no samples")
        return 1
    print(f"{samples} samples")
    for title, counter in (("own time (leaf frames)", own), ("total time (on the stack)", total)):
        print(f"\n{title}:")
        for frame, k in counter.most_common(n):
            print(f"{100 * k / samples:6.1f}%  {frame}")
    return 0


def main(argv: list[str]) -> int:
    """Dispatch the sub-commands in the module docstring."""
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    if cmd == "count" and len(args) == 1:
        print(count(args[0]))
        return 0
    if cmd == "wait" and len(args) == 3:
        return wait(args[0], int(args[1]), float(args[2]))
    if cmd == "record" and args:
        return record(args[0], args[1:])
    if cmd == "env" and len(args) >= 2:
        return env(args[0], args[1], args[2:])
    if cmd == "top" and args:
        return top(args[0], int(args[1]) if len(args) > 1 else 30)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
