"""Running a coroutine on the event loop the configuration names (``[server] event_loop``)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["run_on"]


def run_on(event_loop: str, main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to its end on ``"uvloop"`` or ``"asyncio"``.

    uvloop runs the same asyncio code on libuv: fewer Python frames per read, write and timer,
    which is most of what a relay does per message (bench/PERF-LOG.md, step 7).
    """
    if event_loop == "uvloop":
        import uvloop  # noqa: PLC0415 - only when asked for

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
        return
    asyncio.run(main)
