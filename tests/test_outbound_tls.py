"""Outbound TLS policies, smart host AUTH and connection reuse, against real TLS next hops."""

from __future__ import annotations

import re
from pathlib import Path

from tests.components.fixtures import Peers, Sinks
from tests.components.services import Dns, free_port, make_cert
from tests.filterhost_fixtures import FilterhostFactory, base_config

MSG = b"From: a@example.test\r\nSubject: tls\r\n\r\nsecret\r\n"


def _send(proc: object, rcpts: list[str], count: int = 1) -> None:
    with proc.smtp() as client:  # type: ignore[attr-defined]
        for _ in range(count):
            client.sendmail("alice@example.test", rcpts, MSG)


def test_may_uses_starttls_without_verifying(
    fh: FilterhostFactory, dns_server: Dns, peers: Peers, tmp_path: Path
) -> None:
    port = free_port()
    cert = make_cert(tmp_path / "certs", "wrong-name.test")  # matches nothing: may is fine
    peer = peers.start("127.0.0.2", port, tls=cert)
    proc = fh.create(base_config(tmp_path, free_port(), dns_server, port)).start()
    _send(proc, ["bob@mx.test"])
    (got,) = peer.wait_for_count(1)
    assert got.tls is not None
    assert got.tls.startswith("TLSv1.")
    assert got.data.endswith(MSG)
    proc.wait_log(r"to=<bob@mx\.test> relay=mx1\.mx\.test\[127\.0\.0\.2\]:\d+ tls=TLSv1\.\d ")


def test_verify_checks_the_mx_name_not_the_address(
    fh: FilterhostFactory, dns_server: Dns, peers: Peers, tmp_path: Path
) -> None:
    port = free_port()
    good = make_cert(tmp_path / "good", "mx1.mx.test")  # the MX *name*; no IP in the cert
    peer = peers.start("127.0.0.2", port, tls=good)
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        port,
        relay={"tls_policies": {"mx.test": "verify"}, "tls_ca_file": str(good.cert)},
    )
    proc = fh.create(conf).start()
    _send(proc, ["bob@mx.test"])
    (got,) = peer.wait_for_count(1)
    assert got.tls is not None
    proc.wait_log(r"to=<bob@mx\.test> relay=\S+ tls=TLSv1\.\d verified ")


def test_verify_defers_on_an_untrusted_certificate(
    fh: FilterhostFactory, dns_server: Dns, peers: Peers, tmp_path: Path
) -> None:
    port = free_port()
    peer = peers.start("127.0.0.2", port, tls=make_cert(tmp_path / "c", "mx1.mx.test"))
    other_ca = make_cert(tmp_path / "ca", "some-ca.test")
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        port,
        relay={"tls_policies": {".test": "verify"}, "tls_ca_file": str(other_ca.cert)},
    )
    proc = fh.create(conf).start()
    _send(proc, ["bob@mx.test"])
    m = proc.wait_log(r"to=<bob@mx\.test> status=deferred attempts=1 .*reply=(.*)$")
    assert "4.7.5" in m.group(1)
    assert "certificate verify failed" in m.group(1)
    assert peer.messages() == []


def test_encrypt_defers_when_starttls_is_not_offered_and_may_falls_back(
    fh: FilterhostFactory, dns_server: Dns, sinks: Sinks, tmp_path: Path
) -> None:
    port = free_port()
    sink = sinks.start("127.0.0.2", port)  # no STARTTLS
    conf = base_config(
        tmp_path, free_port(), dns_server, port, relay={"tls_policies": {"amx.test": "encrypt"}}
    )
    proc = fh.create(conf).start()
    _send(proc, ["enc@amx.test"])
    proc.wait_log(r"to=<enc@amx\.test> status=deferred .*4\.7\.4 .*does not offer STARTTLS")
    _send(proc, ["plain@mx.test"])  # default policy "may": plain text is fine
    (got,) = sink.wait_for_count(1)
    assert got.rcpt_tos == ["plain@mx.test"]


def test_smarthost_auth_over_starttls(fh: FilterhostFactory, peers: Peers, tmp_path: Path) -> None:
    port = free_port()
    cert = make_cert(tmp_path / "c", "smart.test", ips=["127.0.0.5"])
    peer = peers.start("127.0.0.5", port, tls=cert, auth="relayuser:s3cret")
    secrets = tmp_path / "smarthost.auth"
    secrets.write_text("# user:password\nrelayuser:s3cret\n")
    conf = base_config(
        tmp_path,
        free_port(),
        None,
        25,
        relay={
            "mode": "smarthost",
            "smarthost": f"127.0.0.5:{port}",
            "smarthost_auth_file": str(secrets),
            "tls_ca_file": str(cert.cert),
        },
    )
    proc = fh.create(conf).start()
    _send(proc, ["x@anywhere.test"])
    (got,) = peer.wait_for_count(1)
    assert got.auth == "relayuser"
    assert got.tls is not None
    assert "s3cret" not in proc.log  # credentials are never logged


def test_smarthost_auth_failure_defers(fh: FilterhostFactory, peers: Peers, tmp_path: Path) -> None:
    port = free_port()
    cert = make_cert(tmp_path / "c", "smart.test", ips=["127.0.0.5"])
    peers.start("127.0.0.5", port, tls=cert, auth="relayuser:s3cret")
    secrets = tmp_path / "smarthost.auth"
    secrets.write_text("relayuser:wrong\n")
    conf = base_config(
        tmp_path,
        free_port(),
        None,
        25,
        relay={
            "mode": "smarthost",
            "smarthost": f"127.0.0.5:{port}",
            "smarthost_auth_file": str(secrets),
            "tls_ca_file": str(cert.cert),
        },
    )
    proc = fh.create(conf).start()
    _send(proc, ["x@anywhere.test"])
    proc.wait_log(r"status=deferred .*authentication failed: 535")
    assert "wrong" not in proc.log


def test_smarthost_implicit_tls(fh: FilterhostFactory, peers: Peers, tmp_path: Path) -> None:
    port = free_port()
    cert = make_cert(tmp_path / "c", "smart.test", ips=["127.0.0.5"])
    peer = peers.start("127.0.0.5", port, tls=cert, implicit_tls=True)
    conf = base_config(
        tmp_path,
        free_port(),
        None,
        25,
        relay={
            "mode": "smarthost",
            "smarthost": f"127.0.0.5:{port}",
            "smarthost_tls": "implicit",
            "tls_ca_file": str(cert.cert),
        },
    )
    proc = fh.create(conf).start()
    _send(proc, ["x@anywhere.test"])
    (got,) = peer.wait_for_count(1)
    assert got.tls is not None


def test_connections_to_a_next_hop_are_reused(
    fh: FilterhostFactory, dns_server: Dns, peers: Peers, tmp_path: Path
) -> None:
    port = free_port()
    peer = peers.start("127.0.0.2", port)
    proc = fh.create(
        base_config(tmp_path, free_port(), dns_server, port, relay={"connection_reuse_time": "30s"})
    ).start()
    for i in range(5):
        _send(proc, [f"r{i}@mx.test"])
        peer.wait_for_count(i + 1)  # one at a time, so each can take the idle connection
    conns = re.findall(r"relay=\S+ tls=\S+ conn=(new|reused)", proc.log)
    assert conns == ["new", "reused", "reused", "reused", "reused"]
