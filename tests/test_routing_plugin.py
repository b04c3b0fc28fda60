"""The routing plugin: a transport map on the route hook.

Unit tests for the next-hop syntax and the lookup order; an end-to-end test through a running
filterhost with smtp-sink next hops on 127.0.0.x and the test DNS (hold, discard and reject
included); ``filterhost --check-config`` run as the operator would.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from filterhost_builtins.routing import NextHop, RoutingPlugin, parse_next_hop

from filterhost import Message, Route, Session, Transaction, hookimpl
from filterhost.checks import check_configuration
from filterhost.dispatch import HookRunner
from filterhost.pluginmanager import Plugins
from tests.components.fixtures import Sinks
from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import base_config, port_of, running_app, wait_for, write_conf


def configure(
    tmp_path: Path, relay: dict[str, Any] | None = None, **settings: Any
) -> RoutingPlugin:
    """A RoutingPlugin configured from a real conf.d with ``settings`` as its table."""
    conf = base_config(
        tmp_path,
        free_port(),
        None,
        25,
        plugins={"order": ["routing"], "routing": settings},
        relay=relay or {},
    )
    confdir = write_conf(tmp_path / f"conf{len(list(tmp_path.glob('conf*')))}.d", conf)
    plugin = RoutingPlugin()
    plugins = Plugins()
    plugins.add("routing", plugin)
    config, plugins, problems = check_configuration(confdir, plugins)
    assert config is not None, problems
    assert [p for p in problems if p.severity == "error"] == []
    plugins.configure(config)
    return plugin


def route(plugin: RoutingPlugin, recipient: str, sender: str = "alice@corp.test") -> Route | None:
    txn = Transaction(
        session=Session(id="queue", client_ip="10.0.0.1"),
        mail_from=sender,
        recipients=[recipient],
        message=Message(b"Subject: x\r\n\r\nx\r\n"),
        queue_id="QTEST",
    )
    return plugin.filterhost_route(txn, recipient)


# ----------------------------------------------------------------------------- syntax


@pytest.mark.parametrize(
    ("text", "hop"),
    [
        ("mx", NextHop("mx")),
        ("MX", NextHop("mx")),
        ("mx:Example.NET.", NextHop("mx", domain="example.net")),
        ("smarthost", NextHop("smarthost")),
        ("hold", NextHop("hold")),
        (" discard ", NextHop("discard")),
        ("10.0.0.5:2525", NextHop("host", host="10.0.0.5", port=2525)),
        ("relay.partner.test:587", NextHop("host", host="relay.partner.test", port=587)),
        ("relay.partner.test", NextHop("host", host="relay.partner.test", port=25)),
        ("relay:25", NextHop("host", host="relay", port=25)),
        ("[2001:db8::1]:25", NextHop("host", host="2001:db8::1", port=25)),
        ("reject", NextHop("reject")),
        ('reject "Gone"', NextHop("reject", text="Gone")),
        ('reject 5.1.2 "No such domain"', NextHop("reject", status="5.1.2", text="No such domain")),
        ("reject 5.7.0 policy says no", NextHop("reject", status="5.7.0", text="policy says no")),
    ],
)  # fmt: skip
def test_next_hop_syntax(text: str, hop: NextHop) -> None:
    assert parse_next_hop(text) == hop


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "an empty next hop"),
        ("10.0.0.5:99999", "the port must be a number from 1 to 65535"),
        ("10.0.0.5:", "no port after ':'"),
        ("2001:db8::1", "write IPv6 addresses in brackets"),
        ("[2001:db8::1", "missing ']'"),
        ("smtp://relay", "the port must be a number"),
        ("relay", "is not a next hop"),  # one word, no port: a misspelt keyword?
        ("bad_host!:25", "is not a next hop"),
        ("mx:not a domain", 'expected a domain after "mx:"'),
        ('reject 4.7.1 "later"', "a reject needs a 5.x.x status"),
        ("hold on", "is not a next hop"),
    ],
)
def test_bad_next_hops_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(")) as raised:
        parse_next_hop(text)
    assert repr(text) in str(raised.value) or text == ""


def test_routes_made_per_recipient() -> None:
    assert parse_next_hop("mx").route("a@Example.COM") == Route.mx("example.com")
    assert parse_next_hop("mx:relay.test").route("a@example.com") == Route.mx("relay.test")
    assert parse_next_hop("10.0.0.5:2525").route("a@b.test") == Route.host("10.0.0.5", 2525)
    assert parse_next_hop('reject 5.1.2 "No"').route("a@b.test") == Route.reject("5.1.2", "No")
    for word, made in (
        ("smarthost", Route.smarthost()),
        ("hold", Route.hold()),
        ("discard", Route.discard()),
    ):
        assert parse_next_hop(word).route("a@b.test") == made


# ----------------------------------------------------------------------------- lookups


def test_lookup_order(tmp_path: Path) -> None:
    plugin = configure(
        tmp_path,
        relay={"smarthost": "10.9.9.9:25"},
        transport={
            "example.com": "10.0.0.1:25",
            ".example.com": "10.0.0.2:25",
            "deep.sub.example.com": "10.0.0.3:25",
            "ceo@example.com": "hold",
            "old.test": 'reject 5.1.2 "old.test is gone"',
        },
        sender_smarthosts={
            "@marketing.test": "10.0.1.1:587",
            ".lab.test": "10.0.1.2:25",
            "boss@lab.test": "smarthost",
            "<>": "10.0.1.3:25",
        },
        default="mx",
    )
    assert route(plugin, "a@example.com") == Route.host("10.0.0.1", 25)
    assert route(plugin, "a@EXAMPLE.com.") == Route.host("10.0.0.1", 25)
    assert route(plugin, "a@x.example.com") == Route.host("10.0.0.2", 25)
    assert route(plugin, "a@deep.sub.example.com") == Route.host("10.0.0.3", 25)
    assert route(plugin, "a@more.deep.sub.example.com") == Route.host("10.0.0.2", 25)
    assert route(plugin, "CEO@example.com") == Route.hold()
    assert route(plugin, "a@old.test") == Route.reject("5.1.2", "old.test is gone")
    # The transport map wins over the sender; then the sender map; then the default.
    assert route(plugin, "a@example.com", "x@marketing.test") == Route.host("10.0.0.1", 25)
    assert route(plugin, "a@partner.test", "x@marketing.test") == Route.host("10.0.1.1", 587)
    assert route(plugin, "a@partner.test", "x@a.lab.test") == Route.host("10.0.1.2", 25)
    assert route(plugin, "a@partner.test", "boss@lab.test") == Route.smarthost()
    assert route(plugin, "a@partner.test", "x@lab.test") == Route.mx("partner.test")
    assert route(plugin, "a@partner.test", "") == Route.host("10.0.1.3", 25)
    assert route(plugin, "a@partner.test", "x@notmarketing.test") == Route.mx("partner.test")


def test_no_entry_and_no_default_leaves_it_to_the_relay_mode(tmp_path: Path) -> None:
    plugin = configure(tmp_path, transport={"example.com": "hold"})
    assert route(plugin, "a@example.com") == Route.hold()
    assert route(plugin, "a@other.test") is None


class Override:
    """A third-party route hook: VIPs go to their own host, everything else passes on."""

    @hookimpl
    def filterhost_route(self, recipient: str) -> Route | None:
        return Route.host("10.7.7.7", 25) if recipient.startswith("vip@") else None


async def test_a_route_plugin_earlier_in_the_order_overrides_it(tmp_path: Path) -> None:
    conf = base_config(
        tmp_path,
        free_port(),
        None,
        25,
        plugins={"order": ["override", "routing"], "routing": {"default": "hold"}},
    )
    confdir = write_conf(tmp_path / "conf.d", conf)
    plugins = Plugins()
    plugins.add("override", Override())
    plugins.add("routing", RoutingPlugin())
    config, plugins, problems = check_configuration(confdir, plugins)
    assert config is not None
    assert problems == []
    plugins.configure(config)
    runner = HookRunner(plugins, config)
    txn = Transaction(Session("queue", "10.0.0.1"), "a@corp.test", [], Message(b"\r\nx\r\n"))
    for recipient, expected in (
        ("vip@partner.test", Route.host("10.7.7.7", 25)),
        ("other@partner.test", Route.hold()),
    ):
        got = await runner.first_route(transaction=txn, recipient=recipient)
        assert got == expected


# ----------------------------------------------------------------------------- --check-config


def test_check_config_reports_each_bad_entry_with_file_and_key(tmp_path: Path) -> None:
    conf = base_config(tmp_path, free_port(), None, 25, plugins={"order": ["routing"]})
    confdir = write_conf(tmp_path / "conf.d", conf)
    toml = confdir / "60-routing.toml"
    toml.write_text(
        "[plugins.routing]\n"
        'default = "smarthost"\n'
        "[plugins.routing.transport]\n"
        '"partner.test" = "10.0.0.5:70000"\n'
        '"legacy.test" = "hodl"\n'
        '"bad domain" = "mx"\n'
        '"ok.test" = "reject 4.0.0 \\"x\\""\n'
        "[plugins.routing.sender_smarthosts]\n"
        '"@news.test" = "[::1:25"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "filterhost", "--check-config", "-c", str(confdir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    key = "plugins.routing"
    assert lines == [
        f"{toml}: {key}.transport.\"partner.test\": '10.0.0.5:70000': the port must be a number "
        "from 1 to 65535",
        f"{toml}: {key}.transport.\"legacy.test\": 'hodl' is not a next hop: expected \"mx\", "
        "\"mx:domain\", \"smarthost\", \"host:port\", \"hold\", \"discard\" or 'reject \"text\"'",
        f"{toml}: {key}.transport.\"bad domain\": 'bad domain' is not a valid key: expected "
        "\"domain\", \".parent\" (its subdomains) or \"user@domain\"",
        f"{toml}: {key}.transport.\"ok.test\": 'reject 4.0.0 \"x\"': a reject needs a 5.x.x "
        "status, not 4.0.0",
        f"{toml}: {key}.sender_smarthosts.\"@news.test\": '[::1:25': missing ']' after the IPv6 "
        "address",
        f"{toml}: {key}: routes to \"smarthost\", but [relay] smarthost is not set; set it to "
        "\"host:port\" or name the host in the route",
        f"6 problem(s) found in {confdir}",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- end to end


async def _send(port: int, sender: str, recipients: list[str]) -> str:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        _, text = await client.sendmail(
            sender, recipients, f"From: {sender}\r\nSubject: routed\r\n\r\nhello\r\n".encode()
        )
    finally:
        await client.quit()
    return text.rpartition(" ")[2]


async def test_end_to_end_domains_to_their_next_hops(
    tmp_path: Path, dns_server: Dns, sinks: Sinks
) -> None:
    mx = sinks.start("127.0.0.2", free_port())  # mx1.mx.test, reached by MX lookup
    sink_a = sinks.start("127.0.0.3", free_port())
    sink_b = sinks.start("127.0.0.4", free_port())
    sink_news = sinks.start("127.0.0.5", free_port())
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        mx.port,
        plugins={
            "order": ["routing"],
            "routing": {
                "transport": {
                    "a.test": f"127.0.0.3:{sink_a.port}",
                    ".b.test": f"127.0.0.4:{sink_b.port}",
                    "other.test": "mx:mx.test",
                    "held.test": "hold",
                    "dropped.test": "discard",
                    "refused.test": 'reject 5.1.2 "refused.test takes no mail"',
                },
                "sender_smarthosts": {"@news.test": f"127.0.0.5:{sink_news.port}"},
            },
        },
    )
    recipients = [
        "x@a.test",
        "y@sub.b.test",
        "z@other.test",
        "h@held.test",
        "d@dropped.test",
        "r@refused.test",
    ]
    async with running_app(tmp_path, conf, {"routing": RoutingPlugin()}) as app:
        port = port_of(app)
        first = await _send(port, "alice@a.test", recipients)
        await _send(port, "editor@news.test", ["c@unlisted.test"])
        # sink_a gets x@a.test, then the bounce for r@refused.test (to alice@a.test).
        got_a = await asyncio.to_thread(sink_a.wait_for_count, 2)
        (got_b,) = await asyncio.to_thread(sink_b.wait_for_count, 1)
        (got_mx,) = await asyncio.to_thread(mx.wait_for_count, 1)
        (got_news,) = await asyncio.to_thread(sink_news.wait_for_count, 1)

        def settled() -> bool:
            entry = app.spool.read_entry(first)
            return {r.address: r.status for r in entry.recipients}["d@dropped.test"] != "pending"

        await wait_for(settled)
        entry = app.spool.read_entry(first)
    states = {r.address: (r.status, r.last_reply) for r in entry.recipients}
    assert states["h@held.test"] == ("pending", "450 4.3.2 held by routing")
    assert states["d@dropped.test"][0] == "discarded"
    assert states["r@refused.test"] == ("bounced", "550 5.1.2 refused.test takes no mail")
    for address in ("x@a.test", "y@sub.b.test", "z@other.test"):
        assert states[address][0] == "delivered", states

    original, bounce = sorted(got_a, key=lambda m: m.mail_from, reverse=True)
    assert (original.mail_from, original.rcpt_tos) == ("alice@a.test", ["x@a.test"])
    assert (bounce.mail_from, bounce.rcpt_tos) == ("", ["alice@a.test"])
    assert b"r@refused.test" in bounce.data
    assert b"5.1.2" in bounce.data
    assert got_b.rcpt_tos == ["y@sub.b.test"]
    assert got_mx.rcpt_tos == ["z@other.test"]
    assert (got_news.mail_from, got_news.rcpt_tos) == ("editor@news.test", ["c@unlisted.test"])
    everywhere = [
        r for s in (sink_a, sink_b, mx, sink_news) for m in s.messages() for r in m.rcpt_tos
    ]
    assert "d@dropped.test" not in everywhere
    assert "h@held.test" not in everywhere
