"""Keep-alive connections to upstreams, per (host, port): `acquire` one that is idle, `connect` a new one,
`release` one whose exchange completed cleanly. Idle connections close after `upstream_idle`."""

from __future__ import annotations

import asyncio
from typing import Final

from gateway.core.settings import Limits
from gateway.http.deadlines import Deadlines
from gateway.http.upstream import UpstreamConnection

# Idle connections are swept this many times per `upstream_idle`: they close after 0.75x-1x of it.
_SWEEPS_PER_LIFETIME: Final = 4
# Idle connections kept per upstream; more are closed as they go idle.
_MAX_IDLE_PER_UPSTREAM: Final = 256

Key = tuple[str, int]


class UpstreamPool:
    """Idle keep-alive connections per (host, port), most recently used first."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits, deadlines: Deadlines) -> None:
        self.loop = loop
        self.deadlines = deadlines
        self.max_head_bytes = limits.max_header_bytes + limits.max_request_line
        self.max_idle = _MAX_IDLE_PER_UPSTREAM
        self._sweep_every = limits.upstream_idle / _SWEEPS_PER_LIFETIME
        # Idle connections per (host, port), oldest first: taken from the end (most recently used).
        self.idle: dict[Key, list[UpstreamConnection]] = {}
        self.live: set[UpstreamConnection] = set()
        self.sweeps = 0  # counts sweeps, so going idle costs no clock read
        self.deadline_slot = 0
        self._sweeping = False
        self._closed = False

    def acquire(self, key: Key) -> UpstreamConnection | None:
        """The most recently used idle connection to `key`, if any (it may have closed meanwhile: the exchange
        then fails with a retryable reset)."""
        idle = self.idle.get(key)
        return idle.pop() if idle else None

    async def connect(self, key: Key, connect_timeout: float) -> UpstreamConnection:
        """Open a new connection (OSError / TimeoutError on failure)."""
        async with asyncio.timeout(connect_timeout):
            _, conn = await self.loop.create_connection(lambda: UpstreamConnection(self, key), key[0], key[1])
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Take back a connection whose last response completed cleanly: idle, or closed when too many are."""
        idle = self.idle.get(conn.key)
        if idle is None:
            if self._closed or conn.closed:
                conn.close()
                return
            idle = self.idle[conn.key] = []
        if len(idle) >= self.max_idle or conn.closed:
            conn.close()
            return
        conn.idle_since = self.sweeps
        idle.append(conn)
        if not self._sweeping:
            self._sweeping = True
            self.deadlines.arm(self, self.loop.time() + self._sweep_every)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection went away (the upstream closed it, or we did)."""
        self.live.discard(conn)
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        """Close every connection, idle or busy (shutdown)."""
        self._closed = True
        self.idle.clear()
        for conn in list(self.live):
            conn.close(abort=True)

    def on_deadline(self, now: float) -> float:
        """A sweep: close the connections idle for the whole lifetime."""
        self.sweeps += 1
        oldest_kept = self.sweeps - _SWEEPS_PER_LIFETIME
        remaining = 0
        for key, idle in list(self.idle.items()):
            expired = 0
            while expired < len(idle) and idle[expired].idle_since <= oldest_kept:
                expired += 1
            for conn in idle[:expired]:
                conn.close()
            del idle[:expired]
            if idle:
                remaining += len(idle)
            else:
                del self.idle[key]
        self._sweeping = bool(remaining) and not self._closed
        return now + self._sweep_every if self._sweeping else 0.0
