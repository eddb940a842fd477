"""The admin service's periodic audit chain check behind `credgate_audit_chain_ok`: full walks, then new rows only."""

from __future__ import annotations

import asyncio
import logging
import math
import time

from prometheus_client import Gauge

from gateway.core import audit_chain
from gateway.core.audit_chain import ChainPoint, ChainReport
from gateway.core.store import Pool

logger = logging.getLogger(__name__)

# Between full walks, each round checks only the rows added since the last verified link (and that this link
# is still there), so a round costs the new rows, not the whole log; a full walk also catches a rewrite of
# old rows, so one runs at start, once a day, and every round while the chain is broken (a restored chain
# reads 1 again).
FULL_WALK_SECONDS = 86_400.0


class AuditChainCheck:
    """Verifies the chain every `every` seconds and sets `gauge` to 1 (intact) or 0 (broken).

    Until the first walk finishes the gauge is NaN, which no alert comparison matches: a slow first walk or
    a database away at start is not reported as tampering.
    """

    def __init__(self, pool: Pool, gauge: Gauge, every: float) -> None:
        self.pool = pool
        self.gauge = gauge
        self.every = every
        self.verified: ChainPoint | None = None  # None: the next round walks the whole chain
        self.last_full = -math.inf
        gauge.set(math.nan)

    async def check_once(self) -> ChainReport:
        full = self.verified is None or time.monotonic() - self.last_full >= FULL_WALK_SECONDS
        started = time.monotonic()
        report = await audit_chain.verify(self.pool, None if full else self.verified)
        if full:
            self.last_full = started
        if report.broken is None:
            self.verified = report.last
            self.gauge.set(1)
        else:
            self.verified = None
            self.gauge.set(0)
            logger.error("%s; run `credgate audit verify` and compare with the exported copy", report.broken.describe())
        return report

    async def run_forever(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # the database may be away for a while; the gauge keeps its last value
                logger.warning("audit chain check failed", exc_info=True)
            await asyncio.sleep(self.every)
