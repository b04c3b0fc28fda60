"""filterhost: a plugin-based SMTP smart host that scans, shapes and relays outgoing mail.

This module is the public API for plugin authors; everything in ``__all__`` is stable (and
``filterhost.testing`` for tests). A plugin is a module, class or object with hooks::

    from filterhost import Transaction, Verdict, hookimpl

    @hookimpl
    async def filterhost_message(transaction: Transaction) -> Verdict | None:
        if "X-Spam" in transaction.message:
            return Verdict.reject("5.7.1", "Spam is not relayed")
        return None

declared in its package's ``pyproject.toml``::

    [project.entry-points."filterhost.plugins"]
    nospam = "nospam"

The hooks are in :mod:`filterhost.hookspecs`; the guide is ``docs/plugins.md``.
"""

from filterhost.config import Config, ConfigRegistry, Problem
from filterhost.durations import Duration
from filterhost.hookspecs import hookimpl
from filterhost.message import HeaderEdit, Message, Part
from filterhost.model import EnvelopeEdit, PluginResult, Route, Session, Transaction
from filterhost.verdict import Action, InvalidVerdictError, Reply, Verdict

__version__ = "0.1.0.dev0"

__all__ = [
    "Action",
    "Config",
    "ConfigRegistry",
    "Duration",
    "EnvelopeEdit",
    "HeaderEdit",
    "InvalidVerdictError",
    "Message",
    "Part",
    "PluginResult",
    "Problem",
    "Reply",
    "Route",
    "Session",
    "Transaction",
    "Verdict",
    "__version__",
    "hookimpl",
]
