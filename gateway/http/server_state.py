"""What every connection of one listening data plane shares: the handler, the limits, the upstream pool, the
one deadline timer, and what shutdown needs (the open connections, the tasks in flight)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

from gateway.core.settings import Limits
from gateway.http.deadlines import Deadlines
from gateway.http.exchange import Handler
from gateway.http.pool import UpstreamPool


class Connection(Protocol):
    """A client connection, as shutdown sees it."""

    def shutdown(self) -> None: ...
    def abort(self) -> None: ...


class ServerState:
    """Shared by the connections of one server."""

    __slots__ = ("closing", "connections", "deadlines", "drained", "handler", "limits", "loop", "pool", "tasks")

    def __init__(self, handler: Handler, limits: Limits, loop: asyncio.AbstractEventLoop) -> None:
        self.handler = handler
        self.limits = limits
        self.loop = loop
        self.deadlines = Deadlines(loop)
        self.pool = UpstreamPool(loop, limits, self.deadlines)
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self.drained: asyncio.Event | None = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self.drained is not None:
            self.drained.set()
