"""Signals on a real filterhost process: SIGHUP reloads conf.d; SIGTERM drains, keeps the spool."""

from __future__ import annotations

import signal
import ssl
from pathlib import Path

from filterhost.testing import make_message
from tests.components.fixtures import Peers
from tests.components.services import Dns, free_port, make_cert
from tests.filterhost_fixtures import FilterhostFactory, FilterhostProcess, base_config, spooled_ids
from tests.smtp_raw import Raw


def _message(subject: str, attachment: str | None = None) -> bytes:
    attachments = [(attachment, b"MZ\x90\x00 not really a program")] if attachment else []
    return make_message(subject=subject, to=["bob@mx.test"], attachments=attachments).as_bytes()


def _start_transaction(raw: Raw) -> None:
    assert raw.cmd(b"MAIL FROM:<alice@example.test>").startswith(b"250")
    assert raw.cmd(b"RCPT TO:<bob@mx.test>").startswith(b"250")
    assert raw.cmd(b"DATA").startswith(b"354")


def _send(raw: Raw, data: bytes) -> bytes:
    _start_transaction(raw)
    raw.send(data + b".\r\n")
    return raw.reply()


def _hup(proc: FilterhostProcess) -> None:
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)


def test_sighup_applies_a_good_config_and_keeps_the_old_one_when_broken(
    fh: FilterhostFactory, tmp_path: Path, dns_server: Dns
) -> None:
    port = free_port()
    proc = fh.create(base_config(tmp_path, port, dns_server, free_port())).start()
    raw = Raw(port)
    raw.greet()
    assert _send(raw, _message("before", "tool.exe")).startswith(b"250 ")  # no chain yet

    # A good change: the attachments plugin joins the chain. The open session stays open and
    # its next message meets the new chain.
    (proc.confdir / "50-chain.toml").write_text('[plugins]\norder = ["attachments"]\n')
    _hup(proc)
    proc.wait_log(r"reload: configuration from \S+ in effect; order: attachments")
    assert _send(raw, _message("after", "tool.exe")).startswith(b"554 5.7.1 ")

    # A broken file: each problem is logged, and the server goes on with the old config.
    broken = proc.confdir / "60-broken.toml"
    broken.write_text("[server\nmax_hops = 3\n")
    _hup(proc)
    proc.wait_log(r"reload refused: 1 configuration problem\(s\); still serving")
    assert f"reload: {broken}: -: TOML syntax error" in proc.log
    assert _send(raw, _message("still", "tool.exe")).startswith(b"554 5.7.1 ")
    assert _send(raw, _message("clean")).startswith(b"250 ")

    # A change that needs new sockets is refused, not half applied.
    broken.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n')
    _hup(proc)
    proc.wait_log(r"reload refused: server\.listen cannot change while running")
    assert _send(raw, _message("again", "tool.exe")).startswith(b"554 5.7.1 ")
    assert raw.cmd(b"QUIT").startswith(b"221")
    raw.close()
    assert "Traceback" not in proc.log


def test_sigterm_during_a_transfer_loses_nothing(
    fh: FilterhostFactory, peers: Peers, tmp_path: Path, dns_server: Dns
) -> None:
    port, mx_port = free_port(), free_port()
    proc = fh.create(base_config(tmp_path, port, dns_server, mx_port)).start()
    data = _message("drained")
    half = len(data) // 2
    finishing, abandoning, idle = Raw(port), Raw(port), Raw(port)
    for raw in (finishing, abandoning, idle):
        raw.greet()
    for raw in (finishing, abandoning):
        _start_transaction(raw)
        raw.send(data[:half])

    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    proc.wait_log(r"stopping: no new connections")
    # Between transactions: told at once; mid-transfer: allowed to finish.
    assert idle.closed().startswith(b"421 4.3.2 ")
    abandoning.close()  # this client gives up: it never got a 250, so nothing may be queued
    finishing.send(data[half:] + b".\r\n")
    reply = finishing.reply()
    assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
    queue_id = reply.split()[-1].decode()
    assert finishing.closed().startswith(b"421 4.3.2 ")  # then the session ends
    assert proc.proc.wait(20) == 0
    for raw in (finishing, idle):
        raw.close()

    # Nothing listened at the MX: the accepted message is in the spool, and only it.
    queued = sorted(spooled_ids(tmp_path / "spool"))
    assert queued == [queue_id]

    peer = peers.start("127.0.0.2", mx_port)
    proc.start()
    proc.wait_log(rf"{queue_id}: to=<bob@mx\.test> status=delivered", timeout=20)
    arrived = [m for m in peer.messages() if b"Subject: drained" in m.data]
    assert len(arrived) == 1
    proc.wait_log(rf"{queue_id}: removed \(all recipients done\)")
    assert not spooled_ids(tmp_path / "spool")


def _served_certificate(port: int) -> bytes:
    raw = Raw(port)
    try:
        raw.greet()
        raw.starttls()
        der = raw.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert der is not None
        return bytes(der)
    finally:
        raw.close()


def test_sighup_loads_a_renewed_certificate_for_new_sessions(
    fh: FilterhostFactory, tmp_path: Path, dns_server: Dns
) -> None:
    old = make_cert(tmp_path / "old", "relay.test")
    new = make_cert(tmp_path / "new", "relay.test")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("crt", "key"):
        (live / f"relay.{name}").write_bytes((tmp_path / "old" / f"relay.test.{name}").read_bytes())
    port = free_port()
    tls = {"tls_cert": str(live / "relay.crt"), "tls_key": str(live / "relay.key")}
    proc = fh.create(base_config(tmp_path, port, dns_server, free_port(), server=tls)).start()
    assert _served_certificate(port) == ssl.PEM_cert_to_DER_cert(old.cert.read_text())
    # The operator's renewal tool replaces the files; a reload puts the new pair in use.
    for name in ("crt", "key"):
        (live / f"relay.{name}").write_bytes((tmp_path / "new" / f"relay.test.{name}").read_bytes())
    _hup(proc)
    proc.wait_log(r"reload: configuration from \S+ in effect")
    assert _served_certificate(port) == ssl.PEM_cert_to_DER_cert(new.cert.read_text())
