"""The dkim plugin end to end: keys from ``filterhost dkim keygen``, published in a real unbound,
mail relayed through a real filterhost process to a recording peer that keeps the exact bytes,
and verified there with dkimpy's verifier against that DNS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import ipaddress
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import dns.nameserver
import dns.resolver
import pytest
from filterhost_builtins.dkim import (
    DEFAULT_SIGN_HEADERS,
    DkimConfig,
    DkimDomain,
    _client_allowed,
    _Domain,
    _signing_domain,
    load_key,
    parse_key,
    zone_line,
)

from filterhost import Session
from filterhost.checks import check_configuration, load_everything
from filterhost.cli import main as cli_main
from tests.components.fixtures import Peers
from tests.components.services import Dns, PeerMessage, free_port, start_unbound
from tests.filterhost_fixtures import (
    FilterhostFactory,
    FilterhostProcess,
    base_config,
    write_conf,
)

CORPUS = sorted((Path(__file__).parent / "corpus").glob("*.eml"))
QUEUED = re.compile(rb"queued as ([0-9A-F]+)")


# ----------------------------------------------------------------------------- keys and DNS


@dataclass(frozen=True)
class Keygen:
    """What one ``filterhost dkim keygen`` run wrote and printed."""

    path: Path
    output: str

    @property
    def record(self) -> str:
        """The zone-file TXT line it printed."""
        (line,) = [x for x in self.output.splitlines() if " IN TXT " in x]
        return line


def keygen(directory: Path, domain: str, selector: str, *extra: str) -> Keygen:
    """Run the real CLI entry point in-process and capture what it prints."""
    out = io.StringIO()
    argv = ["dkim", "keygen", "--domain", domain, "--selector", selector, "--dir", str(directory)]
    with contextlib.redirect_stdout(out):
        rc = cli_main([*argv, *extra])
    assert rc == 0, out.getvalue()
    return Keygen(directory / f"{domain}.{selector}.key", out.getvalue())


@dataclass(frozen=True)
class Keys:
    """The test keys (made once per module) and the unbound that publishes them."""

    rsa: Keygen
    ed25519: Keygen
    unpublished: Keygen
    mismatched: Keygen
    dns: Dns


SIGNING_DOMAINS = ("corp.example", "partner.example", "supplier.example", "restricted.example")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    directory = tmp_path_factory.mktemp("dkim") / "keys"
    old_umask = os.umask(0)  # keygen must not rely on the operator's umask
    try:
        rsa = keygen(directory, "corp.example", "rsa1")
        ed = keygen(directory, "corp.example", "ed1", "--type", "ed25519")
        unpublished = keygen(directory, "corp.example", "nodns", "--type", "ed25519")
        mismatched = keygen(directory, "corp.example", "other", "--type", "ed25519")
    finally:
        os.umask(old_umask)
    key = load_key(rsa.path)
    records = [rsa.record, ed.record]
    # The same RSA key serves the other test domains (a key may sign for several domains).
    records += [zone_line(d, "rsa1", key) for d in SIGNING_DOMAINS if d != "corp.example"]
    # "other" publishes the ed1 key, not the one in its file: --check-config must see that.
    records.append(ed.record.replace("ed1._domainkey", "other._domainkey"))
    # Authoritative for the test domains, so a name without a record is NXDOMAIN (the
    # test zone refuses everything it does not know).
    zones = [f'local-zone: "{d}." static' for d in SIGNING_DOMAINS]
    server = start_unbound(extra_data=zones + records)
    try:
        yield Keys(rsa, ed, unpublished, mismatched, server)
    finally:
        server.stop()


def dnsfunc(server: Dns) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` that asks only the test unbound (with dnspython)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(server.host, server.port)]
    resolver.lifetime = 3.0

    def get_txt(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(text, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]

    return get_txt


def signatures(data: bytes) -> list[dict[bytes, bytes]]:
    """The tags of every DKIM-Signature field, top first."""
    return [
        dkim.util.parse_tag_value(value)
        for name, value in dkim.DKIM(data).headers
        if name.lower() == b"dkim-signature"
    ]


OUR_SELECTORS = {b"rsa1", b"ed1"}


def verify_all(data: bytes, server: Dns) -> list[tuple[bytes, bytes, bytes]]:
    """Verify each signature filterhost added with dkimpy; return (d, s, a) of each.

    Signatures that came with the message (the corpus has some, from domains whose keys are
    not in the test DNS) are left alone: they are the sender's business.
    """
    found = signatures(data)
    get_txt = dnsfunc(server)
    out = []
    for i, tags in enumerate(found):
        if tags[b"s"] not in OUR_SELECTORS:
            continue
        assert dkim.DKIM(data, minkey=2048).verify(idx=i, dnsfunc=get_txt), (i, tags)
        out.append((tags[b"d"], tags[b"s"], tags[b"a"]))
    assert out, "filterhost did not sign the message"
    return out


# ----------------------------------------------------------------------------- the server


def dkim_table(keys: Keys, **extra: Any) -> dict[str, Any]:
    """A [plugins.dkim] table signing for the test domains."""
    rsa = {"selector": "rsa1", "key_file": str(keys.rsa.path)}
    domains: dict[str, Any] = {
        "corp.example": {"keys": [rsa, {"selector": "ed1", "key_file": str(keys.ed25519.path)}]},
        "partner.example": {"keys": [rsa]},
        "supplier.example": {"keys": [rsa]},
        # Only 127.0.0.9 may send as restricted.example (127.0.0.1 is trusted, but not that).
        "restricted.example": {"allowed_networks": ["127.0.0.9/32"], "keys": [rsa]},
    }
    return {
        "domains": domains,
        "domain_map": {".corp.example": "corp.example", ".partner.example": "partner.example"},
        **extra,
    }


def start(
    fh: FilterhostFactory, keys: Keys, tmp_path: Path, mx_port: int, **dkim_extra: Any
) -> FilterhostProcess:
    conf = base_config(
        tmp_path,
        free_port(),
        keys.dns,
        mx_port,
        # 127.0.0.0/24 may relay; 127.0.1.x is the outside world, which may only send to
        # mx.test (an inbound relay domain).
        server={"mynetworks": ["127.0.0.0/24"], "relay_domains": ["mx.test"]},
        plugins={"order": ["dkim"], "dkim": dkim_table(keys, **dkim_extra)},
    )
    return fh.create(conf).start()


def send(proc: FilterhostProcess, raw: bytes, source: str = "127.0.0.1") -> str:
    """Send ``raw`` to bob@mx.test from ``source``; return the queue id."""
    with proc.smtp(source_address=(source, 0)) as client:
        client.ehlo("client.test")
        options = [] if raw.isascii() else ["BODY=8BITMIME"]
        code, _ = client.mail("sender@corp.example", options)
        assert code == 250
        code, _ = client.rcpt("bob@mx.test")
        assert code == 250
        code, text = client.data(raw)
        assert code == 250, text
    match = QUEUED.search(text)
    assert match is not None, text
    return match.group(1).decode()


def mail(sender: str, subject: str = "hello", body: str = "Hello there.\r\n") -> bytes:
    return (
        f"From: Sender <{sender}>\r\nTo: bob@mx.test\r\nSubject: {subject}\r\n"
        f"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@test>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}"
    ).encode()


def by_subject(messages: list[PeerMessage]) -> dict[str, bytes]:
    out = {}
    for m in messages:
        found = re.search(rb"^Subject: (\S+)", m.data, re.MULTILINE)
        assert found is not None
        out[found.group(1).decode()] = m.data
    return out


# ----------------------------------------------------------------------------- tests


def test_rsa_and_ed25519_signatures_verify_at_the_next_hop(
    fh: FilterhostFactory, keys: Keys, peers: Peers, tmp_path: Path
) -> None:
    mx_port = free_port()
    peer = peers.start("127.0.0.2", mx_port)
    proc = start(fh, keys, tmp_path, mx_port)
    original = mail("alice@corp.example", "signed")
    qid = send(proc, original)
    (got,) = peer.wait_for_count(1)

    # Both keys sign: RSA (rsa1) and Ed25519 (ed1), relaxed/relaxed, oversigned From.
    assert sorted(verify_all(got.data, keys.dns)) == [
        (b"corp.example", b"ed1", b"ed25519-sha256"),
        (b"corp.example", b"rsa1", b"rsa-sha256"),
    ]
    for tags in signatures(got.data):
        assert tags[b"c"] == b"relaxed/relaxed"
        signed = [h.strip().lower() for h in tags[b"h"].split(b":")]
        assert signed.count(b"from") == 2  # once for the field, once more: no second From
        assert b"received" not in signed
    # Nothing else changed: the message arrives as sent, below our Received and signatures.
    assert got.data.endswith(original)
    proc.wait_log(rf"{qid}: dkim: signed d=corp\.example s=rsa1 a=rsa-sha256, s=ed1 ")

    # The signatures protect what they should: an added From (oversigned) or an edited
    # Subject fails; an added unsigned field does not.
    head, _, body = got.data.partition(b"\r\n\r\n")
    get_txt = dnsfunc(keys.dns)
    extra_from = head + b"\r\nFrom: ceo@corp.example\r\n\r\n" + body
    assert not dkim.verify(extra_from, dnsfunc=get_txt)
    edited = got.data.replace(b"Subject: signed", b"Subject: changed")
    assert not dkim.verify(edited, dnsfunc=get_txt)
    assert dkim.verify(b"X-Added-Later: yes\r\n" + got.data, dnsfunc=get_txt)


def test_odd_real_world_mails_still_verify_after_relaying(
    fh: FilterhostFactory, keys: Keys, peers: Peers, tmp_path: Path
) -> None:
    """8-bit bodies, long and folded headers, nested MIME, a DSN, no body: DESIGN.md 2's
    byte preservation is what makes each signature hold at the receiver."""
    mx_port = free_port()
    peer = peers.start("127.0.0.2", mx_port)
    proc = start(fh, keys, tmp_path, mx_port)
    originals = {path.name: path.read_bytes() for path in CORPUS}
    assert len(originals) >= 10
    queue_ids = {send(proc, raw): name for name, raw in originals.items()}
    got = peer.wait_for_count(len(originals))
    assert len(got) == len(originals)
    for message in got:
        (name,) = [n for n, raw in originals.items() if message.data.endswith(raw)]
        domains = {d for d, _, _ in verify_all(message.data, keys.dns)}
        # Every corpus sender is in (or mapped by domain_map to) a signing domain:
        # ci.corp.example -> corp.example, lists.partner.example -> partner.example.
        from_domain = re.search(rb"^From:.*@([\w.-]+)>?\r$", originals[name], re.MULTILINE)
        assert from_domain is not None, name
        expected = from_domain.group(1).decode().lower()
        for parent in ("corp.example", "partner.example"):
            if expected.endswith("." + parent):
                expected = parent
        assert domains == {expected.encode()}, (name, domains)
    for qid in queue_ids:
        proc.wait_log(rf"{qid}: dkim: signed d=")


def test_unsigned_mail_is_relayed_and_logged_with_the_reason(
    fh: FilterhostFactory, keys: Keys, peers: Peers, tmp_path: Path
) -> None:
    mx_port = free_port()
    peer = peers.start("127.0.0.2", mx_port)
    proc = start(fh, keys, tmp_path, mx_port)
    cases = {
        # A sender domain without a key: relayed unsigned.
        "nokey": (mail("someone@elsewhere.example", "nokey"), "127.0.0.1"),
        # An untrusted client (outside mynetworks, not authenticated) claiming our domain:
        # signing it would launder a forgery.
        "forged": (mail("ceo@corp.example", "forged"), "127.0.1.5"),
        # A trusted client, but not one allowed to send as restricted.example.
        "restricted": (mail("a@restricted.example", "restricted"), "127.0.0.1"),
        # ... and the one that is allowed.
        "allowed": (mail("a@restricted.example", "allowed"), "127.0.0.9"),
    }
    ids = {name: send(proc, raw, source) for name, (raw, source) in cases.items()}
    relayed = by_subject(peer.wait_for_count(len(cases)))
    for name in ("nokey", "forged", "restricted"):
        assert signatures(relayed[name]) == [], name
        assert relayed[name].endswith(cases[name][0])
    assert verify_all(relayed["allowed"], keys.dns) == [
        (b"restricted.example", b"rsa1", b"rsa-sha256")
    ]
    proc.wait_log(rf"{ids['nokey']}: dkim: not signed: no key for elsewhere\.example")
    proc.wait_log(
        rf"{ids['forged']}: dkim: not signed: client 127\.0\.1\.5 is neither in mynetworks "
        "nor authenticated"
    )
    proc.wait_log(
        rf"{ids['restricted']}: dkim: not signed: client 127\.0\.0\.1 is not in "
        r"allowed_networks/allowed_users of restricted\.example"
    )


# ----------------------------------------------------------------------------- --check-config


def check_conf(
    tmp_path: Path, keys: Keys, order: list[str], nameserver: str | None = None, **dkim_extra: Any
) -> Path:
    conf = base_config(
        tmp_path,
        free_port(),
        keys.dns,
        25,
        plugins={"order": order, "dkim": dkim_table(keys, **dkim_extra)},
    )
    if nameserver is not None:
        conf["relay"]["nameservers"] = [nameserver]
    return write_conf(tmp_path / "conf.d", conf)


def problems_of(confdir: Path) -> list[str]:
    _, _, problems = check_configuration(confdir)
    return [str(p) for p in problems]


def test_check_config_refuses_a_header_editing_plugin_after_dkim(
    keys: Keys, tmp_path: Path
) -> None:
    confdir = check_conf(tmp_path, keys, ["dkim", "headers"])
    # The real command line, as an operator runs it.
    done = subprocess.run(
        [sys.executable, "-m", "filterhost", "--check-config", "-c", str(confdir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert re.search(
        r"plugins\.order: 'headers' runs after 'dkim' and implements filterhost_message and "
        r"does not declare edits_headers = False: a header edit after signing breaks",
        done.stderr,
    ), done.stderr


def test_check_config_accepts_dkim_last_and_route_only_plugins_after_it(
    keys: Keys, tmp_path: Path
) -> None:
    # routing has no message hook, so it cannot touch the signed header.
    assert problems_of(check_conf(tmp_path / "a", keys, ["headers", "dkim", "routing"])) == []


def test_check_config_compares_the_published_records_with_the_keys(
    keys: Keys, tmp_path: Path
) -> None:
    extra = {
        "domains": {
            "corp.example": {
                "keys": [
                    {"selector": "rsa1", "key_file": str(keys.rsa.path)},
                    {"selector": "nodns", "key_file": str(keys.unpublished.path)},
                    {"selector": "other", "key_file": str(keys.mismatched.path)},
                ]
            }
        },
        "domain_map": {},
    }
    found = problems_of(check_conf(tmp_path, keys, ["dkim"], **extra))
    assert len(found) == 2, found
    missing, differs = sorted(found, key=lambda p: "warning" not in p)
    assert (
        "plugins.dkim.domains.corp.example.keys: warning: nodns._domainkey.corp.example TXT: "
        "no TXT record is published"
    ) in missing
    # The hint is the record to publish, for this key.
    assert zone_line("corp.example", "nodns", load_key(keys.unpublished.path)) in missing
    assert "warning" not in differs
    assert (
        "other._domainkey.corp.example TXT: the published record does not match the key file: "
        "it has a different public key"
    ) in differs

    # A resolver that does not answer is a warning (mail is still signed), not an error.
    silent = f"127.0.0.1:{free_port()}"
    found = problems_of(
        check_conf(tmp_path / "b", keys, ["dkim"], nameserver=silent, dns_timeout="1s")
    )
    assert found, "each key should have a could-not-check warning"
    assert all("warning: " in p and "could not be checked" in p for p in found), found


def test_check_config_refuses_unsafe_weak_or_unreadable_keys(keys: Keys, tmp_path: Path) -> None:
    directory = tmp_path / "bad"
    directory.mkdir()
    readable = directory / "readable.key"
    readable.write_bytes(keys.ed25519.path.read_bytes())
    readable.chmod(0o640)
    weak = directory / "weak.key"
    weak.write_bytes(
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
            capture_output=True,
            check=True,
        ).stdout
    )
    weak.chmod(0o600)
    garbage = directory / "garbage.key"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    garbage.chmod(0o600)
    entries = [
        {"selector": s, "key_file": str(p)}
        for s, p in (
            ("a", readable),
            ("b", weak),
            ("c", garbage),
            ("d", directory / "missing.key"),
        )
    ]
    extra = {
        "domains": {"corp.example": {"keys": entries}},
        "domain_map": {},
        "sign_headers": ["Subject", "Received"],
    }
    found = problems_of(check_conf(tmp_path, keys, ["dkim"], **extra))
    text = "\n".join(found)
    assert f"{readable}: mode 0640 lets group or others at the private key; chmod 600" in text
    assert f"{weak}: RSA key of 1024 bits; use at least 2048" in text
    assert f"{garbage}: a PEM 'CERTIFICATE', not a private key" in text
    assert f"{directory / 'missing.key'}: No such file or directory" in text
    assert "plugins.dkim.sign_headers: must include From" in text
    assert "'received' changes in transit and must not be signed" in text
    assert all("warning" not in p for p in found), found
    assert len(found) == 6, found


# ----------------------------------------------------------------------------- keygen


def test_keygen_writes_a_private_key_and_a_record_that_verifies(keys: Keys, tmp_path: Path) -> None:
    for made, kind in ((keys.rsa, "rsa"), (keys.ed25519, "ed25519")):
        # 0600 although the fixture ran keygen with umask 0.
        assert stat.S_IMODE(made.path.stat().st_mode) == 0o600
        key = load_key(made.path)
        assert key.kind == kind
        # openssl reads the file too (PKCS#8 PEM), so other tools can use the key.
        subprocess.run(["openssl", "pkey", "-in", str(made.path), "-noout"], check=True)
        # Each string of the TXT record fits the 255-octet limit, and the record says k=.
        strings = re.findall(r'"([^"]*)"', made.record)
        assert all(len(s) <= 255 for s in strings)
        assert "".join(strings).startswith(f"v=DKIM1; k={kind}; p=")
        assert made.record.startswith(f"{made.path.name.split('.')[-2]}._domainkey.corp.example. ")
        assert f'key_file = "{made.path}"' in made.output
        # A signature made with the key verifies against the record unbound serves.
        message = mail("x@corp.example", "keygen")
        selector = made.record.split(".", 1)[0].encode()
        header = dkim.sign(
            message,
            selector,
            b"corp.example",
            key.private,
            signature_algorithm=key.algorithm,
            include_headers=[b"from", b"subject"],
        )
        assert dkim.verify(header + message, dnsfunc=dnsfunc(keys.dns), minkey=2048)

    # Never overwrite: that key may be published already.
    out, err = io.StringIO(), io.StringIO()
    argv = ["dkim", "keygen", "--domain", "corp.example", "--selector", "rsa1"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli_main([*argv, "--dir", str(keys.rsa.path.parent)]) == 1
    assert "exists; choose another selector" in err.getvalue()
    with contextlib.redirect_stderr(err):
        assert cli_main([*argv, "--bits", "1024", "--dir", str(tmp_path)]) == 1
    assert "--bits 1024: use from 2048 to 8192" in err.getvalue()
    assert list(tmp_path.iterdir()) == []


def test_keys_in_other_tools_formats_load(tmp_path: Path) -> None:
    # dknewkey (dkimpy) writes an Ed25519 key as its base64 seed; openssl -traditional
    # writes PKCS#1 ("RSA PRIVATE KEY"). Both are what operators migrating may have.
    seed = parse_key(b"A" * 43 + b"=", tmp_path / "x")
    assert seed.kind == "ed25519"
    pkcs1 = subprocess.run(
        ["openssl", "genrsa", "-traditional", "2048"], capture_output=True, check=True
    ).stdout
    assert b"BEGIN RSA PRIVATE KEY" in pkcs1
    key = parse_key(pkcs1, tmp_path / "y")
    assert (key.kind, key.bits) == ("rsa", 2048)
    signed = dkim.sign(mail("x@corp.example"), b"s", b"corp.example", key.private)
    assert signed.startswith(b"DKIM-Signature: ")
    with pytest.raises(ValueError, match="encrypted"):
        parse_key(
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAA==\n-----END ENCRYPTED PRIVATE KEY-----",
            tmp_path / "z",
        )


# ----------------------------------------------------------------------------- the doc page

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins" / "dkim.md"


def test_the_doc_example_and_configuration_table_match_the_plugin(tmp_path: Path) -> None:
    text = DOC.read_text()
    (example,) = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)
    confdir = tmp_path / "conf.d"
    confdir.mkdir()
    (confdir / "00-base.toml").write_text(f'[spool]\ndirectory = "{tmp_path / "spool"}"\n')
    (confdir / "40-dkim.toml").write_text(re.sub(r"(?m)^   ", "", example))
    config, _, problems = load_everything(confdir)
    assert config is not None
    assert problems == []
    cfg = config.plugin_config(DkimConfig)
    assert cfg.domain_map == {".corp.example": "corp.example"}
    assert [k.selector for k in cfg.domains["corp.example"].keys] == ["2026a", "2026e"]
    assert cfg.domains["corp-shop.example"].allowed_users == ["shop-mailer"]
    # The Configuration table names every key, and no key that does not exist.
    table = re.findall(r"^\| `([a-z_.\"D]+)` \|", text, re.MULTILINE)
    top = {f.name for f in dataclasses.fields(DkimConfig)} | {"timeout", "on_error"}
    nested = {f'domains."D".{f.name}' for f in dataclasses.fields(DkimDomain)}
    assert set(table) == top | nested
    # The default signed list is RFC 6376 5.4.1's, as dkimpy has it.
    assert {h.lower().encode() for h in DEFAULT_SIGN_HEADERS} == set(dkim.DKIM.SHOULD)
    for name in DEFAULT_SIGN_HEADERS:
        assert f"`{name}`" in text


# ----------------------------------------------------------------------------- the rules, directly


def test_domain_map_prefers_an_exact_domain_then_the_longest_suffix() -> None:
    table = {
        ".corp.example": "corp.example",
        ".eu.corp.example": "eu.corp.example",
        "legacy.corp.example": "legacy.example",
    }
    assert _signing_domain("sales.corp.example", table) == "corp.example"
    assert _signing_domain("paris.eu.corp.example", table) == "eu.corp.example"
    assert _signing_domain("legacy.corp.example", table) == "legacy.example"
    # The dotted key is for subdomains only; the domain itself signs as itself.
    assert _signing_domain("corp.example", table) == "corp.example"
    assert _signing_domain("notcorp.example", table) == "notcorp.example"


def test_allowed_users_and_networks_each_admit_a_trusted_client(keys: Keys) -> None:
    key = load_key(keys.ed25519.path)
    domain = _Domain(
        "shop.example",
        (("ed1", key),),
        (ipaddress.ip_network("10.20.0.0/24"),),
        frozenset({"shop-mailer"}),
    )

    def session(ip: str, user: str | None = None, trusted: bool = True) -> Session:
        return Session(id="s", client_ip=ip, authenticated_as=user, trusted=trusted)

    assert _client_allowed(session("10.20.0.7"), domain) is None
    assert _client_allowed(session("192.0.2.1", "shop-mailer"), domain) is None
    assert _client_allowed(session("192.0.2.1", "alice"), domain) == (
        "client 192.0.2.1 (user alice) is not in allowed_networks/allowed_users of shop.example"
    )
    # In an allowed network but untrusted (not in mynetworks, no AUTH): still not signed.
    assert _client_allowed(session("10.20.0.7", trusted=False), domain) == (
        "client 10.20.0.7 is neither in mynetworks nor authenticated"
    )
    # A domain without restrictions signs for every trusted client, and only those.
    open_domain = dataclasses.replace(domain, networks=(), users=frozenset())
    assert _client_allowed(session("192.0.2.1", "alice"), open_domain) is None
    assert _client_allowed(session("192.0.2.1", trusted=False), open_domain) is not None
