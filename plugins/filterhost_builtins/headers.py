"""The ``headers`` plugin: declarative header rules, topology hiding and sender rewriting.

At the end of DATA, in this order:

1. **Topology hiding** (``strip_topology = true``): ``Received`` fields whose "from" part names a
   host in ``internal_networks`` or ``internal_domains`` are removed, and so are the
   ``topology_headers`` (``X-Originating-IP``). filterhost's own ``Received`` field (the top
   one) is kept without its "from" part, so every pass through this relay still counts as a
   hop and a mail loop still ends at ``max_hops``.
2. **Sender rewriting** (``sender_rewrite``, like Postfix's ``smtp_generic_maps``): internal
   addresses become public ones in the envelope sender and in the ``rewrite_headers``
   (``From``, ``Reply-To``). Only the address changes; display names are kept.
3. **Rules** (``[[plugins.headers.rules]]``), in the order written: add, remove (by name or by
   a pattern on the name, optionally only fields whose value matches), replace.

Every header field the plugin does not touch leaves byte for byte as it came; the body is never
touched. See docs/plugins/headers.md.

This plugin uses only the public API (``from filterhost import ...``).
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from filterhost import Config, ConfigRegistry, Message, Problem, Transaction, hookimpl

__all__ = ["HeaderRule", "HeadersConfig", "HeadersPlugin", "SenderRewriter"]

SECTION = "headers"
"""The ``[plugins.headers]`` table, and the name the entry point registers."""

DEFAULT_INTERNAL_NETWORKS = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)
# Header fields that hold mailboxes a sender rewrite may change (RFC 5322 3.6.2, 3.6.6).
ADDRESS_HEADERS = frozenset({"from", "sender", "reply-to", "resent-from", "resent-sender"})

_FIELD_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 2.2: printable ASCII except ":"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
# In the "from" part of a Received field: address literals and bare addresses, host names.
_IP_LITERAL = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")
_BARE_IP = re.compile(r"(?<![\w.:])(\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]*:[0-9A-Fa-f:.]+)(?![\w.:])")
_HOST_NAME = re.compile(rf"(?<![\w.-])({_LABEL}(?:\.{_LABEL})+)(?![\w-])")
_FROM_PART = re.compile(r"^\s*from\s+(?P<from>.*?)\s+by\s+(?P<rest>.*)$", re.IGNORECASE | re.DOTALL)

log = logging.getLogger("filterhost.plugins.headers")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """One ``[[plugins.headers.rules]]`` entry; rules run in the order they are written."""

    action: Literal["add", "remove", "replace"] = field(
        metadata=_help('"add", "remove" or "replace"')
    )
    name: str = field(
        default="", metadata=_help("the field name (add, replace; remove: this name)")
    )
    pattern: str = field(
        default="",
        metadata=_help("remove: a regular expression searched in field names (case-insensitive)"),
    )
    value: str = field(default="", metadata=_help("add, replace: the field's value"))
    value_pattern: str = field(
        default="",
        metadata=_help("remove: only fields whose value matches (regular expression, searched)"),
    )
    position: Literal["top", "bottom"] = field(
        default="top", metadata=_help("add: at the top of the header or at the bottom")
    )


@dataclass(frozen=True, slots=True)
class HeadersConfig:
    """``[plugins.headers]``: rules, topology hiding and sender rewriting."""

    rules: list[HeaderRule] = field(
        default_factory=list,
        metadata=_help("[[plugins.headers.rules]] tables: add, remove, replace, in order"),
    )
    strip_topology: bool = field(
        default=False,
        metadata=_help(
            "remove Received fields from internal hosts and the topology_headers; "
            "filterhost's own Received field loses its from part"
        ),
    )
    internal_networks: list[str] = field(
        default_factory=lambda: list(DEFAULT_INTERNAL_NETWORKS),
        metadata=_help("networks (CIDR) whose addresses are internal hosts"),
    )
    internal_domains: list[str] = field(
        default_factory=list,
        metadata=_help("domains whose hosts (and their subdomains' hosts) are internal"),
    )
    topology_headers: list[str] = field(
        default_factory=lambda: ["X-Originating-IP"],
        metadata=_help("fields removed whole when strip_topology is on"),
    )
    sender_rewrite: dict[str, str] = field(
        default_factory=dict,
        metadata=_help(
            'internal -> public sender addresses: "user@corp.local" = "user@example.com", '
            '"@corp.local" = "@example.com" (keeps the local part), '
            '".corp.local" = "@example.com" (subdomains)'
        ),
    )
    rewrite_envelope_sender: bool = field(
        default=True, metadata=_help("apply sender_rewrite to the envelope sender (MAIL FROM)")
    )
    rewrite_headers: list[str] = field(
        default_factory=lambda: ["From", "Reply-To"],
        metadata=_help("address fields sender_rewrite applies to (display names are kept)"),
    )


# -- checking -----------------------------------------------------------------------------------


def _regex_problem(text: str) -> str | None:
    try:
        re.compile(text)
    except re.error as exc:
        return f"{text!r} is not a regular expression: {exc}"
    return None


def _rule_problems(rule: HeaderRule) -> list[tuple[str, str, bool]]:
    """(field, message, is_warning) for each problem of one rule."""
    out: list[tuple[str, str, bool]] = []
    if rule.name and not _FIELD_NAME.match(rule.name):
        out.append(("name", f"{rule.name!r} is not a header field name", False))
    if any(c in rule.value for c in "\r\n\0"):
        out.append(("value", "must be a single line", False))
    for key in ("pattern", "value_pattern"):
        problem = _regex_problem(getattr(rule, key)) if getattr(rule, key) else None
        if problem is not None:
            out.append((key, problem, False))
    if rule.action == "remove":
        return out + _remove_rule_problems(rule)
    article = "an" if rule.action == "add" else "a"
    if not rule.name:
        out.append(("name", f"{article} {rule.action} rule needs the field name", False))
    if not rule.value.strip():
        out.append(("value", f"{article} {rule.action} rule needs a value", False))
    elif not out:
        try:  # what the rule will do to every message, tried once on an empty one
            Message(b"\r\n").add_header(rule.name, rule.value)
        except ValueError as exc:
            out.append(("value", str(exc), False))
    out.extend(
        (key, f"only remove rules take {key}", False)
        for key in ("pattern", "value_pattern")
        if getattr(rule, key)
    )
    return out


def _remove_rule_problems(rule: HeaderRule) -> list[tuple[str, str, bool]]:
    out: list[tuple[str, str, bool]] = []
    if bool(rule.name) == bool(rule.pattern):
        out.append(("name", "a remove rule needs either name or pattern (not both)", False))
    if rule.value:
        out.append(("value", "a remove rule takes no value (use value_pattern)", False))
    removes_received = rule.name.lower() == "received" or bool(
        rule.pattern
        and _regex_problem(rule.pattern) is None
        and re.search(rule.pattern, "Received", re.IGNORECASE)
    )
    if removes_received and not rule.value_pattern:
        out.append(
            (
                "name" if rule.name else "pattern",
                "removes every Received field: mail loops are no longer detected "
                "(max_hops); prefer strip_topology or a value_pattern",
                True,
            )
        )
    return out


def _rewrite_key_problem(key: str, value: str) -> str | None:
    lookup = key.strip().lower()
    if lookup.startswith("."):
        if not _DOMAIN.match(lookup[1:]):
            return f'{key!r}: expected a domain after the dot, such as ".corp.example"'
    elif lookup.startswith("@"):
        if not _DOMAIN.match(lookup[1:]):
            return f'{key!r}: expected a domain after "@", such as "@corp.example"'
    else:
        local, at, domain = lookup.rpartition("@")
        if not at or not local or not _DOMAIN.match(domain):
            return f'{key!r}: expected "user@domain", "@domain" or ".domain"'
    target = value.strip()
    _, at, domain = target.rpartition("@")
    if not at or not _DOMAIN.match(domain) or any(c.isspace() or c in "<>" for c in target):
        return f'{key!r} = {value!r}: the value must be "@domain" or "user@domain"'
    return None


def _problems(cfg: HeadersConfig, config: Config) -> list[Problem]:
    """Everything wrong with ``cfg``, each with the file and key that set it."""
    prefix = f"plugins.{SECTION}"
    problems: list[Problem] = []

    def add(key: str, message: str, *, warning: bool = False, where: str | None = None) -> None:
        problems.append(
            Problem(
                config.where(where or f"{prefix}.{key}"),
                f"{prefix}.{key}",
                message,
                severity="warning" if warning else "error",
            )
        )

    for i, rule in enumerate(cfg.rules, 1):
        for key, message, warning in _rule_problems(rule):
            add(f"rules[{i}].{key}", message, warning=warning, where=f"{prefix}.rules")
    for i, net in enumerate(cfg.internal_networks, 1):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            add("internal_networks", f'item {i}: {net!r} is not a network such as "10.0.0.0/8"')
    for i, domain in enumerate(cfg.internal_domains, 1):
        if not _DOMAIN.match(domain.strip().lstrip(".")):
            add("internal_domains", f'item {i}: {domain!r} is not a domain such as "corp.local"')
    for i, name in enumerate(cfg.topology_headers, 1):
        if not _FIELD_NAME.match(name):
            add("topology_headers", f"item {i}: {name!r} is not a header field name")
    for i, name in enumerate(cfg.rewrite_headers, 1):
        if name.lower() not in ADDRESS_HEADERS:
            add(
                "rewrite_headers",
                f"item {i}: {name!r} is not a sender address field "
                "(From, Sender, Reply-To, Resent-From, Resent-Sender)",
            )
    for key, value in cfg.sender_rewrite.items():
        text = _rewrite_key_problem(key, value)
        if text is not None:
            add("sender_rewrite", text, where=f"{prefix}.sender_rewrite.{key}")
    return problems


# -- sender rewriting ---------------------------------------------------------------------------


class SenderRewriter:
    """Map internal sender addresses to public ones (Postfix ``smtp_generic_maps`` semantics).

    Lookups are case-insensitive, most specific first: the whole address, then ``@domain``,
    then ``.parent`` for each parent domain. A value ``@domain`` keeps the local part; a value
    ``user@domain`` replaces the whole address.
    """

    def __init__(self, table: dict[str, str]) -> None:
        self.table = {k.strip().lower(): v.strip() for k, v in table.items()}

    def __bool__(self) -> bool:
        return bool(self.table)

    def rewrite(self, address: str) -> str | None:
        """The public form of ``address``, or None when no entry applies."""
        local, at, domain = address.rpartition("@")
        if not at or not local:
            return None
        domain = domain.lower().rstrip(".")
        target: str | None = self.table.get(f"{local.lower()}@{domain}")
        if target is None:
            target = self.table.get(f"@{domain}")
        if target is None:
            labels = domain.split(".")
            for i in range(1, len(labels)):
                target = self.table.get("." + ".".join(labels[i:]))
                if target is not None:
                    break
        if target is None:
            return None
        return f"{local}{target}" if target.startswith("@") else target


def _rewritten_field(raw_value: Any, rewriter: SenderRewriter) -> str | None:
    """The field's new value with its addresses rewritten, or None when nothing changes.

    ``raw_value`` is a parsed address header (:mod:`email.headerregistry`): display names come
    out decoded and are encoded again by :func:`email.utils.formataddr` (RFC 2047 for
    non-ASCII), so a name with commas or quotes survives, and an address is never put inside
    an encoded word.
    """
    if getattr(raw_value, "defects", None) or any(g.display_name for g in raw_value.groups):
        raise ValueError("unusual syntax (a group or a parse defect)")
    changed = False
    out: list[str] = []
    for address in raw_value.addresses:
        spec = address.addr_spec
        new = rewriter.rewrite(spec)
        if new is not None and new != spec:
            changed = True
            spec = new
        out.append(email.utils.formataddr((address.display_name, spec), charset="utf-8"))
    return ", ".join(out) if changed else None


# -- topology -----------------------------------------------------------------------------------


class _Topology:
    def __init__(self, cfg: HeadersConfig) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in cfg.internal_networks]
        self.domains = tuple(d.strip().lower().strip(".") for d in cfg.internal_domains)
        self.headers = tuple(cfg.topology_headers)

    def internal_host(self, text: str) -> bool:
        """True when ``text`` (the "from" part of a Received field) names an internal host."""
        for match in (*_IP_LITERAL.finditer(text), *_BARE_IP.finditer(text)):
            try:
                ip = ipaddress.ip_address(match.group(1))
            except ValueError:
                continue
            if any(ip in net for net in self.networks):
                return True
        if self.domains:
            for match in _HOST_NAME.finditer(text):
                name = match.group(1).lower().rstrip(".")
                if any(name == d or name.endswith("." + d) for d in self.domains):
                    return True
        return False

    def from_part(self, value: str) -> tuple[str, str] | None:
        """(from part, the rest from "by" on) of a Received value, or None without a from."""
        match = _FROM_PART.match(value)
        if match is None:
            return None
        return match.group("from"), "by " + match.group("rest")

    def strip(self, message: Message) -> list[str]:
        """Apply topology hiding to ``message``; what was done, for the log."""
        done: list[str] = []
        received = message.get_all("Received")
        own: tuple[str, str] | None = None
        if received:
            parts = self.from_part(received[0])
            if parts is not None and self.internal_host(parts[0]):
                own = (received[0], parts[1])

        def internal(value: str) -> bool:
            parts = self.from_part(value)
            return parts is not None and self.internal_host(parts[0])

        removed = message.remove_header("Received", where=internal)
        if own is not None:
            # This relay's own trace field, without the internal client: one hop counted.
            message.add_header("Received", own[1], top=True)
            removed -= 1
            done.append("own Received without its from part")
        if removed:
            done.append(f"{removed} internal Received")
        for name in self.headers:
            count = message.remove_header(name)
            if count:
                done.append(f"{count} {name}")
        return done


# -- rules --------------------------------------------------------------------------------------


def _searcher(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    """A predicate for :meth:`Message.remove_header`: true when ``pattern`` is in the value."""

    def found(value: str) -> bool:
        return pattern.search(value) is not None

    return found


@dataclass(frozen=True, slots=True)
class _Rule:
    rule: HeaderRule
    pattern: re.Pattern[str] | None
    value_pattern: re.Pattern[str] | None

    def apply(self, message: Message) -> str | None:
        rule = self.rule
        if rule.action == "add":
            message.add_header(rule.name, rule.value, top=rule.position == "top")
            return f"added {rule.name}"
        if rule.action == "replace":
            message.replace_header(rule.name, rule.value)
            return f"replaced {rule.name}"
        where = _searcher(self.value_pattern) if self.value_pattern is not None else None
        if self.pattern is not None:
            names = dict.fromkeys(
                n.lower() for n, _ in message.header_items() if self.pattern.search(n)
            )
        else:
            names = {rule.name: None}
        removed = sum(message.remove_header(name, where=where) for name in names)
        return f"removed {removed} {rule.name or '/' + rule.pattern + '/'}" if removed else None


@dataclass(frozen=True, slots=True)
class _State:
    config: HeadersConfig
    rules: tuple[_Rule, ...]
    topology: _Topology | None
    rewriter: SenderRewriter


class HeadersPlugin:
    """Declarative header edits, topology hiding and sender rewriting.

    Registered as ``headers`` in the ``filterhost.plugins`` entry-point group.
    """

    timeout: float = 10.0
    """Seconds per call: header work only, no I/O."""

    on_error: Literal["tempfail", "pass", "reject"] = "tempfail"
    """If rewriting fails (a bug), the client retries: internal names are never leaked."""

    def __init__(self) -> None:
        self._state: _State | None = None

    @hookimpl
    def filterhost_add_config(self, registry: ConfigRegistry) -> None:
        """Declare ``[plugins.headers]``."""
        registry.add(SECTION, HeadersConfig, "header rules, topology hiding, sender rewriting")

    @hookimpl
    def filterhost_check_config(self, config: Config) -> list[Problem]:
        """Each rule, network, domain, field name and rewrite entry must be usable."""
        return _problems(config.plugin_config(HeadersConfig), config)

    @hookimpl
    def filterhost_configure(self, config: Config) -> None:
        """Compile rules and maps once, before serving."""
        cfg = config.plugin_config(HeadersConfig)
        errors = [p for p in _problems(cfg, config) if p.severity == "error"]
        if errors:
            raise ValueError("; ".join(str(p) for p in errors))
        self._state = _State(
            config=cfg,
            rules=tuple(
                _Rule(
                    r,
                    re.compile(r.pattern, re.IGNORECASE) if r.pattern else None,
                    re.compile(r.value_pattern) if r.value_pattern else None,
                )
                for r in cfg.rules
            ),
            topology=_Topology(cfg) if cfg.strip_topology else None,
            rewriter=SenderRewriter(cfg.sender_rewrite),
        )

    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> None:
        """Hide the topology, rewrite the sender, then apply the rules."""
        state = self._state
        if state is None:
            raise RuntimeError("headers: filterhost_configure was not called")
        message = transaction.message
        done: list[str] = []
        if state.topology is not None:
            done += state.topology.strip(message)
        if state.rewriter:
            done += self._rewrite_sender(state, transaction)
        for rule in state.rules:
            what = rule.apply(message)
            if what is not None:
                done.append(what)
        if done:
            log.info("%s: headers: %s", transaction.queue_id or "-", "; ".join(done))

    @staticmethod
    def _rewrite_sender(state: _State, transaction: Transaction) -> list[str]:
        done: list[str] = []
        rewriter = state.rewriter
        if state.config.rewrite_envelope_sender and transaction.mail_from:
            new = rewriter.rewrite(transaction.mail_from)
            if new is not None and new != transaction.mail_from:
                done.append(f"envelope sender <{transaction.mail_from}> -> <{new}>")
                transaction.set_sender(new)
        message = transaction.message
        wanted = [n for n in state.config.rewrite_headers if message.count(n)]
        if not wanted:
            return done
        # Only the header block is parsed, with the email package's structured address
        # headers, which read encoded words and quoted names correctly from the raw bytes.
        data = message.as_bytes()
        end = data.find(b"\r\n\r\n")
        head = data if end < 0 else data[: end + 2]
        parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        qid = transaction.queue_id or "-"
        for name in wanted:
            if message.count(name) != 1:
                log.warning(
                    "%s: headers: %d %s fields; not rewritten", qid, message.count(name), name
                )
                continue
            try:
                new_value = _rewritten_field(parsed[name], rewriter)
            except (ValueError, LookupError, UnicodeError, AttributeError) as exc:
                log.warning("%s: headers: %s not rewritten: %s", qid, name, exc)
                continue
            if new_value is None:
                continue
            try:
                message.replace_header(name, new_value)
            except ValueError as exc:  # e.g. a display name too long to fold
                log.warning("%s: headers: %s not rewritten: %s", qid, name, exc)
                continue
            done.append(f"rewrote {name}")
        return done
