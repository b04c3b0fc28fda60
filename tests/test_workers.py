"""``[server] workers``: a master and worker processes on one port, each message delivered once."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from tests.components.fixtures import Sinks
from tests.components.services import free_port
from tests.filterhost_fixtures import FilterhostFactory, FilterhostProcess, base_config, spooled_ids


def _send(proc: FilterhostProcess, count: int, tag: str) -> None:
    for i in range(count):  # a connection each: the kernel spreads them over the workers
        with proc.smtp() as client:
            client.sendmail(
                "alice@example.test", [f"{tag}{i}@mx.test"], f"Subject: {i}\r\n\r\nx\r\n"
            )


def test_workers_share_the_port_deliver_once_restart_and_stop(
    fh: FilterhostFactory, sinks: Sinks, tmp_path: Path
) -> None:
    sink_port = free_port()
    upstream = sinks.start("127.0.0.5", sink_port)
    conf = base_config(
        tmp_path,
        free_port(),
        None,
        25,
        server={"workers": 2},
        relay={
            "mode": "smarthost",
            "smarthost": f"127.0.0.5:{sink_port}",
            "smarthost_tls_policy": "none",
        },
    )
    proc = fh.create(conf).start()
    proc.wait_log(r"(filterhost ready[\s\S]*){2}")
    pids = {int(m) for m in re.findall(r"worker \d started \(pid (\d+)\)", proc.log)}
    assert len(pids) == 2
    assert proc.proc is not None
    pidfile = tmp_path / "spool" / "filterhost.pid"
    assert pidfile.read_text().strip() == str(proc.proc.pid)  # the master: it forwards SIGUSR1

    _send(proc, 20, "a")
    got = upstream.wait_for_count(20, timeout=20)
    time.sleep(1.5)  # a second delivery of any message would show up now
    rcpts = sorted(r for m in upstream.messages() for r in m.rcpt_tos)
    assert rcpts == sorted(f"a{i}@mx.test" for i in range(20)), got

    # A worker that dies is replaced; the service goes on.
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    proc.wait_log(rf"worker \d \(pid {victim}\) exited with status -9; restarting")
    proc.wait_log(r"(filterhost ready[\s\S]*){3}")
    _send(proc, 5, "b")
    upstream.wait_for_count(25, timeout=20)

    assert proc.stop() == 0
    for pid in pids - {victim}:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker {pid} still running after the master stopped")
    assert not pidfile.exists()
    assert spooled_ids(tmp_path / "spool") == set()
