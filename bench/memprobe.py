"""Memory of a server under two loads that throughput runs do not show (issue 7's RSS targets).

    memprobe.py idle PORT SESSIONS SERVER_PID OUT.json
        Open SESSIONS connections that each read the greeting and say EHLO, then stay idle.
        Records the server tree's RSS/PSS before and with all of them open.
    memprobe.py inflight PORT N BYTES SERVER_PID SINK_OUT OUT.json
        N sessions each send a whole message of BYTES (MAIL, RCPT, DATA, body) but hold back the
        final ".": N messages are then in flight inside the server at once. Records RSS before,
        while they are held, and the peak while they are ended, spooled and relayed (until
        smtp-sink counted them).

The server tree is SERVER_PID and its descendants. Every wait is bounded (TIMEOUT_S overall).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import count
from clamd_rate import message
from procmon import memory, snapshot, tree

TIMEOUT_S = 120.0
DEADLINE = time.monotonic() + TIMEOUT_S
CONNECT_AT_ONCE = 50
"""Handshakes in progress at once: more would overflow the server's listen backlog (SYN drops
cost a 1 s retransmit each, which measures TCP, not the server)."""


async def until(done: Callable[[], bool], interval: float) -> None:
    """Poll ``done`` every ``interval`` seconds until it is true or DEADLINE has passed."""
    for _ in range(int(TIMEOUT_S / interval)):
        if done() or time.monotonic() > DEADLINE:
            return
        await asyncio.sleep(interval)


def server_memory(pid: int) -> dict[str, int]:
    """RSS sum, PSS sum, largest VmHWM and process count of the server tree now."""
    stats = snapshot()
    return memory(tree(stats, [pid]), stats)


async def reply(reader: asyncio.StreamReader) -> bytes:
    """One SMTP reply (all lines of a multi-line one); the last line."""
    while True:
        line = await reader.readline()
        if not line or line[3:4] != b"-":
            return line


Session = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_session(port: int, gate: asyncio.Semaphore) -> Session | None:
    """Connect, read the greeting, EHLO; None unless the server said 220 and 250."""
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = await reply(reader)
        writer.write(b"EHLO bench.test\r\n")
        ehlo = await reply(reader)
    if greeting.startswith(b"220") and ehlo.startswith(b"250"):
        return reader, writer
    writer.close()
    return None


def close_all(sessions: list[Session]) -> None:
    """Drop every connection (an abrupt close is what an idle client that goes away does)."""
    for _, writer in sessions:
        writer.close()


async def idle(port: int, n: int, pid: int) -> dict[str, object]:
    """Memory with ``n`` idle sessions open."""
    before = server_memory(pid)
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(open_session(port, gate) for _ in range(n)), return_exceptions=True
    )
    sessions = [r for r in results if isinstance(r, tuple)]
    open_s = time.monotonic() - t0
    await asyncio.sleep(0.5)  # let the server finish whatever each greeting started
    during = server_memory(pid)
    close_all(sessions)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    return {
        "sessions": n,
        "sessions_ok": len(sessions),
        "open_s": round(open_s, 2),
        "before": before,
        "idle": during,
        "per_session_kb": round((during["rss_kb"] - before["rss_kb"]) / max(1, len(sessions)), 1),
        "first_error": errors[0] if errors else "",
    }


def tcp_queues(port: int) -> int:
    """Bytes still in socket queues on connections to ``port`` (both directions, both ends)."""
    hex_port = f":{port:04X}"
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[1].endswith(hex_port) or f[2].endswith(hex_port):
                    tx, rx = f[4].split(":")
                    total += int(tx, 16) + int(rx, 16)
    return total


async def start_message(session: Session, body: bytes) -> bool:
    """MAIL, RCPT, DATA and the whole body, without the final "."; True if all were accepted."""
    reader, writer = session
    for cmd, want in (
        (b"MAIL FROM:<sender@example.test>\r\n", b"250"),
        (b"RCPT TO:<rcpt@example.test>\r\n", b"250"),
        (b"DATA\r\n", b"354"),
    ):
        writer.write(cmd)
        if not (await reply(reader)).startswith(want):
            return False
    writer.write(body)
    await writer.drain()
    return True


async def end_message(session: Session) -> bool:
    """Send the final "." and read the verdict."""
    reader, writer = session
    writer.write(b".\r\nQUIT\r\n")
    ok = (await reply(reader)).startswith(b"250")
    writer.close()
    return ok


async def inflight(port: int, n: int, size: int, pid: int, sink_out: str) -> dict[str, object]:
    """Memory with ``n`` messages of ``size`` bytes received but not yet ended, then accepted."""
    body = message(size)
    before = server_memory(pid)
    base = count(sink_out)
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    opened = await asyncio.gather(*(open_session(port, gate) for _ in range(n)))
    sessions = [s for s in opened if s is not None]
    started = await asyncio.gather(*(start_message(s, body) for s in sessions))
    # "In flight" means inside the server: wait until no byte waits in a socket queue.
    await until(lambda: tcp_queues(port) == 0, 0.05)
    await asyncio.sleep(0.3)
    holding = server_memory(pid)

    peak = dict(holding)
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            now = server_memory(pid)
            for key in ("rss_kb", "pss_kb", "hwm_kb"):
                peak[key] = max(peak[key], now[key])
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    accepted = await asyncio.gather(*(end_message(s) for s in sessions))
    await until(lambda: count(sink_out) >= base + sum(accepted), 0.02)
    done.set()
    await sampler
    data = len(body) * sum(started)
    return {
        "messages": n,
        "message_bytes": len(body),
        "started": sum(started),
        "accepted": sum(accepted),
        "relayed": count(sink_out) - base,
        "data_in_flight_kb": data // 1024,
        "before": before,
        "holding": holding,
        "peak": peak,
        "holding_rss_per_data": round(holding["rss_kb"] * 1024 / data, 2) if data else None,
    }


def main(argv: list[str]) -> int:
    """Run one probe and write its JSON."""
    if argv[:1] == ["idle"] and len(argv) == 5:
        port, n, pid, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
        coro = idle(port, n, pid)
    elif argv[:1] == ["inflight"] and len(argv) == 7:
        port, n, size, pid = int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
        out = argv[6]
        coro = inflight(port, n, size, pid, argv[5])
    else:
        print(__doc__, file=sys.stderr)
        return 2

    async def bounded() -> dict[str, object]:
        async with asyncio.timeout(TIMEOUT_S):
            return await coro

    result = asyncio.run(bounded())
    Path(out).write_text(json.dumps(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
