"""The front end's two command paths answer alike.

With no plugin on a session hook, EHLO, MAIL, RCPT, DATA and QUIT are answered straight from
``data_received`` (``FilterhostSMTP._run_fast``), with a task only for the end of a message;
everything else, and every session when a plugin does implement a session hook, goes through
aiosmtpd's task-per-session loop. The same
conversation, byte for byte, must get the same replies either way, one command per write or
pipelined, and the session must really be on the path the test means.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from filterhost import Session, Verdict, hookimpl
from filterhost.app import App
from filterhost.checks import check_configuration
from filterhost.dispatch import HookRunner
from filterhost.pluginmanager import Plugins
from filterhost.smtp.server import FilterhostSMTP
from tests.components.fixtures import Sinks
from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import base_config, port_of, running_app, write_conf

MESSAGE = b"From: a@example.test\r\nSubject: paths\r\n\r\n..a stuffed line\r\nbody\r\n.\r\n"

# One exchange per item: the bytes sent, then (when the next item is a message) its data.
CONVERSATION: list[bytes] = [
    b"EHLO client.test",
    b"MAIL FROM:<bad",
    b"MAIL FROM:<alice@example.test> SIZE=100 BODY=8BITMIME",
    b"MAIL FROM:<alice@example.test>",
    b"RCPT TO:<user@mx.test.>",
    b"RCPT TO:<bob@mx.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@mx.test",
    b"RCPT TO:<carol@mx.test>",
    b"rcpt to:<dave@mx.test>",
    b"RSET",
    b"NOOP",
    b"VRFY bob",
    b"XYZZY",
    b"RCPT TO:<bob@mx.test>",
    b"MAIL FROM:<alice@example.test> SIZE=99999999999",
    b"MAIL FROM:<alice@example.test>",
    b"RCPT TO:<bob@mx.test>",
    b"DATA",
    MESSAGE,
    b"MAIL FROM:<>",
    b"RCPT TO:<erin@mx.test> NOTIFY=NEVER",
    b"DATA extra",
    b"DATA",
    MESSAGE,
    b"HELO again.test",
    b"MAIL FROM:<alice@example.test> SIZE=10",
    b"RSET",
    b"EHLO",
    b"QUIT now",
    b"QUIT",
]


class SessionHookOnly:
    """Implements a session hook and does nothing: its presence alone takes the task path."""

    @hookimpl
    def filterhost_rcpt(self, session: Session, recipient: str) -> Verdict | None:
        return None


@pytest.fixture
def mx(sinks: Sinks) -> Any:
    return sinks.start("127.0.0.2", free_port())


async def _reply(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


@contextlib.asynccontextmanager
async def _transaction(
    app: App,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection that has said EHLO, MAIL and RCPT (each answered 250); closed after."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(app))
    try:
        await _reply(reader)
        for line in (b"EHLO client.test", b"MAIL FROM:<a@example.test>", b"RCPT TO:<b@mx.test>"):
            writer.write(line + b"\r\n")
            assert (await _reply(reader)).startswith(b"250")
        yield reader, writer
    finally:
        writer.close()


def _groups(pipelined: bool) -> list[list[bytes]]:
    """The conversation as writes: one command each, or pipelined up to each DATA/QUIT."""
    if not pipelined:
        return [[item] for item in CONVERSATION]
    groups: list[list[bytes]] = [[]]
    for item in CONVERSATION:
        if item is MESSAGE:
            groups.append([item])
            groups.append([])
        else:
            groups[-1].append(item)
    return [g for g in groups if g]


def _session(app: App) -> FilterhostSMTP:
    (session,) = app.front.sessions
    return session


async def _converse(app: App, *, pipelined: bool) -> tuple[list[bytes], list[tuple[bytes, bool]]]:
    """The replies to CONVERSATION; after each write, its last item and whether a task ran."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(app))
    replies = [await _reply(reader)]
    tasks: list[tuple[bytes, bool]] = []
    try:
        for group in _groups(pipelined):
            writer.write(b"".join(g if g is MESSAGE else g + b"\r\n" for g in group))
            for _ in group:
                replies.append(await _reply(reader))
            if app.front.sessions:
                session = _session(app)
                task = session._handler_coroutine
                tasks.append((group[-1], task is not None and not task.done()))
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed after QUIT
    finally:
        writer.close()
    return replies, tasks


def _normal(replies: list[bytes]) -> list[bytes]:
    return [re.sub(rb"queued as \S+", b"queued as ID", r) for r in replies]


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
async def test_both_command_paths_answer_alike(
    tmp_path: Path, dns_server: Dns, mx: Any, pipelined: bool
) -> None:
    fast_conf = base_config(tmp_path / "fast", free_port(), dns_server, mx.port)
    slow_conf = base_config(
        tmp_path / "slow", free_port(), dns_server, mx.port, plugins={"order": ["quiet"]}
    )
    async with running_app(tmp_path / "fast", fast_conf) as fast_app:
        assert fast_app.front.session_hooks_idle()
        fast, fast_tasks = await _converse(fast_app, pipelined=pipelined)
    async with running_app(
        tmp_path / "slow", slow_conf, plugins={"quiet": SessionHookOnly()}
    ) as slow_app:
        assert not slow_app.front.session_hooks_idle()
        slow, slow_tasks = await _converse(slow_app, pipelined=pipelined)

    assert _normal(fast) == _normal(slow)
    # What the conversation is meant to exercise did happen (on both paths).
    codes = [r[:3] for r in fast]
    assert codes.count(b"250") >= 10
    assert {b"501", b"503", b"553", b"552", b"500"} <= set(codes)
    assert fast[-1].startswith(b"221 2.0.0")
    assert sum(b"queued as" in r for r in fast) == 2
    # The task path was in charge of every slow session. The fast one had no task left running
    # once its replies were in, but for a DATA pipelined behind odd commands (the task that
    # answered them keeps the session while input is buffered, so it reads that message).
    assert all(alive for _, alive in slow_tasks)
    handed_over = {b"RSET", b"NOOP", b"VRFY bob", b"XYZZY", b"DATA extra"}
    expected = [
        group[-1]
        for group in _groups(pipelined)
        if group[-1] == b"DATA" and handed_over.intersection(group[:-1])
    ]
    assert [last for last, alive in fast_tasks if alive] == expected
    assert len(expected) == (2 if pipelined else 0)
    assert len(fast_tasks) > 3


async def test_a_session_needs_a_task_only_at_the_end_of_a_message(
    tmp_path: Path, dns_server: Dns, mx: Any
) -> None:
    conf = base_config(tmp_path, free_port(), dns_server, mx.port)
    async with running_app(tmp_path, conf) as app, _transaction(app) as (reader, writer):
        session = _session(app)
        assert session._handler_coroutine is None
        writer.write(b"DATA\r\n")
        assert (await _reply(reader)).startswith(b"354")
        assert session._handler_coroutine is None  # the message is read without a task
        writer.write(MESSAGE)
        assert b"queued as" in await _reply(reader)
        task = session._handler_coroutine  # the end of DATA: plugins, the spool's fsync
        assert task is not None
        await asyncio.wait_for(asyncio.shield(task), 5)
        writer.write(b"MAIL FROM:<a@example.test>\r\n")
        assert (await _reply(reader)).startswith(b"250 2.1.0")
        assert session._handler_coroutine is task  # no new task for MAIL


async def test_input_pipelined_behind_a_message_waits_for_its_end(
    tmp_path: Path, dns_server: Dns, mx: Any
) -> None:
    """A second whole transaction sent with the first message's dot: answered in order."""
    conf = base_config(tmp_path, free_port(), dns_server, mx.port)
    async with running_app(tmp_path, conf) as app, _transaction(app) as (reader, writer):
        writer.write(b"DATA\r\n")
        assert (await _reply(reader)).startswith(b"354")
        writer.write(MESSAGE + b"MAIL FROM:<c@example.test>\r\nRCPT TO:<d@mx.test>\r\nDATA\r\n")
        replies = [await _reply(reader) for _ in range(4)]
        assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354"], replies
        assert b"queued as" in replies[0]
        writer.write(MESSAGE + b"QUIT\r\n")
        assert b"queued as" in await _reply(reader)
        assert (await _reply(reader)).startswith(b"221")


class RefuseRecipients:
    """A session hook that refuses every recipient."""

    @hookimpl
    def filterhost_rcpt(self, session: Session, recipient: str) -> Verdict | None:
        return Verdict.reject("5.7.1", "Refused by the new plugin", code=550)


async def test_a_session_hook_brought_by_a_reload_applies_to_open_sessions(
    tmp_path: Path, dns_server: Dns, mx: Any
) -> None:
    conf = base_config(tmp_path, free_port(), dns_server, mx.port)
    async with running_app(tmp_path, conf) as app, _transaction(app) as (reader, writer):
        # What a reload does (filterhost.reload.Reloader._switch): new plugins, new hooks.
        plugins = Plugins()
        plugins.add("refuse", RefuseRecipients())
        confdir = write_conf(
            tmp_path / "reloaded.d",
            base_config(tmp_path, port_of(app), dns_server, mx.port, plugins={"order": ["refuse"]}),
        )
        config, plugins, problems = check_configuration(confdir, plugins)
        assert config is not None, problems
        app.front.hooks = HookRunner(plugins, config)
        assert not app.front.session_hooks_idle()
        writer.write(b"RCPT TO:<c@mx.test>\r\n")
        assert (await _reply(reader)).startswith(b"550 5.7.1 Refused by the new plugin")


async def test_a_flood_pipelined_behind_a_message_is_answered_in_order(
    tmp_path: Path, dns_server: Dns, mx: Any
) -> None:
    """More input than the synchronous path keeps while a message is processed (it stops
    reading until the message is done), with replies twenty times its size: every command is
    still answered, once and in order."""
    count = 10_000  # 90 KB of commands, ~1.5 MB of replies
    conf = base_config(tmp_path, free_port(), dns_server, mx.port)
    async with running_app(tmp_path, conf) as app, _transaction(app) as (reader, writer):
        writer.write(b"DATA\r\n")
        assert (await _reply(reader)).startswith(b"354")
        flood = b"".join(b"EHLO c%05d\r\n" % i for i in range(count))
        writer.write(MESSAGE + flood + b"QUIT\r\n")
        assert b"queued as" in await _reply(reader)
        for i in range(count):
            reply = await _reply(reader)
            assert reply.startswith(b"250-"), (i, reply[:60])
            assert reply.endswith(b"250 HELP\r\n"), (i, reply[-60:])
        assert (await _reply(reader)).startswith(b"221")
