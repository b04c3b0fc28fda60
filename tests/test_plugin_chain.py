"""The plugin chain's semantics, through a real front end (in this event loop) and real next hops.

Order, short-circuit, async and sync hooks mixed, timeouts, exceptions, invalid verdicts, each
on_error policy, and every verdict of the message phase.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from filterhost import Route, Session, Transaction, Verdict, hookimpl
from filterhost.smtp import server
from filterhost.verdict import Reply
from tests.components.fixtures import Sinks
from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import base_config, port_of, running_app, spooled_ids, wait_for

MESSAGE = b"From: a@example.test\r\nSubject: chain\r\n\r\nbody\r\n"


class Recorder:
    """Appends its name to a shared list, then returns a fixed result."""

    def __init__(self, name: str, calls: list[str], result: Verdict | None = None) -> None:
        self.name = name
        self.calls = calls
        self.result = result

    @hookimpl
    async def filterhost_message(self, transaction: Transaction) -> Verdict | None:
        self.calls.append(self.name)
        transaction.message.add_header(f"X-Seen-{self.name}", "yes", top=False)
        return self.result


class SyncRecorder:
    """A plain (not async) hook, mixed with async ones."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> None:
        self.calls.append("sync")
        transaction.notes["sync"] = True


async def _send(port: int, rcpts: list[str] | None = None, data: bytes = MESSAGE) -> Any:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        await client.mail("alice@example.test")
        for rcpt in rcpts or ["bob@mx.test"]:
            await client.rcpt(rcpt)
        return await client.data(data)
    finally:
        await client.quit()


@pytest.fixture
def mx(sinks: Sinks) -> Any:
    port = free_port()
    return sinks.start("127.0.0.2", port)


def _conf(tmp_path: Path, dns: Dns, mx_port: int, order: list[str], **plugins: Any) -> Any:
    return base_config(tmp_path, free_port(), dns, mx_port, plugins={"order": order, **plugins})


async def test_chain_runs_in_the_operators_order_and_edits_arrive(
    tmp_path: Path, dns_server: Dns, mx: Any
) -> None:
    calls: list[str] = []
    plugins = {
        "first": Recorder("first", calls),
        "second": SyncRecorder(calls),
        "third": Recorder("third", calls),
        "unused": Recorder("unused", calls),  # installed, not in the order: never called
    }
    conf = _conf(tmp_path, dns_server, mx.port, ["third", "second", "first"])
    async with running_app(tmp_path, conf, plugins) as app:
        reply = await _send(port_of(app))
        assert reply.code == 250
        (got,) = await asyncio.to_thread(mx.wait_for_count, 1)
    assert calls == ["third", "sync", "first"]
    # The edits arrive, at the bottom of the header, in chain order; the body is untouched.
    head, _, body = got.data.partition(b"\r\n\r\n")
    assert head.endswith(b"Subject: chain\r\nX-Seen-third: yes\r\nX-Seen-first: yes")
    assert body == b"body\r\n"


async def test_first_terminal_verdict_stops_the_chain(tmp_path: Path, dns_server: Dns) -> None:
    calls: list[str] = []
    plugins = {
        "a": Recorder("a", calls),
        "b": Recorder("b", calls, Verdict.reject("5.7.1", "No thanks")),
        "c": Recorder("c", calls),
    }
    async with running_app(
        tmp_path, _conf(tmp_path, dns_server, 25, ["a", "b", "c"]), plugins
    ) as app:
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await _send(port_of(app))
        assert not spooled_ids(app.spool.directory)
    assert (info.value.code, info.value.message) == (554, "5.7.1 No thanks")
    assert calls == ["a", "b"]


class Raises:
    timeout = 5.0

    @hookimpl
    async def filterhost_message(self) -> None:
        raise RuntimeError("boom")


class Sleeps:
    timeout = 0.2  # declared by the plugin; conf.d may override it

    @hookimpl
    async def filterhost_message(self) -> None:
        await asyncio.sleep(30)


class ReturnsJunk:
    @hookimpl
    def filterhost_message(self) -> str:
        return "250 OK"


class BadVerdict:
    @hookimpl
    def filterhost_message(self) -> Verdict:
        return Verdict.reject("4.7.1", "a reject with a 4xx code is invalid")


@pytest.mark.parametrize(
    ("plugin", "error"),
    [
        (Raises(), "RuntimeError: boom"),
        (Sleeps(), "timed out after 0.2s"),
        (ReturnsJunk(), "returned str, expected a Verdict or None"),
        (BadVerdict(), "InvalidVerdictError: enhanced status 4.7.1"),
    ],
    ids=["exception", "timeout", "junk-result", "invalid-verdict"],
)
async def test_plugin_failure_tempfails_and_is_logged_with_the_plugin_name(
    tmp_path: Path, dns_server: Dns, caplog: pytest.LogCaptureFixture, plugin: object, error: str
) -> None:
    caplog.set_level(logging.INFO)
    conf = _conf(tmp_path, dns_server, 25, ["flaky"])
    async with running_app(tmp_path, conf, {"flaky": plugin}) as app:
        started = time.monotonic()
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await _send(port_of(app))
        assert time.monotonic() - started < 5
        assert not spooled_ids(app.spool.directory)
    assert info.value.code == 451
    assert info.value.message.startswith("4.3.0 ")
    failures = [r.getMessage() for r in caplog.records if "plugin=flaky" in r.getMessage()]
    assert any(error in line and "on_error=tempfail" in line for line in failures), failures


@pytest.mark.parametrize(("policy", "code"), [("pass", 250), ("reject", 554)])
async def test_on_error_policy_from_conf_d(
    tmp_path: Path, dns_server: Dns, mx: Any, policy: str, code: int
) -> None:
    calls: list[str] = []
    conf = _conf(tmp_path, dns_server, mx.port, ["flaky", "after"], flaky={"on_error": policy})
    async with running_app(
        tmp_path, conf, {"flaky": Raises(), "after": Recorder("after", calls)}
    ) as app:
        try:
            reply = await _send(port_of(app))
            got = reply.code
        except aiosmtplib.SMTPDataError as exc:
            got = exc.code
    assert got == code
    assert calls == (["after"] if policy == "pass" else [])


async def test_timeout_override_from_conf_d(tmp_path: Path, dns_server: Dns) -> None:
    conf = _conf(tmp_path, dns_server, 25, ["slow"], slow={"timeout": "50ms"})
    async with running_app(tmp_path, conf, {"slow": Sleeps()}) as app:
        started = time.monotonic()
        with pytest.raises(aiosmtplib.SMTPDataError):
            await _send(port_of(app))
        assert time.monotonic() - started < 0.2  # not the plugin's declared 0.2 s


async def test_discard_answers_250_and_relays_nothing(
    tmp_path: Path, dns_server: Dns, mx: Any
) -> None:
    calls: list[str] = []
    conf = _conf(tmp_path, dns_server, mx.port, ["drop", "ok"])
    plugins = {
        "drop": Recorder("drop", calls, Verdict.discard("test")),
        "ok": Recorder("ok", calls),
    }
    async with running_app(tmp_path, conf, plugins) as app:
        reply = await _send(port_of(app))
        assert reply.code == 250
        # Then a normal message goes through: only that one reaches the next hop.
        plugins["drop"].result = None
        await _send(port_of(app), data=b"Subject: second\r\n\r\nx\r\n")
        got = await asyncio.to_thread(mx.wait_for_count, 1)
    assert len(got) == 1
    assert b"Subject: second" in got[0].data


async def test_quarantine_keeps_the_message_aside(tmp_path: Path, dns_server: Dns) -> None:
    conf = _conf(tmp_path, dns_server, 25, ["q"])
    plugins = {"q": Recorder("q", [], Verdict.quarantine("suspicious"))}
    async with running_app(tmp_path, conf, plugins) as app:
        reply = await _send(port_of(app))
        assert reply.code == 250
        assert list(app.spool.entries()) == []  # not in the queue: never delivered
        quarantine = app.front.quarantine.spool
        (entry,) = list(quarantine.entries())
    assert (entry.hold, entry.plugin, entry.reason) == (True, "q", "suspicious")
    assert quarantine.read_message(entry.id).endswith(MESSAGE.split(b"\r\n\r\n")[1])


class Policy:
    """Session-phase hooks: refuse one client name, one sender, accept one outside recipient."""

    @hookimpl
    def filterhost_helo(self, name: str) -> Verdict | None:
        return Verdict.reject("5.7.1", "Go away", code=550) if name == "bad.test" else None

    @hookimpl
    async def filterhost_mail(self, sender: str) -> Verdict | None:
        return Verdict.tempfail("4.7.1", "Slow down") if sender.startswith("slow@") else None

    @hookimpl
    def filterhost_rcpt(self, session: Session, recipient: str) -> Verdict | None:
        if recipient == "blocked@mx.test":
            return Verdict.reject("5.1.1", "No such user", code=550)
        if recipient == "special@elsewhere.test":
            return Verdict.accept("plugin vouches for it")
        return None


async def test_session_phase_hooks(tmp_path: Path, dns_server: Dns) -> None:
    conf = _conf(tmp_path, dns_server, 25, ["policy"])
    conf["server"]["mynetworks"] = ["10.0.0.0/8"]  # this client is not trusted
    async with running_app(tmp_path, conf, {"policy": Policy()}) as app:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port_of(app), start_tls=False)
        await client.connect()
        try:
            code, text = await client.execute_command(b"EHLO", b"bad.test")
            assert (code, text[:5]) == (550, "5.7.1")
            await client.ehlo(hostname="good.test")
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as sender:
                await client.mail("slow@example.test")
            assert sender.value.code == 451
            await client.mail("alice@example.test")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as blocked:
                await client.rcpt("blocked@mx.test")
            assert (blocked.value.code, blocked.value.message) == (550, "5.1.1 No such user")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as relay:
                await client.rcpt("other@elsewhere.test")
            assert (relay.value.code, relay.value.message) == (554, "5.7.1 Relay access denied")
            accepted = await client.rcpt("special@elsewhere.test")
            assert accepted.code == 250
        finally:
            await client.quit()


class Router:
    """Routes one domain to a fixed host, leaves the rest to [relay] mode."""

    def __init__(self, port: int) -> None:
        self.port = port

    @hookimpl
    async def filterhost_route(self, recipient: str) -> Route | None:
        if recipient.endswith("@routed.test"):
            return Route.host("127.0.0.6", self.port)
        if recipient.endswith("@dropped.test"):
            return Route.discard()
        return None


class Outcomes:
    """Observes deliveries; its exceptions must not change anything."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, Reply]] = []

    @hookimpl
    def filterhost_delivered(self, recipient: str, reply: Reply) -> None:
        self.delivered.append((recipient, reply))
        raise RuntimeError("observer bug")


async def test_route_hook_and_outcome_observers(
    tmp_path: Path, dns_server: Dns, sinks: Sinks
) -> None:
    port = free_port()
    mx1 = sinks.start("127.0.0.2", port)
    routed = sinks.start("127.0.0.6", port)
    outcomes = Outcomes()
    conf = _conf(tmp_path, dns_server, port, ["router", "outcomes"])
    async with running_app(tmp_path, conf, {"router": Router(port), "outcomes": outcomes}) as app:
        await _send(port_of(app), ["a@routed.test", "b@mx.test", "c@dropped.test"])
        (via_route,) = await asyncio.to_thread(routed.wait_for_count, 1)
        (via_mx,) = await asyncio.to_thread(mx1.wait_for_count, 1)
        await wait_for(lambda: not spooled_ids(app.spool.directory))
    assert via_route.rcpt_tos == ["a@routed.test"]
    assert via_mx.rcpt_tos == ["b@mx.test"]
    assert sorted(r for r, _ in outcomes.delivered) == ["a@routed.test", "b@mx.test"]
    assert all(reply.code == 250 for _, reply in outcomes.delivered)


async def test_an_internal_error_is_451_never_500(
    tmp_path: Path, dns_server: Dns, monkeypatch: pytest.MonkeyPatch, mx: Any
) -> None:
    def broken(*args: object) -> str:
        raise KeyError("a bug of ours")

    conf = _conf(tmp_path, dns_server, mx.port, [])
    async with running_app(tmp_path, conf) as app:
        # Both command paths accept a sender through it (see FilterhostSMTP._fast_mail).
        monkeypatch.setattr(server.Handler, "mail_accepted", staticmethod(broken))
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port_of(app), start_tls=False)
        await client.connect()
        try:
            await client.ehlo(hostname="client.test")
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
                await client.mail("alice@example.test")
            assert (info.value.code, info.value.message) == (
                451,
                "4.3.0 Internal error, please try again later",
            )
            assert "KeyError" not in info.value.message
            # The session goes on.
            assert (await client.noop()).code == 250
        finally:
            await client.quit()
        monkeypatch.undo()
        assert (await _send(port_of(app))).code == 250
