"""pytest fixtures that start the real components and always stop them again.

``dns_server`` and ``clamd_server`` live for the whole session (they hold no per-test
state; a test that needs extra DNS records starts its own with ``start_unbound``).
``sinks`` and ``peers`` are per-test factories: what a test starts is stopped after it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tests.components.services import (
    Clamd,
    Dns,
    Peer,
    Sink,
    start_clamd,
    start_recording_peer,
    start_sink,
    start_unbound,
)


@pytest.fixture(scope="session")
def dns_server() -> Iterator[Dns]:
    """Unbound with the test zone on 127.0.0.1 (see tests/components/unbound.sh)."""
    server = start_unbound()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def clamd_server() -> Iterator[Clamd]:
    """Clamd with only the EICAR test signatures, StreamMaxLength 2M."""
    server = start_clamd()
    try:
        yield server
    finally:
        server.stop()


class Sinks:
    """Factory for smtp-sink servers; everything it started is stopped at teardown."""

    def __init__(self) -> None:
        self.started: list[Sink] = []

    def start(self, addr: str, port: int, *options: str) -> Sink:
        """Start smtp-sink on addr:port with extra smtp-sink ``options``."""
        sink = start_sink(addr, port, *options)
        self.started.append(sink)
        return sink

    def stop_all(self) -> None:
        """Stop every sink, newest first."""
        while self.started:
            self.started.pop().stop()


class Peers:
    """Factory for recording peers (``peer.py``); all are stopped at teardown."""

    def __init__(self) -> None:
        self.started: list[Peer] = []

    def start(
        self,
        addr: str,
        port: int,
        replies: Mapping[str, tuple[int, str]] | None = None,
        **options: Any,
    ) -> Peer:
        """Start a recording peer on addr:port (arguments: see start_recording_peer)."""
        peer = start_recording_peer(addr, port, replies, **options)
        self.started.append(peer)
        return peer

    def stop_all(self) -> None:
        """Stop every peer, newest first."""
        while self.started:
            self.started.pop().stop()


@pytest.fixture
def sinks() -> Iterator[Sinks]:
    """``sinks.start("127.0.0.2", port, "-r", "RCPT")`` starts an smtp-sink for this test."""
    factory = Sinks()
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def peers() -> Iterator[Peers]:
    """``peers.start("127.0.0.3", port)`` starts a recording peer for this test."""
    factory = Peers()
    try:
        yield factory
    finally:
        factory.stop_all()
