"""pytest fixtures for plugin authors: ``filterhost_harness`` and ``filterhost_server``.

Registered through the ``pytest11`` entry point, so any project with filterhost installed has
them. Both are factories, so a test says which plugins and settings it wants; everything they
start is stopped when the test ends. They are async fixtures and need ``pytest-asyncio``.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

if TYPE_CHECKING:
    from filterhost.testing import HarnessFactory, ServerFactory

__all__ = ["filterhost_harness", "filterhost_server"]

F = TypeVar("F", bound=Callable[..., Any])


def _async_fixture(func: F) -> F:
    """``pytest_asyncio.fixture``, or, without pytest-asyncio, a fixture that says what is missing.

    This module is loaded into every pytest run of an environment that has filterhost; a
    missing optional dependency must not break test suites that never use these fixtures.
    """
    try:
        import pytest_asyncio  # noqa: PLC0415 - optional, see above
    except ImportError:

        @functools.wraps(func)
        def missing(*args: object, **kwargs: object) -> None:
            raise pytest.UsageError(
                f"the {func.__name__} fixture needs pytest-asyncio: "
                "pip install 'filterhost[testing]'"
            )

        return cast(F, pytest.fixture(missing))
    return cast(F, pytest_asyncio.fixture(func))


@_async_fixture
async def filterhost_harness() -> AsyncIterator[HarnessFactory]:
    """A factory of started harnesses; each is stopped (``filterhost_shutdown``) at teardown.

    Call it as ``harness = await filterhost_harness(plugins, config)``.
    """
    from filterhost.testing import HarnessFactory  # noqa: PLC0415 - keep pytest start-up light

    async with AsyncExitStack() as stack:
        yield HarnessFactory(stack)


@_async_fixture
async def filterhost_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """A factory of running filterhost servers; each is stopped at teardown.

    Call it as ``server = await filterhost_server(plugins, config)``. A server listens on a
    free port of 127.0.0.1, spools under ``tmp_path`` and relays everything to a recording
    next hop (``await server.wait_relayed()``).
    """
    from filterhost.testing import ServerFactory  # noqa: PLC0415 - keep pytest start-up light

    async with AsyncExitStack() as stack:
        yield ServerFactory(stack, tmp_path)
