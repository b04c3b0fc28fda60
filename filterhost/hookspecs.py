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

__all__ = ["PIPELINE_HOOKS", "hookimpl", "hookspec"]

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
    ``config.plugin_config(MyConfig)``.

    :param registry: where sections are declared.

    Call mode: every plugin. ``timeout`` and ``on_error`` are reserved keys of every table.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_check_config(config: Config) -> list[Problem] | None:
    """Report what is wrong with the plugin's configuration or its environment.

    Used by ``filterhost --check-config`` and at start-up. Return a list of
    :class:`filterhost.config.Problem` (file, key, message), for example an unreachable scanner;
    return None or ``[]`` when all is well. Must not change any state.

    :param config: the checked configuration.

    Call mode: every plugin; the lists are concatenated.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_configure(config: Config) -> None:
    """Take the configuration: read your typed section with ``config.plugin_config(MyConfig)``.

    Called before serving (and again on reload). Do not open connections here; use
    :func:`filterhost_startup`.

    :param config: the checked configuration.

    Call mode: every plugin.

    .. versionadded:: 0.1
    """


# ----------------------------------------------------------------------------------------------
# Lifecycle hooks (pipeline: may be async).
# ----------------------------------------------------------------------------------------------


@hookspec
def filterhost_startup() -> None:
    """The server is starting: open pools and connections the plugin needs.

    Call mode: observe, in ``[plugins] order``, before the first client is accepted. An exception
    is logged with the plugin name.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_shutdown() -> None:
    """The server is stopping: close what :func:`filterhost_startup` opened.

    Call mode: observe, in reverse ``[plugins] order``, after the last session ended.

    .. versionadded:: 0.1
    """


# ----------------------------------------------------------------------------------------------
# Session hooks (pipeline), in SMTP order. Core policy (mynetworks, relay_domains, limits) runs
# first; a plugin can refuse more but cannot make filterhost relay for an untrusted client
# unless it returns ACCEPT at RCPT on purpose.
# ----------------------------------------------------------------------------------------------


@hookspec
def filterhost_connect(session: Session) -> Verdict | None:
    """A client connected.

    :param session: the new session (``client_ip``, ``trusted``, ``notes``).
    :return: None to go on; REJECT/TEMPFAIL/DISCONNECT to refuse the connection with that reply.

    Call mode: chain. May write ``session.notes``.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_helo(session: Session, name: str) -> Verdict | None:
    """The client said HELO or EHLO.

    :param session: the session; ``session.helo`` is already set to ``name``.
    :param name: the name the client gave.
    :return: None to go on; REJECT or TEMPFAIL to refuse the greeting.

    Call mode: chain.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_mail(session: Session, sender: str, options: list[str]) -> Verdict | None:
    """MAIL FROM, after core checks (size, syntax).

    :param session: the session.
    :param sender: the envelope sender without brackets; ``""`` is the null sender.
    :param options: ESMTP parameters as given (``["SIZE=1000", "BODY=8BITMIME"]``).
    :return: None to go on; REJECT or TEMPFAIL to refuse the sender.

    Call mode: chain.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_rcpt(
    session: Session, sender: str, recipient: str, options: list[str]
) -> Verdict | None:
    """RCPT TO, once per recipient, before the relay policy decides.

    :param session: the session.
    :param sender: the envelope sender of this transaction.
    :param recipient: the recipient address without brackets.
    :param options: ESMTP parameters of this RCPT.
    :return: None to leave the decision to the relay policy (``mynetworks``, ``relay_domains``);
        REJECT or TEMPFAIL to refuse this recipient; ACCEPT to accept it even where the relay
        policy would refuse it. An ACCEPT makes your plugin responsible for not creating an
        open relay.

    Call mode: chain.

    .. versionadded:: 0.1
    """


# ----------------------------------------------------------------------------------------------
# Message hook (pipeline): the content chain, at end of DATA, before the client gets its reply.
# ----------------------------------------------------------------------------------------------


@hookspec
def filterhost_message(transaction: Transaction) -> Verdict | None:
    """The whole message has arrived: scan it, rewrite it, decide about it.

    :param transaction: envelope (``mail_from``, ``recipients``), ``message`` (headers editable,
        body readable), ``session`` and ``notes``.
    :return: None to go on; REJECT (5xx) or TEMPFAIL (4xx) to refuse the message in-session;
        DISCARD or QUARANTINE to answer 250 and not relay it; ACCEPT to skip the rest of the chain.

    Call mode: chain, in ``[plugins] order``. May edit headers (``transaction.message``) and the
    envelope recipients; must not edit the body bytes. The verdict becomes the DATA reply.

    .. versionadded:: 0.1
    """


# ----------------------------------------------------------------------------------------------
# Routing hook (pipeline): in the queue runner, per recipient and delivery attempt.
# ----------------------------------------------------------------------------------------------


@hookspec
def filterhost_route(transaction: Transaction, recipient: str) -> Route | None:
    """Choose the next hop for ``recipient``.

    :param transaction: the spooled message (read only).
    :param recipient: one envelope recipient.
    :return: a :class:`filterhost.Route` (MX of a domain, a host and port, the smart host, hold,
        discard, reject), or None to leave it to the next plugin and then to ``[relay] mode``.

    Call mode: first. An exception or timeout defers the recipient (it is retried).

    .. versionadded:: 0.1
    """


# ----------------------------------------------------------------------------------------------
# Delivery outcome hooks (pipeline, observe only).
# ----------------------------------------------------------------------------------------------


@hookspec
def filterhost_delivered(transaction: Transaction, recipient: str, reply: Reply) -> None:
    """``recipient`` was accepted by the next hop with ``reply``.

    Call mode: observe. An exception is logged and changes nothing.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_deferred(transaction: Transaction, recipient: str, reply: Reply) -> None:
    """Delivery to ``recipient`` failed for now (``reply``: the 4xx or the local reason).

    Call mode: observe. An exception is logged and changes nothing.

    .. versionadded:: 0.1
    """


@hookspec
def filterhost_bounced(transaction: Transaction, recipient: str, reply: Reply) -> None:
    """Delivery to ``recipient`` failed for good (``reply``: the 5xx or the local reason).

    Call mode: observe. An exception is logged and changes nothing.

    .. versionadded:: 0.1
    """


# Hooks that filterhost's own runner calls (they may be async); the rest go through pluggy.
PIPELINE_HOOKS = frozenset(
    {
        "filterhost_startup",
        "filterhost_shutdown",
        "filterhost_connect",
        "filterhost_helo",
        "filterhost_mail",
        "filterhost_rcpt",
        "filterhost_message",
        "filterhost_route",
        "filterhost_delivered",
        "filterhost_deferred",
        "filterhost_bounced",
    }
)
