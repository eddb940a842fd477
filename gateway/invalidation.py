"""The invalidation listener: LISTENs for the store's change notifications and evicts affected entries.

A lost connection marks the whole memory tier stale (re-checked before use) and reconnects with
exponential backoff; TTLs bound staleness whatever happens. It connects as the pool does (`database.connect`):
to the primary of a host list, so after a failover it follows the promoted standby. LISTEN needs a session of
its own on the primary itself: not a standby (which refuses LISTEN) nor a transaction-mode pooler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway.core import database, store
from gateway.core.errors import STORE_ERRORS
from gateway.core.tasks import TaskGroup, background
from gateway.memory import MemoryCache
from gateway.redis_tier import RedisTier

logger = logging.getLogger(__name__)

# How often an idle LISTEN connection is probed: a hung server is noticed within this plus the timeout.
_PROBE_SECONDS = 2.0
# The longest pause between reconnection attempts (jittered by +-50%). A failover (a standby promoted) takes
# seconds, and every one the channel stays down after it is a second of caches re-checked against the store;
# a failed attempt costs little (a refused connection, or a standby saying it is not the primary).
_MAX_RECONNECT_DELAY = 2.0


class InvalidationListener:
    """Evicts from both tiers what each change notification names; `connected` tells whether it is listening."""

    def __init__(
        self,
        dsn: str,
        memory: MemoryCache,
        redis_tier: RedisTier,
        pool: store.Pool,
        *,
        timeout: float = 1.5,
        on_event: Callable[[float], None] = lambda _lag: None,
        on_state: Callable[[bool], None] = lambda _up: None,
        on_token_revoked: Callable[[dict[str, Any]], None] = lambda _event: None,
    ) -> None:
        self.dsn = dsn
        self.memory = memory
        self.redis = redis_tier
        self.pool = pool
        self.timeout = timeout  # for each query on the LISTEN connection
        self.connected = False
        self.on_event = on_event  # called with the lag (seconds) of each event
        self.on_state = on_state
        # "t": "j" events (an OAuth access token revoked; migration 003) go to the token denylist.
        self.on_token_revoked = on_token_revoked
        self._lost = asyncio.Event()
        self._evictions = TaskGroup()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[InvalidationListener]:
        """Listen for the duration of the block."""
        try:
            async with background(self._run(), "invalidation listener"):
                yield self
        finally:
            await self._evictions.close()

    def _set_state(self, connected: bool) -> None:
        self.connected = connected
        self.on_state(connected)

    async def _run(self) -> None:
        delay = 0.1
        first = True
        while True:
            conn = None
            try:
                # target_session_attrs (read-write for a host list) keeps it off standbys
                conn = await database.connect(
                    self.dsn, timeout=5, server_settings={"application_name": "credgate-listen"}
                )
                self._lost.clear()
                conn.add_termination_listener(lambda _c: self._lost.set())
                await conn.add_listener(store.NOTIFY_CHANNEL, self._notified)
                # Listening now. Any change committed before this point may have been missed (while this
                # process was not listening, or before it started): whatever any tier holds from a store read
                # that saw fewer changes is re-validated against the store before it is used again.
                caught_up = await asyncio.wait_for(conn.fetchval(store.CHANGE_SEQUENCE), timeout=self.timeout)
                self.memory.changed(int(caught_up))
                if not first:
                    self.memory.mark_all_stale()
                first = False
                self._set_state(True)
                delay = 0.1
                while not self._lost.is_set():
                    try:
                        await asyncio.wait_for(self._lost.wait(), timeout=_PROBE_SECONDS)
                    except TimeoutError:
                        # a silently dead TCP connection (or a frozen server) never terminates: probe it
                        await asyncio.wait_for(conn.execute(store.PING), timeout=self.timeout)
            except asyncio.CancelledError:
                raise
            except STORE_ERRORS as exc:
                logger.debug("listen connection problem: %s", exc.__class__.__name__)
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            if self.connected:
                logger.warning("lost the invalidation channel; cache marked stale, reconnecting")
            self.memory.mark_all_stale()
            self._set_state(False)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, _MAX_RECONNECT_DELAY)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
            kind, ident, ts = event["t"], str(event["id"]), float(event["ts"])
            seq = int(event["seq"]) if kind != "j" else 0
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed invalidation payload")
            return
        if kind == "c":
            self.memory.changed(seq, public_id=ident)
            self.memory.evict(ident)
            self._evictions.spawn(self.redis.delete([ident]))
        elif kind == "p":
            self.memory.changed(seq, owner_id=int(ident))
            evicted = self.memory.evict_owner(int(ident))
            self._evictions.spawn(self._evict_owner_everywhere(int(ident), evicted))
        elif kind == "j":
            self.on_token_revoked(event)
        else:
            self.memory.changed(seq)
            for public_id in list(self.memory.entries):
                self.memory.evict(public_id)
            self._evictions.spawn(self.redis.flush_all())
        self.on_event(max(0.0, time.time() - ts))

    async def _evict_owner_everywhere(self, owner_id: int, evicted: list[str]) -> None:
        await self.redis.delete(sorted(evicted))  # the ones we know of first, without waiting for the query
        ids = set(evicted)
        try:
            rows = await self.pool.fetch(store.CREDENTIAL_IDS_OF_OWNER, owner_id)
            ids.update(r[0] for r in rows)
        except STORE_ERRORS:
            logger.warning("could not list credentials of principal %s; flushing Redis tier", owner_id)
            await self.redis.flush_all()
        await self.redis.delete(sorted(ids))
