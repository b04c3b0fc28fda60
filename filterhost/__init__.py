"""filterhost: a plugin-based SMTP smart host that scans, shapes and relays outgoing mail.

This module is the public API for plugin authors; everything in ``__all__`` is stable.

    from filterhost import hookimpl, Verdict

    @hookimpl
    async def filterhost_message(transaction):
        if "X-Spam" in transaction.message:
            return Verdict.reject("5.7.1", "Spam is not relayed")
"""

from filterhost.config import Config, ConfigRegistry, Problem
from filterhost.durations import Duration
from filterhost.hookspecs import hookimpl
from filterhost.message import HeaderEdit, Message
from filterhost.model import PluginResult, Route, Session, Transaction
from filterhost.verdict import Action, InvalidVerdictError, Reply, Verdict

__version__ = "0.1.0.dev0"

__all__ = [
    "Action",
    "Config",
    "ConfigRegistry",
    "Duration",
    "HeaderEdit",
    "InvalidVerdictError",
    "Message",
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
