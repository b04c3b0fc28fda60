"""Builders for test messages and transactions: real RFC 5322 bytes, CRLF line ends."""

from __future__ import annotations

import email
import email.policy
import email.utils
import itertools
import mimetypes
from collections.abc import Iterable, Mapping, Sequence
from email.message import EmailMessage

from filterhost.message import Message
from filterhost.model import Session, Transaction

__all__ = ["Attachment", "make_message", "make_session", "make_transaction"]

Attachment = tuple[str, bytes] | tuple[str, bytes, str]
"""``(filename, content)`` or ``(filename, content, "type/subtype")``."""

DEFAULT_SENDER = "sender@example.test"
DEFAULT_RECIPIENTS = ("rcpt@example.test",)
DEFAULT_CLIENT_IP = "127.0.0.1"
DEFAULT_HELO = "client.example.test"
# A fixed date keeps messages built in tests identical from run to run.
DEFAULT_DATE = "Tue, 24 Nov 2026 09:00:00 +0000"

_session_ids = itertools.count(1)
# Python's own table only: the system's /etc/mime.types differs from machine to machine.
_TYPES = mimetypes.MimeTypes()


def _content_type(filename: str) -> tuple[str, str]:
    guessed, _ = _TYPES.guess_type(filename, strict=False)
    maintype, _, subtype = (guessed or "application/octet-stream").partition("/")
    return maintype, subtype


def make_message(
    *,
    subject: str = "Test message",
    sender: str = DEFAULT_SENDER,
    to: Sequence[str] = DEFAULT_RECIPIENTS,
    body: str = "Hello.\n",
    html: str | None = None,
    attachments: Iterable[Attachment] = (),
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
) -> Message:
    """A well-formed message, built with :mod:`email` and serialised with CRLF line ends.

    :param subject: the ``Subject``.
    :param sender: the ``From`` address.
    :param to: the ``To`` addresses.
    :param body: the plain-text body (any Unicode; encoded as the :mod:`email` package chooses).
    :param html: an HTML alternative to ``body``, if given.
    :param attachments: files as ``(filename, content)`` or ``(filename, content, type)``; the
        type is guessed from the file name when not given. A non-ASCII file name is encoded as
        RFC 2231 does.
    :param headers: more header fields, added after the standard ones (``Date``,
        ``Message-ID``, ``From``, ``To``, ``Subject``), in order.
    """
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["Date"] = DEFAULT_DATE
    msg["Message-ID"] = email.utils.make_msgid(domain="example.test")
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        msg[name] = value
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for attachment in attachments:
        filename, content = attachment[0], attachment[1]
        if len(attachment) == 3:
            maintype, _, subtype = attachment[2].partition("/")
        else:
            maintype, subtype = _content_type(filename)
        if (maintype, subtype) == ("message", "rfc822"):
            inner = email.message_from_bytes(content, policy=email.policy.SMTP)
            msg.add_attachment(inner, filename=filename)
        else:
            msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    return Message(msg.as_bytes())


def make_session(
    *,
    client_ip: str = DEFAULT_CLIENT_IP,
    helo: str | None = DEFAULT_HELO,
    authenticated_as: str | None = None,
    tls: bool = False,
) -> Session:
    """A client session as the front end creates it (``trusted`` is set by the harness)."""
    return Session(
        id=f"S-test-{next(_session_ids)}",
        client_ip=client_ip,
        helo=helo,
        esmtp=helo is not None,
        authenticated_as=authenticated_as,
        tls=tls,
    )


def make_transaction(
    message: Message | bytes | None = None,
    *,
    mail_from: str = DEFAULT_SENDER,
    recipients: Sequence[str] = DEFAULT_RECIPIENTS,
    mail_options: Sequence[str] = (),
    session: Session | None = None,
    subject: str = "Test message",
    body: str = "Hello.\n",
    html: str | None = None,
    attachments: Iterable[Attachment] = (),
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
) -> Transaction:
    """A transaction: envelope, session and message, ready for :meth:`Harness.run`.

    :param message: the message, as a :class:`~filterhost.Message` or raw CRLF bytes; when
        None it is built by :func:`make_message` from ``subject``, ``body``, ``html``,
        ``attachments`` and ``headers``, with ``From``/``To`` from the envelope.
    :param mail_from: the envelope sender (``""``: the null sender).
    :param recipients: the envelope recipients.
    :param mail_options: ESMTP parameters of MAIL FROM.
    :param session: the client session; by default :func:`make_session` (127.0.0.1).
    """
    if message is None:
        message = make_message(
            subject=subject,
            sender=mail_from or "mailer-daemon@example.test",
            to=recipients,
            body=body,
            html=html,
            attachments=attachments,
            headers=headers,
        )
    elif isinstance(message, bytes):
        message = Message(message)
    return Transaction(
        session=session if session is not None else make_session(),
        mail_from=mail_from,
        recipients=list(recipients),
        message=message,
        mail_options=list(mail_options),
    )
