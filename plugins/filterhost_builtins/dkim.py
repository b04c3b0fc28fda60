"""The ``dkim`` plugin: DKIM-sign outgoing mail (RFC 6376) with dkimpy, RSA and Ed25519.

The signing domain comes from the message's From header (``domain_map`` may send a sender
domain to another signing domain). A message is signed only when every one of these holds:

* the client may send for that domain: it is trusted (``mynetworks`` or AUTH) and, when the
  domain lists ``allowed_networks`` / ``allowed_users``, it is one of them. Signing mail from
  anyone else would launder it: an outsider's forgery would leave with our signature;
* there is a key for the domain (never a signature for a domain without one);
* nothing runs after this plugin that can edit headers: ``--check-config`` refuses such an
  order, because an edit after signing breaks the signature at the receiver.

Each configured key signs (an RSA and an Ed25519 key together give two signatures, as RFC 8463
recommends). Mail that is not signed is relayed unchanged, and why is logged with the queue id.
``filterhost dkim keygen`` (:func:`keygen_main`) writes keys and prints the DNS record to
publish. See docs/plugins/dkim.md.

This plugin uses only the public API (``from filterhost import ...``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.parser
import email.policy
import importlib.metadata
import ipaddress
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import dkim
import dkim.crypto
import dkim.util
import dns.exception
import dns.nameserver
import dns.resolver
import nacl.signing

from filterhost import Config, ConfigRegistry, Duration, Problem, Session, Transaction, hookimpl

__all__ = [
    "DEFAULT_OVERSIGN_HEADERS",
    "DEFAULT_SIGN_HEADERS",
    "DkimConfig",
    "DkimDomain",
    "DkimKey",
    "DkimKeyError",
    "DkimPlugin",
    "SigningKey",
    "dns_record",
    "generate_key",
    "keygen_main",
    "load_key",
    "parse_key",
    "published_problem",
    "zone_line",
]

SECTION = "dkim"
"""The ``[plugins.dkim]`` table, and the name the entry point registers."""

ENTRY_POINT_GROUP = "filterhost.plugins"
"""Where installed plugins are declared (the plugin guide's packaging section)."""

MIN_RSA_BITS = 2048
"""RFC 8301 3.2: signers MUST use at least 1024 bits and SHOULD use 2048; we hold to the SHOULD."""

DEFAULT_SIGN_HEADERS = [
    "From", "Sender", "Reply-To", "Subject", "Date", "Message-ID", "To", "Cc",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Content-ID",
    "Content-Description", "Resent-Date", "Resent-From", "Resent-Sender", "Resent-To",
    "Resent-Cc", "Resent-Message-ID", "In-Reply-To", "References", "List-Id", "List-Help",
    "List-Unsubscribe", "List-Subscribe", "List-Post", "List-Owner", "List-Archive",
]  # fmt: skip
"""RFC 6376 section 5.4.1's list (dkimpy's ``DKIM.SHOULD``), in a readable order."""

DEFAULT_OVERSIGN_HEADERS = ["From", "Reply-To", "Subject", "To", "Cc"]
"""Signed once more than they occur, so that a copy with one more of them (a second From that a
mail client might show) fails verification. These are the fields a reader sees."""

# RFC 6376 5.4: fields a signer should not sign (they change in transit); dkimpy refuses them.
_MUST_NOT_SIGN = frozenset(
    {"return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature"}
)

Severity = Literal["error", "warning"]

_ALGORITHM = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}

# DER of a PKCS#8 Ed25519 private key (RFC 8410) before its 32-byte seed, as openssl writes it.
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
# AlgorithmIdentifier of rsaEncryption (1.2.840.113549.1.1.1) with its NULL parameters.
_RSA_ALGORITHM_ID = bytes.fromhex("300d06092a864886f70d0101010500")

_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})+$")
_SELECTOR = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_TXT_CHUNK = 255  # RFC 1035 3.3.14: one character-string of a TXT record holds 255 octets

log = logging.getLogger("filterhost.plugins.dkim")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing key of a domain: ``{ selector = "...", key_file = "..." }``."""

    selector: str = field(metadata=_help("the s= selector: the key is published at "
                                         "SELECTOR._domainkey.DOMAIN"))  # fmt: skip
    key_file: str = field(
        metadata=_help("PEM private key (RSA or Ed25519), mode 0600; see filterhost dkim keygen")
    )


@dataclass(frozen=True, slots=True)
class DkimDomain:
    """``[plugins.dkim.domains."example.com"]``: one signing domain's keys and senders."""

    keys: list[DkimKey] = field(
        default_factory=list,
        metadata=_help("each key signs: one RSA and one Ed25519 key give two signatures"),
    )
    allowed_networks: list[str] = field(
        default_factory=list,
        metadata=_help("if set (or allowed_users is): only clients in these networks..."),
    )
    allowed_users: list[str] = field(
        default_factory=list,
        metadata=_help("...or authenticated as one of these users get this domain's signature"),
    )


@dataclass(frozen=True, slots=True)
class DkimConfig:
    """``[plugins.dkim]``: signing domains and their keys, what to sign, how."""

    domains: dict[str, DkimDomain] = field(
        default_factory=dict, metadata=_help("signing domain -> its keys and allowed senders")
    )
    domain_map: dict[str, str] = field(
        default_factory=dict,
        metadata=_help(
            'From domain -> signing domain; ".example.com" matches every subdomain '
            "(the longest match wins); unmapped domains sign as themselves"
        ),
    )
    canonicalization: Literal["relaxed/relaxed", "relaxed/simple"] = field(
        default="relaxed/relaxed", metadata=_help("c= header/body canonicalization")
    )
    sign_headers: list[str] = field(
        default_factory=lambda: list(DEFAULT_SIGN_HEADERS),
        metadata=_help("header fields signed when present (From is required)"),
    )
    oversign_headers: list[str] = field(
        default_factory=lambda: list(DEFAULT_OVERSIGN_HEADERS),
        metadata=_help("signed once more than they occur, so none can be added"),
    )
    check_dns: bool = field(
        default=True,
        metadata=_help("--check-config compares the published TXT records with the keys"),
    )
    dns_timeout: Duration = field(
        default=Duration(5.0), metadata=_help("time for each TXT lookup of --check-config")
    )


# -------------------------------------------------------------------------------- keys


class DkimKeyError(ValueError):
    """A key file that cannot be used: missing, unsafe permissions, unknown format, too short."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key loaded for dkimpy, with the public half that DNS must publish."""

    path: Path
    kind: Literal["rsa", "ed25519"]
    private: bytes
    """What dkimpy's ``sign(privkey=...)`` takes: PEM for RSA, the base64 seed for Ed25519."""
    public: bytes
    """The ``p=`` value, decoded: SubjectPublicKeyInfo DER (RSA), or the 32-byte key."""
    bits: int

    @property
    def algorithm(self) -> bytes:
        """The a= algorithm (``rsa-sha256`` or ``ed25519-sha256``)."""
        return _ALGORITHM[self.kind]


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def _der_integer(value: int) -> bytes:
    # One byte more than the bits need, so that the sign bit of a positive number is 0.
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _rsa_public_der(modulus: int, exponent: int) -> bytes:
    """SubjectPublicKeyInfo of an RSA key (RFC 5280 4.1.2.7): the form DKIM's p= carries."""
    rsa_key = _der(0x30, _der_integer(modulus) + _der_integer(exponent))
    return _der(0x30, _RSA_ALGORITHM_ID + _der(0x03, b"\x00" + rsa_key))


def _pem(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----\n".encode()]
    )


def _ed25519_key(path: Path, seed: bytes) -> SigningKey:
    public = bytes(nacl.signing.SigningKey(seed).verify_key)
    return SigningKey(path, "ed25519", base64.b64encode(seed), public, 256)


def _rsa_key(path: Path, der: bytes) -> SigningKey:
    try:
        parsed = dkim.crypto.parse_private_key(der)
    except (dkim.crypto.UnparsableKeyError, IndexError, ValueError) as exc:
        raise DkimKeyError(f"{path}: not an RSA or Ed25519 private key ({exc})") from None
    modulus, exponent = int(parsed["modulus"]), int(parsed["publicExponent"])
    bits = modulus.bit_length()
    if bits < MIN_RSA_BITS:
        raise DkimKeyError(
            f"{path}: RSA key of {bits} bits; use at least {MIN_RSA_BITS} "
            "(filterhost dkim keygen --bits 2048)"
        )
    # dkimpy reads PKCS#1 and PKCS#8 PEM; hand it one clean form whatever the file's layout.
    pkcs8 = _RSA_ALGORITHM_ID in der[:32]  # PKCS#8 names the algorithm near the start
    private = _pem("PRIVATE KEY" if pkcs8 else "RSA PRIVATE KEY", der)
    return SigningKey(path, "rsa", private, _rsa_public_der(modulus, exponent), bits)


def parse_key(data: bytes, path: Path) -> SigningKey:
    """The key in ``data``, in one of the forms operators have.

    PEM RSA (PKCS#1 or PKCS#8), PEM Ed25519 (PKCS#8), or dkimpy's Ed25519 format (the base64
    32-byte seed, as ``dknewkey`` writes it).
    """
    match = _PEM.search(data)
    if match is None:
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except binascii.Error:
            seed = b""
        if len(seed) == 32:
            return _ed25519_key(path, seed)
        raise DkimKeyError(f"{path}: no PEM private key in the file")
    label = match.group(1).decode()
    if label == "ENCRYPTED PRIVATE KEY":
        raise DkimKeyError(
            f"{path}: the key is encrypted; filterhost needs it unencrypted (mode 0600)"
        )
    if label not in ("PRIVATE KEY", "RSA PRIVATE KEY"):
        raise DkimKeyError(f"{path}: a PEM {label!r}, not a private key")
    try:
        der = base64.b64decode(b"".join(match.group(2).split()), validate=True)
    except binascii.Error as exc:
        raise DkimKeyError(f"{path}: damaged PEM ({exc})") from None
    if label == "PRIVATE KEY" and der.startswith(_ED25519_PKCS8_PREFIX) and len(der) == 48:
        return _ed25519_key(path, der[len(_ED25519_PKCS8_PREFIX) :])
    return _rsa_key(path, der)


def _permission_problem(path: Path, mode: int) -> str | None:
    if mode & 0o077:
        return (
            f"{path}: mode {stat.S_IMODE(mode):04o} lets group or others at the private key; "
            f"chmod 600 {path}"
        )
    return None


def load_key(path: Path) -> SigningKey:
    """Read and check a private key file: a regular file, mode 0600 (or stricter), parseable.

    Raises :class:`DkimKeyError` with the file name and what is wrong.
    """
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise DkimKeyError(f"{path}: not a regular file")
        problem = _permission_problem(path, st.st_mode)
        if problem is not None:
            raise DkimKeyError(problem)
        data = path.read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"{path}: {exc.strerror or exc}") from None
    return parse_key(data, path)


def dns_record(key: SigningKey) -> str:
    """The TXT value to publish for ``key``: ``v=DKIM1; k=rsa; p=...``."""
    return f"v=DKIM1; k={key.kind}; p={base64.b64encode(key.public).decode()}"


def zone_line(domain: str, selector: str, key: SigningKey, ttl: int = 3600) -> str:
    """The record as a zone-file line, split into 255-octet strings as TXT requires."""
    value = dns_record(key)
    chunks = [value[i : i + _TXT_CHUNK] for i in range(0, len(value), _TXT_CHUNK)]
    strings = " ".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey.{domain}. {ttl} IN TXT {strings}"


# -------------------------------------------------------------------------------- keygen


def generate_key(
    domain: str,
    selector: str,
    kind: Literal["rsa", "ed25519"] = "rsa",
    bits: int = MIN_RSA_BITS,
    directory: Path = Path(),
) -> tuple[Path, SigningKey]:
    """Write a new private key to ``directory/DOMAIN.SELECTOR.key`` (mode 0600); never overwrite.

    RSA keys are made by ``openssl genpkey`` (dkimpy's ``dknewkey`` does the same), Ed25519
    keys from 32 random bytes; both are written as PKCS#8 PEM, which openssl and OpenDKIM read.
    Raises :class:`DkimKeyError` (bad arguments, existing file) or OSError.
    """
    domain = domain.lower().rstrip(".")
    if not _DOMAIN.match(domain):
        raise DkimKeyError(f"{domain!r} is not a domain name (use the A-label form of IDNs)")
    if not _SELECTOR.match(selector):
        raise DkimKeyError(f"{selector!r} is not a valid selector (letters, digits, '-', '.')")
    if kind == "rsa":
        if not MIN_RSA_BITS <= bits <= 8192:
            raise DkimKeyError(f"--bits {bits}: use from {MIN_RSA_BITS} to 8192")
        openssl = shutil.which("openssl")
        if openssl is None:
            raise DkimKeyError("openssl is needed to make RSA keys (apt install openssl)")
        argv = [openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}"]
        try:
            # Fixed arguments (bits is an int checked above): nothing from outside is run.
            made = subprocess.run(argv, capture_output=True, check=True, timeout=300)  # noqa: S603
        except subprocess.CalledProcessError as exc:
            detail = exc.stderr.decode(errors="replace").strip()
            raise DkimKeyError(f"openssl genpkey failed: {detail}") from None
        pem = made.stdout
    else:
        pem = _pem("PRIVATE KEY", _ED25519_PKCS8_PREFIX + os.urandom(32))
    path = directory / f"{domain}.{selector}.key"
    key = parse_key(pem, path)  # what the plugin will read: check before writing
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # O_EXCL: an existing key may already be published; replacing it would break signing.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise DkimKeyError(f"{path} exists; choose another selector (or remove it first)") from None
    try:
        os.fchmod(fd, 0o600)  # the mode given to open() is reduced by the umask, never raised
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path, key


def keygen_main(
    domain: str, selector: str, kind: Literal["rsa", "ed25519"], bits: int, directory: Path
) -> int:
    """``filterhost dkim keygen``: write the key, print the DNS record and the config lines."""
    try:
        path, key = generate_key(domain, selector, kind, bits, directory)
    except (DkimKeyError, OSError) as exc:
        print(f"filterhost dkim keygen: {exc}", file=sys.stderr)
        return 1
    domain = domain.lower().rstrip(".")
    size = f"{key.bits} bits" if key.kind == "rsa" else "Ed25519"
    print(f"# wrote {path} ({size}, mode 0600); make it readable by filterhost's user only")
    print(f"# publish this TXT record in the DNS zone of {domain}:")
    print(zone_line(domain, selector, key))
    print("# then add the key to conf.d (filterhost --check-config compares it with DNS):")
    print(f'[[plugins.dkim.domains."{domain}".keys]]')
    print(f'selector = "{selector}"')
    print(f'key_file = "{path.absolute()}"')
    return 0


# -------------------------------------------------------------------------------- plugin


@dataclass(frozen=True, slots=True)
class _Domain:
    name: str
    keys: tuple[tuple[str, SigningKey], ...]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    users: frozenset[str]

    @property
    def restricted(self) -> bool:
        return bool(self.networks or self.users)


@dataclass(frozen=True, slots=True)
class _State:
    domains: dict[str, _Domain]
    domain_map: dict[str, str]
    canonicalize: tuple[bytes, bytes]
    sign: tuple[str, ...]
    oversign: frozenset[str]


def _normal_domain(domain: str) -> str:
    domain = domain.strip().lower().rstrip(".")
    if not domain.isascii():
        try:
            return domain.encode("idna").decode("ascii")
        except UnicodeError:
            return domain
    return domain


def _map_key(pattern: str) -> str:
    """A domain_map key normalized: ".example.com" (subdomains) keeps its leading dot."""
    if pattern.startswith("."):
        return "." + _normal_domain(pattern[1:])
    return _normal_domain(pattern)


def _lower_names(names: list[str]) -> list[str]:
    seen: list[str] = []
    for name in names:
        if name.lower() not in seen:
            seen.append(name.lower())
    return seen


def _include_headers(state: _State, present: list[bytes]) -> list[bytes]:
    """The h= list: each signed field as often as it occurs, oversigned ones once more.

    dkimpy takes a repeated name from the bottom up, as RFC 6376 5.4.2 says; an extra
    occurrence signs "no further field of this name", so adding one breaks the signature.
    """
    counts: dict[str, int] = {}
    for raw_name in present:
        key = raw_name.decode("ascii", "replace").lower()
        counts[key] = counts.get(key, 0) + 1
    out: list[bytes] = []
    for name in state.sign:
        times = counts.get(name, 0) + (1 if name in state.oversign else 0)
        out.extend([name.encode("ascii")] * times)
    return out


def _sign(raw: bytes, domain: _Domain, state: _State) -> list[tuple[str, SigningKey, str]]:
    """One DKIM-Signature value per key of ``domain`` (runs in a thread: RSA takes ~10 ms)."""
    out = []
    for selector, key in domain.keys:
        signer = dkim.DKIM(raw, signature_algorithm=key.algorithm)
        include = _include_headers(state, [name for name, _ in signer.headers])
        header = signer.sign(
            selector.encode(),
            domain.name.encode(),
            key.private,
            canonicalize=state.canonicalize,
            include_headers=include,
        )
        _, _, value = bytes(header).decode("ascii").partition(":")
        # Message.add_header folds the value itself; unfolding keeps every space, so the
        # relaxed header canonicalization (always used) sees the same field dkimpy hashed.
        out.append((selector, key, value.replace("\r\n", "").strip()))
    return out


def _from_domain(raw: bytes) -> tuple[str | None, str]:
    """The From header's domain, or None and why it cannot be had."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[: end + 2]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
    try:
        fields = parsed.get_all("From") or []
        if not fields:
            return None, "no From header"
        if len(fields) > 1:
            return None, f"{len(fields)} From headers (RFC 5322 allows one)"
        addresses = fields[0].addresses
    except (ValueError, LookupError, IndexError, AttributeError, TypeError) as exc:
        return None, f"the From header cannot be parsed ({type(exc).__name__})"
    domains = {_normal_domain(a.domain) for a in addresses if a.domain}
    if not domains:
        return None, "the From header has no address with a domain"
    if len(domains) > 1:
        return (
            None,
            f"the From header has addresses in several domains ({', '.join(sorted(domains))})",
        )
    return domains.pop(), ""


def _signing_domain(from_domain: str, domain_map: dict[str, str]) -> str:
    if from_domain in domain_map:
        return domain_map[from_domain]
    best = ""
    for pattern in domain_map:
        if pattern.startswith(".") and from_domain.endswith(pattern) and len(pattern) > len(best):
            best = pattern
    return domain_map[best] if best else from_domain


def _client_allowed(session: Session, domain: _Domain) -> str | None:
    """Why the client may not have mail signed for ``domain``, or None when it may."""
    who = f"client {session.client_ip}" + (
        f" (user {session.authenticated_as})" if session.authenticated_as else ""
    )
    if not session.trusted:
        return f"{who} is neither in mynetworks nor authenticated"
    if not domain.restricted:
        return None
    if session.authenticated_as is not None and session.authenticated_as in domain.users:
        return None
    try:
        address = session.address
    except ValueError:
        address = None
    if address is not None and any(address in net for net in domain.networks):
        return None
    return f"{who} is not in allowed_networks/allowed_users of {domain.name}"


def _plugins_after(order: list[str]) -> list[str]:
    if SECTION not in order:
        return []
    return order[order.index(SECTION) + 1 :]


def _order_problems(config: Config) -> list[Problem]:
    """Plugins after dkim in the chain that may edit headers: each would break the signatures.

    The check looks at installed plugins (the ``filterhost.plugins`` entry points, as
    filterhost loads them): a plugin that implements ``filterhost_message`` must declare
    ``edits_headers = False`` to run after dkim.
    """
    later = _plugins_after(config.plugins.order)
    if not later:
        return []
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    problems = []
    for name in later:
        ep = installed.get(name)
        why = None
        if ep is None:
            why = "cannot be inspected (not an installed entry point)"
        else:
            try:
                plugin = ep.load()
            except Exception:  # reported by the plugin loader; treat as "may edit"
                plugin = None
            if plugin is None:
                why = "cannot be loaded"
            elif callable(getattr(plugin, "filterhost_message", None)) and getattr(
                plugin, "edits_headers", True
            ):
                why = "implements filterhost_message and does not declare edits_headers = False"
        if why is not None:
            problems.append(
                Problem(
                    config.where("plugins.order"),
                    "plugins.order",
                    f"{name!r} runs after 'dkim' and {why}: a header edit after signing breaks "
                    "the DKIM signature at every receiver; put 'dkim' last in the chain",
                )
            )
    return problems


def _resolver(config: Config, timeout: float) -> dns.resolver.Resolver:
    nameservers = config.relay.nameserver_addresses
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in nameservers
        ]
    else:
        resolver = dns.resolver.Resolver()
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


def published_problem(txt: list[bytes], key: SigningKey) -> tuple[Severity, str] | None:
    """Compare the TXT strings found at the selector's name with ``key``.

    Returns None when a record matches, else (severity, what is wrong).
    """
    if not txt:
        return "warning", "no TXT record is published"
    found = []
    for record in txt:
        try:
            tags = dkim.util.parse_tag_value(record)
        except dkim.util.InvalidTagValueList as exc:
            found.append(f"a malformed record ({exc})")
            continue
        if tags.get(b"v", b"DKIM1") != b"DKIM1":
            continue  # not a DKIM key record (RFC 6376 3.6.1: v= must be first and DKIM1)
        kind = tags.get(b"k", b"rsa").decode("ascii", "replace")
        p = b"".join(tags.get(b"p", b"").split())
        if not p:
            found.append("an empty p= (the key is revoked)")
            continue
        try:
            public = base64.b64decode(p, validate=True)
        except binascii.Error:
            found.append("a p= that is not base64")
            continue
        if kind != key.kind:
            found.append(f"a k={kind} key, but the file holds an {key.kind} key")
            continue
        if _same_public(kind, public, key):
            if tags.get(b"t", b"").replace(b" ", b"") in (b"y", b"y:s", b"s:y"):
                return "warning", "the record has t=y (testing): receivers treat mail as unsigned"
            return None
        found.append("a different public key")
    if not found:
        return "warning", "no DKIM1 TXT record is published"
    return "error", "the published record does not match the key file: it has " + "; ".join(found)


def _same_public(kind: str, public: bytes, key: SigningKey) -> bool:
    if kind == "ed25519":
        return public == key.public
    try:
        theirs = dkim.crypto.parse_public_key(public)
        ours = dkim.crypto.parse_public_key(key.public)
    except (dkim.crypto.UnparsableKeyError, IndexError, ValueError):
        return False
    return bool(
        theirs["modulus"] == ours["modulus"] and theirs["publicExponent"] == ours["publicExponent"]
    )


def _lookup(resolver: dns.resolver.Resolver, name: str) -> list[bytes] | str:
    """The TXT records at ``name`` (each joined), [] when there are none, or why we do not know."""
    try:
        answer = resolver.resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:
        return f"{type(exc).__name__}: {exc}"
    return [b"".join(rdata.strings) for rdata in answer]


def _settings_problems(cfg: DkimConfig, problem: Callable[..., None]) -> None:
    """Header lists, domain names, the map and allowed networks."""
    signed = _lower_names(cfg.sign_headers)
    oversigned = _lower_names(cfg.oversign_headers)
    if "from" not in signed:
        problem("sign_headers", "must include From (RFC 6376 5.4: From is always signed)")
    for name in sorted(set(signed + oversigned) & _MUST_NOT_SIGN):
        key = "sign_headers" if name in signed else "oversign_headers"
        problem(key, f"{name!r} changes in transit and must not be signed (RFC 6376 5.4)")
    if "from" not in oversigned:
        problem(
            "oversign_headers",
            "From is not oversigned: a copy with a second From added would still verify",
            "warning",
        )
    if not cfg.domains:
        problem("domains", "no signing domain is configured: nothing is signed", "warning")
    known = {_normal_domain(d) for d in cfg.domains}
    for source, target in cfg.domain_map.items():
        if _normal_domain(target) not in known:
            problem(f"domain_map.{source}", f"{target!r} is not in domains (it has no key)")
    for name, settings in cfg.domains.items():
        where = f"domains.{name}"
        if not _DOMAIN.match(_normal_domain(name)):
            problem(where, f"{name!r} is not a domain name")
        if not settings.keys:
            problem(f"{where}.keys", "no key: mail of this domain is not signed", "warning")
        for net in settings.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                problem(f"{where}.allowed_networks", f"{net!r} is not a network (10.0.0.0/8)")


def _key_problems(
    cfg: DkimConfig, problem: Callable[..., None]
) -> list[tuple[str, str, SigningKey]]:
    """Load every key file; return (domain, selector, key) of those that load."""
    loaded: list[tuple[str, str, SigningKey]] = []
    for name, settings in cfg.domains.items():
        where = f"domains.{name}.keys"
        selectors = [k.selector for k in settings.keys]
        for selector in sorted({s for s in selectors if selectors.count(s) > 1}):
            problem(where, f"selector {selector!r} is listed twice")
        for entry in settings.keys:
            if not _SELECTOR.match(entry.selector):
                problem(where, f"{entry.selector!r} is not a valid selector")
                continue
            try:
                key = load_key(Path(entry.key_file))
            except DkimKeyError as exc:
                problem(where, str(exc))
                continue
            loaded.append((_normal_domain(name), entry.selector, key))
    return loaded


def _dns_problems(
    resolver: dns.resolver.Resolver,
    keys: list[tuple[str, str, SigningKey]],
    problem: Callable[..., None],
) -> None:
    """Compare the TXT record at SELECTOR._domainkey.DOMAIN with each key.

    After a lookup that times out (or no server answers), the rest are not tried: each would
    wait as long, and --check-config should not take minutes to say the resolver is down.
    """
    down: str | None = None
    for domain, selector, key in keys:
        name = f"{selector}._domainkey.{domain}"
        publish = f"publish: {zone_line(domain, selector, key)}"
        found = down if down is not None else _lookup(resolver, name)
        if isinstance(found, str):
            if down is None and found.startswith(("LifetimeTimeout", "Timeout", "NoNameservers")):
                down = found
            what = f"{name} TXT could not be checked ({found}); {publish}"
            problem(f"domains.{domain}.keys", what, "warning")
            continue
        wrong = published_problem(found, key)
        if wrong is not None:
            severity, what = wrong
            what = f"{name} TXT: {what} ({key.path}); {publish}"
            problem(f"domains.{domain}.keys", what, severity)


class DkimPlugin:
    """DKIM-sign the mail of trusted clients for the domains that have keys.

    Registered as ``dkim`` in the ``filterhost.plugins`` entry-point group. It must be last in
    ``[plugins] order`` (after every plugin that may edit headers); ``--check-config`` says so.
    """

    timeout: float = 60.0
    """Seconds per call: dkimpy canonicalizes in Python, about 0.05 s per MB per key."""

    on_error: Literal["tempfail", "pass", "reject"] = "tempfail"
    """A bug (not a message dkimpy cannot sign, which is relayed unsigned) refuses for now, as
    OpenDKIM's On-InternalError does: mail that must be signed is not sent unsigned quietly."""

    edits_headers = True
    """It adds DKIM-Signature; so another signer cannot run after it either."""

    def __init__(self) -> None:
        self._state: _State | None = None

    # -- setup hooks --------------------------------------------------------------------------

    @hookimpl
    def filterhost_add_config(self, registry: ConfigRegistry) -> None:
        """Declare ``[plugins.dkim]``."""
        registry.add(SECTION, DkimConfig, "DKIM signing of outgoing mail")

    @hookimpl
    def filterhost_configure(self, config: Config) -> None:
        """Load every key (the server starts only if --check-config found no error)."""
        cfg = config.plugin_config(DkimConfig)
        domains: dict[str, _Domain] = {}
        for name, settings in cfg.domains.items():
            domain = _normal_domain(name)
            keys = tuple((k.selector, load_key(Path(k.key_file))) for k in settings.keys)
            networks = tuple(
                ipaddress.ip_network(n, strict=False) for n in settings.allowed_networks
            )
            domains[domain] = _Domain(domain, keys, networks, frozenset(settings.allowed_users))
        sign = _lower_names([*cfg.sign_headers, *cfg.oversign_headers])
        header_c, _, body_c = cfg.canonicalization.partition("/")
        self._state = _State(
            domains=domains,
            domain_map={_map_key(k): _normal_domain(v) for k, v in cfg.domain_map.items()},
            canonicalize=(header_c.encode(), body_c.encode()),
            sign=tuple(sign),
            oversign=frozenset(_lower_names(cfg.oversign_headers)),
        )

    @hookimpl
    def filterhost_check_config(self, config: Config) -> list[Problem]:
        """Settings, the chain order, each key file, and (``check_dns``) the published records.

        Key files that cannot be used and a published record that differs from its key are
        errors; a record that is missing or cannot be looked up right now is a warning (the
        operator may be about to publish it). A plain setup hook: blocking DNS, bounded by
        ``dns_timeout`` per lookup.
        """
        cfg = config.plugin_config(DkimConfig)
        problems = _order_problems(config)

        def problem(key: str, message: str, severity: Severity = "error") -> None:
            dotted = f"plugins.{SECTION}.{key}"
            problems.append(Problem(config.where(dotted), dotted, message, severity=severity))

        _settings_problems(cfg, problem)
        keys = _key_problems(cfg, problem)
        if cfg.check_dns and not any(p.severity == "error" for p in problems):
            resolver = _resolver(config, float(cfg.dns_timeout))
            _dns_problems(resolver, keys, problem)
        return problems

    # -- the message chain --------------------------------------------------------------------

    @hookimpl
    async def filterhost_message(self, transaction: Transaction) -> None:
        """Sign the message when its client may send for the From domain and a key exists."""
        state = self._state
        if state is None:
            raise RuntimeError("dkim: filterhost_configure was not called")
        qid = transaction.queue_id or "-"
        raw = transaction.message.as_bytes()
        from_domain, why = _from_domain(raw)
        domain = None
        if from_domain is not None:
            signing = _signing_domain(from_domain, state.domain_map)
            domain = state.domains.get(signing)
            if domain is None or not domain.keys:
                via = f" (mapped from {from_domain})" if signing != from_domain else ""
                why = f"no key for {signing}{via}"
                domain = None
            else:
                why = _client_allowed(transaction.session, domain) or ""
                if why:
                    domain = None
        if domain is None:
            return self._unsigned(transaction, qid, why)
        try:
            signatures = await asyncio.to_thread(_sign, raw, domain, state)
        except dkim.DKIMException as exc:
            # This message cannot be signed (dkimpy finds it malformed); it never will be, so
            # a tempfail would only delay it: relay it unsigned, and say so.
            log.warning("%s: dkim: not signed: dkimpy refused the message: %s", qid, exc)
            transaction.notes[SECTION] = {"signed": False, "reason": f"dkimpy: {exc}"}
            return None
        # Each signature covers the message without the others (DKIM-Signature is never in h=).
        for _, _, value in reversed(signatures):
            transaction.message.add_header("DKIM-Signature", value)
        done = ", ".join(f"s={s} a={k.algorithm.decode()}" for s, k, _ in signatures)
        log.info("%s: dkim: signed d=%s %s", qid, domain.name, done)
        transaction.notes[SECTION] = {
            "signed": True,
            "domain": domain.name,
            "selectors": [s for s, _, _ in signatures],
        }
        return None

    @staticmethod
    def _unsigned(transaction: Transaction, qid: str, why: str) -> None:
        log.info("%s: dkim: not signed: %s", qid, why)
        transaction.notes[SECTION] = {"signed": False, "reason": why}
