"""``filterhost --check-config`` (and friends) run as the operator runs them: a real process.

Every case is a copy of the shipped conf.d plus a few files of its own, checked by
``python -m filterhost --check-config -c conf.d`` with the case's directory as cwd (so the shipped
relative spool path stays inside it). Each run takes about half a second of CPU, mostly imports,
so the module starts every case at once and waits for all of them; each test then reads the
outcome of its own case. One real clamd (test signatures only) serves the clean case.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from filterhost.checks import check_configuration
from tests.components.services import start_clamd
from tests.filterhost_fixtures import REPO

CONFDIR = "conf.d"
CHECK = ("--check-config", "-c", CONFDIR)
# The shipped chain is ["clamav"]: cases about something else switch the scanner off, so that
# a clamd that is not running is not one more problem in their output.
NOSCAN = {"90-noscan.toml": "[plugins]\norder = []\n"}


@dataclass(frozen=True)
class Case:
    files: dict[str, str]
    args: tuple[str, ...] = CHECK
    shipped: bool = True
    regular_files: tuple[str, ...] = ()


@dataclass
class Run:
    returncode: int | None
    stdout: str
    stderr: str
    directory: Path
    args: tuple[str, ...] = field(default=())

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _broken(text: str) -> dict[str, str]:
    return {**NOSCAN, "95-test.toml": text}


CASES: dict[str, Case] = {
    # A real clamd answers on the unix socket: nothing to report.
    # The test clamd carries only the EICAR test signatures, no official database.
    "clean": Case(
        {
            "99-test.toml": '[plugins.clamav]\nservers = ["unix:{clamd_socket}"]\n'
            "official_signatures = false\n"
        }
    ),
    "clamd_down": Case({"99-test.toml": '[plugins.clamav]\nservers = ["unix:{dir}/no.sock"]\n'}),
    "unknown_key": Case(_broken("[server]\nmax_hop = 5\n")),
    "wrong_type": Case(_broken('[relay]\nmx_port = "25"\n')),
    "toml_syntax": Case(_broken("[relay]\nmode = mx\n")),
    "table_as_value": Case(_broken('relay = "smarthost"\n')),
    "open_relay": Case(
        _broken(
            '[server]\nmynetworks = ["127.0.0.0/8", "0.0.0.0/0", "10.0.0.0/8", "::/0", '
            '"8.0.0.0/8", "::1/128"]\n'
        )
    ),
    "private8": Case(_broken('[server]\nmynetworks = ["127.0.0.0/8", "10.0.0.0/8"]\n')),
    "wildcard_domain": Case(
        _broken('[server]\nrelay_domains = ["corp.example", "*.example.com"]\n')
    ),
    "unknown_plugin": Case({"95-test.toml": '[plugins]\norder = ["spamfilter"]\n'}),
    "plugin_not_installed": Case(_broken("[plugins.spamfilter]\nscore = 5\n")),
    "spool_under_file": Case(
        _broken('[spool]\ndirectory = "{dir}/not-a-dir/spool"\n'),
        regular_files=("not-a-dir",),
    ),
    "several": Case(
        {
            **NOSCAN,
            "95-server.toml": "[server]\nmax_hop = 5\n",
            "96-relay.toml": '[relay]\nmx_port = "25"\n',
            "97-broken.toml": "[spool\n",
        }
    ),
    "missing_dir": Case({}, args=("--check-config", "-c", "nosuch.d"), shipped=False),
    "serve_broken": Case(
        _broken('[server]\nlisten = ["127.0.0.1:{held_port}"]\n[relay]\nmx_prot = 25\n'),
        args=("-c", CONFDIR),
    ),
    "plugins_list": Case(NOSCAN, args=("plugins", "-c", CONFDIR)),
    "plugins_list_c_first": Case(NOSCAN, args=("-c", CONFDIR, "plugins")),
}


def _prepare(directory: Path, case: Case, values: dict[str, str]) -> None:
    confdir = directory / CONFDIR
    if case.shipped:
        shutil.copytree(REPO / "conf.d", confdir)
    for name, text in case.files.items():
        (confdir / name).write_text(text.format(dir=directory, **values), encoding="utf-8")
    for name in case.regular_files:
        (directory / name).write_text("a regular file, not a directory\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Every case, run at once; the outcomes by case name."""
    clamd = start_clamd(stream_max="32M")  # at least max_size (25 MiB): a well-set-up clamd
    held = socket.socket()
    started: list[tuple[str, subprocess.Popen[bytes], Path, IO[bytes], IO[bytes]]] = []
    try:
        # The serving case listens on a port we hold: if it ever tried to bind, it would say so.
        held.bind(("127.0.0.1", 0))
        held.listen()
        values = {"clamd_socket": str(clamd.socket_path), "held_port": str(held.getsockname()[1])}
        for name, case in CASES.items():
            directory = tmp_path_factory.mktemp(name)
            _prepare(directory, case, values)
            out = (directory / "stdout").open("wb")
            err = (directory / "stderr").open("wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "filterhost", *case.args],
                cwd=directory,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
            started.append((name, proc, directory, out, err))
        results: dict[str, Run] = {}
        for name, proc, directory, out, err in started:
            try:
                returncode: int | None = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                returncode = None  # it did not exit by itself
            out.close()
            err.close()
            results[name] = Run(
                returncode,
                (directory / "stdout").read_text(errors="replace"),
                (directory / "stderr").read_text(errors="replace"),
                directory,
                CASES[name].args,
            )
        yield results
    finally:
        for _, proc, _, out, err in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()
        held.close()
        clamd.stop()


def outcome(runs: dict[str, Run], name: str) -> Run:
    run = runs[name]
    assert run.returncode is not None, f"{name}: did not exit within 60 s"
    assert "Traceback" not in run.output, run.output
    return run


def problem_lines(run: Run) -> list[str]:
    """The problem lines of a failed check: every stderr line but the final count."""
    assert run.returncode == 1, run
    assert run.stdout == "", run
    lines = run.stderr.splitlines()
    assert lines, run
    assert lines[-1] == f"{len(lines) - 1} problem(s) found in {CONFDIR}", run.stderr
    return lines[:-1]


def one_line(run: Run, file: str, key: str, *words: str) -> str:
    """The single problem line of ``run``; it names ``file`` and ``key`` and says ``words``."""
    lines = problem_lines(run)
    assert len(lines) == 1, run.stderr
    line = lines[0]
    assert line.startswith(f"{CONFDIR}/{file}: {key}: "), line
    for word in words:
        assert word in line, (word, line)
    return line


# -- clean ---------------------------------------------------------------------------------------


def test_shipped_conf_d_with_a_reachable_clamd_is_clean(runs: dict[str, Run]) -> None:
    run = outcome(runs, "clean")
    assert run.stderr == ""
    assert run.stdout == f"{CONFDIR}: configuration OK\n"
    assert run.returncode == 0
    # Checking changes nothing: no spool is created.
    assert not (run.directory / "var").exists()


def test_private_10_slash_8_is_not_an_open_relay(runs: dict[str, Run]) -> None:
    run = outcome(runs, "private8")
    assert (run.returncode, run.stderr) == (0, "")
    assert "configuration OK" in run.stdout


def test_unreachable_clamd_is_reported_with_file_and_key(runs: dict[str, Run]) -> None:
    run = outcome(runs, "clamd_down")
    line = one_line(run, "99-test.toml", "plugins.clamav.servers", "not reachable")
    assert "no.sock" in line


# -- broken configurations: exit 1, one line per problem, with file and key ----------------------


def test_unknown_key(runs: dict[str, Run]) -> None:
    one_line(outcome(runs, "unknown_key"), "95-test.toml", "server.max_hop", "max_hops")


def test_wrong_type(runs: dict[str, Run]) -> None:
    one_line(outcome(runs, "wrong_type"), "95-test.toml", "relay.mx_port", "expected integer")


def test_toml_syntax_error(runs: dict[str, Run]) -> None:
    lines = problem_lines(outcome(runs, "toml_syntax"))
    assert len(lines) == 1
    assert lines[0].startswith(f"{CONFDIR}/95-test.toml: ")
    assert "TOML syntax error" in lines[0]
    assert "line 2" in lines[0]


def test_a_core_table_written_as_a_value(runs: dict[str, Run]) -> None:
    one_line(outcome(runs, "table_as_value"), "95-test.toml", "relay", "expected a table")


def test_open_relay_is_refused(runs: dict[str, Run]) -> None:
    # One line per network that lets much of the Internet relay; private ones are fine.
    lines = problem_lines(outcome(runs, "open_relay"))
    assert len(lines) == 3, lines
    for line, network in zip(lines, ["0.0.0.0/0", "::/0", "8.0.0.0/8"], strict=True):
        assert line.startswith(f"{CONFDIR}/95-test.toml: server.mynetworks: {network} "), line
        assert "open relay" in line


def test_wildcard_relay_domain_is_refused(runs: dict[str, Run]) -> None:
    line = one_line(
        outcome(runs, "wildcard_domain"), "95-test.toml", "server.relay_domains", "wildcard"
    )
    assert "*.example.com" in line
    assert "'corp.example'" not in line


def test_unknown_plugin_in_the_chain(runs: dict[str, Run]) -> None:
    line = one_line(outcome(runs, "unknown_plugin"), "95-test.toml", "plugins.order", "spamfilter")
    assert re.search(r"installed: [^)]*\bclamav\b", line), line


def test_table_for_a_plugin_that_is_not_installed(runs: dict[str, Run]) -> None:
    one_line(
        outcome(runs, "plugin_not_installed"),
        "95-test.toml",
        "plugins.spamfilter",
        "no installed plugin",
    )


def test_spool_directory_that_cannot_be_created(runs: dict[str, Run]) -> None:
    run = outcome(runs, "spool_under_file")
    line = one_line(run, "95-test.toml", "spool.directory", "not a directory")
    assert str(run.directory / "not-a-dir") in line


@pytest.mark.parametrize(
    "directory",
    ["var/spool\0x", "var/" + "s" * 300, "/tmp/" + "s/" * 3000],
    ids=["nul", "long-name", "long-path"],
)
def test_spool_directory_that_no_system_can_create(tmp_path: Path, directory: str) -> None:
    # In-process (one subprocess per case would be slow): the same check_configuration the
    # command runs. Each path is refused by the kernel or by Python; the check must say so,
    # naming the key, rather than the server failing (or crashing) at start-up.
    confdir = tmp_path / CONFDIR
    confdir.mkdir()
    # A JSON string is a valid TOML basic string (NUL as \u0000).
    (confdir / "00.toml").write_text(
        f"[spool]\ndirectory = {json.dumps(directory)}\n[plugins]\norder = []\n"
    )
    _, _, problems = check_configuration(confdir)
    assert [p.key for p in problems] == ["spool.directory"], problems
    assert problems[0].file == str(confdir / "00.toml")


def test_several_problems_give_several_lines(runs: dict[str, Run]) -> None:
    lines = problem_lines(outcome(runs, "several"))
    assert len(lines) == 3, lines
    assert sum(line.startswith(f"{CONFDIR}/95-server.toml: server.max_hop: ") for line in lines)
    assert sum(line.startswith(f"{CONFDIR}/96-relay.toml: relay.mx_port: ") for line in lines)
    assert sum(
        line.startswith(f"{CONFDIR}/97-broken.toml: ") and "TOML syntax error" in line
        for line in lines
    )


def test_missing_conf_directory(runs: dict[str, Run]) -> None:
    run = outcome(runs, "missing_dir")
    assert run.returncode == 1
    lines = run.stderr.splitlines()
    assert len(lines) == 2, run.stderr
    assert lines[0].startswith("nosuch.d: ")
    assert "not a directory" in lines[0]


def test_no_traceback_in_any_output(runs: dict[str, Run]) -> None:
    for name, run in runs.items():
        assert "Traceback" not in run.output, (name, run.output)
        assert not re.search(r"^\w+(Error|Exception): ", run.output, re.MULTILINE), (name, run)


# -- serving with a broken configuration ---------------------------------------------------------


def test_serving_with_a_broken_config_exits_without_binding(runs: dict[str, Run]) -> None:
    run = outcome(runs, "serve_broken")
    assert run.returncode not in (0, None)
    lines = run.stderr.splitlines()
    problems = [line for line in lines if line.startswith(f"{CONFDIR}/")]
    assert len(problems) == 1, run.stderr
    assert problems[0].startswith(f"{CONFDIR}/95-test.toml: relay.mx_prot: unknown key")
    assert "not starting" in run.stderr
    # The port in its config was held by the test: had it tried to listen, it would have failed
    # with "cannot start" (address in use) instead.
    assert "cannot start" not in run.output
    assert "listening on" not in run.output


# -- filterhost plugins --------------------------------------------------------------------------


def _assert_lists_clamav(run: Run) -> None:
    assert run.returncode == 0, run
    assert run.stderr == ""
    lines = run.stdout.splitlines()
    clamav = [line for line in lines if line.split()[:1] == ["clamav"]]
    assert len(clamav) == 1, run.stdout
    assert "inactive" in clamav[0]
    assert "filterhost_builtins.clamav:ClamavPlugin" in clamav[0]
    assert lines[-1] == "order: (none)"


def test_plugins_command_lists_installed_plugins(runs: dict[str, Run]) -> None:
    # The spelling the operator guide uses: `filterhost plugins -c DIR`.
    _assert_lists_clamav(outcome(runs, "plugins_list"))


def test_plugins_command_with_c_before_the_command(runs: dict[str, Run]) -> None:
    _assert_lists_clamav(outcome(runs, "plugins_list_c_first"))
