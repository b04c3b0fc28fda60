"""SMTP smuggling and line endings, spoken byte for byte over a raw socket.

Only CRLF.CRLF ends DATA. Every fake end-of-data variant is followed by a pipelined second
message: the client must get exactly one reply for the whole thing, and nothing may reach the
next hop (a bare CR or LF in a message is refused with 554 5.6.0 by default).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from filterhost.smtp.data import check_content, decode_body, read_data
from tests.components.fixtures import Peers
from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import FilterhostFactory, FilterhostProcess, base_config
from tests.smtp_raw import Raw


def _start(factory: FilterhostFactory, peers: Peers, dns: Dns, **server: Any) -> Any:
    mx_port = free_port()
    peer = peers.start("127.0.0.2", mx_port)  # keeps exact bytes, bare CR/LF included
    conf = base_config(factory.tmp, free_port(), dns, mx_port, server=server)
    return factory.create(conf).start(), peer


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, dns_server: Dns) -> Iterator[Any]:
    """One server for the tests after which nothing may have reached the next hop."""
    factory, peers = FilterhostFactory(tmp_path_factory.mktemp("smuggling")), Peers()
    try:
        yield _start(factory, peers, dns_server)
    finally:
        factory.stop_all()
        peers.stop_all()


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
    proc.wait_log(r"refused at end of DATA: 554 5\.6\.0")
    # This server never queues: none of its tests may get anything through.
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


def test_pipelined_messages_after_a_real_end_are_both_delivered(
    fh: FilterhostFactory, dns_server: Dns, peers: Peers
) -> None:
    proc, peer = _start(fh, peers, dns_server)
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


def test_normalize_mode_turns_fake_ends_into_content(
    fh: FilterhostFactory, dns_server: Dns, peers: Peers
) -> None:
    """line_endings = "normalize": bare CR/LF become CRLF, never end DATA, never pass on."""
    proc, peer = _start(fh, peers, dns_server, line_endings="normalize")
    raw = _open(proc)
    smuggled = b"MAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\n"
    # Every variant in one pipelined stream: one reply per real message, nothing more.
    stream = b"".join(
        b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@mx.test>\r\nDATA\r\n"
        + b"Subject: v%d\r\n\r\nbody" % i
        + fake_end
        + smuggled
        + b"smuggled\nbo\rdy\r\n.\r\n"
        for i, fake_end in enumerate(FAKE_ENDS)
    )
    try:
        raw.send(stream + b"QUIT\r\n")
        replies = [raw.reply() for _ in range(4 * len(FAKE_ENDS) + 1)]
    finally:
        raw.close()
    expected = [b"250", b"250", b"354", b"250"] * len(FAKE_ENDS) + [b"221"]
    assert [r[:3] for r in replies] == expected
    got = peer.wait_for_count(len(FAKE_ENDS))
    assert all(m.rcpt_tos == ["bob@mx.test"] for m in got)  # never victim@
    for message in got:
        bare = message.data.replace(b"\r\n", b"")
        assert b"\r" not in bare
        assert b"\n" not in bare
        # Every fake end became an empty line: the dot line is unstuffed like any other once
        # its line end is CRLF (as Postfix does); the "commands" after it are message text.
        body = message.data.split(b"\r\n\r\n", 1)[1]
        assert body == b"body\r\n\r\n" + smuggled + b"smuggled\r\nbo\r\ndy\r\n"
    assert "queued from=<evil@" not in proc.log


def test_bare_lf_never_ends_a_command(relay: Any) -> None:
    proc, _ = relay
    raw = _open(proc)
    # If LF ended commands, NOOP would run twice; the second half never runs as a command.
    raw.send(b"NOOP\nNOOP\r\n")
    assert raw.closed() == b"500 5.5.2 Error: bare <LF> received; lines must end with <CR><LF>\r\n"
    raw.close()
    proc.wait_log(r"bare LF in a command line, closing")


def test_bare_cr_and_nul_in_a_command_refuse_the_whole_line(relay: Any) -> None:
    proc, _ = relay
    raw = _open(proc)
    raw.send(b"MAIL FROM:<a@example.test>\rRCPT TO:<b@mx.test>\r\nRCPT TO:<b@mx.test>\r\n")
    assert raw.reply() == b"500 5.5.2 Error: bare <CR> or NUL in a command line"
    assert raw.reply() == b"503 5.5.1 Error: need MAIL command"  # MAIL never ran
    assert raw.cmd(b"NOOP\x00") == b"500 5.5.2 Error: bare <CR> or NUL in a command line"
    assert raw.cmd(b"NOOP").startswith(b"250 2.0.0")
    raw.close()


def test_command_lines_over_1000_octets_are_refused(relay: Any) -> None:
    proc, _ = relay
    raw = _open(proc)
    for size in (1001, 1002, 5000, 70000):
        line = b"NOOP " + b"x" * (size - 7)  # + CRLF: ``size`` octets
        assert raw.cmd(line) == b"500 5.5.2 Error: line too long (over 1000 octets)", size
    assert raw.cmd(b"NOOP " + b"x" * 993).startswith(b"250 2.0.0")  # exactly 1000: fine
    # An over-long RCPT is refused whole, and the session stays in step.
    assert raw.cmd(b"MAIL FROM:<a@example.test>").startswith(b"250")
    assert raw.cmd(b"RCPT TO:<b@mx.test> ORCPT=rfc822;" + b"x" * 1000).startswith(b"500 5.5.2")
    assert raw.cmd(b"RCPT TO:<b@mx.test>").startswith(b"250 2.1.5")
    raw.close()


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
    assert result.raw == b"line one\r\n..dotted\r\nlast\r\n"
    assert decode_body(result.raw) == b"line one\r\n.dotted\r\nlast\r\n"
    assert rest == b"NEXT COMMAND\r\n"


async def test_empty_message_and_oversize() -> None:
    result, rest = await _feed([b".\r\nQUIT\r\n"])
    assert result.raw == b""
    assert rest == b"QUIT\r\n"
    big = b"x" * 100 + b"\r\n"
    result, rest = await _feed([big * 50, b".\r\nRSET\r\n"], limit=1000)
    assert result.too_big
    assert result.raw is None
    assert rest == b"RSET\r\n"  # read to the end: the session stays in step


def test_check_content_accepts_clean_crlf() -> None:
    assert check_content(b"a\r\nb\r\n\r\n" + b"y" * 998 + b"\r\n") is None
