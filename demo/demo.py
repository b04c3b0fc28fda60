"""`make demo`: five messages through filterhost, in a private mail world on loopback.

Run by ``demo/run.sh``, which puts it in a private network namespace first (this script refuses
to run where the network reaches further than loopback). It starts

* unbound on 127.0.0.1:5353 with the demo zone (``ZONE`` below, on top of the test zone of
  ``tests/components/unbound.sh``),
* clamd on 127.0.0.1:3310 with only the EICAR test signatures (``tests/components/clamd.sh``),
* two recipient servers that store what they receive (``demo/mailserver.py``):
  ``mx.example.test`` on 127.0.0.10:2525, the MX of example.test, corp.test, busy.test (whose
  recipients it defers with 450) and partner.test; ``gw.partner.test`` on 127.0.0.20:2525,
  partner.test's gateway, which only the routing plugin sends to,
* filterhost with ``demo/conf.d`` (clamav, headers, routing, and dkim when that plugin is
  installed: the key is made with ``filterhost dkim keygen`` and its TXT record published in the
  demo zone) on 127.0.0.1:2525,

sends five messages with smtplib, and shows for each the client's reply, its queue id's story
from the log, where it ended, and the header lines filterhost added or removed (a DKIM signature
is verified as a receiver would, against the demo DNS); then ``filterhost queue list`` and
``filterhost --check-config``. Everything it started is stopped by PID on the way out (also on
SIGINT/SIGTERM), and its temporary directory is removed
(``DEMO_KEEP=1`` keeps it, to look at the mailboxes and the log).

``--summary FILE`` writes what happened as JSON (``tests/test_demo.py`` checks it). The exit
status is 0 when every message ended as the tour says, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import email
import email.message
import email.policy
import email.utils
import functools
import importlib.metadata
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from types import FrameType
from typing import Any

import dns.exception
import dns.message
import dns.query

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo"
COMPONENTS = REPO / "tests" / "components"

FILTERHOST = ("127.0.0.1", 2525)
DNS_PORT = 5353
CLAMD_PORT = 3310
MX_PORT = 2525
SERVERS = {  # name -> (address, domains it defers)
    "mx.example.test": ("127.0.0.10", ["busy.test"]),
    "gw.partner.test": ("127.0.0.20", []),
}
ZONE = [
    "mx.example.test.  60 IN A  127.0.0.10",
    "gw.partner.test.  60 IN A  127.0.0.20",
    "example.test.     60 IN MX 10 mx.example.test.",
    "corp.test.        60 IN MX 10 mx.example.test.",
    "busy.test.        60 IN MX 10 mx.example.test.",
    "partner.test.     60 IN MX 10 mx.example.test.",
    "nomail.test.      60 IN MX 0 .",
]
SENDER = "alice@corp.test"
DKIM_CONF = "30-dkim.toml"  # in demo/conf.d; dropped when the dkim plugin is not installed
WAIT = 25.0  # seconds the whole tour may wait for deliveries
STOP_TIMEOUT = 5.0

# The EICAR test file, assembled here so that this source file does not trip a virus scanner.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-" + b"TEST-FILE!$H+H*"


# -- processes ---------------------------------------------------------------------------------


class Processes:
    """Every process the demo starts, stopped by its own PID, last started first."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.pids: dict[str, int] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Path:
        """Start ``argv`` with its output in ``logdir/name.log``; return that path."""
        log_path = self.logdir / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                argv,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.logdir,
            )
        self.started.append((name, proc))
        self.pids[name] = proc.pid
        return log_path

    def tail(self, name: str, lines: int = 15) -> str:
        """The last lines the process called ``name`` wrote."""
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def alive(self, name: str) -> bool:
        """Whether the process called ``name`` is still running."""
        return any(n == name and p.poll() is None for n, p in self.started)

    def stop_all(self) -> list[str]:
        """SIGTERM each (then SIGKILL after STOP_TIMEOUT); return one line per process."""
        lines = []
        for name, proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_TIMEOUT)
            lines.append(f"{name} (pid {proc.pid}) exited {proc.returncode}")
        self.started.clear()
        return lines


def wait_for(what: str, check: Callable[[], bool], timeout: float, procs: Processes) -> None:
    """Poll ``check`` until it is true; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, dns.exception.DNSException):
            if check():
                return
        if time.monotonic() > deadline:
            raise StartError(f"{what}: not ready after {timeout:.0f}s", procs.tail(what))
        if not procs.alive(what):
            raise StartError(f"{what} exited", procs.tail(what))
        time.sleep(0.05)


class StartError(RuntimeError):
    """A server of the demo did not come up; carries the end of its log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(f"{message}; its log ends:\n{log_tail}" if log_tail else message)


def ports_free() -> None:
    """Fail early, and clearly, when an address the demo needs is taken in this namespace."""
    wanted = [FILTERHOST, ("127.0.0.1", CLAMD_PORT), ("127.0.0.1", DNS_PORT)]
    wanted += [(addr, MX_PORT) for addr, _ in SERVERS.values()]
    for addr, port in wanted:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                s.bind((addr, port))
            except OSError as exc:
                raise StartError(
                    f"{addr}:{port} is taken in this network namespace ({exc.strerror})"
                ) from None


def _greets(addr: str, port: int) -> bool:
    with socket.create_connection((addr, port), timeout=1) as s:
        return s.recv(512).startswith(b"220")


def _pongs() -> bool:
    with socket.create_connection(("127.0.0.1", CLAMD_PORT), timeout=1) as s:
        s.sendall(b"zPING\0")
        return s.recv(16) == b"PONG\0"


def _answers() -> bool:
    query = dns.message.make_query("example.test", "MX")
    return bool(dns.query.udp(query, "127.0.0.1", port=DNS_PORT, timeout=0.3).answer)


@dataclass
class World:
    """What the demo started its world with."""

    zone: list[str]
    dkim_record: str | None = None  # the TXT record of the demo's DKIM key, if signing is on
    dkim_note: str = ""


def make_dkim_key(work: Path) -> tuple[str | None, str]:
    """Make corp.test's DKIM key as an operator would; return its TXT record (or None) and why.

    Signing is on only when the dkim plugin is installed and ``filterhost dkim keygen`` works.
    """
    installed = {ep.name for ep in importlib.metadata.entry_points(group="filterhost.plugins")}
    if "dkim" not in installed:
        return None, "off: the dkim plugin is not installed"
    made = filterhost_cli(
        work, "dkim", "keygen", "--domain", "corp.test", "--selector", "demo", "--dir", "dkim"
    )
    record = next((line for line in made.stdout.splitlines() if " IN TXT " in line), None)
    if made.returncode != 0 or record is None:
        why = (made.stderr or made.stdout).strip().splitlines()[-1:] or ["no TXT record printed"]
        return None, f"off: filterhost dkim keygen failed: {why[0]}"
    return record, "corp.test signs with selector demo (key and TXT from filterhost dkim keygen)"


def _local_data(rr: str) -> str:
    rr = " ".join(rr.split()) if '"' not in rr else rr
    quote = "'" if '"' in rr else '"'
    return f"local-data: {quote}{rr}{quote}"


def start_world(work: Path, procs: Processes) -> World:
    """Start DNS, clamd and the two recipient servers, and wait until all of them answer."""
    for sub in ("unbound", "clamd"):
        (work / sub).mkdir(mode=0o755)
    procs.start(
        "clamd",
        ["bash", str(COMPONENTS / "clamd.sh"), str(CLAMD_PORT)],
        {"CLAMD_DIR": str(work / "clamd"), "CLAMD_STREAM_MAX": "2M"},
    )
    for name, (addr, defer) in SERVERS.items():
        argv = [sys.executable, str(DEMO / "mailserver.py"), "--name", name]
        argv += ["--dir", str(work / "mailboxes" / name)]
        for domain in defer:
            argv += ["--defer-domain", domain]
        procs.start(name, [*argv, addr, str(MX_PORT)])
    world = World(list(ZONE))
    world.dkim_record, world.dkim_note = make_dkim_key(work)  # while clamd loads
    if world.dkim_record is not None:
        world.zone.append(world.dkim_record)
    procs.start(
        "unbound",
        ["bash", str(COMPONENTS / "unbound.sh"), str(DNS_PORT)],
        {
            "UNBOUND_DIR": str(work / "unbound"),
            "UNBOUND_EXTRA_DATA": "\n".join(_local_data(rr) for rr in world.zone),
        },
    )
    wait_for("unbound", _answers, 15, procs)
    wait_for("clamd", _pongs, 30, procs)
    for name, (addr, _) in SERVERS.items():
        wait_for(name, functools.partial(_greets, addr, MX_PORT), 15, procs)
    return world


def start_filterhost(work: Path, procs: Processes, world: World) -> Path:
    """Copy demo/conf.d into ``work`` and start filterhost on it; return its log.

    Without a DKIM key (no dkim plugin), the copy goes without its DKIM file.
    """
    shutil.copytree(DEMO / "conf.d", work / "conf.d")
    if world.dkim_record is None:
        (work / "conf.d" / DKIM_CONF).unlink()
    log = procs.start("filterhost", [sys.executable, "-m", "filterhost", "-c", "conf.d"])
    wait_for("filterhost", lambda: _greets(*FILTERHOST), 20, procs)
    return log


def filterhost_cli(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``filterhost ARGS`` on the demo conf.d (in ``work``, where its spool is)."""
    return subprocess.run(  # noqa: S603 - our own argv, no shell
        [sys.executable, "-m", "filterhost", *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- the messages ------------------------------------------------------------------------------


@dataclass
class Tour:
    """One message of the tour: what is sent, and what became of it."""

    name: str
    title: str
    rcpt: str
    expect: str  # delivered | refused | bounced | deferred | routed
    attachment: bytes | None = None
    sent: bytes = b""
    reply_code: int = 0
    reply_text: str = ""
    queue_id: str | None = None
    outcome: str = "unknown"
    where: list[str] = field(default_factory=list)
    story: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    next_look: float = 0.0  # (deferred) when to ask the queue CLI again

    @property
    def ok(self) -> bool:
        """Whether it ended as the tour says it should."""
        return self.outcome == self.expect


def tours() -> list[Tour]:
    """The five messages."""
    return [
        Tour("clean", "a clean message", "bob@example.test", "delivered"),
        Tour("virus", "the EICAR test file attached", "bob@example.test", "refused", EICAR),
        Tour("nullmx", "to a domain that takes no mail (null MX)", "carol@nomail.test", "bounced"),
        Tour("deferred", "to a domain whose server defers", "dave@busy.test", "deferred"),
        Tour("routed", "routed to a second next hop", "erin@partner.test", "routed"),
    ]


def build(tour: Tour, number: int) -> bytes:
    """The message as the client sends it."""
    msg = EmailMessage()
    msg["From"] = f"Alice <{SENDER}>"
    msg["To"] = tour.rcpt
    msg["Subject"] = f"demo {number}: {tour.title}"
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = email.utils.make_msgid(f"demo{number}", "ws1.corp.test")
    msg["X-Mailer"] = "demo-client 1.0"
    msg["X-Originating-IP"] = "[10.1.2.3]"
    msg.set_content(f"Hello {tour.rcpt.split('@')[0]}, this is demo message {number}.\n")
    if tour.attachment is not None:
        msg.add_attachment(
            tour.attachment, maintype="application", subtype="octet-stream", filename="eicar.com"
        )
    return msg.as_bytes(policy=email.policy.SMTP)


def send(tour: Tour, data: bytes, log: Path) -> None:
    """Send with smtplib, step by step, keeping the reply to DATA.

    A refused message gets no queue id in its reply; the log names it (``ID: refused``).
    """
    tour.sent = data
    seen = len(log_lines(log))
    with smtplib.SMTP(*FILTERHOST, local_hostname="ws1.corp.test", timeout=30) as client:
        client.ehlo()
        code, text = client.mail(SENDER)
        if code == 250:
            code, text = client.rcpt(tour.rcpt)
        if code == 250:
            code, text = client.data(data)
        tour.reply_code, tour.reply_text = code, text.decode(errors="replace")
    match = re.search(r"queued as (\S+)", tour.reply_text)
    tour.queue_id = match.group(1) if match else None
    if tour.queue_id is None:
        since = log_lines(log)[seen:]
        for line in since:
            refused = re.search(r" (\S+): refused from=", line)
            if refused:
                tour.queue_id = refused.group(1)
        if tour.queue_id is None:  # something else went wrong: show what the log said meanwhile
            tour.story = [event(line) for line in since[-12:]]


# -- what became of them -----------------------------------------------------------------------


@dataclass
class Stored:
    """A message a recipient server stored."""

    server: str
    path: Path
    mail_from: str
    rcpt_tos: list[str]

    @property
    def data(self) -> bytes:
        """The message as the server received it."""
        return self.path.read_bytes()


def mailboxes(work: Path) -> list[Stored]:
    """Every message the recipient servers have stored so far."""
    out = []
    for server in SERVERS:
        for meta in sorted((work / "mailboxes" / server).glob("*.json")):
            info = json.loads(meta.read_text())
            out.append(
                Stored(server, meta.with_suffix(".eml"), info["mail_from"], info["rcpt_tos"])
            )
    return out


def log_lines(log: Path) -> list[str]:
    """The lines of the filterhost log, one event per line."""
    return log.read_text(errors="replace").splitlines()


_LOG_LINE = re.compile(r"^\S+ (\d\d:\d\d:\d\d),(\d+) filterhost\[\d+\] (\w+) \S+: (.*)$")


def event(line: str) -> str:
    """A log line shortened to its time, level and event (the logger name and PID go)."""
    m = _LOG_LINE.match(line)
    return f"{m[1]}.{m[2]} {m[3]:<7} {m[4]}" if m else line


def story(lines: list[str], queue_id: str) -> list[str]:
    """``grep QUEUEID``, each line shortened to its time and its event."""
    return [event(line) for line in lines if queue_id in line]


def header_fields(data: bytes) -> list[str]:
    """The header fields of a message, each unfolded onto one line."""
    head = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode(errors="replace")
    fields: list[str] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += " " + line.strip()
        elif line:
            fields.append(line)
    return fields


def header_diff(tour: Tour, arrived: bytes) -> None:
    """Fill in which header fields filterhost added and removed."""
    before, after = header_fields(tour.sent), header_fields(arrived)
    tour.added = [f for f in after if f not in before]
    tour.removed = [f for f in before if f not in after]


def dsn_summary(data: bytes) -> list[str]:
    """The lines of a DSN a person looks at: who sent it, and each recipient's status."""
    report = email.message_from_bytes(data, policy=email.policy.default)
    out = [f"{name}: {report[name]}" for name in ("From", "To", "Subject")]
    kind = report.get_param("report-type")
    out.append(f"Content-Type: {report.get_content_type()}; report-type={kind}")
    for part in report.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = part.get_payload()  # the per-message block, then one per recipient
        for block in blocks if isinstance(blocks, list) else []:
            if not isinstance(block, email.message.Message):
                continue
            for name in ("Final-Recipient", "Action", "Status", "Diagnostic-Code"):
                if block[name] is not None:
                    out.append(f"{name}: {' '.join(str(block[name]).split())}")
    return [line[:100] for line in out]


def _txt(name: bytes | str, timeout: float = 5) -> bytes | None:
    """The DNS lookup dkimpy asks for (a TXT record), answered by the demo's unbound."""
    qname = name.decode() if isinstance(name, bytes) else name
    query = dns.message.make_query(qname, "TXT")
    answer = dns.query.udp(query, "127.0.0.1", port=DNS_PORT, timeout=timeout).answer
    for rrset in answer:
        for rdata in rrset:
            return b"".join(rdata.strings)
    return None


def verify_dkim(data: bytes) -> str:
    """Verify the message's DKIM signature as a receiver would: "pass" or "fail (why)"."""
    try:
        import dkim  # noqa: PLC0415 - only when a message carries a signature
    except ImportError:
        return "not checked (dkimpy is not installed)"
    try:
        return "pass" if dkim.verify(data, dnsfunc=_txt) else "fail"
    except dkim.DKIMException as exc:
        return f"fail ({exc})"


def queue_json(work: Path) -> list[dict[str, Any]]:
    """``filterhost queue list --json``."""
    result = filterhost_cli(work, "-c", "conf.d", "queue", "list", "--json")
    if result.returncode != 0:
        return []
    data: list[dict[str, Any]] = json.loads(result.stdout)
    return data


def queued(work: Path, queue_id: str) -> dict[str, Any] | None:
    """The queue's entry for ``queue_id``, or None when it is not (or no longer) queued."""
    return next((e for e in queue_json(work) if e["id"] == queue_id), None)


def find_stored(work: Path, rcpt: str, *, sender: str | None = None) -> Stored | None:
    """The stored message for ``rcpt`` (from ``sender``, if given), if there is one yet."""
    for stored in mailboxes(work):
        if rcpt in stored.rcpt_tos and (sender is None or stored.mail_from == sender):
            return stored
    return None


def _refused(tour: Tour, work: Path, log: Path) -> bool:
    qid = tour.queue_id or "-"
    spooled = any(f"{qid}: queued" in line for line in log_lines(log))
    arrived = any(tour.rcpt in s.rcpt_tos and s.data == tour.sent for s in mailboxes(work))
    bad = tour.reply_code < 500 or spooled or arrived
    tour.outcome = "accepted" if bad else "refused"
    tour.where = ["refused in-session: nothing queued, nothing relayed, no bounce to send"]
    return True


def _stored(tour: Tour, work: Path, log: Path) -> bool:
    stored = find_stored(work, tour.rcpt)
    if stored is None:
        return False
    tour.outcome = "delivered" if stored.server == "mx.example.test" else "routed"
    tour.details = {"server": stored.server, "file": stored.path.name}
    tour.where = [f"{stored.server} stored it: mailboxes/{stored.server}/{stored.path.name}"]
    if stored.server != "mx.example.test":
        domain = tour.rcpt.rpartition("@")[2]
        tour.where.append(f"(not {domain}'s MX mx.example.test: the routing plugin chose)")
    header_diff(tour, stored.data)
    if any(h.startswith("DKIM-Signature:") for h in tour.added):
        tour.details["dkim"] = verify_dkim(stored.data)
    return True


def _bounced(tour: Tour, work: Path, log: Path) -> bool:
    dsns = [s for s in mailboxes(work) if s.mail_from == "" and SENDER in s.rcpt_tos]
    dsn = next((s for s in dsns if tour.rcpt.encode() in s.data), None)
    if dsn is None:
        return False
    summary = dsn_summary(dsn.data)
    tour.outcome = "bounced" if "Action: failed" in summary else "DSN without a failure"
    tour.details = {"server": dsn.server, "file": dsn.path.name, "dsn": summary}
    text = "\n".join(story(log_lines(log), tour.queue_id or "-"))
    notified = re.search(r"dsn=(\w+)", text)
    if notified:
        tour.details["dsn_id"] = notified.group(1)
    tour.where = [
        f"bounced: a DSN to <{SENDER}> is in the sender's box, "
        f"{dsn.server}: mailboxes/{dsn.server}/{dsn.path.name}",
        *(f"  | {line}" for line in summary),
    ]
    return True


def _deferred(tour: Tour, work: Path, log: Path) -> bool:
    # Ask the queue CLI (a Python start-up each time) when the log says the attempt was made,
    # else every 2 seconds.
    said = any("deferred" in line for line in story(log_lines(log), tour.queue_id or "-"))
    if not said and time.monotonic() < tour.next_look:
        return False
    tour.next_look = time.monotonic() + 2.0
    entry = queued(work, tour.queue_id or "-")
    if entry is None:
        tour.outcome = "not in the queue"
        return find_stored(work, tour.rcpt) is not None
    (rcpt,) = entry["recipients"]
    if rcpt["attempts"] < 1:
        return False
    tour.outcome = "deferred" if rcpt["status"] == "pending" else rcpt["status"]
    tour.details = {k: rcpt[k] for k in ("status", "attempts", "next_attempt", "last_reply")}
    tour.where = [_still_queued(rcpt)]
    show = filterhost_cli(work, "-c", "conf.d", "queue", "show", entry["id"])
    header_diff(tour, show.stdout.partition("\nheaders:\n")[2].encode())
    return True


SETTLE: dict[str, Callable[[Tour, Path, Path], bool]] = {
    "refused": _refused,
    "delivered": _stored,
    "routed": _stored,
    "bounced": _bounced,
    "deferred": _deferred,
}


def settle(tour: Tour, work: Path, log: Path) -> bool:
    """Look once at what became of ``tour``; return True when it has come to rest."""
    if tour.queue_id is None and tour.reply_code < 500:
        tour.outcome = f"not accepted ({tour.reply_code})"
        return True
    return SETTLE[tour.expect](tour, work, log)


def _still_queued(rcpt: dict[str, Any]) -> str:
    nxt = datetime.datetime.fromisoformat(rcpt["next_attempt"])
    wait = (nxt - datetime.datetime.now(datetime.UTC)).total_seconds()
    return (
        f"still queued: attempts={rcpt['attempts']}, next retry {nxt:%H:%M:%S} UTC "
        f"(in {max(0, round(wait))}s), last reply: {rcpt['last_reply']}"
    )


def settle_all(todo: list[Tour], work: Path, log: Path) -> None:
    """Wait (at most WAIT seconds) until every message has come to rest."""
    deadline = time.monotonic() + WAIT
    waiting = list(todo)
    while waiting:
        waiting = [t for t in waiting if not settle(t, work, log)]
        if not waiting:
            break
        if time.monotonic() > deadline:
            for tour in waiting:
                tour.outcome = f"no outcome after {WAIT:.0f}s"
            break
        time.sleep(0.1)
    for tour in todo:  # the final story, with everything logged by now
        if tour.queue_id:
            tour.story = story(log_lines(log), tour.queue_id)
            if "dsn_id" in tour.details:
                dsn = story(log_lines(log), tour.details["dsn_id"])
                tour.story += [line for line in dsn if line not in tour.story]


# -- output ------------------------------------------------------------------------------------


def say(text: str = "") -> None:
    """Print a line of the tour."""
    print(text, flush=True)


def _short(text: str, width: int = 150) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def show_world(world: World) -> None:
    """What was started, where."""
    chain = "clamav -> headers -> routing" + (" -> dkim" if world.dkim_record else "")
    say("filterhost: the five-minute tour (make demo)")
    say()
    say("The world (a private network namespace: nothing here reaches beyond loopback):")
    say(f"  DNS          unbound 127.0.0.1:{DNS_PORT}, the demo zone:")
    for rr in world.zone:
        say(f"                 {_short(' '.join(rr.split()), 100)}")
    say(f"  scanner      clamd 127.0.0.1:{CLAMD_PORT}, only the EICAR test signatures")
    say(f"  recipients   mx.example.test 127.0.0.10:{MX_PORT} (defers busy.test with 450)")
    say(f"               gw.partner.test 127.0.0.20:{MX_PORT} (partner.test's gateway)")
    host, port = FILTERHOST
    say(f"  filterhost   {host}:{port}, demo/conf.d: {chain}")
    say('               routing: "partner.test" = "gw.partner.test:2525"; retries 30s, 1m, 5m')
    say(f"               DKIM: {world.dkim_note}")


def show_tour(number: int, tour: Tour) -> None:
    """One message, at a glance."""
    say()
    say(f"-- {number}. {tour.title}: <{SENDER}> -> <{tour.rcpt}>")
    say(f"   SMTP reply: {tour.reply_code} {tour.reply_text}")
    if tour.story:
        say(f"   log (grep {tour.queue_id}):" if tour.queue_id else "   log (while it was sent):")
        for line in tour.story:
            say(f"     {line}")
    mark = "ok" if tour.ok else f"UNEXPECTED, wanted {tour.expect}"
    say(f"   ended: {tour.outcome} [{mark}]")
    for line in tour.where:
        say(f"     {line}")
    if tour.added or tour.removed:
        say("   header lines filterhost changed:")
        for line in tour.added:
            say(f"     + {_short(line)}")
        for line in tour.removed:
            say(f"     - {_short(line)}")
    if "dkim" in tour.details:
        say(
            f"   DKIM-Signature checked at the recipient (dkimpy, demo DNS): {tour.details['dkim']}"
        )


def show_command(title: str, result: subprocess.CompletedProcess[str]) -> None:
    """A command's output, as an operator would see it."""
    say()
    say(f"$ {title}   (exit {result.returncode})")
    for line in (result.stdout + result.stderr).rstrip("\n").split("\n"):
        say(f"  {line}")


# -- the whole tour ----------------------------------------------------------------------------


def isolated() -> bool:
    """True when this network namespace has nothing but loopback (from /proc/net/dev)."""
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    names = {line.split(":", 1)[0].strip() for line in lines}
    return names <= {"lo"}


def run(work: Path, summary_path: Path | None) -> int:
    """Start the world, send the five messages, show what became of them."""
    started = time.monotonic()
    procs = Processes(work)
    todo = tours()
    summary: dict[str, Any] = {"ok": False, "messages": []}
    try:
        ports_free()
        world = start_world(work, procs)
        summary["dkim"] = {"enabled": world.dkim_record is not None, "note": world.dkim_note}
        log = start_filterhost(work, procs, world)
        summary["startup_seconds"] = round(time.monotonic() - started, 2)
        show_world(world)
        say(f"  (all started in {summary['startup_seconds']:.1f}s)")
        say()
        say(f"Five messages from <{SENDER}>, sent with smtplib (EHLO ws1.corp.test):")
        for number, tour in enumerate(todo, 1):
            send(tour, build(tour, number), log)
        summary["sent_seconds"] = round(time.monotonic() - started, 2)
        settle_all(todo, work, log)
        summary["settled_seconds"] = round(time.monotonic() - started, 2)
        for number, tour in enumerate(todo, 1):
            show_tour(number, tour)
        queue = filterhost_cli(work, "-c", "conf.d", "queue", "list")
        show_command("filterhost -c conf.d queue list", queue)
        check = filterhost_cli(work, "--check-config", "-c", "conf.d")
        show_command("filterhost --check-config -c conf.d", check)
        summary.update(
            queue_list={"rc": queue.returncode, "output": queue.stdout},
            check_config={"rc": check.returncode, "output": check.stdout + check.stderr},
            ok=all(t.ok for t in todo) and queue.returncode == 0 and check.returncode == 0,
        )
    except StartError as exc:
        say(f"demo: {exc}")
        summary["error"] = str(exc)
    finally:
        say()
        say("Stopping what the demo started:")
        for line in procs.stop_all():
            say(f"  {line}")
        summary["messages"] = [_tour_json(t) for t in todo]
        summary["pids"] = procs.pids
        summary["workdir"] = str(work)
        summary["seconds"] = round(time.monotonic() - started, 2)
        if summary_path is not None:
            summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    verdict = "every message ended as expected" if summary["ok"] else "SOMETHING WENT WRONG"
    say(f"Demo finished in {summary['seconds']:.1f}s: {verdict}.")
    if not os.environ.get("DEMO_KEEP"):
        say("(DEMO_KEEP=1 make demo keeps the mailboxes, the log and the spool to look at.)")
    return 0 if summary["ok"] else 1


def _tour_json(tour: Tour) -> dict[str, Any]:
    return {
        "name": tour.name,
        "rcpt": tour.rcpt,
        "expect": tour.expect,
        "outcome": tour.outcome,
        "ok": tour.ok,
        "reply": {"code": tour.reply_code, "text": tour.reply_text},
        "queue_id": tour.queue_id,
        "story": tour.story,
        "where": tour.where,
        "added_headers": tour.added,
        "removed_headers": tour.removed,
        "details": tour.details,
    }


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A temporary directory for everything, removed afterwards unless DEMO_KEEP is set.

    As root, clamd and unbound drop to their own users, so it lives in /tmp with mode 755.
    """
    base = "/tmp" if os.geteuid() == 0 else None  # noqa: S108 - see the docstring
    work = Path(tempfile.mkdtemp(prefix="filterhost-demo.", dir=base))
    work.chmod(0o755)
    try:
        yield work
    finally:
        if os.environ.get("DEMO_KEEP"):
            say(f"Kept {work} (DEMO_KEEP is set): mailboxes/, filterhost.log, conf.d/, spool/")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    """Parse the command line and run the tour."""
    ap = argparse.ArgumentParser(description="filterhost's five-minute tour")
    ap.add_argument("--summary", type=Path, help="write what happened as JSON to this file")
    args = ap.parse_args()
    if not isolated():
        print(
            "demo.py: this network namespace reaches beyond loopback; run demo/run.sh "
            "(or make demo), which enters a private one",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    with workdir() as work:
        return run(work, args.summary)


if __name__ == "__main__":
    sys.exit(main())
