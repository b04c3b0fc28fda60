"""The ``routing`` plugin: a transport map on the route hook.

For each recipient at each delivery attempt, the first of these that has an entry decides the
next hop (Postfix's order: ``transport_maps``, then ``sender_dependent_relayhost_maps``, then
``relayhost``):

1. ``transport``, by recipient: the whole address (``"user@example.com"``), the domain
   (``"example.com"``), then each parent domain written with a leading dot (``".example.com"``
   matches ``a.example.com`` and ``b.a.example.com``, not ``example.com`` itself);
2. ``sender_smarthosts``, by envelope sender: the address, ``"@domain"`` (or ``"domain"``),
   ``".parent"`` domains, and ``"<>"`` for the null sender (bounces);
3. ``default``;
4. nothing: the next route plugin, then ``[relay] mode`` decides.

A next hop is ``"mx"`` (the recipient domain's MX hosts), ``"mx:example.net"`` (another
domain's MX hosts), ``"smarthost"`` (``[relay] smarthost``), ``"host:port"`` (``"[v6]:port"``;
``"host"`` alone means port 25), ``"hold"`` (stays queued until released), ``"discard"`` (dropped,
logged) or ``"reject"`` / ``'reject "text"'`` / ``'reject 5.1.2 "text"'`` (bounced).

TLS per next hop is not part of a :class:`filterhost.Route`: it comes from ``[relay]
tls_policies``, which is looked up by the route's host name (``host:port`` routes) or domain
(``mx`` routes). See docs/plugins/routing.md.

This plugin uses only the public API (``from filterhost import ...``). Routing is just the
``filterhost_route`` hook: a third-party plugin earlier in ``[plugins] order`` overrides it, and
one that replaces it needs nothing from it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from filterhost import Config, ConfigRegistry, Problem, Route, Transaction, hookimpl

__all__ = ["NextHop", "RoutingConfig", "RoutingPlugin", "parse_next_hop"]

SECTION = "routing"
"""The ``[plugins.routing]`` table, and the name the entry point registers."""

DEFAULT_REJECT_STATUS = "5.7.1"
DEFAULT_REJECT_TEXT = "Delivery to this destination is not allowed"
NULL_SENDER = "<>"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_REJECT = re.compile(r"^reject(?:\s+(?P<status>\d\.\d{1,3}\.\d{1,3}))?(?:\s+(?P<text>.*?))?\s*$")

log = logging.getLogger("filterhost.plugins.routing")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """``[plugins.routing]``: the transport map, sender-dependent relays and a default."""

    transport: dict[str, str] = field(
        default_factory=dict,
        metadata=_help(
            'recipient "user@domain", "domain" or ".parent" (subdomains) -> next hop: '
            '"mx", "mx:domain", "smarthost", "host:port", "hold", "discard", '
            "'reject \"text\"'"
        ),
    )
    sender_smarthosts: dict[str, str] = field(
        default_factory=dict,
        metadata=_help(
            'envelope sender "user@domain", "@domain", ".parent" or "<>" -> next hop '
            "(used when transport has no entry)"
        ),
    )
    default: str = field(
        default="",
        metadata=_help('next hop for everything else; "" leaves it to [relay] mode'),
    )


@dataclass(frozen=True, slots=True)
class NextHop:
    """A parsed next hop; :meth:`route` makes the Route for one recipient."""

    kind: Literal["mx", "smarthost", "host", "hold", "discard", "reject"]
    domain: str = ""
    """For ``mx``: the domain whose MX hosts to use (empty: the recipient's own)."""
    host: str = ""
    port: int = 25
    status: str = DEFAULT_REJECT_STATUS
    text: str = DEFAULT_REJECT_TEXT

    def route(self, recipient: str) -> Route:
        """The Route this next hop gives ``recipient``."""
        if self.kind == "mx":
            return Route.mx(self.domain or recipient.rpartition("@")[2])
        if self.kind == "host":
            return Route.host(self.host, self.port)
        if self.kind == "reject":
            return Route.reject(self.status, self.text)
        constructors: dict[str, Callable[[], Route]] = {
            "smarthost": Route.smarthost,
            "hold": Route.hold,
            "discard": Route.discard,
        }
        return constructors[self.kind]()


# The next hops that are a single word.
_KEYWORDS = {
    "mx": NextHop("mx"),
    "smarthost": NextHop("smarthost"),
    "hold": NextHop("hold"),
    "discard": NextHop("discard"),
}


def _is_host(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return bool(_DOMAIN.match(name))
    return True


def _host_port(text: str) -> NextHop:
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise ValueError(f'{text!r}: write IPv6 addresses in brackets, as "[::1]:25"')
    # A single word without a port is more likely a misspelt keyword ("hodl") than a host.
    single_word = "." not in host and ":" not in host and not port_text
    if not host or not _is_host(host) or single_word:
        raise ValueError(
            f'{text!r} is not a next hop: expected "mx", "mx:domain", "smarthost", '
            '"host:port", "hold", "discard" or \'reject "text"\''
        )
    if port_text == "" and text.endswith(":"):
        raise ValueError(f"{text!r}: no port after ':'")
    if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return NextHop("host", host=host, port=int(port_text) if port_text else 25)


def parse_next_hop(text: str) -> NextHop:
    """Parse a next hop as written in ``[plugins.routing]``; ValueError says what is wrong."""
    value = text.strip()
    word = value.lower()
    if not value:
        raise ValueError('an empty next hop; write "mx", "smarthost", "host:port", ...')
    if word in _KEYWORDS:
        return _KEYWORDS[word]
    if word.startswith("mx:"):
        domain = word[3:].rstrip(".")
        if not _DOMAIN.match(domain):
            raise ValueError(f'{text!r}: expected a domain after "mx:", such as "mx:example.net"')
        return NextHop("mx", domain=domain)
    if word == "reject" or word.startswith(("reject ", "reject\t")):
        match = _REJECT.match(value)
        if match is None:
            raise ValueError(
                f"{text!r}: expected 'reject', 'reject \"text\"' or 'reject 5.x.x \"text\"'"
            )
        status = match.group("status") or DEFAULT_REJECT_STATUS
        if not status.startswith("5."):
            raise ValueError(f"{text!r}: a reject needs a 5.x.x status, not {status}")
        reply = match.group("text") or ""
        if len(reply) >= 2 and reply[0] == reply[-1] and reply[0] in "\"'":
            reply = reply[1:-1]
        if not all(c.isprintable() for c in reply):
            raise ValueError(f"{text!r}: the reply text must be printable, on one line")
        return NextHop("reject", status=status, text=reply or DEFAULT_REJECT_TEXT)
    return _host_port(value)


def _key_problem(key: str, *, sender: bool) -> str | None:
    """What is wrong with a map key (None when it is fine)."""
    lookup = key.strip().lower()
    if sender and lookup == NULL_SENDER:
        return None
    if lookup.startswith("."):
        ok = bool(_DOMAIN.match(lookup[1:]))
    elif "@" in lookup:
        local, _, domain = lookup.rpartition("@")
        ok = bool(_DOMAIN.match(domain)) and (bool(local) or sender)
    else:
        ok = bool(_DOMAIN.match(lookup))
    if ok:
        return None
    forms = (
        '"user@domain", "@domain", ".parent" or "<>"'
        if sender
        else ('"domain", ".parent" (its subdomains) or "user@domain"')
    )
    return f"{key!r} is not a valid key: expected {forms}"


def _lookup(table: Mapping[str, NextHop], address: str, *, sender: bool) -> NextHop | None:
    """The most specific entry for ``address``: address, domain, then parent domains."""
    if sender and address == "":
        return table.get(NULL_SENDER)
    local, _, domain = address.rpartition("@")
    domain = domain.lower().rstrip(".")
    for key in (f"{local.lower()}@{domain}", f"@{domain}", domain):
        if key in table:
            return table[key]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        hop = table.get("." + ".".join(labels[i:]))
        if hop is not None:
            return hop
    return None


@dataclass(frozen=True, slots=True)
class _Maps:
    transport: dict[str, NextHop]
    senders: dict[str, NextHop]
    default: NextHop | None


def _normal_key(key: str, *, sender: bool) -> str:
    lookup = key.strip().lower().rstrip(".")
    # "domain" and "@domain" are the same entry in the sender map (Postfix writes "@domain").
    if sender and lookup not in (NULL_SENDER,) and "@" not in lookup and not lookup.startswith("."):
        return "@" + lookup
    return lookup


def _problems(cfg: RoutingConfig, config: Config) -> list[Problem]:
    """Every bad key or next hop, with the file and key that set it."""
    prefix = f"plugins.{SECTION}"
    problems: list[Problem] = []
    hops: list[NextHop] = []

    def check(table: str, key: str, value: str, *, sender: bool) -> None:
        where = config.where(f"{prefix}.{table}.{key}")
        dotted = f'{prefix}.{table}."{key}"'
        problem = _key_problem(key, sender=sender)
        if problem is not None:
            problems.append(Problem(where, dotted, problem))
        try:
            hops.append(parse_next_hop(value))
        except ValueError as exc:
            problems.append(Problem(where, dotted, str(exc)))

    for key, value in cfg.transport.items():
        check("transport", key, value, sender=False)
    for key, value in cfg.sender_smarthosts.items():
        check("sender_smarthosts", key, value, sender=True)
    if cfg.default:
        try:
            hops.append(parse_next_hop(cfg.default))
        except ValueError as exc:
            key = f"{prefix}.default"
            problems.append(Problem(config.where(key), key, str(exc)))
    if any(h.kind == "smarthost" for h in hops) and not config.relay.smarthost:
        key = f"{prefix}"
        problems.append(
            Problem(
                config.where(key),
                key,
                'routes to "smarthost", but [relay] smarthost is not set; set it to '
                '"host:port" or name the host in the route',
            )
        )
    return problems


class RoutingPlugin:
    """A transport map on the route hook.

    Registered as ``routing`` in the ``filterhost.plugins`` entry-point group.
    """

    timeout: float = 5.0
    """Seconds per call: table lookups only."""

    on_error: Literal["tempfail", "pass", "reject"] = "tempfail"
    """A failure defers the recipient (the route hook's rule); it is tried again later."""

    def __init__(self) -> None:
        self._maps: _Maps | None = None

    @hookimpl
    def filterhost_add_config(self, registry: ConfigRegistry) -> None:
        """Declare ``[plugins.routing]``."""
        registry.add(SECTION, RoutingConfig, "transport map: next hop per domain and sender")

    @hookimpl
    def filterhost_check_config(self, config: Config) -> list[Problem]:
        """Every key and next hop must parse; a smart host route needs ``[relay] smarthost``."""
        return _problems(config.plugin_config(RoutingConfig), config)

    @hookimpl
    def filterhost_configure(self, config: Config) -> None:
        """Parse the maps once, before serving."""
        cfg = config.plugin_config(RoutingConfig)
        problems = _problems(cfg, config)
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))
        self._maps = _Maps(
            transport={
                _normal_key(k, sender=False): parse_next_hop(v) for k, v in cfg.transport.items()
            },
            senders={
                _normal_key(k, sender=True): parse_next_hop(v)
                for k, v in cfg.sender_smarthosts.items()
            },
            default=parse_next_hop(cfg.default) if cfg.default else None,
        )

    @hookimpl
    def filterhost_route(self, transaction: Transaction, recipient: str) -> Route | None:
        """The next hop for ``recipient``: transport map, sender map, default, else None."""
        maps = self._maps
        if maps is None:
            raise RuntimeError("routing: filterhost_configure was not called")
        hop = _lookup(maps.transport, recipient, sender=False)
        source = "transport"
        if hop is None:
            hop = _lookup(maps.senders, transaction.mail_from, sender=True)
            source = "sender_smarthosts"
        if hop is None:
            hop, source = maps.default, "default"
        if hop is None:
            return None
        route = hop.route(recipient)
        log.debug(
            "%s: routing: to=<%s> from=<%s> -> %s (%s)",
            transaction.queue_id or "-",
            recipient,
            transaction.mail_from,
            route.next_hop,
            source,
        )
        return route
