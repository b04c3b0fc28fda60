"""contrib/: the systemd unit parses, hardens and wires reload and the pre-start check."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.filterhost_fixtures import REPO

UNIT = REPO / "contrib" / "filterhost.service"


def _directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_unit_hardening_and_commands() -> None:
    d = _directives()
    assert d["ProtectSystem"] == ["strict"]
    assert d["ReadWritePaths"] == ["/var/spool/filterhost"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["PrivateTmp"] == ["yes"]
    assert d["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert d["KillSignal"] == ["SIGTERM"]
    assert "--check-config" in d["ExecStartPre"][0]
    # Reload: check first (a broken conf.d fails `systemctl reload`), then SIGHUP.
    assert "--check-config" in d["ExecReload"][0]
    assert d["ExecReload"][1] == "/bin/kill -HUP $MAINPID"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "filterhost"
    unit = tmp_path / "filterhost.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/filterhost", str(script)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_check_config_errors_only_lets_warnings_pass(tmp_path: Path) -> None:
    confdir = tmp_path / "conf.d"
    confdir.mkdir()
    # clamd is down: a warning. ExecStartPre must not stop the start for it.
    (confdir / "00.toml").write_text(
        f'[spool]\ndirectory = "{tmp_path / "spool"}"\n[plugins]\norder = ["clamav"]\n'
        f'[plugins.clamav]\nservers = ["unix:{tmp_path / "no.sock"}"]\n'
    )
    args = [sys.executable, "-m", "filterhost", "--check-config", "-c", str(confdir)]
    strict = subprocess.run(args, capture_output=True, text=True, check=False)
    lenient = subprocess.run([*args, "--errors-only"], capture_output=True, text=True, check=False)
    assert strict.returncode == 1
    assert "warning" in strict.stderr
    assert lenient.returncode == 0
    assert "warning" in lenient.stderr
    assert "configuration OK apart from the warnings above" in lenient.stdout
