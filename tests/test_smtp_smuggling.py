"""SMTP smuggling and line endings, spoken byte for byte over a raw socket.

Only CRLF.CRLF ends DATA. Every fake end-of-data variant is followed by a pipelined second
message: the client must get exactly one reply for the whole thing, and nothing may reach the
next hop (a bare CR or LF in a message is refused with 554 5.6.0 by default).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from filterhost.smtp.data import check_content, read_data
from tests.components.fixtures import Peers
from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import FilterhostFactory, FilterhostProcess, base_config


class Raw:
    """A raw SMTP client: send bytes, read reply lines."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def pending(self, wait: float = 0.5) -> bytes:
        """Whatever else the server sends within ``wait`` seconds (nothing, we hope)."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            data = b""
        finally:
            self.sock.settimeout(5)
        return self.buf + data


@pytest.fixture
def relay(fh: FilterhostFactory, dns_server: Dns, peers: Peers, tmp_path: Path) -> Any:
    mx_port = free_port()
    peer = peers.start("127.0.0.2", mx_port)  # keeps exact bytes, bare CR/LF included
    proc = fh.create(base_config(tmp_path, free_port(), dns_server, mx_port)).start()
    return proc, peer


def _open(proc: FilterhostProcess) -> Raw:
    raw = Raw(proc.port)
    assert raw.reply().startswith(b"220 ")
    raw.send(b"EHLO client.test\r\n")
    assert raw.reply().startswith(b"250-")
    return raw


FAKE_ENDS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r.\r\n",
]


@pytest.mark.parametrize("fake_end", FAKE_ENDS, ids=repr)
def test_fake_end_of_data_smuggles_nothing(relay: Any, fake_end: bytes) -> None:
    proc, peer = relay
    raw = _open(proc)
    smuggled = (
        b"MAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsmuggled body\r\n"
    )
    raw.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@mx.test>\r\nDATA\r\n")
    assert raw.reply().startswith(b"250")
    assert raw.reply().startswith(b"250")
    assert raw.reply().startswith(b"354")
    raw.send(b"Subject: first\r\n\r\nfirst body" + fake_end + smuggled + b".\r\n")
    reply = raw.reply()
    assert reply.startswith(b"554 5.6.0 "), reply
    # Exactly one reply for all of it: the "smuggled" commands were data, not commands.
    assert raw.pending() == b""
    raw.send(b"QUIT\r\n")
    assert raw.reply().startswith(b"221")
    raw.close()
    proc.wait_log(r"refused at end of DATA")
    assert "queued from=" not in proc.log
    assert peer.messages() == []


def test_nul_and_long_lines_are_refused(relay: Any) -> None:
    proc, _ = relay
    raw = _open(proc)
    for body, what in ((b"a\x00b\r\n", b"NUL"), (b"x" * 999 + b"\r\n", b"1000 octets")):
        raw.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n")
        for _ in range(2):
            assert raw.reply().startswith(b"250")
        assert raw.reply().startswith(b"354")
        raw.send(b"Subject: x\r\n\r\n" + body + b".\r\n")
        reply = raw.reply()
        assert reply.startswith(b"554 5.6.0 ")
        assert what in reply
    raw.close()


def test_pipelined_messages_after_a_real_end_are_both_delivered(relay: Any) -> None:
    proc, peer = relay
    raw = _open(proc)
    one = b"Subject: one\r\n\r\n.leading dot\r\n"
    two = b"Subject: two\r\n\r\ntwo\r\n"
    raw.send(
        b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n"
        + one.replace(b"\r\n.", b"\r\n..")
        + b".\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<c@mx.test>\r\nDATA\r\n"
        + two
        + b".\r\nQUIT\r\n"
    )
    replies = [raw.reply() for _ in range(9)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"354", b"250"] * 2 + [b"221"]
    raw.close()
    got = sorted(peer.wait_for_count(2), key=lambda m: m.rcpt_tos)
    assert got[0].data.endswith(one)  # dot-unstuffed once, exactly
    assert got[1].data.endswith(two)


# -- the block reader on its own: chunk boundaries anywhere ----------------------------------


async def _feed(chunks: list[bytes], limit: int = 10_000) -> tuple[Any, bytes]:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    result = await read_data(reader, limit)
    rest = await reader.read()
    return result, rest


@pytest.mark.parametrize("split", range(1, 30))
async def test_end_marker_found_across_any_chunk_boundary(split: int) -> None:
    wire = b"line one\r\n..dotted\r\nlast\r\n.\r\nNEXT COMMAND\r\n"
    # StreamReader hands back what it has; several feeds model several TCP segments.
    result, rest = await _feed([wire[:split], wire[split:]])
    assert result.content == b"line one\r\n.dotted\r\nlast\r\n"
    assert rest == b"NEXT COMMAND\r\n"


async def test_empty_message_and_oversize() -> None:
    result, rest = await _feed([b".\r\nQUIT\r\n"])
    assert result.content == b""
    assert rest == b"QUIT\r\n"
    big = b"x" * 100 + b"\r\n"
    result, rest = await _feed([big * 50, b".\r\nRSET\r\n"], limit=1000)
    assert result.too_big
    assert result.content is None
    assert rest == b"RSET\r\n"  # read to the end: the session stays in step


def test_check_content_accepts_clean_crlf() -> None:
    assert check_content(b"a\r\nb\r\n\r\n" + b"y" * 998 + b"\r\n") is None
