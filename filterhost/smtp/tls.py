"""The server's TLS context, and the certificate checks behind ``--check-config``."""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["certificate_problems", "server_context"]


def _no_passphrase() -> bytes:
    # An encrypted key must fail to load here, not stop the server to prompt on a terminal.
    raise ValueError("the key is encrypted; filterhost needs an unencrypted key file")


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 or later, no client certificates asked for."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key, password=_no_passphrase)
    return context


def _read(path: Path, what: str) -> tuple[str | None, str | None]:
    try:
        return path.read_text(encoding="ascii", errors="replace"), None
    except FileNotFoundError:
        return None, f"{path}: no such file"
    except IsADirectoryError:
        return None, f"{path}: is a directory, expected a PEM {what} file"
    except OSError as exc:
        return None, f"{path}: cannot be read: {exc.strerror or exc}"


def certificate_problems(cert: Path, key: Path) -> list[tuple[str, str]]:
    """What is wrong with a certificate and key pair, as ``(config key, message)`` pairs.

    Checks that each file can be read and is PEM of the right kind, that the certificate
    parses, and that the key loads and belongs to the certificate.
    """
    problems: list[tuple[str, str]] = []
    cert_text, error = _read(cert, "certificate")
    if error:
        problems.append(("tls_cert", error))
    elif cert_text is not None and "-----BEGIN CERTIFICATE-----" not in cert_text:
        problems.append(("tls_cert", f"{cert}: not a PEM certificate (no BEGIN CERTIFICATE)"))
    else:
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            probe.load_verify_locations(cafile=str(cert))
        except ssl.SSLError as exc:
            problems.append(("tls_cert", f"{cert}: the certificate does not parse: {exc.reason}"))
    key_text, error = _read(key, "key")
    if error:
        problems.append(("tls_key", error))
    elif key_text is not None and "PRIVATE KEY-----" not in key_text:
        problems.append(("tls_key", f"{key}: not a PEM private key (no BEGIN ... PRIVATE KEY)"))
    if problems:
        return problems
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problems.append(("tls_key", f"{key} does not match the certificate in {cert}"))
        else:
            problems.append(("tls_key", f"{key}: the key does not load: {exc.reason or exc}"))
    except ValueError as exc:
        problems.append(("tls_key", f"{key}: {exc}"))
    return problems
