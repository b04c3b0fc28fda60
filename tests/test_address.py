"""The address parser, the relay-hygiene checks and the ESMTP parameters, as pure functions.

Every routing trick listed in issue 6 is refused here with its own reason; the same cases go
over the wire in test_smtp_hygiene.py.
"""

from __future__ import annotations

import pytest

from filterhost.smtp.address import (
    AddressError,
    Mailbox,
    canonical_domain,
    check_mailbox,
    parse_path,
)
from filterhost.smtp.auth import FailureLimiter, parse_user_file
from filterhost.smtp.data import decode_body, header_size
from filterhost.smtp.params import is_xtext, parse_mail_params, parse_rcpt_params
from filterhost.smtp.policy import recipient_allowed
from filterhost.smtp.replies import with_status


def refused(text: str, *, sender: bool = False) -> str:
    with pytest.raises(AddressError) as info:
        parse_path(text, sender=sender)
    return str(info.value.reply)


@pytest.mark.parametrize(
    ("text", "address", "params"),
    [
        ("<bob@example.test>", "bob@example.test", []),
        (" <bob@example.test>", "bob@example.test", []),  # "RCPT TO: <...>" is common
        ("bob@example.test", "bob@example.test", []),  # no brackets: tolerated, like Postfix
        (
            "<bob@example.test> NOTIFY=NEVER  ORCPT=rfc822;b",
            "bob@example.test",
            ["NOTIFY=NEVER", "ORCPT=rfc822;b"],
        ),
        ("<first.last+tag@sub.example.test>", "first.last+tag@sub.example.test", []),
        ('<"john doe"@example.test>', '"john doe"@example.test', []),
        ('<"a>b"@example.test>', '"a>b"@example.test', []),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]", []),
        ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]", []),
        ("<jörg@bücher.test>", "jörg@bücher.test", []),
        ("<x@" + "a" * 63 + ".test>", "x@" + "a" * 63 + ".test", []),
    ],
)
def test_valid_paths(text: str, address: str, params: list[str]) -> None:
    path = parse_path(text, sender=False)
    assert (path.address, path.params) == (address, params)


def test_null_sender_only_for_mail() -> None:
    assert parse_path("<>", sender=True).mailbox is None
    assert parse_path("<> SIZE=10", sender=True).params == ["SIZE=10"]
    assert "null address" in refused("<>")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("<@relay.test:victim@elsewhere.test>", "553 5.1.3 Source routes"),
        ("<@a.test,@b.test:victim@elsewhere.test>", "553 5.1.3 Source routes"),
        ("<victim%elsewhere.test@relay.test>", "553 5.1.3 Address may not contain '%'"),
        ("<elsewhere.test!victim@relay.test>", "553 5.1.3 Address may not contain '!'"),
        ('<"victim@elsewhere.test"@relay.test>', "553 5.1.3 A quoted local part may not"),
        ('<"victim%elsewhere.test"@relay.test>', "553 5.1.3 A quoted local part may not"),
        ('<"victim\\@elsewhere.test"@relay.test>', "553 5.1.3 A quoted local part may not"),
        ("<victim@elsewhere.test@relay.test>", "553 5.1.3 Address has more than one '@'"),
        ("<victim@relay.test.>", "553 5.1.3 Domain may not end with a dot"),
        ("<victim@192.0.2.1>", "553 5.1.3 Domain is an IP address"),
        ("<victim@relay.test\x00>", "553 5.1.3 Address contains a control character"),
        ("<victim@relay.test\r>", "553 5.1.3 Address contains a control character"),
        ("<vic\ttim@relay.test>", "553 5.1.3 Address contains a control character"),
        ("<victim\x7f@relay.test>", "553 5.1.3 Address contains a control character"),
        ("<" + "v" * 65 + "@relay.test>", "553 5.1.3 Local part is longer than 64"),
        ("<v@" + "d." * 126 + "test>", "553 5.1.3 Address is longer than 256"),
        ("<victim>", "553 5.1.3 Address must include a domain"),
        ("<victim@>", "553 5.1.3 Address must include a domain"),
        ("<@relay.test>", "553 5.1.3 Source routes"),
        ("<victim@relay..test>", "553 5.1.3 Malformed domain: empty label"),
        ("<victim@-relay.test>", "553 5.1.3 Malformed domain: a label may not"),
        ("<victim@relay_x.test>", "553 5.1.3 Malformed domain: use letters"),
        ("<a..b@relay.test>", "553 5.1.3 Malformed address: empty part"),
        ("<a b@relay.test>", "553 5.1.3 Malformed address: ' '"),
        ("<victim@[192.0.2.300]>", "553 5.1.3 Malformed address literal"),
        ("<victim@[tag:stuff]>", "553 5.1.3 Malformed address literal"),
        ("<victim@relay.test", "501 5.1.3 Malformed address: no closing '>'"),
        ("<victim@relay.test>junk", "501 5.1.3 Malformed address: text after '>'"),
        ("<v\udcffx@relay.test>", "553 5.6.7 Address is not valid UTF-8"),
    ],
)
def test_routing_tricks_and_bad_syntax_are_refused(text: str, reason: str) -> None:
    assert refused(text).startswith(reason)


def test_sender_problems_use_5_1_7() -> None:
    assert refused("<a%b@relay.test>", sender=True).startswith("553 5.1.7 ")


def test_length_limits_are_octets() -> None:
    # 64 octets of local part is fine, 65 is not; "é" is two octets in UTF-8.
    assert parse_path("<" + "v" * 64 + "@relay.test>", sender=False).mailbox is not None
    assert "longer than 64" in refused("<" + "é" * 33 + "@relay.test>")


def test_literals_only_for_trusted_clients_and_utf8_needs_smtputf8() -> None:
    literal = Mailbox("user", "[192.0.2.1]", literal=True)
    assert str(check_mailbox(literal, sender=False, trusted=False, smtputf8=False)).startswith(
        "550 5.7.1 Address literals"
    )
    assert check_mailbox(literal, sender=False, trusted=True, smtputf8=False) is None
    utf8 = Mailbox("jörg", "example.test")
    assert str(check_mailbox(utf8, sender=True, trusted=True, smtputf8=False)).startswith(
        "553 5.6.7"
    )
    assert check_mailbox(utf8, sender=True, trusted=True, smtputf8=True) is None


@pytest.mark.parametrize(
    ("recipient", "allowed"),
    [
        ("user@relaydomain.test", True),
        ("user@RelayDomain.TEST", True),
        ("user@relaydomain.test.evil.test", False),  # suffix trick
        ("user@evilrelaydomain.test", False),
        ("user@sub.relaydomain.test", False),  # subdomains are not included
        ("user@relaydomain.test.", False),  # a trailing dot never matches
        ("user@bücher.test", True),
        ("user@xn--bcher-kva.test", True),
    ],
)
def test_relay_domains_match_exactly(recipient: str, allowed: bool) -> None:
    domains = ["relaydomain.test", "BÜCHER.test."]
    assert recipient_allowed(recipient, trusted=False, relay_domains=domains) is allowed
    assert canonical_domain("Relaydomain.Test.") == "relaydomain.test"


def test_mail_parameters_are_checked_and_normalised() -> None:
    params = parse_mail_params(
        ["size=100", "body=8bitmime", "SMTPUTF8", "RET=hdrs", "ENVID=Q+2Bid", "AUTH=<>"],
        max_size=1000,
    )
    assert params.size == 100
    assert params.smtputf8
    assert params.stored == ["BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=Q+2Bid"]


@pytest.mark.parametrize(
    ("tokens", "reply"),
    [
        (["SIZE=2000"], "552 5.3.4 "),
        (["SIZE=x"], "501 5.5.4 "),
        (["BODY=BINARYMIME"], "501 5.5.4 "),
        (["SMTPUTF8=yes"], "501 5.5.4 "),
        (["RET=ALL"], "501 5.5.4 "),
        (["ENVID=a+b"], "501 5.5.4 "),  # "+" must be "+XX"
        (["ENVID=" + "x" * 101], "501 5.5.4 "),
        (["RET=FULL", "ret=HDRS"], "501 5.5.4 Duplicate"),
        (["XFORWARD=1"], "555 5.5.4 MAIL FROM parameter XFORWARD is not supported"),
        (["=x"], "501 5.5.4 Malformed"),
    ],
)
def test_bad_mail_parameters(tokens: list[str], reply: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_mail_params(tokens, max_size=1000)
    assert str(info.value.reply).startswith(reply)


def test_rcpt_parameters_dsn() -> None:
    got = parse_rcpt_params(
        ["notify=failure,delay", "ORCPT=rfc822;Bob+40x@example.org"], smtputf8=False
    )
    assert got == ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;Bob+40x@example.org"]
    assert parse_rcpt_params(["NOTIFY=NEVER"], smtputf8=False) == ["NOTIFY=NEVER"]
    assert parse_rcpt_params(["ORCPT=utf-8;jörg@x.test"], smtputf8=True) == [
        "ORCPT=utf-8;jörg@x.test"
    ]
    for bad in (
        ["NOTIFY=NEVER,FAILURE"],
        ["NOTIFY=SUCCESS,SUCCESS"],
        ["NOTIFY=SOMETIMES"],
        ["ORCPT=bob@example.org"],  # no addr-type
        ["ORCPT=rfc822;a=b"],  # "=" is not xtext
        ["ORCPT=utf-8;jörg@x.test"],  # non-ASCII needs SMTPUTF8
        ["ORCPT=rfc822;" + "x" * 500],
    ):
        with pytest.raises(AddressError) as info:
            parse_rcpt_params(bad, smtputf8=False)
        assert str(info.value.reply).startswith("501 5.5.4 "), bad
    with pytest.raises(AddressError) as info:
        parse_rcpt_params(["FOO=1"], smtputf8=False)
    assert str(info.value.reply).startswith("555 5.5.4 ")
    assert is_xtext("a+2Bb")
    assert not is_xtext("a+2bb")
    assert not is_xtext("a b")


@pytest.mark.parametrize(
    ("line", "coded"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("503 Error: send HELO first", "503 5.5.1 Error: send HELO first"),
        ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
        ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
        (
            "554 Command refused due to lack of security",
            "554 5.7.0 Command refused due to lack of security",
        ),
        ("250-Supported", "250-2.0.0 Supported"),
        ("250 2.1.5 Ok", "250 2.1.5 Ok"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
        ("599 odd", "599 5.0.0 odd"),
    ],
)
def test_every_reply_gets_an_enhanced_status(line: str, coded: str) -> None:
    assert with_status(line) == coded


def test_normalize_turns_bare_line_ends_into_crlf_then_unstuffs() -> None:
    raw = b"a\nb\rc\r\r\n..d\n..e\r\n"
    assert decode_body(raw, "normalize") == b"a\r\nb\r\nc\r\n\r\n.d\r\n.e\r\n"
    # "reject" leaves them for check_content to refuse.
    assert decode_body(raw, "reject") == b"a\nb\rc\r\r\n.d\n..e\r\n"
    assert header_size(b"A: b\r\nC: d\r\n\r\nbody") == 12
    assert header_size(b"\r\nbody") == 0
    assert header_size(b"A: b\r\n") == 6


def test_failure_limiter_counts_per_address_and_ipv6_prefix() -> None:
    now = [0.0]
    limiter = FailureLimiter(limit=2, window=10.0, clock=lambda: now[0])
    assert limiter.add("192.0.2.1") == 1
    assert not limiter.blocked("192.0.2.1")
    assert limiter.add("::ffff:192.0.2.1") == 2  # the same client, IPv4-mapped
    assert limiter.blocked("192.0.2.1")
    assert not limiter.blocked("192.0.2.2")
    limiter.add("2001:db8::1")
    limiter.add("2001:db8::ffff")  # same /64
    assert limiter.blocked("2001:db8::42")
    assert not limiter.blocked("2001:db8:0:1::1")
    now[0] = 10.5  # the failures age out
    assert not limiter.blocked("192.0.2.1")
    assert limiter.failures("2001:db8::1") == 0


def test_user_file_parsing() -> None:
    users, problems = parse_user_file(
        "# users\n\nalice:$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA\n"
        "bob:plaintext\nno colon here\nalice:$argon2id$again\n"
    )
    assert list(users) == ["alice"]
    assert [p.line for p in problems] == [4, 5, 6]
    assert "not an Argon2id hash" in str(problems[0])
