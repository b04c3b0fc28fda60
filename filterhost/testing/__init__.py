"""Test helpers for plugin authors: run plugins without sockets, or behind a real server.

Pipeline tests need no network::

    from filterhost import Action
    from filterhost.testing import Harness, make_transaction

    async def test_refuses_executables() -> None:
        async with Harness(plugins={"noexe": NoExecutables()}) as harness:
            outcome = await harness.run(make_transaction(attachments=[("x.exe", b"MZ")]))
        assert outcome.action is Action.REJECT and outcome.plugin == "noexe"
        assert outcome.relayed == []

End-to-end tests start filterhost itself (front end, spool, queue runner, relay) in the test's
event loop, relaying to a recording next hop::

    async def test_end_to_end(filterhost_server) -> None:
        server = await filterhost_server({"noexe": NoExecutables()})
        result = await server.send(make_transaction(attachments=[("x.pdf", b"%PDF")]))
        assert result.accepted
        (relayed,) = await server.wait_relayed(1)

The fixtures ``filterhost_harness`` and ``filterhost_server`` come with the pytest plugin
:mod:`filterhost.testing.pytest_plugin`, which pytest loads by itself once filterhost is
installed (it needs ``pytest-asyncio``: ``pip install filterhost[testing]``).
"""

from filterhost.config import ConfigError
from filterhost.testing._builders import Attachment, make_message, make_session, make_transaction
from filterhost.testing._fixtures import HarnessFactory, ServerFactory
from filterhost.testing._harness import FakeRelay, Harness, Outcome, Phase, Relayed
from filterhost.testing._server import (
    RecordingNextHop,
    RunningServer,
    SessionResult,
    start_server,
)

__all__ = [
    "Attachment",
    "ConfigError",
    "FakeRelay",
    "Harness",
    "HarnessFactory",
    "Outcome",
    "Phase",
    "RecordingNextHop",
    "Relayed",
    "RunningServer",
    "ServerFactory",
    "SessionResult",
    "make_message",
    "make_session",
    "make_transaction",
    "start_server",
]
