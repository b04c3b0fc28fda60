"""clamd's own INSTREAM rate: the ceiling for filterhost with the clamav plugin.

    clamd_rate.py SOCKET N CLIENTS BYTES [TIMEOUT_S]

Scans one message of the shape smtp-source sends (four headers, then BYTES of 80-byte lines) N
times over clamd's unix SOCKET, from CLIENTS threads at once, one plain INSTREAM connection per
scan (clamd's simplest protocol, so the figure is clamd's cost, not a client's). Prints one JSON
object: scans, seconds, rate, errors. Blocking sockets in threads are the smallest honest client:
clamd scans each stream in its own thread, so the client only has to keep CLIENTS requests open.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time

CHUNK = 64 * 1024


def message(size: int) -> bytes:
    """Headers like smtp-source's, then ``size`` bytes of body in lines of 78 characters + CRLF."""
    head = (
        b"From: <sender@example.test>\r\nTo: <rcpt@example.test>\r\n"
        b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-Id: <1.2.3@bench.test>\r\n\r\n"
    )
    lines = b"".join(str(i % 10).encode() + b"X" * 77 + b"\r\n" for i in range(1, size // 80 + 2))
    return head + lines[:size]


def request(data: bytes) -> bytes:
    """The whole INSTREAM request: command, length-prefixed chunks, zero-length end chunk."""
    parts = [b"zINSTREAM\0"]
    for i in range(0, len(data), CHUNK):
        chunk = data[i : i + CHUNK]
        parts += [struct.pack("!L", len(chunk)), chunk]
    parts.append(struct.pack("!L", 0))
    return b"".join(parts)


def scan(path: str, req: bytes, timeout: float) -> bytes:
    """One INSTREAM exchange; clamd's reply without the trailing NUL."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(req)
        reply = b""
        while not reply.endswith(b"\0"):
            more = s.recv(4096)
            if not more:
                break
            reply += more
    return reply.rstrip(b"\0")


def main(argv: list[str]) -> int:
    """Run the scans and print the result."""
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    path, total, clients, size = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    timeout = float(argv[4]) if len(argv) > 4 else 300.0
    req = request(message(size))
    deadline = time.monotonic() + timeout
    errors: list[str] = []
    done = [0] * clients

    def worker(k: int) -> None:
        # Worker k does every clients-th scan; together they do exactly `total`.
        for _ in range(k, total, clients):
            if time.monotonic() > deadline:
                errors.append("timeout")
                return
            try:
                reply = scan(path, req, timeout)
            except OSError as exc:
                errors.append(str(exc))
                continue
            if reply.endswith(b"OK"):
                done[k] += 1
            else:
                errors.append(reply.decode(errors="replace"))

    scan(path, req, timeout)  # warm-up: clamd's first scan after start is slower
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    scans = sum(done)
    print(
        json.dumps(
            {
                "scans": scans,
                "seconds": round(elapsed, 3),
                "rate": round(scans / elapsed, 1) if elapsed else 0,
                "errors": len(errors),
                "first_error": errors[0] if errors else "",
            }
        )
    )
    return 0 if scans == total else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
