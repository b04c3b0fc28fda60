"""STARTTLS, implicit TLS and AUTH: raw sockets for the byte-exact rules, swaks as a real client.

One filterhost process serves the module with three listeners: plain (STARTTLS offered), plain
with require_tls, and implicit TLS. mynetworks is 127.0.0.1/32, so clients bound to 127.0.0.2
and up may relay only once authenticated. Each test that fails AUTH on purpose uses its own
client address: failures are counted per address.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import argon2
import pytest

from filterhost.checks import check_configuration
from filterhost.smtp.auth import passwd_main
from tests.components.fixtures import Peers
from tests.components.services import Cert, Dns, Peer, free_port, make_cert
from tests.filterhost_fixtures import (
    FilterhostFactory,
    FilterhostProcess,
    base_config,
    write_conf,
)
from tests.smtp_raw import Raw, client_tls

PASSWORD = "s3cret-pass"
PLAIN_OK = base64.b64encode(f"\0alice\0{PASSWORD}".encode())


@dataclass
class Relay:
    proc: FilterhostProcess
    peer: Peer
    plain: int
    required: int
    implicit: int
    users: Path


def _passwd(
    users: Path, user: str, password: str | None, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "filterhost", "passwd", str(users), user, *extra],
        input=None if password is None else password + "\n",
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("cert"), "relay.test", ["127.0.0.1"])


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, dns_server: Dns, cert: Cert) -> Iterator[Relay]:
    tmp = tmp_path_factory.mktemp("tls")
    users = tmp / "users"
    assert _passwd(users, "alice", PASSWORD).returncode == 0
    mx_port = free_port()
    peers = Peers()
    factory = FilterhostFactory(tmp)
    plain, required, implicit = free_port(), free_port(), free_port()
    conf = base_config(
        tmp,
        plain,
        dns_server,
        mx_port,
        server={
            "listen": [f"127.0.0.1:{plain}", f"127.0.0.1:{required}"],
            "tls_listen": [f"127.0.0.1:{implicit}"],
            "require_tls": [f"127.0.0.1:{required}"],
            "tls_cert": str(cert.cert),
            "tls_key": str(cert.key),
            "auth_file": str(users),
            "auth_max_failures": 3,
            "mynetworks": ["127.0.0.1/32"],
            "max_errors_per_session": 100,
        },
    )
    try:
        peer = peers.start("127.0.0.2", mx_port)
        proc = factory.create(conf).start()
        yield Relay(proc, peer, plain, required, implicit, users)
    finally:
        factory.stop_all()
        peers.stop_all()


def _arrived(peer: Peer, subject: bytes) -> bytes:
    """The message with ``subject`` (waits for it), its trace header unfolded."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for message in peer.messages():
            if b"Subject: " + subject in message.data:
                return message.data.replace(b"\r\n ", b" ")
        time.sleep(0.05)
    raise AssertionError(f"no message {subject!r} at the peer")


def _assert_no_secrets(log: str) -> None:
    for secret in (PASSWORD, PLAIN_OK.decode(), base64.b64encode(PASSWORD.encode()).decode()):
        assert secret not in log
    assert "wrong-one" not in log


def test_starttls_then_auth_is_offered(relay: Relay) -> None:
    raw = Raw(relay.plain, source="127.0.0.2")
    try:
        ehlo = raw.greet()
        assert b"250-STARTTLS" in ehlo
        assert b"AUTH" not in ehlo  # never offered in the clear
        assert raw.cmd(b"AUTH PLAIN " + PLAIN_OK) == (
            b"538 5.7.11 Encryption required for requested authentication mechanism"
        )
        raw.starttls()
        # RFC 3207 4.2: the server forgets the EHLO; the client must say it again.
        assert raw.cmd(b"MAIL FROM:<a@example.test>") == b"503 5.5.1 Error: send HELO first"
        ehlo = raw.cmd(b"EHLO client.test")
        assert b"250-AUTH PLAIN LOGIN" in ehlo
        assert b"STARTTLS" not in ehlo
        assert raw.cmd(b"STARTTLS") == b"503 5.5.1 Error: TLS already active"
    finally:
        raw.close()
    relay.proc.wait_log(r"STARTTLS TLSv1\.[23] ")


def test_commands_pipelined_before_starttls_are_discarded(relay: Relay) -> None:
    raw = Raw(relay.plain, source="127.0.0.2")
    try:
        assert raw.reply().startswith(b"220 ")
        # An attacker on the path injects commands after STARTTLS, in the clear.
        raw.send(
            b"EHLO client.test\r\nSTARTTLS\r\n"
            b"MAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@mx.test>\r\n"
        )
        assert raw.reply().startswith(b"250-relay.test")
        assert raw.reply() == b"220 2.0.0 Ready to start TLS"
        raw.wrap_tls()  # asserts that nothing else came in the clear
        # The first reply over TLS is for our first command: the injected ones were dropped.
        assert raw.cmd(b"NOOP") == b"250 2.0.0 OK"
        raw.cmd(b"EHLO client.test")
        assert raw.cmd(b"RCPT TO:<victim@mx.test>") == b"503 5.5.1 Error: need MAIL command"
    finally:
        raw.close()


def test_require_tls_listener_refuses_mail_before_starttls(relay: Relay) -> None:
    raw = Raw(relay.required)
    try:
        raw.greet()
        for command in (b"MAIL FROM:<a@example.test>", b"AUTH PLAIN " + PLAIN_OK, b"VRFY a"):
            assert raw.cmd(command) == b"530 5.7.0 Must issue a STARTTLS command first"
        assert raw.cmd(b"NOOP").startswith(b"250")
        raw.starttls()
        raw.cmd(b"EHLO client.test")
        assert raw.cmd(b"MAIL FROM:<a@example.test>").startswith(b"250 2.1.0")
    finally:
        raw.close()


def test_auth_plain_lets_an_outside_client_relay(relay: Relay) -> None:
    raw = Raw(relay.plain, source="127.0.0.2")
    try:
        raw.greet()
        raw.starttls()
        raw.cmd(b"EHLO client.test")
        assert raw.cmd(b"MAIL FROM:<alice@example.test>").startswith(b"250")
        assert raw.cmd(b"RCPT TO:<bob@mx.test>") == b"554 5.7.1 Relay access denied"
        assert raw.cmd(b"AUTH PLAIN " + PLAIN_OK) == (
            b"503 5.5.1 Error: AUTH not permitted during a mail transaction"
        )
        assert raw.cmd(b"RSET").startswith(b"250")
        assert raw.cmd(b"AUTH PLAIN " + PLAIN_OK) == b"235 2.7.0 Authentication successful"
        assert raw.cmd(b"AUTH PLAIN " + PLAIN_OK) == b"503 5.5.1 Error: already authenticated"
        assert raw.cmd(b"MAIL FROM:<alice@example.test>").startswith(b"250")
        assert raw.cmd(b"RCPT TO:<bob@mx.test>").startswith(b"250 2.1.5")
        assert raw.cmd(b"RCPT TO:<x@[127.0.0.9]>").startswith(b"250 2.1.5")  # trusted now
        assert raw.cmd(b"RCPT TO:<x%y@mx.test>").startswith(b"553 5.1.3")  # tricks still not
        assert raw.cmd(b"DATA").startswith(b"354")
        assert raw.cmd(b"Subject: authenticated\r\n\r\nhi\r\n.").startswith(b"250 2.0.0")
    finally:
        raw.close()
    assert b"with ESMTPSA id" in _arrived(relay.peer, b"authenticated")
    relay.proc.wait_log(r"AUTH PLAIN succeeded user=alice")
    relay.proc.wait_log(r"queued from=<alice@example.test> .* user=alice")
    _assert_no_secrets(relay.proc.log)


def test_auth_login_challenges_over_implicit_tls(relay: Relay) -> None:
    raw = Raw(relay.implicit, source="127.0.0.4", tls=client_tls())
    try:
        ehlo = raw.greet()
        assert b"250-AUTH PLAIN LOGIN" in ehlo
        assert b"STARTTLS" not in ehlo
        assert raw.cmd(b"AUTH CRAM-MD5") == b"504 5.5.4 Unrecognized authentication type"
        assert raw.cmd(b"AUTH LOGIN") == b"334 VXNlcm5hbWU6"  # "Username:"
        assert raw.cmd(b"*") == b"501 5.7.0 Authentication aborted"
        assert raw.cmd(b"AUTH PLAIN not-base64!") == (
            b"501 5.5.2 Cannot decode the response (not base64)"
        )
        assert raw.cmd(b"AUTH LOGIN") == b"334 VXNlcm5hbWU6"
        assert raw.cmd(base64.b64encode(b"alice")) == b"334 UGFzc3dvcmQ6"  # "Password:"
        assert raw.cmd(base64.b64encode(PASSWORD.encode())) == (
            b"235 2.7.0 Authentication successful"
        )
    finally:
        raw.close()
    _assert_no_secrets(relay.proc.log)


def test_failed_auth_is_rate_limited_per_client(relay: Relay) -> None:
    wrong = base64.b64encode(b"\0alice\0wrong-one")
    raw = Raw(relay.implicit, source="127.0.0.3", tls=client_tls())
    try:
        raw.greet()
        # Acting as another user (authzid) is not offered: a failure like a wrong password.
        other = base64.b64encode(f"bob\0alice\0{PASSWORD}".encode())
        assert raw.cmd(b"AUTH PLAIN " + other) == b"535 5.7.8 Authentication credentials invalid"
        assert raw.cmd(b"AUTH PLAIN " + wrong) == b"535 5.7.8 Authentication credentials invalid"
        raw.send(b"AUTH PLAIN " + wrong + b"\r\n")
        assert raw.closed() == (
            b"421 4.7.0 relay.test Error: too many failed authentication attempts\r\n"
        )
    finally:
        raw.close()
    # The same address, even with the right password, is refused until the failures age out.
    raw = Raw(relay.implicit, source="127.0.0.3", tls=client_tls())
    try:
        raw.greet()
        assert raw.cmd(b"AUTH PLAIN " + PLAIN_OK) == (
            b"454 4.7.0 Too many failed authentication attempts; try again later"
        )
    finally:
        raw.close()
    # Another client is not affected.
    raw = Raw(relay.implicit, source="127.0.0.5", tls=client_tls())
    try:
        raw.greet()
        assert raw.cmd(b"AUTH PLAIN " + PLAIN_OK) == b"235 2.7.0 Authentication successful"
    finally:
        raw.close()
    relay.proc.wait_log(r"AUTH PLAIN failed client=127\.0\.0\.3 failures=3/3")
    _assert_no_secrets(relay.proc.log)


def test_a_user_added_while_running_can_authenticate(relay: Relay) -> None:
    bob = base64.b64encode(b"\0bob\0bobs-pass")
    assert _passwd(relay.users, "bob", "bobs-pass").returncode == 0
    raw = Raw(relay.implicit, source="127.0.0.7", tls=client_tls())
    try:
        raw.greet()
        assert raw.cmd(b"AUTH PLAIN " + bob) == b"235 2.7.0 Authentication successful"
    finally:
        raw.close()
    assert _passwd(relay.users, "bob", None, "--delete").returncode == 0
    raw = Raw(relay.implicit, source="127.0.0.7", tls=client_tls())
    try:
        raw.greet()
        assert raw.cmd(b"AUTH PLAIN " + bob) == b"535 5.7.8 Authentication credentials invalid"
    finally:
        raw.close()


def test_a_failed_tls_handshake_only_ends_that_session(relay: Relay) -> None:
    raw = Raw(relay.implicit)
    try:
        raw.send(b"EHLO plaintext.test\r\n")  # not a TLS ClientHello
        raw.closed()
    finally:
        raw.close()
    raw = Raw(relay.plain)
    try:
        raw.greet()
        assert raw.cmd(b"STARTTLS").startswith(b"220 2.0.0")
        raw.send(b"this is not a handshake\r\n")
        raw.closed()
    finally:
        raw.close()
    relay.proc.wait_log(r"TLS handshake failed")
    raw = Raw(relay.implicit, tls=client_tls())
    try:
        assert raw.greet().startswith(b"250-relay.test")
    finally:
        raw.close()


# -- swaks, a real client ------------------------------------------------------------------


def _swaks(relay: Relay, port: int, source: str, *options: str) -> subprocess.CompletedProcess[str]:
    argv = ["swaks", "--server", "127.0.0.1", "--port", str(port), "--local-interface", source]
    argv += ["--from", "alice@example.test", "--to", "bob@mx.test", "--helo", "client.test"]
    argv += ["--timeout", "10", *options]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_swaks_starttls_auth_plain_relays(relay: Relay) -> None:
    done = _swaks(
        relay,
        relay.plain,
        "127.0.0.2",
        "--tls",
        "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD,
        "--header", "Subject: swaks starttls",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "<~  235 2.7.0 Authentication successful" in done.stdout
    assert "<~  250 2.0.0 Ok: queued as " in done.stdout
    assert b"with ESMTPSA id" in _arrived(relay.peer, b"swaks starttls")


def test_swaks_implicit_tls_auth_login(relay: Relay) -> None:
    done = _swaks(
        relay,
        relay.implicit,
        "127.0.0.2",
        "--tlsc",
        "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", PASSWORD,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "<~  250 2.0.0 Ok: queued as " in done.stdout


def test_swaks_without_auth_cannot_relay_and_wrong_password_fails(relay: Relay) -> None:
    done = _swaks(relay, relay.plain, "127.0.0.6", "--tls")
    assert done.returncode == 24, done.stdout  # swaks: RCPT refused
    assert "<~* 554 5.7.1 Relay access denied" in done.stdout
    done = _swaks(
        relay,
        relay.plain,
        "127.0.0.6",
        "--tls",
        "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "wrong-one",
    )  # fmt: skip
    assert done.returncode == 28, done.stdout  # swaks: AUTH failed
    assert "<~* 535 5.7.8 Authentication credentials invalid" in done.stdout
    _assert_no_secrets(relay.proc.log)


# -- filterhost passwd and --check-config --------------------------------------------------


def _passwd_here(users: Path, user: str, password: str | None, *, delete: bool = False) -> int:
    """``filterhost passwd`` in this process (the CLI itself is run by the module fixture)."""
    return passwd_main(users, user, delete=delete, stdin=io.StringIO(f"{password}\n"))


def test_passwd_adds_changes_and_deletes_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users"
    assert _passwd_here(users, "carol", "first") == 0
    assert capsys.readouterr().out.strip() == f"{users}: user carol added"
    assert users.stat().st_mode & 0o777 == 0o600
    users.write_text("# keep this comment\n" + users.read_text())
    assert _passwd_here(users, "carol", "second") == 0
    assert capsys.readouterr().out.strip() == f"{users}: user carol changed"
    assert _passwd_here(users, "dave", "third") == 0
    lines = users.read_text().splitlines()
    assert lines[0] == "# keep this comment"
    hashes = dict(line.split(":", 1) for line in lines[1:])
    assert sorted(hashes) == ["carol", "dave"]
    assert hashes["carol"].startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(hashes["carol"], "second")
    assert "second" not in users.read_text()
    assert _passwd_here(users, "dave", None, delete=True) == 0
    assert "dave" not in users.read_text()
    for user, password, status in (("bad:name", "x", 2), ("a b", "x", 2), ("erin", "", 1)):
        assert _passwd_here(users, user, password) == status, user
    assert _passwd_here(users, "nobody", None, delete=True) == 1
    assert "Traceback" not in capsys.readouterr().err


def _problems(tmp_path: Path, dns: Dns, **server: object) -> list[str]:
    conf = base_config(tmp_path, free_port(), dns, 25, server=server)
    confdir = write_conf(tmp_path / f"conf{free_port()}.d", conf)
    _, _, problems = check_configuration(confdir)
    return [str(p) for p in problems]


def test_check_config_checks_certificate_key_and_credentials(
    tmp_path: Path, dns_server: Dns, cert: Cert
) -> None:
    other = make_cert(tmp_path, "other.test")
    (mismatch,) = _problems(tmp_path, dns_server, tls_cert=str(cert.cert), tls_key=str(other.key))
    assert "server.tls_key: " in mismatch
    assert f"{other.key} does not match the certificate in {cert.cert}" in mismatch
    assert mismatch.startswith(str(tmp_path))  # the file that set the key
    (missing,) = _problems(
        tmp_path, dns_server, tls_cert=str(tmp_path / "nope.crt"), tls_key=str(cert.key)
    )
    assert f"server.tls_cert: {tmp_path / 'nope.crt'}: no such file" in missing
    junk = tmp_path / "junk.crt"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (bad,) = _problems(tmp_path, dns_server, tls_cert=str(junk), tls_key=str(cert.key))
    assert "server.tls_cert: " in bad
    assert "does not parse" in bad
    (nokey,) = _problems(tmp_path, dns_server, tls_cert=str(cert.cert), tls_key=str(cert.cert))
    assert "not a PEM private key" in nokey
    (alone,) = _problems(tmp_path, dns_server, tls_key=str(cert.key))
    assert "server.tls_cert: tls_cert and tls_key go together" in alone
    (implicit,) = _problems(tmp_path, dns_server, tls_listen=["127.0.0.1:4465"])
    assert "server.tls_listen: needs a certificate" in implicit
    (auth,) = _problems(tmp_path, dns_server, auth_file=str(tmp_path / "users"))
    assert "server.auth_file: needs a certificate" in auth
    (require,) = _problems(
        tmp_path,
        dns_server,
        tls_cert=str(cert.cert),
        tls_key=str(cert.key),
        require_tls=["127.0.0.1:1"],
    )
    assert "server.require_tls: '127.0.0.1:1' is not one of the listen addresses" in require
    users = tmp_path / "users"
    users.write_text("alice:$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaA\nbob:secret\n")
    tls = {"tls_cert": str(cert.cert), "tls_key": str(cert.key)}
    (line,) = _problems(tmp_path, dns_server, auth_file=str(users), **tls)
    assert f"server.auth_file: {users} line 2: bob: not an Argon2id hash" in line
    (gone,) = _problems(tmp_path, dns_server, auth_file=str(tmp_path / "none"), **tls)
    assert "server.auth_file: " in gone
    assert "No such file" in gone


def test_check_config_command_names_file_and_key(tmp_path: Path, cert: Cert) -> None:
    other = make_cert(tmp_path, "other.test")
    conf = base_config(
        tmp_path,
        free_port(),
        None,
        25,
        server={"tls_cert": str(cert.cert), "tls_key": str(other.key)},
    )
    confdir = write_conf(tmp_path / "conf.d", conf)
    done = subprocess.run(
        [sys.executable, "-m", "filterhost", "--check-config", "-c", str(confdir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert f"{confdir / '00-test.toml'}: server.tls_key: {other.key} does not match" in done.stderr
    assert "Traceback" not in done.stderr
