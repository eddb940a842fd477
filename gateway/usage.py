"""Per-credential usage: request counts by day and last-used times, accumulated in memory, written in batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import asyncpg

from gateway.core import store
from gateway.core.tasks import background

logger = logging.getLogger(__name__)


class UsageRecorder:
    """`record()` is a dict increment on the hot path; `flush()` writes everything in one transaction."""

    def __init__(self, pool: store.Pool, interval: float) -> None:
        self.pool = pool
        self.interval = interval
        self.counts: dict[int, int] = {}
        self.day = datetime.now(UTC).date()
        self.pending: dict[tuple[int, date], int] = {}
        self.last_used: dict[int, datetime] = {}

    def record(self, credential_id: int) -> None:
        self.counts[credential_id] = self.counts.get(credential_id, 0) + 1

    def _harvest(self) -> None:
        """Move the hot counters into the pending batch, stamped with today's date and the time now."""
        if not self.counts:
            return
        now = datetime.now(UTC)
        counts, self.counts = self.counts, {}
        for cid, n in counts.items():
            key = (cid, now.date())
            self.pending[key] = self.pending.get(key, 0) + n
            self.last_used[cid] = now

    async def flush(self) -> None:
        self._harvest()
        if not self.pending and not self.last_used:
            return
        pending, last_used = self.pending, self.last_used
        self.pending, self.last_used = {}, {}
        try:
            async with self.pool.acquire(timeout=5) as conn:
                await store.write_usage(conn, pending, last_used)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning(
                "usage flush failed (%s); keeping %d counters for the next try", exc.__class__.__name__, len(pending)
            )
            self._keep(pending, last_used)
        except asyncio.CancelledError:  # the batch was not written (the transaction rolls back): keep it
            self._keep(pending, last_used)
            raise

    def _keep(self, pending: dict[tuple[int, date], int], last_used: dict[int, datetime]) -> None:
        for key, n in pending.items():
            self.pending[key] = self.pending.get(key, 0) + n
        for cid, at in last_used.items():
            self.last_used[cid] = max(at, self.last_used.get(cid, at))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[UsageRecorder]:
        """Flush every `interval` seconds for the block's duration, and once more at its end.

        At the end the flusher is asked to stop rather than cancelled, so a write in flight completes
        (cancelling it mid-write lost the batch: requests admitted just before a shutdown went uncounted,
        and a quota re-read from Postgres after a Redis flush then allowed more than its limit).
        """
        stop = asyncio.Event()
        try:
            async with background(self._loop(stop), "usage flusher") as task:
                try:
                    yield self
                finally:
                    stop.set()
                    await asyncio.wait({task}, timeout=10)  # then background() cancels it if still running
        finally:
            await self.flush()

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
            await self.flush()
