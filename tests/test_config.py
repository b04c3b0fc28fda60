"""Configuration loading (DESIGN.md section 4): merge order, typed keys, errors in words.

Unit tests: conf.d directories are written under tmp_path and read with load_config; no sockets.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest

from filterhost.config import (
    Config,
    ConfigRegistry,
    HostPort,
    PluginSettings,
    Problem,
    apply_plugin_sections,
    load_config,
)
from filterhost.durations import Duration, parse_duration
from tests.filterhost_fixtures import REPO, write_conf

# -- helpers -------------------------------------------------------------------------------------


def write(directory: Path, name: str, toml: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(toml), encoding="utf-8")
    return path


def load_ok(directory: Path) -> Config:
    config, problems = load_config(directory)
    assert problems == []
    assert config is not None
    return config


def one_problem(directory: Path) -> Problem:
    """The single problem found in ``directory`` (and the config must be refused)."""
    config, problems = load_config(directory)
    assert len(problems) == 1, problems
    assert config is None
    return problems[0]


def assert_names(problem: Problem, path: Path, key: str, *words: str) -> None:
    """``problem`` names the file and the dotted key, and says each of ``words``."""
    assert problem.file == str(path), problem
    assert problem.key == key, problem
    assert problem.severity == "error"
    for word in words:
        assert word in problem.message, (word, problem)
    assert str(problem).startswith(f"{path}: {key}: ")
    assert "\n" not in str(problem)


# -- merging conf.d ------------------------------------------------------------------------------


def test_files_merge_in_name_order_key_by_key(tmp_path: Path) -> None:
    first = write(
        tmp_path,
        "00-server.toml",
        """
        [server]
        listen = ["127.0.0.1:2525"]
        max_hops = 10
        max_recipients = 5
        [relay]
        mx_port = 2500
        """,
    )
    second = write(
        tmp_path,
        "50-override.toml",
        """
        [server]
        max_hops = 20
        [relay]
        nameservers = ["127.0.0.1:5353"]
        """,
    )
    # File-name order, not numeric: "9-" sorts after "50-".
    last = write(tmp_path, "9-last.toml", "[server]\nmax_hops = 30\n")
    config = load_ok(tmp_path)
    assert config.server.max_hops == 30
    # The other keys of the same tables survive: key by key, not table by table.
    assert config.server.listen == ["127.0.0.1:2525"]
    assert config.server.max_recipients == 5
    assert config.relay.mx_port == 2500
    assert config.relay.nameservers == ["127.0.0.1:5353"]
    assert config.where("server.max_hops") == str(last)
    assert config.where("server.max_recipients") == str(first)
    assert config.where("relay.nameservers") == str(second)


def test_a_later_list_replaces_the_earlier_one(tmp_path: Path) -> None:
    write(tmp_path, "00-a.toml", '[server]\nmynetworks = ["127.0.0.0/8", "10.0.0.0/8"]\n')
    write(tmp_path, "10-b.toml", '[server]\nmynetworks = ["192.168.0.0/16"]\n')
    assert load_ok(tmp_path).server.mynetworks == ["192.168.0.0/16"]


def test_only_toml_files_are_read(tmp_path: Path) -> None:
    write(tmp_path, "00-a.toml", "[server]\nmax_hops = 7\n")
    write(tmp_path, "50-a.toml.bak", "[server]\nmax_hops = oops\n")
    write(tmp_path, "README", "not toml at all [")
    (tmp_path / "60-dir.toml").mkdir()
    assert load_ok(tmp_path).server.max_hops == 7


def test_write_conf_helper_output_loads(tmp_path: Path) -> None:
    confdir = write_conf(
        tmp_path / "conf.d",
        {"server": {"max_hops": 9}, "plugins": {"order": [], "demo": {"limit": 3}}},
    )
    config = load_ok(confdir)
    assert config.server.max_hops == 9
    assert config.plugin_tables == {"demo": {"limit": 3}}


# -- defaults (DESIGN.md section 4) --------------------------------------------------------------


def _assert_design_defaults(config: Config) -> None:
    assert config.server.listen == ["127.0.0.1:2525"]
    assert config.server.listen_addresses == [HostPort("127.0.0.1", 2525)]
    assert config.server.hostname == ""
    assert config.server.mynetworks == ["127.0.0.0/8", "::1/128"]
    assert config.server.relay_domains == []
    assert config.server.max_message_size == 26214400
    assert config.server.max_recipients == 1000
    assert config.server.max_hops == 50
    assert config.spool.directory == "var/spool"
    assert config.relay.mode == "mx"
    assert config.relay.smarthost == ""
    assert config.relay.mx_port == 25
    assert config.relay.nameservers == []
    assert config.relay.retry_schedule == [300, 600, 1200, 2400, 3960]
    assert config.relay.max_queue_lifetime == 5 * 86400


def test_defaults_match_the_design(tmp_path: Path) -> None:
    write(tmp_path, "00-empty.toml", "# nothing set here\n")
    config = load_ok(tmp_path)
    _assert_design_defaults(config)
    assert config.plugins.order == []
    assert config.hostname == socket.getfqdn()
    assert config.spool_directory == Path("var/spool").absolute()
    assert all(isinstance(d, Duration) for d in config.relay.retry_schedule)


def test_shipped_conf_d_loads_cleanly_with_the_design_values() -> None:
    config = load_ok(REPO / "conf.d")
    _assert_design_defaults(config)
    assert config.plugins.order == ["clamav", "attachments", "headers", "routing"]
    assert config.plugin_tables == {"clamav": {"servers": ["unix:/var/run/clamav/clamd.ctl"]}}


def test_hostname_is_used_when_set(tmp_path: Path) -> None:
    write(tmp_path, "00.toml", '[server]\nhostname = "relay.example.net"\n')
    assert load_ok(tmp_path).hostname == "relay.example.net"


# -- unknown tables and keys ---------------------------------------------------------------------


def test_unknown_table_names_file_and_known_tables(tmp_path: Path) -> None:
    write(tmp_path, "00-ok.toml", "[server]\nmax_hops = 5\n")
    path = write(tmp_path, "10-typo.toml", "[srever]\nmax_hops = 5\n")
    config, problems = load_config(tmp_path)
    assert config is not None  # the known tables are still checked
    assert len(problems) == 1
    assert_names(problems[0], path, "srever", "unknown table", "server", "relay", "plugins")


def test_unknown_key_names_file_key_and_lists_known_keys(tmp_path: Path) -> None:
    write(tmp_path, "00-ok.toml", "[server]\nmax_hops = 5\n")
    path = write(tmp_path, "20-typo.toml", "[server]\nmax_hop = 5\n")
    problem = one_problem(tmp_path)
    assert_names(problem, path, "server.max_hop", "unknown key")
    for known in ("listen", "hostname", "mynetworks", "relay_domains", "max_hops"):
        assert known in problem.message


@pytest.mark.parametrize(
    ("table", "key", "known"),
    [
        ("spool", "dir", "directory"),
        ("relay", "smart_host", "smarthost"),
        ("plugins", "chain", "order"),
    ],
)
def test_unknown_key_in_each_core_table(tmp_path: Path, table: str, key: str, known: str) -> None:
    path = write(tmp_path, "00.toml", f'[{table}]\n{key} = "x"\n')
    assert_names(one_problem(tmp_path), path, f"{table}.{key}", "unknown key", known)


# -- wrong types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ('[server]\nmax_hops = "50"\n', "server.max_hops", "expected integer, got '50'"),
        ("[server]\nmax_recipients = true\n", "server.max_recipients", "expected integer"),
        ("[server]\nmax_message_size = 1.5\n", "server.max_message_size", "expected integer"),
        ("[server]\nlisten = 5\n", "server.listen", "expected a list of strings"),
        ('[server]\nlisten = "127.0.0.1:25"\n', "server.listen", "expected a list of strings"),
        ('[server]\nmynetworks = [10, "::1/128"]\n', "server.mynetworks", "item 1"),
        ("[server]\nhostname = 5\n", "server.hostname", "expected string"),
        ('[relay]\nmax_queue_lifetime = "5x"\n', "relay.max_queue_lifetime", '"30s"'),
        ('[relay]\nretry_schedule = ["5m", "5x"]\n', "relay.retry_schedule", "item 2"),
        ('[relay]\nretry_schedule = "5m"\n', "relay.retry_schedule", "expected a list"),
        ('[relay]\nmode = "direct"\n', "relay.mode", "one of 'mx', 'smarthost', got 'direct'"),
        ('[relay]\nmode = "MX"\n', "relay.mode", "'mx', 'smarthost'"),
        ('[relay]\nmx_port = "25"\n', "relay.mx_port", "expected integer"),
        ('[plugins]\norder = "clamav"\n', "plugins.order", "expected a list of strings"),
        ('[spool]\ndirectory = ["/var/spool"]\n', "spool.directory", "expected string"),
    ],
)
def test_wrong_type_names_file_key_and_what_was_expected(
    tmp_path: Path, toml: str, key: str, expected: str
) -> None:
    path = write(tmp_path, "30-wrong.toml", toml)
    assert_names(one_problem(tmp_path), path, key, expected)


def test_a_core_table_that_is_not_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "00.toml", 'server = "relay.example.net"\n')
    assert_names(one_problem(tmp_path), path, "server", "expected a table")


def test_several_wrong_keys_are_all_reported(tmp_path: Path) -> None:
    a = write(tmp_path, "00-a.toml", '[server]\nmax_hops = "many"\nlistn = []\n')
    b = write(tmp_path, "10-b.toml", '[relay]\nmode = "direct"\n[spool]\ndirectory = 1\n')
    config, problems = load_config(tmp_path)
    assert config is None
    assert {(p.file, p.key) for p in problems} == {
        (str(a), "server.max_hops"),
        (str(a), "server.listn"),
        (str(b), "relay.mode"),
        (str(b), "spool.directory"),
    }


# -- TOML syntax ---------------------------------------------------------------------------------


def test_toml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    write(tmp_path, "00-ok.toml", "[server]\nmax_hops = 5\n")
    bad = write(tmp_path, "10-bad.toml", "[relay]\nmode = mx\n")
    config, problems = load_config(tmp_path)
    assert len(problems) == 1
    assert problems[0].file == str(bad)
    assert "TOML syntax error" in problems[0].message
    assert "line 2" in problems[0].message
    assert str(problems[0]).startswith(f"{bad}: ")
    # The other files are still read (so their own problems can be reported too).
    assert config is not None
    assert config.server.max_hops == 5


def test_a_duplicate_key_in_one_file_is_a_syntax_error(tmp_path: Path) -> None:
    bad = write(tmp_path, "00.toml", "[server]\nmax_hops = 5\nmax_hops = 6\n")
    _, problems = load_config(tmp_path)
    assert [p.file for p in problems] == [str(bad)]
    assert "TOML syntax error" in problems[0].message


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "00-latin1.toml"
    bad.write_bytes(b'[server]\nhostname = "r\xe9lais"\n')
    _, problems = load_config(tmp_path)
    assert [p.file for p in problems] == [str(bad)]


# -- the conf.d directory itself -----------------------------------------------------------------


def test_missing_conf_directory(tmp_path: Path) -> None:
    missing = tmp_path / "conf.d"
    config, problems = load_config(missing)
    assert config is not None  # defaults, but with a problem that stops the server
    assert len(problems) == 1
    assert problems[0].file == str(missing)
    assert "not a directory" in problems[0].message


def test_empty_conf_directory(tmp_path: Path) -> None:
    _, problems = load_config(tmp_path)
    assert len(problems) == 1
    assert problems[0].file == str(tmp_path)
    assert "no *.toml files" in problems[0].message


# -- values checked beyond their type ------------------------------------------------------------


@pytest.mark.parametrize(
    "item",
    ["127.0.0.1", "127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:smtp", "::1:25", "[::1", ":25"],
)
def test_bad_listen_address(tmp_path: Path, item: str) -> None:
    path = write(tmp_path, "00.toml", f'[server]\nlisten = ["127.0.0.1:2525", "{item}"]\n')
    assert_names(one_problem(tmp_path), path, "server.listen", repr(item))


def test_empty_listen_list(tmp_path: Path) -> None:
    path = write(tmp_path, "00.toml", "[server]\nlisten = []\n")
    assert_names(one_problem(tmp_path), path, "server.listen", '"host:port"')


def test_good_listen_addresses_are_parsed(tmp_path: Path) -> None:
    write(tmp_path, "00.toml", '[server]\nlisten = ["0.0.0.0:25", "[::1]:2525"]\n')
    assert load_ok(tmp_path).server.listen_addresses == [
        HostPort("0.0.0.0", 25),
        HostPort("::1", 2525),
    ]


@pytest.mark.parametrize("net", ["10.0.0.0/33", "10.0.0.256/8", "intranet", "fe80::/129", ""])
def test_bad_cidr_in_mynetworks(tmp_path: Path, net: str) -> None:
    path = write(tmp_path, "00.toml", f'[server]\nmynetworks = ["127.0.0.0/8", "{net}"]\n')
    assert_names(one_problem(tmp_path), path, "server.mynetworks", repr(net), "network")


def test_good_networks_are_parsed(tmp_path: Path) -> None:
    write(tmp_path, "00.toml", '[server]\nmynetworks = ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]\n')
    assert [str(n) for n in load_ok(tmp_path).server.networks] == [
        "10.0.0.0/8",
        "fd00::/8",
        "192.0.2.7/32",
    ]


@pytest.mark.parametrize("key", ["max_message_size", "max_recipients", "max_hops"])
@pytest.mark.parametrize("value", [0, -1])
def test_limits_must_be_positive(tmp_path: Path, key: str, value: int) -> None:
    path = write(tmp_path, "00.toml", f"[server]\n{key} = {value}\n")
    assert_names(one_problem(tmp_path), path, f"server.{key}", "at least 1")


@pytest.mark.parametrize("value", ["relay.example.net\r\n250 injected", "relay example"])
def test_hostname_must_be_one_word(tmp_path: Path, value: str) -> None:
    # The hostname goes into the 220 banner, the EHLO reply and Received: a line break in
    # it would write protocol lines of its own.
    escaped = value.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    path = write(tmp_path, "00.toml", f'[server]\nhostname = "{escaped}"\n')
    assert_names(one_problem(tmp_path), path, "server.hostname")


@pytest.mark.parametrize("name", ["dns.example.net", "localhost", "localhost:53", "ns1:5353"])
def test_nameservers_must_be_ip_addresses(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, "00.toml", f'[relay]\nnameservers = ["127.0.0.1", "{name}"]\n')
    assert_names(one_problem(tmp_path), path, "relay.nameservers", repr(name), "IP address")


def test_good_nameservers_are_parsed(tmp_path: Path) -> None:
    write(tmp_path, "00.toml", '[relay]\nnameservers = ["127.0.0.1", "127.0.0.1:5353", "[::1]"]\n')
    assert load_ok(tmp_path).relay.nameserver_addresses == [
        HostPort("127.0.0.1", 53),
        HostPort("127.0.0.1", 5353),
        HostPort("::1", 53),
    ]


def test_smarthost_mode_needs_a_smarthost(tmp_path: Path) -> None:
    path = write(tmp_path, "00.toml", '[relay]\nmode = "smarthost"\n')
    assert_names(one_problem(tmp_path), path, "relay.smarthost", 'mode = "smarthost"')


def test_smarthost_mode_with_an_empty_smarthost_names_its_file(tmp_path: Path) -> None:
    write(tmp_path, "00.toml", '[relay]\nmode = "mx"\n')
    path = write(tmp_path, "10.toml", '[relay]\nmode = "smarthost"\nsmarthost = ""\n')
    assert_names(one_problem(tmp_path), path, "relay.smarthost", "host:port")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail.example.net", HostPort("mail.example.net", 25)),
        ("mail.example.net:587", HostPort("mail.example.net", 587)),
        ("[2001:db8::25]:2525", HostPort("2001:db8::25", 2525)),
    ],
)
def test_smarthost_is_parsed(tmp_path: Path, text: str, expected: HostPort) -> None:
    write(tmp_path, "00.toml", f'[relay]\nmode = "smarthost"\nsmarthost = "{text}"\n')
    relay = load_ok(tmp_path).relay
    assert relay.smarthost_address == expected


def test_bad_smarthost_port(tmp_path: Path) -> None:
    path = write(tmp_path, "00.toml", '[relay]\nmode = "smarthost"\nsmarthost = "mail:70000"\n')
    assert_names(one_problem(tmp_path), path, "relay.smarthost", "1 to 65535")


@pytest.mark.parametrize("port", [0, 65536])
def test_mx_port_range(tmp_path: Path, port: int) -> None:
    path = write(tmp_path, "00.toml", f"[relay]\nmx_port = {port}\n")
    assert_names(one_problem(tmp_path), path, "relay.mx_port", "1 to 65535")


def test_empty_retry_schedule(tmp_path: Path) -> None:
    path = write(tmp_path, "00.toml", "[relay]\nretry_schedule = []\n")
    assert_names(one_problem(tmp_path), path, "relay.retry_schedule", "at least one")


def test_empty_spool_directory(tmp_path: Path) -> None:
    # An empty path would silently mean "the current directory".
    path = write(tmp_path, "00.toml", '[spool]\ndirectory = ""\n')
    assert_names(one_problem(tmp_path), path, "spool.directory")


# -- durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml_value", "seconds"),
    [
        ('"30s"', 30),
        ('"5m"', 300),
        ('"1h"', 3600),
        ('"5d"', 432000),
        ('"2w"', 1209600),
        ('"500ms"', 0.5),
        ("90", 90),
        ("1.5", 1.5),
        ('"90"', 90),
    ],
)
def test_durations(tmp_path: Path, toml_value: str, seconds: float) -> None:
    write(tmp_path, "00.toml", f"[relay]\nmax_queue_lifetime = {toml_value}\n")
    lifetime = load_ok(tmp_path).relay.max_queue_lifetime
    assert isinstance(lifetime, Duration)
    assert lifetime == seconds


def test_retry_schedule_durations(tmp_path: Path) -> None:
    write(tmp_path, "00.toml", '[relay]\nretry_schedule = ["30s", 60, "1h"]\n')
    assert load_ok(tmp_path).relay.retry_schedule == [30, 60, 3600]


@pytest.mark.parametrize(
    ("toml_value", "words"),
    [
        ("-5", "negative"),
        ("-0.5", "negative"),
        ('"-5m"', '"30s"'),
        ("true", '"30s"'),
        ("false", '"30s"'),
        ('"5x"', "'5x'"),
        ('"5 minutes"', '"5m"'),
        ('""', '"30s"'),
        ('"m"', '"30s"'),
        ("nan", ""),
        ("inf", ""),
        ("[5]", '"30s"'),
    ],
)
def test_bad_durations(tmp_path: Path, toml_value: str, words: str) -> None:
    path = write(tmp_path, "00.toml", f"[relay]\nmax_queue_lifetime = {toml_value}\n")
    assert_names(one_problem(tmp_path), path, "relay.max_queue_lifetime", words)


@pytest.mark.parametrize("value", [True, -1, "soon", None, math.nan, math.inf])
def test_parse_duration_refuses(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


# -- Config.where --------------------------------------------------------------------------------


def test_where_names_the_file_that_set_a_key_or_its_table(tmp_path: Path) -> None:
    a = write(tmp_path, "00-a.toml", "[server]\nmax_hops = 5\n[plugins.demo]\nlimit = 1\n")
    b = write(tmp_path, "10-b.toml", '[server]\nmax_hops = 6\nhostname = "r.example"\n')
    config = load_ok(tmp_path)
    assert config.where("server.max_hops") == str(b)
    assert config.where("server.hostname") == str(b)
    # A key nobody set: the file of its table (the first that opened it).
    assert config.where("server.listen") == str(a)
    assert config.where("server") == str(a)
    assert config.where("plugins.demo.limit") == str(a)
    assert config.where("plugins.demo.other") == str(a)
    assert config.where("plugins.demo") == str(a)
    # Nothing of it anywhere.
    assert config.where("relay.mode") is None
    assert config.where("nosuch") is None
    assert config.where("") is None


# -- plugin sections -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class DemoConfig:
    servers: list[str] = dataclasses.field(default_factory=lambda: ["127.0.0.1:3310"])
    limit: int = 10
    wait: Duration = dataclasses.field(default=Duration(5))
    mode: Literal["reject", "quarantine"] = "reject"
    ratio: float = 0.5
    enabled: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class NeedyConfig:
    api_key: str
    region: str = "eu"


def registry_with(**schemas: type[Any]) -> ConfigRegistry:
    registry = ConfigRegistry()
    for name, schema in schemas.items():
        registry.add(name, schema, f"the {name} plugin")
    return registry


def plugin_problems(
    directory: Path, installed: set[str] | None = None, **schemas: type[Any]
) -> tuple[Config, list[Problem]]:
    config = load_ok(directory)
    registry = registry_with(**(schemas or {"demo": DemoConfig}))
    found = apply_plugin_sections(config, registry, installed or {"demo", "bare"})
    return config, found


def test_plugin_table_is_typed_and_merged_key_by_key(tmp_path: Path) -> None:
    write(tmp_path, "20-plugins.toml", '[plugins.demo]\nservers = ["unix:/run/a.sock"]\n')
    write(tmp_path, "99-local.toml", '[plugins.demo]\nlimit = 20\nwait = "1m"\nratio = 2\n')
    config, problems = plugin_problems(tmp_path)
    assert problems == []
    demo = config.plugin_config(DemoConfig)
    assert demo == DemoConfig(servers=["unix:/run/a.sock"], limit=20, wait=Duration(60), ratio=2.0)
    assert isinstance(demo.wait, Duration)
    assert config.plugin_sections["demo"] is demo


def test_plugin_without_a_table_gets_its_defaults(tmp_path: Path) -> None:
    write(tmp_path, "00.toml", "[plugins]\norder = []\n")
    config, problems = plugin_problems(tmp_path)
    assert problems == []
    assert config.plugin_config(DemoConfig) == DemoConfig()
    assert config.settings_for("demo", PluginSettings()) == PluginSettings()


def test_table_for_a_plugin_that_is_not_installed(tmp_path: Path) -> None:
    path = write(tmp_path, "20.toml", "[plugins.spamfilter]\nscore = 5\n")
    _, problems = plugin_problems(tmp_path, installed={"demo", "clamav"})
    assert len(problems) == 1
    assert_names(problems[0], path, "plugins.spamfilter", "'spamfilter'", "clamav, demo")


def test_unknown_key_in_a_plugin_table_lists_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "20.toml", "[plugins.demo]\nlimt = 5\n")
    _, problems = plugin_problems(tmp_path)
    assert len(problems) == 1
    assert_names(problems[0], path, "plugins.demo.limt", "unknown key", "limit", "servers")


def test_any_key_in_a_plugin_without_settings_is_unknown(tmp_path: Path) -> None:
    path = write(tmp_path, "20.toml", "[plugins.bare]\nlimit = 5\n")
    _, problems = plugin_problems(tmp_path)
    assert len(problems) == 1
    assert_names(problems[0], path, "plugins.bare.limit", "unknown key", "timeout", "on_error")


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ('limit = "ten"', "plugins.demo.limit", "expected integer"),
        ("limit = 1.0", "plugins.demo.limit", "expected integer"),
        ('servers = "unix:/run/a.sock"', "plugins.demo.servers", "expected a list of strings"),
        ("servers = [1]", "plugins.demo.servers", "item 1"),
        ('wait = "5x"', "plugins.demo.wait", "'5x'"),
        ("wait = -1", "plugins.demo.wait", "negative"),
        ('mode = "drop"', "plugins.demo.mode", "'reject', 'quarantine'"),
        ('ratio = "half"', "plugins.demo.ratio", "expected number"),
        ("enabled = 1", "plugins.demo.enabled", "expected boolean"),
    ],
)
def test_wrong_type_in_a_plugin_table(tmp_path: Path, toml: str, key: str, expected: str) -> None:
    path = write(tmp_path, "20.toml", f"[plugins.demo]\n{toml}\n")
    config, problems = plugin_problems(tmp_path)
    assert len(problems) == 1
    assert_names(problems[0], path, key, expected)
    assert "demo" not in config.plugin_sections


@pytest.mark.parametrize("plugin", ["demo", "bare"])
def test_reserved_timeout_and_on_error_are_accepted(tmp_path: Path, plugin: str) -> None:
    write(tmp_path, "20.toml", f'[plugins.{plugin}]\ntimeout = "2m"\non_error = "pass"\n')
    config, problems = plugin_problems(tmp_path)
    assert problems == []
    declared = PluginSettings(timeout=10.0, on_error="reject")
    assert config.settings_for(plugin, declared) == PluginSettings(120.0, "pass")
    # Only what conf.d sets overrides what the plugin declares.
    assert config.settings_for("other", declared) == declared


def test_reserved_keys_override_one_at_a_time(tmp_path: Path) -> None:
    write(tmp_path, "20.toml", "[plugins.demo]\ntimeout = 3\n")
    config, problems = plugin_problems(tmp_path)
    assert problems == []
    assert config.settings_for("demo", PluginSettings(30.0, "reject")) == PluginSettings(
        3.0, "reject"
    )
    assert config.plugin_config(DemoConfig) == DemoConfig()


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ('timeout = "soon"', "plugins.demo.timeout", '"30s"'),
        ("timeout = -1", "plugins.demo.timeout", "negative"),
        ("timeout = true", "plugins.demo.timeout", '"30s"'),
        ("timeout = 0", "plugins.demo.timeout", ""),
        ('on_error = "ignore"', "plugins.demo.on_error", "'tempfail', 'pass', 'reject'"),
        ("on_error = 1", "plugins.demo.on_error", "'tempfail', 'pass', 'reject'"),
    ],
)
def test_reserved_keys_are_validated(tmp_path: Path, toml: str, key: str, expected: str) -> None:
    path = write(tmp_path, "20.toml", f"[plugins.demo]\n{toml}\n")
    _, problems = plugin_problems(tmp_path)
    assert len(problems) == 1
    assert_names(problems[0], path, key, expected)


def test_a_plugin_with_required_settings_and_no_table(tmp_path: Path) -> None:
    write(tmp_path, "00.toml", "[plugins]\norder = []\n")
    _, problems = plugin_problems(tmp_path, installed={"needy"}, needy=NeedyConfig)
    assert len(problems) == 1
    assert problems[0].key == "plugins.needy"
    assert "[plugins.needy]" in problems[0].message


def test_a_missing_required_key_in_a_plugin_table_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "20.toml", '[plugins.needy]\nregion = "us"\n')
    _, problems = plugin_problems(tmp_path, installed={"needy"}, needy=NeedyConfig)
    assert len(problems) == 1
    # The operator must learn which key is missing and what it takes, in words.
    assert_names(problems[0], path, "plugins.needy.api_key", "string")
    assert "__init__" not in problems[0].message


def test_registry_refuses_a_schema_that_is_not_a_dataclass() -> None:
    registry = ConfigRegistry()
    with pytest.raises(TypeError):
        registry.add("demo", dict)
    registry.add("demo", DemoConfig, "demo things")
    assert registry.sections == {"demo": (DemoConfig, "demo things")}
