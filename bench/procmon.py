"""CPU time and memory of process trees, sampled from /proc (standard library only).

    procmon.py OUT.json READY_FILE NAME=PID[,PID...] ...

Each NAME is a group: the listed PIDs and all their descendants, found again at every sample so
that short-lived children (Postfix's smtpd/smtp/cleanup, worker processes) are seen. Samples every
0.1 s until SIGTERM or SIGINT, then writes OUT.json with, per group:

    cpu_s        CPU seconds between the first and the last sample: utime+stime+cutime+cstime
                 summed over the tree, so children reaped by a parent inside the tree still count
    peak_rss_kb  largest summed RSS of the tree (shared pages counted once per process)
    peak_pss_kb  largest summed PSS (smaps_rollup): shared pages divided among the processes
    hwm_kb       largest VmHWM of any one process: the kernel's own peak RSS for it
    max_procs    most processes seen in the tree at once

and, for the whole machine, the busy and total CPU seconds of the window (other users of the box
show up there). READY_FILE is written after the first sample, so a caller can start the load only
once the baseline is taken. memprobe.py imports the sampling functions.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
INTERVAL_S = 0.1
SLOW_EVERY = 5
"""PSS and VmHWM cost a file read per process: every 5th sample (and the last) is enough."""


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/PID/stat that the sampler needs."""

    ppid: int
    cpu_ticks: int
    rss_kb: int


def read_stat(pid: int) -> Stat | None:
    """One process's parent, CPU ticks (self + reaped children) and RSS; None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes().decode("latin-1")
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime 14-17, rss 24.
    return Stat(int(fields[1]), sum(int(x) for x in fields[11:15]), int(fields[21]) * PAGE_KB)


def read_kb(path: str, key: str) -> int:
    """The kB value of the line starting with ``key`` in a /proc file; 0 when unreadable."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def snapshot() -> dict[int, Stat]:
    """Every process on the machine, by PID."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := read_stat(int(name))) is not None:
            stats[int(name)] = st
    return stats


def tree(stats: dict[int, Stat], roots: list[int]) -> set[int]:
    """The PIDs of ``roots`` (those still alive) and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st.ppid, []).append(pid)
    found: set[int] = set()
    stack = [r for r in roots if r in stats]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found


def memory(pids: set[int], stats: dict[int, Stat]) -> dict[str, int]:
    """RSS sum, PSS sum and largest VmHWM of ``pids``, in kB."""
    return {
        "rss_kb": sum(stats[p].rss_kb for p in pids if p in stats),
        "pss_kb": sum(read_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids),
        "hwm_kb": max((read_kb(f"/proc/{p}/status", "VmHWM:") for p in pids), default=0),
        "procs": len(pids),
    }


def machine_cpu() -> tuple[int, int]:
    """(busy, total) ticks of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


@dataclass
class Group:
    """What has been seen of one process tree so far."""

    roots: list[int]
    cpu_first: int | None = None
    cpu_last: int = 0
    peaks: dict[str, int] = field(
        default_factory=lambda: {"peak_rss_kb": 0, "peak_pss_kb": 0, "hwm_kb": 0, "max_procs": 0}
    )

    def sample(self, stats: dict[int, Stat], slow: bool) -> None:
        """Fold one snapshot into the totals; PSS and VmHWM only when ``slow``."""
        pids = tree(stats, self.roots)
        cpu = sum(stats[p].cpu_ticks for p in pids)
        if self.cpu_first is None:
            self.cpu_first = cpu
        self.cpu_last = cpu
        p = self.peaks
        p["peak_rss_kb"] = max(p["peak_rss_kb"], sum(stats[pid].rss_kb for pid in pids))
        p["max_procs"] = max(p["max_procs"], len(pids))
        if slow:
            mem = memory(pids, stats)
            p["peak_pss_kb"] = max(p["peak_pss_kb"], mem["pss_kb"])
            p["hwm_kb"] = max(p["hwm_kb"], mem["hwm_kb"])

    def result(self) -> dict[str, float]:
        """The group's line in OUT.json."""
        cpu_s = (self.cpu_last - (self.cpu_first or 0)) / TICKS
        return {"cpu_s": round(cpu_s, 2), **self.peaks}


def main(argv: list[str]) -> int:
    """Sample until told to stop, then write the JSON summary."""
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out_path, ready = Path(argv[0]), Path(argv[1])
    groups = {}
    for arg in argv[2:]:
        name, pids = arg.split("=", 1)
        groups[name] = Group([int(p) for p in pids.split(",") if p])
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    busy0, total0 = machine_cpu()
    t_first = time.monotonic()
    n = 0
    while True:
        last = bool(stop)
        stats = snapshot()
        for group in groups.values():
            group.sample(stats, slow=n % SLOW_EVERY == 0 or last)
        if n == 0:
            ready.write_text("ready\n")
        n += 1
        if last:
            break
        time.sleep(INTERVAL_S)
    busy1, total1 = machine_cpu()
    out: dict[str, object] = {
        "interval_s": round(time.monotonic() - t_first, 3),
        "samples": n,
        "machine_busy_cpu_s": round((busy1 - busy0) / TICKS, 2),
        "machine_total_cpu_s": round((total1 - total0) / TICKS, 2),
    }
    out.update({name: group.result() for name, group in groups.items()})
    out_path.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
