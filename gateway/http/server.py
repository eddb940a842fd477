"""Start and stop a listening data plane: `start_server` serves a handler on a port with the limits;
`ProxyServer.shutdown` stops accepting, lets exchanges in flight finish, then closes everything."""

from __future__ import annotations

import asyncio
import logging
import socket

from gateway.core.settings import Limits
from gateway.http.client import ClientConnection
from gateway.http.exchange import Handler
from gateway.http.server_state import ServerState

logger = logging.getLogger(__name__)


class ProxyServer:
    """A listening data plane; `shutdown` drains it."""

    def __init__(self, server: asyncio.AbstractServer, state: ServerState) -> None:
        self._server = server
        self.state = state
        self._port: int = self.sockets[0].getsockname()[1]

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (empty once shut down)."""
        return tuple(getattr(self._server, "sockets", ()) or ())

    @property
    def port(self) -> int:
        """The port of the first listening socket (kept after shutdown)."""
        return self._port

    async def shutdown(self, timeout: float) -> None:  # noqa: ASYNC109  (the grace period, not a cancel scope)
        """Stop accepting, let exchanges in flight finish for up to `timeout` seconds, then force-close."""
        state = self.state
        self._server.close()
        state.closing = True
        state.drained = asyncio.Event()
        for conn in list(state.connections):
            conn.shutdown()
        if state.connections:
            try:
                async with asyncio.timeout(timeout):
                    await state.drained.wait()
            except TimeoutError:
                logger.warning("shutdown: forcing %d connections closed", len(state.connections))
        for conn in list(state.connections):
            conn.abort()
        state.pool.close()
        for task in list(state.tasks):
            task.cancel()
        if state.tasks:
            await asyncio.gather(*state.tasks, return_exceptions=True)
        await self._server.wait_closed()
        for _ in range(100):  # connection_lost of the transports closed above runs on later loop iterations
            if not state.connections and not state.pool.live:
                break
            await asyncio.sleep(0.001)
        state.deadlines.close()


async def start_server(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: Limits,
    reuse_port: bool = False,
    sock: socket.socket | None = None,
    backlog: int = 2048,
) -> ProxyServer:
    """Listen on host:port (or `sock`) and serve the data plane with `handler`."""
    loop = asyncio.get_running_loop()
    state = ServerState(handler, limits, loop)

    def factory() -> ClientConnection:
        return ClientConnection(state)

    if sock is not None:
        server = await loop.create_server(factory, sock=sock, backlog=backlog)
    else:
        server = await loop.create_server(factory, host, port, reuse_port=reuse_port or None, backlog=backlog)
    return ProxyServer(server, state)
