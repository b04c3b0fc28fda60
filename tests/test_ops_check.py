"""``--check-config`` in depth: consistency, spool, certificate dates, --online, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from filterhost.checks import (
    certificate_expiry_problems,
    check_configuration,
    deep_problems,
    spool_durability_problems,
)
from filterhost.config import Config, Problem
from filterhost.pluginmanager import Plugins
from tests.components.fixtures import Peers
from tests.components.services import Dns, free_port, make_cert
from tests.filterhost_fixtures import base_config, write_conf


def _load(tmp_path: Path, conf: dict[str, Any]) -> tuple[Config, Plugins]:
    confdir = write_conf(tmp_path / "conf.d", conf)
    config, plugins, problems = check_configuration(confdir)
    assert config is not None
    assert not [p for p in problems if p.severity == "error"], problems
    return config, plugins


def _check_json(confdir: Path, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "filterhost",
            "--check-config",
            "--json",
            "-c",
            str(confdir),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr
    return done.returncode, json.loads(done.stdout)


def test_json_lists_problems_with_file_key_message_severity(tmp_path: Path) -> None:
    conf = base_config(
        tmp_path,
        free_port(),
        None,
        25,
        server={"data_timeout": "10s"},
        plugins={"order": ["headers"], "headers": {"timeout": "20s"}},
    )
    confdir = write_conf(tmp_path / "conf.d", conf)
    code, problems = _check_json(confdir)
    assert code == 1
    assert problems == [
        {
            "file": str(confdir / "00-test.toml"),
            "key": "plugins.headers.timeout",
            "message": "20s is not shorter than server.data_timeout (10s): clients may give up "
            "waiting for the reply and send the message again",
            "severity": "warning",
        }
    ]


def test_json_of_a_clean_config_is_an_empty_list_and_the_spool_probe_leaves_nothing(
    tmp_path: Path,
) -> None:
    conf = base_config(tmp_path, free_port(), None, 25)
    spool = tmp_path / "spool"
    spool.mkdir()
    code, problems = _check_json(write_conf(tmp_path / "conf.d", conf))
    assert (code, problems) == (0, [])
    assert list(spool.iterdir()) == []


def test_json_of_a_broken_config_has_the_syntax_error(tmp_path: Path) -> None:
    confdir = tmp_path / "conf.d"
    confdir.mkdir()
    (confdir / "00.toml").write_text("[server\n")
    code, problems = _check_json(confdir)
    assert code == 1
    assert problems[0]["file"] == str(confdir / "00.toml")
    assert problems[0]["severity"] == "error"
    assert "TOML syntax error" in problems[0]["message"]


def test_chain_timeouts_adding_up_past_the_data_timeout(tmp_path: Path) -> None:
    conf = base_config(
        tmp_path,
        free_port(),
        None,
        25,
        server={"data_timeout": "50s"},
        plugins={
            "order": ["attachments", "headers"],
            "attachments": {"timeout": "30s"},
            "headers": {"timeout": "30s"},
        },
    )
    config, plugins = _load(tmp_path, conf)
    (problem,) = deep_problems(config, plugins, online=False)
    assert problem.key == "server.data_timeout"
    assert "add up to 60s" in problem.message


def test_spool_durability_probe_writes_fsyncs_renames_for_real(tmp_path: Path) -> None:
    conf = base_config(tmp_path, free_port(), None, 25)
    config, _ = _load(tmp_path, conf)
    assert spool_durability_problems(config) == []  # not there yet: the server creates it
    config.spool_directory.mkdir()
    assert spool_durability_problems(config) == []
    assert list(config.spool_directory.iterdir()) == []
    # A spool directory whose probe name is taken by a directory: the rename fails, and says so.
    blocker = config.spool_directory / f".check-{os.getpid()}"
    blocker.mkdir()
    (blocker / "x").write_text("x")
    (problem,) = spool_durability_problems(config)
    assert problem.key == "spool.directory"
    assert "write, fsync or rename failed" in problem.message


def test_certificate_expiry_warns_then_errs(tmp_path: Path) -> None:
    cert = make_cert(tmp_path / "cert", "relay.test")  # valid for two days
    conf = base_config(
        tmp_path,
        free_port(),
        None,
        25,
        server={"tls_cert": str(cert.cert), "tls_key": str(cert.key)},
    )
    config, _ = _load(tmp_path, conf)
    (soon,) = certificate_expiry_problems(config)
    assert soon.severity == "warning"
    assert "expires on" in soon.message
    (gone,) = certificate_expiry_problems(config, now=time.time() + 3 * 86400)
    assert gone.severity == "error"
    assert "expired on" in gone.message
    assert certificate_expiry_problems(config, now=time.time() - 30 * 86400) == []


def _online(tmp_path: Path, **relay: Any) -> list[Problem]:
    conf = base_config(tmp_path, free_port(), None, 25, relay=relay)
    config, plugins = _load(tmp_path, conf)
    return deep_problems(config, plugins, online=True)


def test_online_asks_each_nameserver(tmp_path: Path, dns_server: Dns) -> None:
    assert _online(tmp_path, nameservers=[dns_server.nameserver]) == []
    (dead,) = _online(tmp_path, nameservers=[dns_server.nameserver, "127.0.0.1:1"])
    assert dead.key == "relay.nameservers"
    assert dead.message.startswith("nameserver 127.0.0.1:1 ")


@pytest.fixture
def smarthost(tmp_path: Path, peers: Peers) -> dict[str, Any]:
    cert = make_cert(tmp_path / "smart", "smart.test", ["127.0.0.5"])
    port = free_port()
    peers.start("127.0.0.5", port, tls=cert, auth="relayuser:relaypass")
    return {"mode": "smarthost", "smarthost": f"127.0.0.5:{port}", "tls_ca_file": str(cert.cert)}


def test_online_smart_host_ehlo_tls_and_auth(
    tmp_path: Path, dns_server: Dns, smarthost: dict[str, Any]
) -> None:
    good = tmp_path / "good.auth"
    good.write_text("relayuser:relaypass\n")
    ns = {"nameservers": [dns_server.nameserver]}
    assert _online(tmp_path, **ns, **smarthost, smarthost_auth_file=str(good)) == []
    bad = tmp_path / "bad.auth"
    bad.write_text("relayuser:nope\n")
    (auth,) = _online(tmp_path, **ns, **smarthost, smarthost_auth_file=str(bad))
    assert auth.key == "relay.smarthost_auth_file"
    assert "AUTH failed" in auth.message
    assert "nope" not in auth.message


def test_online_smart_host_without_starttls_or_down(
    tmp_path: Path, dns_server: Dns, peers: Peers
) -> None:
    port = free_port()
    peers.start("127.0.0.5", port)  # no TLS offered
    ns = {"nameservers": [dns_server.nameserver]}
    (plain,) = _online(tmp_path, **ns, mode="smarthost", smarthost=f"127.0.0.5:{port}")
    assert plain.key == "relay.smarthost_tls_policy"
    assert "does not offer STARTTLS" in plain.message
    assert (
        _online(
            tmp_path,
            **ns,
            mode="smarthost",
            smarthost=f"127.0.0.5:{port}",
            smarthost_tls_policy="may",
        )
        == []
    )
    (down,) = _online(tmp_path, **ns, mode="smarthost", smarthost=f"127.0.0.5:{free_port()}")
    assert down.key == "relay.smarthost"
    assert "connect failed" in down.message
    assert down.severity == "warning"
