"""The clamav plugin against a real clamd (EICAR test signatures), through the real hook runner.

No SMTP sockets: each test builds a Transaction and runs the message chain the way the front end
does at end of DATA (``HookRunner.chain("filterhost_message", ...)``).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from filterhost_builtins.clamav import ClamavPlugin
from filterhost_builtins.clamd_client import (
    ClamdAddress,
    ClamdFailed,
    ClamdPool,
    _frames,
    parse_reply,
)

from filterhost import Action, Message, Session, Transaction, Verdict
from filterhost.checks import check_configuration, load_everything
from filterhost.config import Config, Problem
from filterhost.dispatch import HookRunner
from filterhost.pluginmanager import Plugins
from tests.components.services import EICAR, Clamd, free_port, start_clamd

HOSTNAME = "relay.test"
SCANNED = f"X-Virus-Scanned: ClamAV at {HOSTNAME}\r\n".encode()
VIRUS_TEXT = "Virus found: Filterhost.Test.EICAR-Body.UNOFFICIAL"


# ----------------------------------------------------------------------------- helpers


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def write_confdir(tmp_path: Path, **clamav: Any) -> Path:
    """A conf.d with the clamav plugin in the chain and ``clamav`` as its settings."""
    confdir = tmp_path / "conf.d"
    confdir.mkdir(exist_ok=True)
    lines = [
        "[server]",
        f'hostname = "{HOSTNAME}"',
        "[spool]",
        f"directory = {_toml(str(tmp_path / 'spool'))}",
        "[plugins]",
        'order = ["clamav"]',
        "[plugins.clamav]",
        *(f"{key} = {_toml(value)}" for key, value in clamav.items()),
    ]
    (confdir / "50-clamav.toml").write_text("\n".join(lines) + "\n")
    return confdir


class Chain:
    """The clamav plugin, configured from a temporary conf.d, behind the real hook runner."""

    def __init__(self, tmp_path: Path, **clamav: Any) -> None:
        tmp_path.mkdir()
        self.confdir = write_confdir(tmp_path, **clamav)
        plugins = Plugins()
        plugins.add("clamav", ClamavPlugin)
        config, plugins, problems = load_everything(self.confdir, plugins)
        assert config is not None, problems
        assert not [p for p in problems if p.severity == "error"], problems
        plugins.configure(config)
        self.config: Config = config
        self.runner = HookRunner(plugins, config)

    async def close(self) -> None:
        """Shut the plugin down (it keeps clamd connections for reuse)."""
        await self.runner.observe("filterhost_shutdown")

    async def run(self, raw: bytes, queue_id: str = "QTEST1") -> tuple[Verdict | None, Transaction]:
        """Run ``raw`` through the message chain; return the verdict and the transaction."""
        txn = Transaction(
            session=Session(id="s", client_ip="127.0.0.1"),
            mail_from="alice@example.test",
            recipients=["bob@example.test"],
            message=Message(raw),
            queue_id=queue_id,
        )
        verdict = await self.runner.chain(
            "filterhost_message", context=queue_id, record=txn.results, transaction=txn
        )
        return verdict, txn


ChainFactory = Callable[..., Chain]


@pytest.fixture
async def make_chain(tmp_path: Path) -> AsyncIterator[ChainFactory]:
    """``make_chain(servers=[...], on_failure="pass", ...)``: a Chain, shut down after the test."""
    made: list[Chain] = []

    def factory(**clamav: Any) -> Chain:
        chain = Chain(tmp_path / f"chain{len(made)}", **clamav)
        made.append(chain)
        return chain

    yield factory
    for chain in made:
        await chain.close()


def make_mail(
    body: str = "hello\n",
    *,
    attachment: bytes | None = None,
    filename: str = "file.bin",
    subtype: str = "octet-stream",
    extra_headers: dict[str, str] | None = None,
) -> bytes:
    """An RFC 5322 message with CRLF line ends (as it arrives over SMTP)."""
    m = EmailMessage()
    m["From"] = "alice@example.test"
    m["To"] = "bob@example.test"
    m["Subject"] = "test"
    m["Message-ID"] = "<1@example.test>"
    m["Date"] = "Thu, 01 Jan 2026 00:00:00 +0000"
    for name, value in (extra_headers or {}).items():
        m[name] = value
    m.set_content(body)
    if attachment is not None:
        m.add_attachment(attachment, maintype="application", subtype=subtype, filename=filename)
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def big_mail(size: int) -> bytes:
    """A clean message of about ``size`` bytes (a base64 attachment of random-looking data)."""
    blob = bytes(range(256)) * (size * 3 // 4 // 256 + 1)
    return make_mail(attachment=blob, filename="blob.bin")


def down_tcp() -> str:
    """A TCP address where nothing listens (connection refused)."""
    return f"127.0.0.1:{free_port()}"


def tcp(clamd: Clamd) -> str:
    return f"{clamd.host}:{clamd.port}"


def unix(clamd: Clamd) -> str:
    return f"unix:{clamd.socket_path}"


def assert_not_scanned(txn: Transaction) -> None:
    assert "X-Virus-Scanned" not in txn.message
    assert b"X-Virus-Scanned" not in txn.message.as_bytes()
    assert txn.notes["clamav"]["scanned"] is False


def assert_tempfail(verdict: Verdict | None) -> None:
    assert verdict is not None
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (451, "4.7.0")
    assert verdict.reply.text == "Virus scanner unavailable, try again later"
    assert verdict.plugin == "clamav"


@pytest.fixture
def own_clamd() -> Iterator[Clamd]:
    """A clamd for this test alone (the test may stop it)."""
    server = start_clamd()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def small_clamd() -> Iterator[Clamd]:
    """A clamd with StreamMaxLength 1M."""
    server = start_clamd(stream_max="1M")
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------- viruses


@pytest.mark.parametrize("transport", [tcp, unix])
async def test_eicar_inline_in_body_is_rejected(
    make_chain: ChainFactory, clamd_server: Clamd, transport: Any
) -> None:
    chain = make_chain(servers=[transport(clamd_server)])
    verdict, txn = await chain.run(make_mail("see this:\n" + EICAR.decode() + "\n"))
    assert verdict is not None
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status, verdict.reply.text) == (
        554,
        "5.7.1",
        VIRUS_TEXT,
    )
    assert "X-Virus-Scanned" not in txn.message
    assert txn.notes["clamav"]["virus"] == "Filterhost.Test.EICAR-Body.UNOFFICIAL"


async def test_eicar_base64_attachment_is_rejected(
    make_chain: ChainFactory, clamd_server: Clamd
) -> None:
    raw = make_mail(attachment=EICAR, filename="eicar.com")
    assert EICAR not in raw  # only clamd's MIME decoding can find it
    verdict, txn = await make_chain(servers=[tcp(clamd_server)]).run(raw)
    assert verdict is not None
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None
    assert verdict.reply.text.startswith("Virus found: Filterhost.Test.EICAR-")
    assert "X-Virus-Scanned" not in txn.message


async def test_eicar_in_zip_attachment_is_rejected(
    make_chain: ChainFactory, clamd_server: Clamd
) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readme.txt", "nothing to see\n")
        zf.writestr("eicar.com", EICAR)
    archive = buf.getvalue()
    assert EICAR not in archive  # deflated: clamd has to unpack it (ScanArchive yes)
    raw = make_mail(attachment=archive, filename="files.zip", subtype="zip")
    verdict, txn = await make_chain(servers=[tcp(clamd_server)]).run(raw)
    assert verdict is not None
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None
    assert verdict.reply.text.startswith("Virus found: Filterhost.Test.EICAR-")
    assert "X-Virus-Scanned" not in txn.message


async def test_on_virus_quarantine(make_chain: ChainFactory, clamd_server: Clamd) -> None:
    chain = make_chain(servers=[tcp(clamd_server)], on_virus="quarantine")
    verdict, txn = await chain.run(make_mail(EICAR.decode()))
    assert verdict is not None
    assert verdict.action is Action.QUARANTINE
    assert verdict.reason == VIRUS_TEXT
    assert verdict.plugin == "clamav"
    assert txn.message.get("X-Virus-Status") == ("Infected (Filterhost.Test.EICAR-Body.UNOFFICIAL)")
    assert "X-Virus-Scanned" not in txn.message


# ----------------------------------------------------------------------------- clean mail


@pytest.mark.parametrize("transport", [tcp, unix])
async def test_clean_mail_gets_header_and_is_otherwise_unchanged(
    make_chain: ChainFactory, clamd_server: Clamd, transport: Any
) -> None:
    raw = make_mail("just text\n")
    verdict, txn = await make_chain(servers=[transport(clamd_server)]).run(raw)
    assert verdict is None
    assert txn.message.as_bytes() == SCANNED + raw
    notes = txn.notes["clamav"]
    assert notes["scanned"] is True
    assert notes["virus"] is None
    assert notes["server"] == transport(clamd_server)


async def test_scanned_header_can_be_turned_off(
    make_chain: ChainFactory, clamd_server: Clamd
) -> None:
    raw = make_mail()
    chain = make_chain(servers=[tcp(clamd_server)], scanned_header=False)
    verdict, txn = await chain.run(raw)
    assert verdict is None
    assert txn.message.as_bytes() == raw
    assert txn.notes["clamav"]["scanned"] is True


async def test_forged_scan_headers_are_removed(
    make_chain: ChainFactory, clamd_server: Clamd
) -> None:
    forged = make_mail(
        "clean, honest\n",
        extra_headers={"X-Virus-Scanned": "ClamAV at trust.me", "X-Virus-Status": "Clean"},
    )
    honest = make_mail("clean, honest\n")
    verdict, txn = await make_chain(servers=[tcp(clamd_server)]).run(forged)
    assert verdict is None
    assert txn.message.get_all("X-Virus-Scanned") == [f"ClamAV at {HOSTNAME}"]
    assert "X-Virus-Status" not in txn.message
    assert txn.message.as_bytes() == SCANNED + honest


async def test_forged_header_is_removed_when_scanner_is_down(make_chain: ChainFactory) -> None:
    forged = make_mail(extra_headers={"X-Virus-Scanned": "ClamAV at trust.me"})
    chain = make_chain(servers=[down_tcp()], on_failure="pass")
    verdict, txn = await chain.run(forged)
    assert verdict is None
    assert_not_scanned(txn)


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("transport", [tcp, unix])
async def test_clamd_stopped_mid_test_tempfails(
    make_chain: ChainFactory, own_clamd: Clamd, transport: Any
) -> None:
    chain = make_chain(servers=[transport(own_clamd)])
    verdict, txn = await chain.run(make_mail())
    assert verdict is None
    assert "X-Virus-Scanned" in txn.message
    own_clamd.stop()
    verdict, txn = await chain.run(make_mail())
    assert_tempfail(verdict)
    assert_not_scanned(txn)
    assert txn.notes["clamav"]["reason"] == "scanner unavailable"


async def test_on_failure_pass_marks_message_unscanned(
    make_chain: ChainFactory, caplog: pytest.LogCaptureFixture
) -> None:
    raw = make_mail()
    chain = make_chain(servers=[down_tcp(), "unix:/nonexistent/clamd.sock"], on_failure="pass")
    with caplog.at_level(logging.WARNING, logger="filterhost.plugins.clamav"):
        verdict, txn = await chain.run(raw, queue_id="QPASS42")
    assert verdict is None
    assert_not_scanned(txn)
    assert txn.notes["clamav"]["reason"] == "scanner unavailable"
    assert txn.message.get_all("X-Virus-Status") == ["Unscanned (scanner unavailable)"]
    assert txn.message.as_bytes() == b"X-Virus-Status: Unscanned (scanner unavailable)\r\n" + raw
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("QPASS42: clamav: message not scanned") for w in warnings), warnings


@pytest.mark.parametrize("on_failure", ["tempfail", "pass"])
async def test_message_over_max_size_is_not_sent(
    make_chain: ChainFactory, clamd_server: Clamd, on_failure: str
) -> None:
    raw = big_mail(5000)
    chain = make_chain(servers=[tcp(clamd_server)], max_size=len(raw) - 1, on_failure=on_failure)
    verdict, txn = await chain.run(raw)
    assert_not_scanned(txn)
    assert txn.notes["clamav"]["reason"] == "too large for scanner"
    assert "max_size" in txn.notes["clamav"]["detail"]
    if on_failure == "tempfail":
        assert_tempfail(verdict)
    else:
        assert verdict is None
        assert txn.message.get("X-Virus-Status") == "Unscanned (too large for scanner)"
    # exactly max_size is still scanned
    chain = make_chain(servers=[tcp(clamd_server)], max_size=len(raw))
    verdict, txn = await chain.run(raw)
    assert verdict is None
    assert txn.message.as_bytes() == SCANNED + raw


@pytest.mark.parametrize("transport", [tcp, unix])
async def test_message_over_clamd_stream_max_length_tempfails(
    make_chain: ChainFactory, small_clamd: Clamd, transport: Any
) -> None:
    raw = big_mail(1_500_000)
    assert 1_400_000 < len(raw) < 1_600_000
    chain = make_chain(servers=[transport(small_clamd)])
    verdict, txn = await chain.run(raw)
    assert_tempfail(verdict)
    assert_not_scanned(txn)
    # clamd's "INSTREAM size limit exceeded. ERROR" is read even after the failed send
    assert txn.notes["clamav"]["reason"] == "too large for scanner"
    assert "size limit exceeded" in txn.notes["clamav"]["detail"]


async def test_failover_to_second_server(
    make_chain: ChainFactory, clamd_server: Clamd, caplog: pytest.LogCaptureFixture
) -> None:
    servers = ["unix:/nonexistent/clamd.sock", down_tcp(), tcp(clamd_server)]
    chain = make_chain(servers=servers)
    with caplog.at_level(logging.WARNING, logger="filterhost.plugins.clamav"):
        verdict, txn = await chain.run(make_mail(EICAR.decode()), queue_id="QFAIL1")
    assert verdict is not None
    assert verdict.action is Action.REJECT
    assert txn.notes["clamav"]["server"] == tcp(clamd_server)
    # the dead servers are not hidden: one warning each, with the queue id
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all(w.startswith("QFAIL1: clamav: ") for w in warnings)
    assert "nonexistent" in warnings[0]
    verdict, txn = await chain.run(make_mail())
    assert verdict is None
    assert "X-Virus-Scanned" in txn.message


@pytest.fixture
async def silent_clamd() -> AsyncIterator[str]:
    """A TCP server that reads everything and never answers (a hung clamd)."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


@pytest.mark.parametrize("on_failure", ["tempfail", "pass"])
async def test_hung_clamd_times_out_under_on_failure(
    make_chain: ChainFactory, silent_clamd: str, on_failure: str
) -> None:
    chain = make_chain(servers=[silent_clamd], scan_timeout="0.3s", on_failure=on_failure)
    verdict, txn = await chain.run(make_mail())
    assert_not_scanned(txn)
    assert txn.notes["clamav"]["reason"] == "scan timed out"
    if on_failure == "tempfail":
        assert_tempfail(verdict)
    else:
        assert verdict is None
        assert txn.message.get("X-Virus-Status") == "Unscanned (scan timed out)"


async def test_scan_ends_before_the_runner_timeout(
    make_chain: ChainFactory, silent_clamd: str
) -> None:
    # scan_timeout above the plugin's timeout: the plugin still ends first, so on_failure
    # (pass, marked unscanned) decides rather than the runner's on_error (tempfail).
    chain = make_chain(
        servers=[silent_clamd], scan_timeout="30s", timeout="0.5s", on_failure="pass"
    )
    verdict, txn = await chain.run(make_mail())
    assert verdict is None
    assert txn.results[0].error is None
    assert txn.message.get("X-Virus-Status") == "Unscanned (scan timed out)"


# ----------------------------------------------------------------------------- check_config


def check(tmp_path: Path, **clamav: Any) -> list[Problem]:
    plugins = Plugins()
    plugins.add("clamav", ClamavPlugin)
    _, _, problems = check_configuration(write_confdir(tmp_path, **clamav), plugins)
    return [p for p in problems if p.key.startswith("plugins.clamav")]


def test_check_config_reports_down_server_as_warning(tmp_path: Path, clamd_server: Clamd) -> None:
    down = down_tcp()
    problems = check(tmp_path, servers=[down, tcp(clamd_server)], max_size=1_000_000)
    conf = str(tmp_path / "conf.d" / "50-clamav.toml")
    down_problems = [p for p in problems if down in p.message]
    assert len(down_problems) == 1
    (p,) = down_problems
    assert (p.file, p.key, p.severity) == (conf, "plugins.clamav.servers", "warning")
    assert "not reachable" in p.message
    assert all(p.severity == "warning" for p in problems), problems


def test_check_config_rejects_bad_server_strings(tmp_path: Path) -> None:
    problems = check(tmp_path, servers=["clamd.example", "unix:relative.sock", "h:99999"])
    errors = [p for p in problems if p.severity == "error"]
    assert [p.key for p in errors] == ["plugins.clamav.servers"] * 3
    assert errors[0].file == str(tmp_path / "conf.d" / "50-clamav.toml")
    assert "item 1" in errors[0].message
    assert "host:port" in errors[0].message


def test_check_config_learns_stream_max_length(tmp_path: Path, clamd_server: Clamd) -> None:
    # clamd_server has StreamMaxLength 2M; max_size is 25 MiB by default
    problems = check(tmp_path, servers=[unix(clamd_server)])
    limit = [p for p in problems if "StreamMaxLength" in p.message]
    assert len(limit) == 1
    assert "is 2097152 bytes" in limit[0].message
    assert limit[0].severity == "warning"
    # only EICAR signatures are loaded: clamd reports no official database
    assert any("no official signature database" in p.message for p in problems)
    # within the limit, nothing to say about it
    problems = check(tmp_path, servers=[unix(clamd_server)], max_size=2 * 1024 * 1024)
    assert not [p for p in problems if "StreamMaxLength" in p.message]


def test_check_config_other_errors_and_warnings(tmp_path: Path) -> None:
    problems = check(tmp_path, servers=[], connect_timeout="0s", max_size=0)
    keys = sorted((p.key, p.severity) for p in problems)
    assert keys == [
        ("plugins.clamav.connect_timeout", "error"),
        ("plugins.clamav.max_size", "error"),
        ("plugins.clamav.servers", "error"),
    ]
    problems = check(tmp_path, servers=[down_tcp()], max_size=1000, scan_timeout="90s")
    assert {p.key for p in problems if p.severity == "warning"} == {
        "plugins.clamav.max_size",
        "plugins.clamav.scan_timeout",
        "plugins.clamav.servers",
    }


# ----------------------------------------------------------------------------- client units


def test_address_parsing() -> None:
    assert str(ClamdAddress.parse("unix:/run/clamd.sock")) == "unix:/run/clamd.sock"
    assert ClamdAddress.parse("10.0.0.1:3310") == ClamdAddress(host="10.0.0.1", port=3310)
    assert ClamdAddress.parse("[::1]:3310") == ClamdAddress(host="::1", port=3310)
    assert str(ClamdAddress.parse("[::1]:3310")) == "[::1]:3310"
    for bad in ("clamd", "::1:3310", "host:0", "host:x", ":3310", "unix:clamd.sock", "[::1]"):
        with pytest.raises(ValueError):
            ClamdAddress.parse(bad)


def test_reply_parsing() -> None:
    assert parse_reply(b"stream: OK\0").clean
    assert parse_reply(b"stream: Eicar-Sig FOUND\0").virus == "Eicar-Sig"
    with pytest.raises(ClamdFailed) as err:
        parse_reply(b"INSTREAM size limit exceeded. ERROR\0")
    assert err.value.reason == "too large for scanner"
    assert not err.value.retryable
    for reply in (b"", b"stream: Can't allocate memory ERROR\0", b"PONG\0"):
        with pytest.raises(ClamdFailed) as err:
            parse_reply(reply)
        assert err.value.reason == "scanner error"
        assert err.value.retryable


# ----------------------------------------------------------------------------- IDSESSION reuse


async def test_session_is_reused_for_the_next_scan(clamd_server: Clamd) -> None:
    pool = ClamdPool(ClamdAddress(path=str(clamd_server.socket_path)))
    try:
        first = await pool.scan(make_mail(), connect_timeout=5, scan_timeout=5)
        assert first.clean
        assert pool.idle == 1
        second = await pool.scan(make_mail(EICAR.decode()), connect_timeout=5, scan_timeout=5)
        assert second.virus == "Filterhost.Test.EICAR-Body.UNOFFICIAL"
        assert pool.idle == 1
        assert pool._idle[0].requests == 2  # one connection answered both
    finally:
        pool.close()


class FakeClamd:
    """An IDSESSION-speaking stand-in for clamd that misbehaves on purpose.

    ``mode``: ``"close_after_reply"`` (drops the session once idle), ``"close_on_next"`` (drops
    it when the next request has arrived, unanswered), ``"wrong_tag"`` (answers "7: stream: OK"
    to request 1), ``"truncated"`` (answers "1: stream: OK" without the NUL, then closes).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: list[asyncio.Task[None]] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> ClamdAddress:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return ClamdAddress(host="127.0.0.1", port=self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    @staticmethod
    async def read_request(reader: asyncio.StreamReader) -> None:
        command = await reader.readuntil(b"\0")
        if command == b"zIDSESSION\0":
            command = await reader.readuntil(b"\0")
        assert command == b"zINSTREAM\0", command
        while size := struct.unpack("!L", await reader.readexactly(4))[0]:
            await reader.readexactly(size)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.handlers.append(task)
        try:
            await self.read_request(reader)
            reply = {"wrong_tag": b"7: stream: OK\0", "truncated": b"1: stream: OK"}
            writer.write(reply.get(self.mode, b"1: stream: OK\0"))
            await writer.drain()
            if self.mode == "close_on_next":
                await self.read_request(reader)
            elif self.mode == "wrong_tag":
                await reader.read()  # until the client hangs up
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("mode", ["close_after_reply", "close_on_next"])
async def test_session_closed_by_clamd_is_replaced(mode: str) -> None:
    async with FakeClamd(mode) as address:
        pool = ClamdPool(address)
        try:
            assert (await pool.scan(make_mail(), connect_timeout=2, scan_timeout=2)).clean
            await asyncio.sleep(0.05)  # let the close arrive (the race is covered either way)
            assert (await pool.scan(make_mail(), connect_timeout=2, scan_timeout=2)).clean
        finally:
            pool.close()


@pytest.mark.parametrize("mode", ["close_after_reply", "close_on_next"])
async def test_replaced_sessions_are_new_connections(mode: str) -> None:
    fake = FakeClamd(mode)
    async with fake as address:
        pool = ClamdPool(address)
        try:
            for _ in range(3):
                assert (await pool.scan(make_mail(), connect_timeout=2, scan_timeout=2)).clean
                await asyncio.sleep(0.02)
        finally:
            pool.close()
    assert fake.connections == 3


@pytest.mark.parametrize("mode", ["wrong_tag", "truncated"])
async def test_malformed_session_reply_is_not_ok(mode: str) -> None:
    fake = FakeClamd(mode)
    async with fake as address:
        pool = ClamdPool(address)
        try:
            with pytest.raises(ClamdFailed) as err:
                await pool.scan(make_mail(), connect_timeout=2, scan_timeout=2)
            assert err.value.reason == "scanner error"
            assert pool.idle == 0  # a connection in an unknown state is never reused
        finally:
            pool.close()


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 200_000])
def test_instream_framing(size: int) -> None:
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    chunks = [data[i : i + 65536] for i in range(0, size, 65536)]
    expected = b"zINSTREAM\0" + b"".join(struct.pack("!L", len(c)) + c for c in chunks)
    assert b"".join(_frames(data, 65536)) == expected + b"\0\0\0\0"
    assert len(list(_frames(data, 65536))) == max(1, len(chunks))  # command/end ride along
