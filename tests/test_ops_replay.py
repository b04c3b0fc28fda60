"""``filterhost replay``: the configured chain and routing on a saved message, run as a command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from filterhost.testing import make_message
from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import base_config, spooled_ids, write_conf


def _replay(confdir: Path, eml: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "filterhost", "replay", str(eml), "-c", str(confdir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _conf(tmp_path: Path, dns: Dns | None, order: list[str], **plugins: Any) -> Path:
    conf = base_config(tmp_path, free_port(), dns, free_port(), plugins={"order": order, **plugins})
    return write_conf(tmp_path / "conf.d", conf)


def _eml(tmp_path: Path, **kwargs: Any) -> Path:
    # Saved as a mail client saves it: LF line ends.
    path = tmp_path / "message.eml"
    data = make_message(subject="Quarterly report", **kwargs).as_bytes()
    path.write_bytes(data.replace(b"\r\n", b"\n"))
    return path


def test_replay_prints_verdicts_header_diff_and_routes(tmp_path: Path, dns_server: Dns) -> None:
    confdir = _conf(
        tmp_path,
        dns_server,
        ["attachments", "headers", "routing"],
        headers={
            "rules": [
                {"action": "add", "name": "X-Replayed", "value": "yes"},
                {"action": "remove", "name": "X-Mailer"},
            ]
        },
        routing={"transport": {"partner.test": "10.0.0.5:2525"}},
    )
    eml = _eml(tmp_path, headers={"X-Mailer": "Outlook 1.0"})
    done = _replay(
        confdir,
        eml,
        "--from",
        "alice@example.test",
        "--to",
        "bob@partner.test",
        "--to",
        "carol@mx.test",
        "--client-ip",
        "127.0.0.9",
        "--resolve",
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # One line per hook call, each with its plugin, duration and verdict.
    assert re.search(r"filterhost_message\s+attachments\s+\d+\.\d ms  continue", out)
    assert re.search(r"filterhost_message\s+headers\s+\d+\.\d ms  continue edits=2", out)
    assert re.search(r"filterhost_route\s+routing\s+\d+\.\d ms  route host:10\.0\.0\.5:2525", out)
    assert re.search(r"result: data 250 2\.0\.0 Ok: queued as [0-9A-F]+ \(accepted\)", out)
    diff = out.split("header diff:\n")[1].split("routes:\n")[0]
    assert "  + X-Replayed: yes\n" in diff
    assert "  - X-Mailer: Outlook 1.0\n" in diff
    assert re.search(r"  \+ Received: from replay\.invalid \(\[127\.0\.0\.9\]\)", diff)
    routes = out.split("routes:\n")[1]
    assert "  <bob@partner.test>: host 10.0.0.5:2525\n" in routes
    assert re.search(
        r"  <carol@mx\.test>: mx mx\.test \(port \d+\) -> mx1\.mx\.test \(pref 10: 127\.0\.0\.2\)",
        routes,
    )
    # Nothing was spooled, nothing was sent.
    assert not list((tmp_path / "spool").glob("*/*.json"))
    assert not spooled_ids(tmp_path / "spool")


def test_replay_of_a_refused_message_exits_1_and_says_who(tmp_path: Path) -> None:
    confdir = _conf(tmp_path, None, ["attachments", "headers"])
    eml = _eml(tmp_path, attachments=[("invoice.pdf.exe", b"MZ")])
    done = _replay(confdir, eml, "--from", "alice@example.test", "--to", "bob@mx.test")
    assert done.returncode == 1, done.stderr
    assert re.search(
        r"filterhost_message\s+attachments\s+\d+\.\d ms  reject 554 5\.7\.1 ", done.stdout
    )
    assert "headers" not in done.stdout.split("hooks:")[1].split("result:")[0]  # chain stopped
    assert re.search(r"result: data 554 5\.7\.1 .* \(refused\)", done.stdout)
    assert "routes:\n  (none: the message would not be queued)" in done.stdout


def test_replay_refuses_a_relay_that_policy_would_refuse(tmp_path: Path) -> None:
    confdir = _conf(tmp_path, None, [])
    eml = _eml(tmp_path)
    done = _replay(
        confdir, eml, "--from", "a@example.test", "--to", "b@mx.test", "--client-ip", "192.0.2.7"
    )
    assert done.returncode == 1
    assert "rcpt <b@mx.test>: 554 5.7.1" in done.stdout
    assert "(no plugin ran)" in done.stdout


def test_replay_with_a_broken_config_names_the_problem(tmp_path: Path) -> None:
    confdir = _conf(tmp_path, None, ["nosuchplugin"])
    done = _replay(confdir, _eml(tmp_path), "--from", "a@example.test", "--to", "b@mx.test")
    assert done.returncode == 2
    assert "plugins.order" in done.stderr
    assert "Traceback" not in done.stderr
