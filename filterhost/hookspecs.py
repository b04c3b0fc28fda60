"""The plugin contract: every hook filterhost calls, in SMTP order.

Implement a hook by defining a function of the same name, marked with ``@filterhost.hookimpl``,
on a module or class that is registered in the ``filterhost.plugins`` entry-point group. An
implementation may take any subset of a hook's arguments (pluggy's opt-in arguments), so new
arguments can be added without breaking plugins.

Two kinds of hooks:

* **Pipeline hooks** (connect, helo, mail, rcpt, message, route, delivered/deferred/bounced,
  startup, shutdown) may be ``async def`` or plain ``def``. filterhost calls them itself, in the
  operator's ``[plugins] order``, awaits them, applies each plugin's ``timeout`` and turns an
  exception or timeout into that plugin's ``on_error`` policy. Wrappers (``wrapper=True``,
  ``hookwrapper=True``) are refused on pipeline hooks: pluggy cannot await.
* **Setup hooks** (add_config, check_config, configure) are plain ``def`` and called through
  pluggy for every registered plugin.

Call modes, named in each docstring:

* *chain*: called in order; the first verdict other than CONTINUE ends the chain and decides.
* *first*: called in order; the first result that is not None wins.
* *observe*: every plugin is called; results and exceptions are logged, and change nothing.
* *every plugin*: setup hooks, called once for each plugin.

Each docstring also says what the hook may change ("May change:"), in RFC 2119 words, and when
it was added. ``docs/plugins.md`` is the guide; ``tests/test_hookspecs_documented.py`` keeps
this module and the guide in step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from filterhost.config import Config, ConfigRegistry, Problem
    from filterhost.model import Route, Session, Transaction
    from filterhost.verdict import Reply, Verdict

PROJECT = "filterhost"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["HOOKS_IN_ORDER", "PIPELINE_HOOKS", "hookimpl", "hookspec"]

# ----------------------------------------------------------------------------------------------
# Setup hooks: plain pluggy calls, once per (re)configuration.
# ----------------------------------------------------------------------------------------------


@hookspec
def filterhost_add_config(registry: ConfigRegistry) -> None:
    """Declare the plugin's ``[plugins.NAME]`` settings.

    Call ``registry.add(NAME, MyConfig, "what it does")`` with a frozen dataclass whose fields
    (types, defaults, ``metadata={"help": ...}``) are the keys the operator may set. filterhost
    checks the operator's table against it: unknown keys and wrong types are config errors naming
    file and key. Read the values back in :func:`filterhost_configure` with
    ``config.plugin_config(MyConfig)``. ``timeout`` and ``on_error`` are reserved keys of every
    table; do not declare them.

    :param registry: where sections are declared (:class:`filterhost.ConfigRegistry`).

    Call mode: every plugin, installed ones too that are not in ``[plugins] order`` (so their
    tables are still checked). Must be a plain ``def``.

    May change: nothing but ``registry``.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_check_config(config: Config) -> list[Problem] | None:
    """Report what is wrong with the plugin's configuration or its environment.

    Used by ``filterhost --check-config`` and at start-up, for plugins in ``[plugins] order``.
    Check what the types cannot say (a value that depends on another, a file that must exist)
    and what the plugin needs to reach (a scanner, a database).

    :param config: the checked configuration; your section is ``config.plugin_config(MyConfig)``.
    :return: a list of :class:`filterhost.Problem` (file, key, message; ``severity="warning"``
        for something that does not stop the server, such as a scanner that is down right now),
        or None or ``[]`` when all is well. An exception is reported as a problem too.

    Call mode: every active plugin, in ``[plugins] order``; the lists are concatenated. Must be
    a plain ``def``.

    May change: nothing. It must not open connections it keeps, nor write files.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_configure(config: Config) -> None:
    """Take the configuration: read your typed section with ``config.plugin_config(MyConfig)``.

    Called before serving, after the configuration passed its checks. Do not open connections
    here; use :func:`filterhost_startup`.

    :param config: the checked configuration.

    Call mode: every active plugin, in ``[plugins] order``. Must be a plain ``def``; an
    exception stops the server from starting.

    May change: the plugin's own state.

    .. versionadded:: 0.1
    """


# ----------------------------------------------------------------------------------------------
# Lifecycle hooks (pipeline: may be async).
# ----------------------------------------------------------------------------------------------


@hookspec
def filterhost_startup() -> None:
    """The server is starting: open the pools and connections the plugin needs.

    Call mode: observe, in ``[plugins] order``, after :func:`filterhost_configure` and before
    the first client is accepted. An exception or timeout is logged with the plugin name and
    the server starts anyway; the plugin's other hooks must cope (their ``on_error`` applies).

    May change: the plugin's own state.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_shutdown() -> None:
    """The server is stopping: close what :func:`filterhost_startup` opened.

    Call mode: observe, in reverse ``[plugins] order``, after the last session ended and the
    queue runner stopped. An exception or timeout is logged and the server stops anyway.

    May change: the plugin's own state.

    .. versionadded:: 0.1
    """


# ----------------------------------------------------------------------------------------------
# Session hooks (pipeline), in SMTP order. Core policy (mynetworks, relay_domains, limits) runs
# first; a plugin can refuse more but cannot make filterhost relay for an untrusted client
# unless it returns ACCEPT at RCPT on purpose.
# ----------------------------------------------------------------------------------------------


@hookspec
def filterhost_connect(session: Session) -> Verdict | None:
    """A client connected, before the greeting.

    :param session: the new session (``client_ip``, ``trusted``, ``notes``).
    :return: None to go on; REJECT (5xx) or TEMPFAIL (4xx) to greet with that reply and close;
        DISCONNECT to answer 421 and close. ACCEPT ends the chain and the session goes on.

    Call mode: chain, in ``[plugins] order``.

    May change: ``session.notes``. Must not change the other fields of ``session``.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_helo(session: Session, name: str) -> Verdict | None:
    """The client said HELO or EHLO.

    :param session: the session; ``session.helo`` is already ``name`` and ``session.esmtp``
        says whether it was EHLO.
    :param name: the name the client gave.
    :return: None to go on; REJECT or TEMPFAIL to refuse the greeting (the client may try
        again); DISCONNECT to answer 421 and close.

    Call mode: chain, in ``[plugins] order``; called again for every HELO/EHLO of the session.

    May change: ``session.notes``.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_mail(session: Session, sender: str, options: list[str]) -> Verdict | None:
    """MAIL FROM, after the core checks (size, syntax).

    :param session: the session.
    :param sender: the envelope sender without brackets; ``""`` is the null sender.
    :param options: ESMTP parameters as given (``["SIZE=1000", "BODY=8BITMIME"]``).
    :return: None to go on; REJECT or TEMPFAIL to refuse the sender; DISCONNECT to answer 421
        and close.

    Call mode: chain, in ``[plugins] order``; once per transaction.

    May change: ``session.notes``. The sender itself is changed in :func:`filterhost_message`.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_rcpt(
    session: Session, sender: str, recipient: str, options: list[str]
) -> Verdict | None:
    """RCPT TO, once per recipient, before the relay policy decides.

    :param session: the session.
    :param sender: the envelope sender of this transaction (``""``: the null sender).
    :param recipient: the recipient address without brackets.
    :param options: ESMTP parameters of this RCPT (``["NOTIFY=FAILURE"]``).
    :return: None to leave the decision to the relay policy (``mynetworks``, ``relay_domains``);
        REJECT or TEMPFAIL to refuse this recipient (the others are not affected); DISCONNECT to
        answer 421 and close; ACCEPT to accept it even where the relay policy would refuse it.
        An ACCEPT makes your plugin responsible for not creating an open relay.

    Call mode: chain, in ``[plugins] order``, for each recipient.

    May change: ``session.notes``.

    .. versionadded:: 0.1
    """


# ----------------------------------------------------------------------------------------------
# Message hook (pipeline): the content chain, at end of DATA, before the client gets its reply.
# ----------------------------------------------------------------------------------------------


@hookspec
def filterhost_message(transaction: Transaction) -> Verdict | None:
    """The whole message has arrived: scan it, rewrite it, decide about it.

    The client waits for the answer, so the verdict is the reply to DATA: a refused message
    is never accepted (no backscatter). filterhost's own ``Received`` field is already at the
    top of the header.

    :param transaction: the envelope (``mail_from``, ``recipients``), the ``message`` (headers
        editable; body and MIME parts readable: ``text()``, ``parts()``, ``attachments()``),
        the ``session`` and per-message ``notes``.
    :return: None to go on; REJECT (5xx) or TEMPFAIL (4xx) to refuse the message in-session;
        DISCARD to answer 250 and drop it (logged); QUARANTINE to answer 250 and keep it aside,
        unrelayed, until an operator releases it; ACCEPT to skip the rest of the chain and queue
        it; DISCONNECT to answer 421 and close.

    Call mode: chain, in ``[plugins] order``. Each plugin's edits are recorded in
    ``transaction.results``; if the plugin fails (exception, timeout, invalid verdict) its
    edits are undone and its ``on_error`` policy decides.

    May change: header fields (``transaction.message.add_header()``, ``replace_header()``,
    ``remove_header()``), the envelope sender (``transaction.set_sender()``) and recipients
    (``add_recipient()``, ``remove_recipient()``), and ``transaction.notes``. Must not change
    the body: it leaves byte for byte as received. A message left with no recipients is
    answered 250 and dropped.

    .. versionadded:: 0.1
    """


# ----------------------------------------------------------------------------------------------
# Routing hook (pipeline): in the queue runner, per recipient and delivery attempt.
# ----------------------------------------------------------------------------------------------


@hookspec
def filterhost_route(transaction: Transaction, recipient: str) -> Route | None:
    """Choose the next hop for ``recipient``, at each delivery attempt.

    Runs in the queue runner, possibly after a restart: ``transaction`` is rebuilt from the
    spool (the message as accepted, the envelope, the client's address and HELO in
    ``transaction.session``), and its ``notes`` are empty. Carry decisions from the message
    phase in a header if routing needs them.

    :param transaction: the spooled message.
    :param recipient: one envelope recipient that is due for delivery.
    :return: a :class:`filterhost.Route`: ``Route.mx(domain)``, ``Route.host(host, port)``,
        ``Route.smarthost()``, ``Route.hold()``, ``Route.discard()`` or
        ``Route.reject(status, text)``; or None to leave it to the next plugin and then to
        ``[relay] mode``.

    Call mode: first, in ``[plugins] order``: the first Route wins. An exception, a timeout or
    a result that is not a Route defers the recipient (it is tried again later).

    May change: nothing; the message and envelope are read only here.

    .. versionadded:: 0.1
    """


# ----------------------------------------------------------------------------------------------
# Delivery outcome hooks (pipeline, observe only).
# ----------------------------------------------------------------------------------------------


@hookspec
def filterhost_delivered(transaction: Transaction, recipient: str, reply: Reply) -> None:
    """``recipient`` was accepted by the next hop.

    :param transaction: the spooled message (notes empty, as for the route hook).
    :param recipient: the recipient that was delivered.
    :param reply: the next hop's 2xx reply.

    Call mode: observe, in ``[plugins] order``. An exception or timeout is logged and changes
    nothing: the recipient is delivered.

    May change: nothing.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_deferred(transaction: Transaction, recipient: str, reply: Reply) -> None:
    """Delivery to ``recipient`` failed for now; it will be tried again.

    :param transaction: the spooled message (notes empty, as for the route hook).
    :param recipient: the recipient that was deferred.
    :param reply: the next hop's 4xx, or the local reason (DNS, connection, routing) as a 4xx.

    Call mode: observe, in ``[plugins] order``. An exception or timeout is logged and changes
    nothing.

    May change: nothing.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_bounced(transaction: Transaction, recipient: str, reply: Reply) -> None:
    """Delivery to ``recipient`` failed for good; it is not tried again.

    :param transaction: the spooled message (notes empty, as for the route hook).
    :param recipient: the recipient that bounced.
    :param reply: the next hop's 5xx, or the local reason (null MX, no such domain, expired,
        rejected by routing) as a 5xx.

    Call mode: observe, in ``[plugins] order``. An exception or timeout is logged and changes
    nothing.

    May change: nothing.

    .. versionadded:: 0.1
    """


HOOKS_IN_ORDER = (
    "filterhost_add_config",
    "filterhost_check_config",
    "filterhost_configure",
    "filterhost_startup",
    "filterhost_connect",
    "filterhost_helo",
    "filterhost_mail",
    "filterhost_rcpt",
    "filterhost_message",
    "filterhost_route",
    "filterhost_delivered",
    "filterhost_deferred",
    "filterhost_bounced",
    "filterhost_shutdown",
)
"""Every hook, in the order a message meets them (setup first, shutdown last)."""

# Hooks that filterhost's own runner calls (they may be async); the rest go through pluggy.
PIPELINE_HOOKS = frozenset(HOOKS_IN_ORDER) - {
    "filterhost_add_config",
    "filterhost_check_config",
    "filterhost_configure",
}
