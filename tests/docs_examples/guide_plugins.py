"""Example plugins from docs/plugins.md, one per hook; tested in test_guide_plugins.py."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from filterhost import (
    Config,
    ConfigRegistry,
    Problem,
    Reply,
    Route,
    Session,
    Transaction,
    Verdict,
    hookimpl,
)


# -- start config --
@dataclass(frozen=True, slots=True)
class SizeCapConfig:
    """[plugins.sizecap]: a lower size limit than the server's, with exceptions."""

    max_bytes: int = field(default=10_000_000, metadata={"help": "largest message relayed"})
    exempt: list[str] = field(
        default_factory=list, metadata={"help": "senders the limit does not apply to"}
    )


class SizeCap:
    def __init__(self) -> None:
        self.settings = SizeCapConfig()

    @hookimpl
    def filterhost_add_config(self, registry: ConfigRegistry) -> None:
        registry.add("sizecap", SizeCapConfig, "refuse messages over max_bytes")

    @hookimpl
    def filterhost_check_config(self, config: Config) -> list[Problem]:
        settings = config.plugin_config(SizeCapConfig)
        if settings.max_bytes >= config.server.max_message_size:
            key = "plugins.sizecap.max_bytes"
            return [
                Problem(
                    config.where(key),
                    key,
                    "is not below server.max_message_size, so it never applies",
                    severity="warning",
                )
            ]
        return []

    @hookimpl
    def filterhost_configure(self, config: Config) -> None:
        self.settings = config.plugin_config(SizeCapConfig)

    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> Verdict | None:
        if transaction.mail_from in self.settings.exempt:
            return None
        if transaction.message.size > self.settings.max_bytes:
            return Verdict.reject("5.3.4", "Message too big for this relay", code=552)
        return None


# -- end config --


# -- start lifecycle --
@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str = field(default="/var/log/filterhost/audit.log", metadata={"help": "log file"})


class Audit:
    """Writes one line per delivery outcome to its own file."""

    def __init__(self) -> None:
        self.path = Path(AuditConfig().path)
        self.file: IO[str] | None = None

    @hookimpl
    def filterhost_add_config(self, registry: ConfigRegistry) -> None:
        registry.add("audit", AuditConfig, "delivery audit log")

    @hookimpl
    def filterhost_configure(self, config: Config) -> None:
        self.path = Path(config.plugin_config(AuditConfig).path)

    @hookimpl
    def filterhost_startup(self) -> None:
        self.file = self.path.open("a", encoding="utf-8", buffering=1)

    @hookimpl
    def filterhost_shutdown(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    # -- end lifecycle --

    # -- start outcomes --
    def _write(self, transaction: Transaction, recipient: str, what: str, reply: Reply) -> None:
        if self.file is not None:
            self.file.write(f"{transaction.queue_id} {what} <{recipient}> {reply}\n")

    @hookimpl
    def filterhost_delivered(self, transaction: Transaction, recipient: str, reply: Reply) -> None:
        self._write(transaction, recipient, "delivered", reply)

    @hookimpl
    def filterhost_deferred(self, transaction: Transaction, recipient: str, reply: Reply) -> None:
        self._write(transaction, recipient, "deferred", reply)

    @hookimpl
    def filterhost_bounced(self, transaction: Transaction, recipient: str, reply: Reply) -> None:
        self._write(transaction, recipient, "bounced", reply)

    # -- end outcomes --


# -- start connect --
BLOCKED = [ipaddress.ip_network("192.0.2.0/24")]


class BlockNetworks:
    @hookimpl
    def filterhost_connect(self, session: Session) -> Verdict | None:
        if any(session.address in net for net in BLOCKED):
            return Verdict.reject("5.7.1", "Not accepting mail from your network")
        session.notes["blocknetworks"] = {"checked": True}
        return None


# -- end connect --


# -- start helo --
class HeloCheck:
    @hookimpl
    def filterhost_helo(self, session: Session, name: str) -> Verdict | None:
        if not session.trusted and name.lower() in {"localhost", "localhost.localdomain"}:
            return Verdict.reject("5.7.1", "Say who you are", code=550)
        return None


# -- end helo --


# -- start mail --
OUR_DOMAINS = {"corp.example", "corp.example.net"}


class SenderDomains:
    """Internal clients may send only as one of our domains (or the null sender)."""

    @hookimpl
    def filterhost_mail(self, session: Session, sender: str) -> Verdict | None:
        domain = sender.rpartition("@")[2].lower()
        if sender and domain not in OUR_DOMAINS:
            return Verdict.reject("5.7.1", f"Not allowed to send as {domain}", code=550)
        return None


# -- end mail --


# -- start rcpt --
class RecipientPolicy:
    @hookimpl
    def filterhost_rcpt(self, session: Session, recipient: str) -> Verdict | None:
        if recipient.lower().endswith("@competitor.example"):
            return Verdict.reject("5.7.1", "Recipient domain blocked by policy", code=550)
        count = session.notes.setdefault("rcpt_count", 0) + 1
        session.notes["rcpt_count"] = count
        if count > 100 and not session.authenticated_as:
            return Verdict.tempfail("4.5.3", "Too many recipients, send the rest later")
        return None


# -- end rcpt --


# -- start message-headers --
class HeaderHygiene:
    """Outgoing mail: drop internal details, tag what was checked."""

    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> None:
        message = transaction.message
        message.remove_header("X-Originating-IP")
        if "X-Mailer" in message:
            message.replace_header("X-Mailer", "corp mail")
        message.add_header("X-Relay-Checked", "yes", top=False)


# -- end message-headers --


# -- start message-body --
class Classify:
    """Reads the text and the attachments; leaves its findings for the next plugins."""

    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> Verdict | None:
        message = transaction.message
        confidential = "confidential" in message.text().lower()
        names = [part.filename or "(unnamed)" for part in message.attachments()]
        transaction.notes["classify"] = {"confidential": confidential, "attachments": names}
        if confidential and any(name.endswith(".zip") for name in names):
            return Verdict.quarantine("confidential text with a zip attachment")
        return None


# -- end message-body --


# -- start message-envelope --
class Archive:
    """Copies confidential mail (see Classify, earlier in the chain) to the archive."""

    @hookimpl
    def filterhost_message(self, transaction: Transaction) -> None:
        findings = transaction.notes.get("classify", {})
        if findings.get("confidential"):
            transaction.add_recipient("archive@corp.example")
        transaction.remove_recipient("nobody@corp.example")


# -- end message-envelope --


# -- start route --
class RouteByDomain:
    @hookimpl
    def filterhost_route(self, recipient: str) -> Route | None:
        domain = recipient.rpartition("@")[2].lower()
        if domain == "legacy.corp.example":
            return Route.host("10.1.2.3", 25)
        if domain == "partner.example":
            return Route.smarthost()
        if domain == "retired.corp.example":
            return Route.reject("5.1.2", "This domain no longer receives mail")
        return None  # the next plugin, then [relay] mode


# -- end route --


# -- start timeouts --
class Reputation:
    """Asks a (slow) reputation service; an optional enrichment."""

    timeout = 2.0  # seconds per call; conf.d may set [plugins.reputation] timeout = "5s"
    on_error = "pass"  # if the service is down, relay anyway (logged as a warning)

    @hookimpl
    async def filterhost_message(self, transaction: Transaction) -> None:
        score = await self.lookup(transaction.session.client_ip)
        transaction.message.add_header("X-Reputation", f"{score:.1f}")

    async def lookup(self, address: str) -> float:
        await asyncio.sleep(0)  # a real plugin would ask its service here
        return 0.0 if address.startswith("127.") else 5.0


# -- end timeouts --
