"""Background tasks tied to the lifetime of what owns them: started on entry, cancelled and awaited on exit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait until it has finished (its own cleanup included)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@contextlib.asynccontextmanager
async def background(coro: Coroutine[Any, Any, Any], name: str) -> AsyncIterator[asyncio.Task[Any]]:
    """Run `coro` as a task for the duration of the `async with` block; it never outlives the block."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    try:
        yield task
    finally:
        await cancel(task)


class TaskGroup:
    """Short fire-and-forget tasks (e.g. Redis evictions) that are cancelled together on close; bounded by use."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            await cancel(task)
