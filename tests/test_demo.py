"""`make demo` is a test too: run the tour and check each message's outcome, so it never rots.

The demo runs as a subprocess (``demo/run.sh``; the suite is already in a private network
namespace, so it runs the tour directly) and writes a JSON summary; the checks read that and
the printed tour. It must finish within a minute on a 2-core machine.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
LIMIT = 60.0  # seconds: the "under a minute"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, float]:
    summary_path = tmp_path_factory.mktemp("demo") / "summary.json"
    env = {k: v for k, v in os.environ.items() if k != "DEMO_KEEP"}
    env["DEMO_PYTHON"] = sys.executable  # the demo runs with the interpreter of the tests
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "demo" / "run.sh"), "--summary", str(summary_path)],
        capture_output=True,
        text=True,
        timeout=2 * LIMIT,
        check=False,
        env=env,
        cwd=REPO,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(summary_path.read_text())
    return summary, proc.stdout, elapsed


def _message(summary: dict[str, Any], name: str) -> dict[str, Any]:
    (msg,) = [m for m in summary["messages"] if m["name"] == name]
    return msg


def test_demo_runs_within_a_minute_and_says_so(demo: tuple[dict[str, Any], str, float]) -> None:
    summary, out, elapsed = demo
    assert elapsed < LIMIT
    assert summary["ok"] is True
    assert [m["name"] for m in summary["messages"]] == [
        "clean",
        "virus",
        "nullmx",
        "deferred",
        "routed",
    ]
    assert all(m["ok"] for m in summary["messages"])
    assert "every message ended as expected" in out


def test_clean_message_is_delivered_scanned_and_shaped(
    demo: tuple[dict[str, Any], str, float],
) -> None:
    msg = _message(demo[0], "clean")
    assert msg["reply"]["code"] == 250
    assert msg["queue_id"]
    assert f"queued as {msg['queue_id']}" in msg["reply"]["text"]
    assert msg["outcome"] == "delivered"
    assert msg["details"]["server"] == "mx.example.test"
    added = "\n".join(msg["added_headers"])
    assert f"Received: by relay.corp.test (filterhost) with ESMTP id {msg['queue_id']}" in added
    assert "X-Virus-Scanned: ClamAV at relay.corp.test" in added
    assert any(h.startswith("X-Mailer:") for h in msg["removed_headers"])
    assert any(h.startswith("X-Originating-IP:") for h in msg["removed_headers"])
    story = "\n".join(msg["story"])
    assert "status=delivered" in story
    assert all(msg["queue_id"] in line for line in msg["story"])


def test_eicar_is_refused_in_session(demo: tuple[dict[str, Any], str, float]) -> None:
    summary, out, _ = demo
    msg = _message(summary, "virus")
    assert msg["reply"]["code"] == 554
    assert msg["reply"]["text"].startswith("5.7.1 Virus found: ")
    assert msg["outcome"] == "refused"
    assert msg["added_headers"] == []
    assert any("refused" in line for line in msg["story"])
    assert "SMTP reply: 554 5.7.1 Virus found" in out


def test_null_mx_bounces_into_the_senders_box(demo: tuple[dict[str, Any], str, float]) -> None:
    msg = _message(demo[0], "nullmx")
    assert msg["reply"]["code"] == 250
    assert msg["outcome"] == "bounced"
    assert msg["details"]["server"] == "mx.example.test"  # corp.test's MX: alice's box
    dsn = msg["details"]["dsn"]
    assert "Final-Recipient: rfc822; carol@nomail.test" in dsn
    assert "Action: failed" in dsn
    assert "Status: 5.1.10" in dsn
    assert any(line.startswith("From: ") and "MAILER-DAEMON@" in line for line in dsn)
    assert any("status=bounced" in line for line in msg["story"])


def test_deferred_message_is_still_queued_with_its_next_retry(
    demo: tuple[dict[str, Any], str, float],
) -> None:
    summary = demo[0]
    msg = _message(summary, "deferred")
    assert msg["reply"]["code"] == 250
    assert msg["outcome"] == "deferred"
    details = msg["details"]
    assert details["status"] == "pending"
    assert details["attempts"] >= 1
    assert details["next_attempt"]
    assert details["last_reply"].startswith("450 4.3.2")
    assert "next retry" in msg["where"][0]
    assert msg["queue_id"] in summary["queue_list"]["output"]
    assert "<dave@busy.test>" in summary["queue_list"]["output"]
    assert any("X-Virus-Scanned" in h for h in msg["added_headers"])


def test_routing_sends_partner_mail_to_the_second_next_hop(
    demo: tuple[dict[str, Any], str, float],
) -> None:
    msg = _message(demo[0], "routed")
    assert msg["reply"]["code"] == 250
    assert msg["outcome"] == "routed"
    assert msg["details"]["server"] == "gw.partner.test"
    assert any("relay=gw.partner.test" in line for line in msg["story"])


def test_queue_list_and_check_config_are_shown(demo: tuple[dict[str, Any], str, float]) -> None:
    summary, out, _ = demo
    assert summary["queue_list"]["rc"] == 0
    assert summary["check_config"]["rc"] == 0
    assert "configuration OK" in summary["check_config"]["output"]
    assert "$ filterhost -c conf.d queue list" in out
    assert "$ filterhost --check-config -c conf.d" in out


def test_demo_stops_everything_and_cleans_up(demo: tuple[dict[str, Any], str, float]) -> None:
    summary, out, _ = demo
    assert set(summary["pids"]) >= {
        "unbound",
        "clamd",
        "mx.example.test",
        "gw.partner.test",
        "filterhost",
    }
    for name, pid in summary["pids"].items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert f"{name} (pid {pid}) exited" in out
    assert not Path(summary["workdir"]).exists()


def test_dkim_signs_when_the_plugin_is_installed(demo: tuple[dict[str, Any], str, float]) -> None:
    summary = demo[0]
    installed = {ep.name for ep in importlib.metadata.entry_points(group="filterhost.plugins")}
    assert summary["dkim"]["enabled"] is ("dkim" in installed), summary["dkim"]["note"]
    if "dkim" not in installed:
        pytest.skip("the dkim plugin is not installed")
    for name in ("clean", "routed"):
        msg = _message(summary, name)
        assert any(h.startswith("DKIM-Signature: ") for h in msg["added_headers"])
        assert msg["details"]["dkim"] == "pass"
