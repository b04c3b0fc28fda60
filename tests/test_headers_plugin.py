"""The headers plugin: rules, topology hiding, sender rewriting; untouched bytes stay identical.

Also the config loader's arrays of tables (``[[plugins.headers.rules]]``), which this plugin is
the first to use. The end-to-end test sends through a running filterhost to a recording peer
that keeps the exact bytes.
"""

from __future__ import annotations

import asyncio
import email.header
import email.utils
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiosmtplib
import pytest
from filterhost_builtins.headers import HeadersPlugin, SenderRewriter

from filterhost import Message, Session, Transaction
from filterhost.checks import check_configuration
from filterhost.config import Problem, SectionError
from filterhost.config.typed import build_section, describe_type
from filterhost.pluginmanager import Plugins
from tests.components.fixtures import Peers
from tests.components.services import Dns, free_port
from tests.filterhost_fixtures import base_config, port_of, running_app, write_conf

REPO = Path(__file__).resolve().parent.parent
CORPUS = sorted((REPO / "tests" / "corpus").glob("*.eml"))
OWN_RECEIVED = (
    "from ws1.corp.example ([10.9.8.7]) by relay.test (filterhost) with ESMTP id 0123ABCD"
    " for <x@partner.example>; Sat, 28 Nov 2026 10:00:00 +0000"
)


def configure(tmp_path: Path, **settings: Any) -> HeadersPlugin:
    """A HeadersPlugin configured from a real conf.d with ``settings`` as its table."""
    conf = base_config(
        tmp_path, free_port(), None, 25, plugins={"order": ["headers"], "headers": settings}
    )
    confdir = write_conf(tmp_path / f"conf{len(list(tmp_path.glob('conf*')))}.d", conf)
    plugin = HeadersPlugin()
    plugins = Plugins()
    plugins.add("headers", plugin)
    config, plugins, problems = check_configuration(confdir, plugins)
    assert config is not None, problems
    assert [p for p in problems if p.severity == "error"] == []
    plugins.configure(config)
    return plugin


def run(
    plugin: HeadersPlugin, raw: bytes, mail_from: str = "alice@ws1.corp.example"
) -> Transaction:
    """The front end's part (its Received field on top), then the plugin's message hook."""
    message = Message(raw)
    message.add_header("Received", OWN_RECEIVED)
    message.edits.clear()
    txn = Transaction(
        session=Session(id="s", client_ip="10.9.8.7"),
        mail_from=mail_from,
        recipients=["x@partner.example"],
        message=message,
        queue_id="0123ABCD",
    )
    plugin.filterhost_message(txn)
    return txn


def split(raw: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (raw, continuation lines included) and the rest (separator, body)."""
    end = raw.find(b"\r\n\r\n")
    head, rest = (raw, b"") if end < 0 else (raw[: end + 2], raw[end + 2 :])
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields, rest


def decoded_address(field_bytes: bytes) -> tuple[str, str]:
    """(display name, address) of a From-like field, decoded."""
    value = field_bytes.partition(b":")[2].decode().replace("\r\n", "")
    name, address = email.utils.parseaddr(value)
    return str(email.header.make_header(email.header.decode_header(name))), address


# ----------------------------------------------------------------------------- arrays of tables


@dataclass(frozen=True)
class Item:
    kind: Literal["a", "b"]
    name: str = ""
    count: int = 1

    def __post_init__(self) -> None:
        if self.kind == "b" and not self.name:
            raise SectionError("name", 'a "b" item needs a name')


@dataclass(frozen=True)
class Section:
    items: list[Item] = field(default_factory=list)
    one: Item | None = None


def _build(data: dict[str, Any]) -> tuple[Section | None, list[Problem]]:
    problems: list[Problem] = []
    origin = {"demo": "conf.d/50.toml", "demo.items": "conf.d/60.toml"}
    return build_section(Section, data, "demo", origin, problems), problems


def test_array_of_tables_builds_nested_dataclasses() -> None:
    section, problems = _build(
        {"items": [{"kind": "a"}, {"kind": "b", "name": "x", "count": 3}], "one": {"kind": "a"}}
    )
    assert problems == []
    assert section == Section([Item("a"), Item("b", "x", 3)], Item("a"))
    assert describe_type(list[Item]) == "an array of tables (keys: kind, name, count)"


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([{"kind": "a"}, {"kind": "a", "nme": "x"}],
         "item 2: unknown key 'nme' (known keys here: kind, name, count)"),
        ([{"name": "x"}], "item 1: kind: required key missing: expected one of 'a', 'b'"),
        ([{"kind": "c"}], "item 1: kind: expected one of 'a', 'b', got 'c'"),
        ([{"kind": "a", "count": "3"}], "item 1: count: expected integer, got '3'"),
        ([{"kind": "b"}], 'item 1: name: a "b" item needs a name'),
        (["a"], "item 1: expected a table (keys: kind, name, count), got 'a'"),
    ],
)  # fmt: skip
def test_array_of_tables_errors_name_file_key_and_item(items: list[Any], message: str) -> None:
    section, problems = _build({"items": items})
    assert section is None
    assert problems == [Problem("conf.d/60.toml", "demo.items", message)]


# ----------------------------------------------------------------------------- the corpus

# Per corpus file: Received fields (by their start) that name internal hosts, and the From
# field that the sender rewrite changes, decoded: (display name, new address).
INTERNAL_RECEIVED = {
    "01-multipart-attachment.eml": b"Received: from billing01.internal.supplier.example",
    "02-utf8-8bit-body.eml": b"Received: from ws-0142.corp.example ([10.1.2.3])",
}
REWRITTEN_FROM = {
    "02-utf8-8bit-body.eml": ("Jürgen Müller", "juergen.mueller@example.com"),
    "05-no-body.eml": ("", "monitor@example.com"),
    "06-dot-body.eml": ("", "build@example.com"),
    "08-header-only.eml": ("", "probe@example.com"),
    "09-dsn-report.eml": ("Mail Delivery System", "MAILER-DAEMON@example.com"),
}


@pytest.fixture(scope="module")
def corpus_plugin(tmp_path_factory: pytest.TempPathFactory) -> HeadersPlugin:
    return configure(
        tmp_path_factory.mktemp("corpus"),
        strip_topology=True,
        internal_domains=["corp.example"],
        sender_rewrite={"@corp.example": "@example.com", ".corp.example": "@example.com"},
        rules=[
            {"action": "remove", "name": "X-Not-There"},
            {"action": "add", "name": "X-Relayed-By", "value": "filterhost", "position": "bottom"},
        ],
    )


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_untouched_bytes_stay_identical(corpus_plugin: HeadersPlugin, path: Path) -> None:
    raw = path.read_bytes()
    txn = run(corpus_plugin, raw)
    out_fields, out_rest = split(txn.message.as_bytes())
    in_fields, in_rest = split(raw)
    assert out_rest == in_rest  # separator and body, byte for byte

    # Top: this relay's own Received field, without the internal client.
    assert Message(out_fields[0]).get("Received") == "by " + OWN_RECEIVED.partition(" by ")[2]
    # Bottom: the added field.
    assert out_fields[-1] == b"X-Relayed-By: filterhost\r\n"
    # Between: the message's own fields, in order, byte for byte, less the internal Received
    # fields; a From field of an internal domain has only its address changed.
    removed = INTERNAL_RECEIVED.get(path.name)
    expected = [f for f in in_fields if removed is None or not f.startswith(removed)]
    middle = out_fields[1:-1]
    assert len(middle) == len(expected)
    for got, want in zip(middle, expected, strict=True):
        if want.startswith(b"From:") and path.name in REWRITTEN_FROM:
            assert decoded_address(got) == REWRITTEN_FROM[path.name]
            assert got.isascii()  # a non-ASCII name is RFC 2047 encoded, the address is not
        else:
            assert got == want
    if path.name not in REWRITTEN_FROM:
        assert b"corp.example>" not in b"".join(f for f in middle if f.startswith(b"From:"))
    assert txn.mail_from == "alice@example.com"


def test_a_message_the_plugin_has_nothing_to_do_for_is_identical(tmp_path: Path) -> None:
    plugin = configure(
        tmp_path,
        sender_rewrite={"@corp.example": "@example.com"},
        rules=[{"action": "remove", "pattern": "^X-Nothing-"}],
    )
    for path in CORPUS:
        raw = path.read_bytes()
        if b"corp.example>" in raw.partition(b"\r\n\r\n")[0]:
            continue
        message = Message(raw)
        txn = Transaction(Session("s", "10.0.0.1"), "a@partner.example", ["b@x.test"], message)
        plugin.filterhost_message(txn)
        assert message.as_bytes() == raw, path.name
        assert message.edits == []


# ----------------------------------------------------------------------------- rules


RULES_MAIL = (
    b"Received: from a.partner.example ([198.51.100.1]) by mx.test;\r\n"
    b" Sat, 28 Nov 2026 10:00:00 +0000\r\n"
    b"From: alice@partner.example\r\n"
    b"X-Mailer: Mailer 1.0\r\n"
    b"Organization: Old Name\r\n"
    b"X-MS-Exchange-Organization-SCL: 1\r\n"
    b"X-MS-Exchange-Transport-Id: 77\r\n"
    b"Subject: hello\r\n"
    b"X-Mailer: Second\r\n"
    b"X-Spam-Score: 0.1 (internal scanner)\r\n"
    b"X-Spam-Score: 4.0\r\n"
    b"\r\n"
    b"body\r\n"
)  # fmt: skip


def test_rules_add_remove_replace_in_order(tmp_path: Path) -> None:
    plugin = configure(
        tmp_path,
        rules=[
            {"action": "remove", "name": "x-mailer"},
            {"action": "remove", "pattern": "^X-MS-Exchange-"},
            {"action": "remove", "name": "X-Spam-Score", "value_pattern": "internal"},
            {"action": "replace", "name": "Organization", "value": "Example Inc."},
            {"action": "add", "name": "X-Top", "value": "1"},
            {"action": "add", "name": "X-Bottom", "value": "Grüße", "position": "bottom"},
        ],
    )
    message = Message(RULES_MAIL)
    txn = Transaction(Session("s", "10.0.0.1"), "alice@partner.example", ["b@x.test"], message)
    plugin.filterhost_message(txn)
    assert message.as_bytes() == (
        b"X-Top: 1\r\n"
        b"Received: from a.partner.example ([198.51.100.1]) by mx.test;\r\n"
        b" Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        b"From: alice@partner.example\r\n"
        b"Organization: Example Inc.\r\n"  # in place
        b"Subject: hello\r\n"
        b"X-Spam-Score: 4.0\r\n"  # only the one whose value matched went
        b"X-Bottom: =?utf-8?b?R3LDvMOfZQ==?=\r\n"
        b"\r\n"
        b"body\r\n"
    )  # fmt: skip
    assert [(e.op, e.name) for e in message.edits] == [
        ("remove", "x-mailer"),
        ("remove", "x-ms-exchange-organization-scl"),
        ("remove", "x-ms-exchange-transport-id"),
        ("remove", "X-Spam-Score"),
        ("replace", "Organization"),
        ("add", "X-Top"),
        ("add", "X-Bottom"),
    ]


def test_remove_header_where_keeps_the_other_fields_bytes_and_places() -> None:
    # Message.remove_header(name, where=...): what strip_topology and value_pattern use.
    raw = (
        b"Received: from a ([10.0.0.1])\r\n\tby b; Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        b"X-Keep:  odd   spacing\r\n"
        b"received: from c ([198.51.100.1]) by d; Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        b"RECEIVED: from e ([10.0.0.2]) by f; Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        b"\r\nbody\r\n"
    )
    message = Message(raw)
    assert message.remove_header("Received", where=lambda v: "[10." in v) == 2
    assert message.as_bytes() == (
        b"X-Keep:  odd   spacing\r\n"
        b"received: from c ([198.51.100.1]) by d; Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        b"\r\nbody\r\n"
    )
    assert [(e.op, e.name) for e in message.edits] == [("remove", "Received")]
    assert message.remove_header("Received", where=lambda v: False) == 0
    assert len(message.edits) == 1  # nothing removed, nothing recorded

    def broken(value: str) -> bool:
        raise RuntimeError("predicate failed")

    before = message.as_bytes()
    with pytest.raises(RuntimeError):
        message.remove_header("Received", where=broken)
    assert message.as_bytes() == before  # all or nothing


# ----------------------------------------------------------------------------- sender rewriting


def test_rewrite_lookups_most_specific_first() -> None:
    rewriter = SenderRewriter(
        {
            "root@ws1.corp.example": "it-alerts@example.com",
            "@corp.example": "@example.com",
            ".corp.example": "@example.com",
            ".lab.corp.example": "@lab.example.com",
        }
    )
    assert rewriter.rewrite("root@ws1.corp.example") == "it-alerts@example.com"
    assert rewriter.rewrite("Root@WS1.Corp.Example") == "it-alerts@example.com"
    assert rewriter.rewrite("bob@ws1.corp.example") == "bob@example.com"  # local part kept
    assert rewriter.rewrite("Bob@corp.example") == "Bob@example.com"
    assert rewriter.rewrite("x@a.lab.corp.example") == "x@lab.example.com"
    assert rewriter.rewrite("x@lab.corp.example") == "x@example.com"  # ".lab..." is subdomains
    assert rewriter.rewrite("x@notcorp.example") is None
    assert rewriter.rewrite("x@corp.example.org") is None
    assert rewriter.rewrite("") is None


def test_display_names_survive_and_only_internal_addresses_change(tmp_path: Path) -> None:
    plugin = configure(tmp_path, sender_rewrite={".corp.example": "@example.com"})
    raw = (
        b"From: =?utf-8?q?M=C3=BCller=2C_J=C3=BCrgen?= <j.mueller@hq.corp.example>\r\n"
        b'Reply-To: "Support, 2nd level" <support@hq.corp.example>, other@partner.example\r\n'
        b"Subject: x\r\n\r\nbody\r\n"
    )
    txn = run(plugin, raw, mail_from="j.mueller@hq.corp.example")
    message = txn.message
    assert txn.mail_from == "j.mueller@example.com"
    from_field = next(f for f in split(message.as_bytes())[0] if f.startswith(b"From:"))
    assert decoded_address(from_field) == ("Müller, Jürgen", "j.mueller@example.com")
    assert message.get("Reply-To") == (
        '"Support, 2nd level" <support@example.com>, other@partner.example'
    )
    assert message.as_bytes().endswith(b"Subject: x\r\n\r\nbody\r\n")


def test_unusual_address_fields_are_left_alone_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = configure(
        tmp_path, sender_rewrite={"@corp.example": "@example.com"}, rewrite_envelope_sender=False
    )
    two_froms = b"From: a@corp.example\r\nFrom: b@corp.example\r\nSubject: x\r\n\r\nx\r\n"
    group = b"From: team: a@corp.example, b@corp.example;\r\nSubject: x\r\n\r\nx\r\n"
    # A display name that is one word too long to fold (the front end would not take this
    # line; a plugin earlier in the chain might make it).
    long_name = b'From: "' + b"A" * 1000 + b'" <a@corp.example>\r\nSubject: x\r\n\r\nx\r\n'
    with caplog.at_level(logging.WARNING, logger="filterhost.plugins.headers"):
        for raw in (two_froms, group, long_name):
            txn = run(plugin, raw, mail_from="a@corp.example")
            assert txn.mail_from == "a@corp.example"  # rewrite_envelope_sender = false
            assert txn.message.as_bytes().endswith(raw)
    assert "0123ABCD: headers: 2 From fields; not rewritten" in caplog.text
    assert "0123ABCD: headers: From not rewritten: unusual syntax" in caplog.text
    assert "0123ABCD: headers: From not rewritten: header value has a word longer than 998" in (
        caplog.text
    )


# ----------------------------------------------------------------------------- --check-config


def test_check_config_names_file_and_key(tmp_path: Path) -> None:
    conf = base_config(tmp_path, free_port(), None, 25, plugins={"order": ["headers"]})
    confdir = write_conf(tmp_path / "conf.d", conf)
    toml = confdir / "40-headers.toml"
    toml.write_text('[[plugins.headers.rules]]\naction = "delete"\nname = "X-A"\n')
    plugins = Plugins()
    plugins.add("headers", HeadersPlugin())
    _, _, problems = check_configuration(confdir, plugins)
    assert [str(p) for p in problems] == [
        f"{toml}: plugins.headers.rules: item 1: action: expected one of 'add', 'remove', "
        "'replace', got 'delete'"
    ]
    toml.write_text(
        "[plugins.headers]\n"
        'internal_networks = ["10.0.0.0/8", "10.0.0.300/8"]\n'
        'rewrite_headers = ["From", "To"]\n'
        "[plugins.headers.sender_rewrite]\n"
        '"@corp.example" = "example.com"\n'
        '"corp" = "@example.com"\n'
        "[[plugins.headers.rules]]\n"
        'action = "remove"\n'  # an empty rule
        "[[plugins.headers.rules]]\n"
        'action = "remove"\n'
        'pattern = "^(X-"\n'
        "[[plugins.headers.rules]]\n"
        'action = "add"\n'
        'name = "Bad Name"\n'
        "[[plugins.headers.rules]]\n"
        'action = "remove"\n'
        'name = "Received"\n'
        "[[plugins.headers.rules]]\n"
        'action = "add"\n'
        'name = "X-Long"\n'
        f'value = "{"x" * 1000}"\n'
    )
    _, _, problems = check_configuration(confdir, plugins)
    got = {(p.file, p.key, p.severity, p.message) for p in problems}
    where, key = str(toml), "plugins.headers"
    assert got == {
        (where, f"{key}.rules[1].name", "error",
         "a remove rule needs either name or pattern (not both)"),
        (where, f"{key}.rules[2].pattern", "error",
         "'^(X-' is not a regular expression: missing ), unterminated subpattern at position 1"),
        (where, f"{key}.rules[3].name", "error", "'Bad Name' is not a header field name"),
        (where, f"{key}.rules[3].value", "error", "an add rule needs a value"),
        (where, f"{key}.rules[4].name", "warning",
         "removes every Received field: mail loops are no longer detected (max_hops); "
         "prefer strip_topology or a value_pattern"),
        (where, f"{key}.rules[5].value", "error",
         "header value has a word longer than 998 characters; it cannot be folded"),
        (where, f"{key}.internal_networks", "error",
         "item 2: '10.0.0.300/8' is not a network such as \"10.0.0.0/8\""),
        (where, f"{key}.rewrite_headers", "error",
         "item 2: 'To' is not a sender address field (From, Sender, Reply-To, Resent-From, "
         "Resent-Sender)"),
        (where, f"{key}.sender_rewrite", "error",
         "'@corp.example' = 'example.com': the value must be \"@domain\" or \"user@domain\""),
        (where, f"{key}.sender_rewrite", "error",
         "'corp': expected \"user@domain\", \"@domain\" or \".domain\""),
    }  # fmt: skip


# ----------------------------------------------------------------------------- end to end


async def test_end_to_end_through_a_running_filterhost(
    tmp_path: Path, dns_server: Dns, peers: Peers
) -> None:
    peer = peers.start("127.0.0.2", free_port())  # mx1.mx.test
    conf = base_config(
        tmp_path,
        free_port(),
        dns_server,
        peer.port,
        plugins={
            "order": ["headers"],
            "headers": {
                "strip_topology": True,
                "internal_domains": ["corp.example"],
                "sender_rewrite": {".corp.example": "@example.com"},
                "rules": [
                    {"action": "remove", "name": "X-Mailer"},
                    {"action": "add", "name": "X-Relayed-By", "value": "relay.test"},
                ],
            },
        },
    )
    sent = (
        b"Received: from ws1.corp.example (ws1.corp.example [10.1.2.3])\r\n"
        b"\tby mail.corp.example (Postfix) with ESMTP id 5E6F; Sat, 28 Nov 2026 10:00:00 +0100\r\n"
        b"From: Alice Example <alice@ws1.corp.example>\r\n"
        b"To: bob@mx.test\r\n"
        b"Subject: quarterly figures\r\n"
        b"X-Originating-IP: [10.1.2.3]\r\n"
        b"X-Mailer: Internal CRM 2.1\r\n"
        b"Message-ID: <q4@ws1.corp.example>\r\n"
        b"\r\n"
        b"Figures attached.\r\n"
    )  # fmt: skip
    async with running_app(tmp_path, conf, {"headers": HeadersPlugin()}) as app:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port_of(app), start_tls=False)
        await client.connect()
        await client.ehlo(hostname="client.test")
        await client.sendmail("alice@ws1.corp.example", ["bob@mx.test"], sent)
        await client.quit()
        (got,) = await asyncio.to_thread(peer.wait_for_count, 1)
    assert got.mail_from == "alice@example.com"
    fields, rest = split(got.data)
    assert rest == b"\r\nFigures attached.\r\n"
    own = Message(b"".join(fields[1:2])).get("Received") or ""
    assert fields[0] == b"X-Relayed-By: relay.test\r\n"
    assert own.startswith("by relay.test (filterhost) with ESMTP id ")  # no client named
    assert fields[2:] == [
        b"From: Alice Example <alice@example.com>\r\n",
        b"To: bob@mx.test\r\n",
        b"Subject: quarterly figures\r\n",
        b"Message-ID: <q4@ws1.corp.example>\r\n",
    ]
