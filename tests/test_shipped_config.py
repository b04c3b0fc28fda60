"""The shipped conf.d, as an operator runs it: checked clean, serving, and relaying a swaks message.

Only what must differ on a test machine is overridden in a later file, the way an operator
would (conf.d/99-local.toml): the port, the spool, the test clamd and the test DNS server.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.components.fixtures import Sinks
from tests.components.services import Clamd, Dns, free_port
from tests.filterhost_fixtures import FilterhostProcess

REPO = Path(__file__).resolve().parent.parent


def _local_conf(tmp: Path, port: int, mx_port: int, clamd: Clamd, dns: Dns) -> Path:
    conf = tmp / "conf.d"
    shutil.copytree(REPO / "conf.d", conf)
    (conf / "99-local.toml").write_text(
        f"""
[server]
listen = ["127.0.0.1:{port}"]
hostname = "relay.test"
max_message_size = 2097152   # what the test clamd can scan (StreamMaxLength 2M)

[spool]
directory = "{tmp / "spool"}"

[relay]
nameservers = ["{dns.nameserver}"]
mx_port = {mx_port}

[plugins.clamav]
servers = ["unix:{clamd.socket_path}"]
official_signatures = false  # the test clamd has only the EICAR test signatures
max_size = 2097152           # --check-config insists that these three sizes agree
"""
    )
    return conf


def test_shipped_conf_d_is_safe_by_default() -> None:
    text = "".join(p.read_text() for p in sorted((REPO / "conf.d").glob("*.toml")))
    assert 'listen = ["127.0.0.1:2525"]' in text
    assert 'mynetworks = ["127.0.0.0/8", "::1/128"]' in text
    assert "relay_domains = []" in text
    assert 'order = ["clamav", "attachments", "headers", "routing"]' in text


def test_shipped_conf_d_serves_and_relays_a_swaks_message(
    tmp_path: Path, clamd_server: Clamd, dns_server: Dns, sinks: Sinks
) -> None:
    port, mx_port = free_port(), free_port()
    mx1 = sinks.start("127.0.0.2", mx_port)
    conf = _local_conf(tmp_path, port, mx_port, clamd_server, dns_server)
    check = subprocess.run(
        [sys.executable, "-m", "filterhost", "--check-config", "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "configuration OK" in check.stdout

    proc = FilterhostProcess(conf, port, tmp_path / "filterhost.log")
    proc.start()
    try:
        swaks = subprocess.run(
            [
                "swaks",
                "--server",
                "127.0.0.1",
                "--port",
                str(port),
                "--from",
                "alice@example.test",
                "--to",
                "bob@mx.test",
                "--helo",
                "client.test",
                "--header",
                "Subject: swaks test",
                "--body",
                "hello from swaks",
                "--timeout",
                "20",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert swaks.returncode == 0, swaks.stdout + swaks.stderr
        assert "250 2.0.0 Ok: queued as" in swaks.stdout
        (got,) = mx1.wait_for_count(1)
    finally:
        assert proc.stop() == 0
    assert got.rcpt_tos == ["bob@mx.test"]
    assert b"Subject: swaks test" in got.data
    assert b"X-Virus-Scanned: ClamAV at relay.test" in got.data
