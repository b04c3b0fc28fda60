"""The factories behind the pytest fixtures, usable with any test runner."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from filterhost.testing._config import PluginsArg
from filterhost.testing._harness import FakeRelay, Harness
from filterhost.testing._server import RunningServer, start_server
from filterhost.verdict import Reply

__all__ = ["HarnessFactory", "ServerFactory"]


class HarnessFactory:
    """Makes :class:`~filterhost.testing.Harness` objects; started, and stopped after the test."""

    def __init__(self, stack: AsyncExitStack) -> None:
        self._stack = stack

    async def __call__(
        self,
        plugins: PluginsArg,
        config: Mapping[str, Any] | None = None,
        *,
        relay: FakeRelay | None = None,
    ) -> Harness:
        """A started harness with ``plugins`` and ``config`` (see Harness)."""
        return await self._stack.enter_async_context(Harness(plugins, config, relay=relay))


class ServerFactory:
    """Starts real filterhost servers in the test's event loop; all stopped after the test."""

    def __init__(self, stack: AsyncExitStack, directory: Path) -> None:
        self._stack = stack
        self._directory = directory
        self._count = 0

    async def __call__(
        self,
        plugins: PluginsArg,
        config: Mapping[str, Any] | None = None,
        *,
        next_hop_replies: Mapping[str, Reply] | None = None,
    ) -> RunningServer:
        """A serving filterhost with ``plugins`` and ``config`` (see ``start_server``)."""
        self._count += 1
        directory = self._directory / f"filterhost-{self._count}"
        directory.mkdir()
        return await self._stack.enter_async_context(
            start_server(plugins, config, directory=directory, next_hop_replies=next_hop_replies)
        )
