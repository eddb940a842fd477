"""The lifecycle-event delivery worker: one per deployment (an advisory lock), it scans for expiring
credentials, fans outbox events out to their URLs and posts each, signed, with retries and backoff."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from admin.lifecycle import LifecycleError, NotFound
from admin.metrics import AdminMetrics
from gateway.core import database, outbox, store
from gateway.core.redaction import redact_url
from gateway.core.sections import WebhookSettings
from gateway.core.store import Actor, Connection, Pool, Record

logger = logging.getLogger(__name__)

# Arbitrary constant shared by every admin process ("credhook"): who holds it is the one delivery worker.
WORKER_LOCK_ID = 0x63726564686F6F6B
# How often a worker looks for due work, and how often a non-leader asks for the lock again.
POLL_SECONDS = 0.5
LEADER_RETRY_SECONDS = 2.0
# Deliveries posted at once per round; events fanned out per round.
BATCH = 20
FAN_OUT_BATCH = 200
# Backoff after failed attempt n: 1 s, 2 s, 4 s ... capped, so a receiver back after an outage hears soon.
MAX_BACKOFF_SECONDS = 600.0
# A claimed delivery is not due again before the attempt's timeout plus this, even if its worker died.
LEASE_MARGIN_SECONDS = 5.0
# What the receiver's error body may add to last_error (it is shown in the admin API).
ERROR_TEXT_CHARS = 200


def backoff(attempts: int) -> float:
    """Seconds to wait after the attempts-th failed attempt."""
    return min(MAX_BACKOFF_SECONDS, 2.0 ** max(0, attempts - 1))


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one post gave: the receiver's status (None: no answer) and a short, secret-free reason."""

    status: int | None
    error: str

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class DeliveryWorker:
    """Runs in every admin process; only the holder of WORKER_LOCK_ID works, the others wait for the lock."""

    def __init__(self, settings: WebhookSettings, pool: Pool, dsn: str, metrics: AdminMetrics) -> None:
        self.settings = settings
        self.pool = pool
        self.dsn = dsn
        self.metrics = metrics
        self.next_scan = 0.0

    async def run(self) -> None:
        if not self.settings.secret.reveal():  # the settings insist on one when webhooks.urls is set
            logger.info("webhooks.secret is not set: lifecycle events are recorded (and pruned), none is sent")
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            while True:
                try:
                    await self._lead(session)
                except Exception:  # the database may be away for a while; ask for the lock again later
                    logger.warning("webhook worker stopped; retrying", exc_info=True)
                await asyncio.sleep(LEADER_RETRY_SECONDS)

    async def _lead(self, session: aiohttp.ClientSession) -> None:
        """Hold the lock on a connection of its own (it goes with the connection) and work while held."""
        lock_conn = await database.connect(self.dsn, timeout=10.0)
        try:
            if not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", WORKER_LOCK_ID):
                return
            logger.info("this admin process delivers lifecycle events")
            while True:
                # a lost lock connection ends the turn (another replica may take over); the leases keep
                # rows claimed here from being posted twice at once meanwhile
                await lock_conn.fetchval("SELECT 1", timeout=self.settings.timeout + LEASE_MARGIN_SECONDS)
                if not await self.work_once(session):
                    await asyncio.sleep(POLL_SECONDS)
        finally:
            lock_conn.terminate()

    async def work_once(self, session: aiohttp.ClientSession) -> int:
        """One round: the expiry scan when due, fan-out, then the due deliveries; returns how many were posted."""
        async with self.pool.acquire() as conn:
            if time.monotonic() >= self.next_scan:
                await outbox.scan_expiry(conn)
                self.next_scan = time.monotonic() + self.settings.expiry_scan_seconds
            async with conn.transaction():
                await conn.execute(outbox.FAN_OUT, list(self.settings.urls), FAN_OUT_BATCH)
            if not self.settings.secret.reveal():
                return 0  # nothing can be signed: owners' deliveries wait for a secret
            async with conn.transaction():
                due = await conn.fetch(outbox.CLAIM_DUE, BATCH, self.settings.timeout + LEASE_MARGIN_SECONDS)
        if due:
            results = await asyncio.gather(*(self.post(session, row) for row in due))
            async with self.pool.acquire() as conn:
                for row, attempt in zip(due, results, strict=True):
                    await self.record(conn, row, attempt)
        return len(due)

    async def post(self, session: aiohttp.ClientSession, row: Record) -> Attempt:
        body = outbox.body_of(row)
        headers = {
            "Content-Type": "application/json",
            outbox.ID_HEADER: str(row["event_id"]),
            outbox.SIGNATURE_HEADER: outbox.signature(self.settings.secret.reveal(), int(time.time()), body),
            "User-Agent": "credgate-webhooks/1",
        }
        try:
            async with session.post(row["url"], data=body, headers=headers, allow_redirects=False) as resp:
                text = "" if resp.status < 300 else (await resp.content.read(ERROR_TEXT_CHARS)).decode(errors="replace")
                return Attempt(resp.status, f"HTTP {resp.status} {text}".strip() if resp.status >= 300 else "")
        except TimeoutError:
            return Attempt(None, f"no answer within {self.settings.timeout:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Attempt(None, exc.__class__.__name__)

    async def record(self, conn: Connection, row: Record, attempt: Attempt) -> None:
        if attempt.delivered:
            await conn.execute(outbox.MARK_DELIVERED, row["id"], attempt.status)
            self.metrics.webhook_deliveries.labels("delivered").inc()
            return
        status = await conn.fetchval(outbox.MARK_ATTEMPT_FAILED, row["id"], attempt.status, attempt.error,
                                     backoff(row["attempts"]), self.settings.retry_for)
        self.metrics.webhook_deliveries.labels("failed" if status == "failed" else "retry").inc()
        log: Any = logger.warning if status == "failed" else logger.info
        log("webhook %s %s to %s: attempt %d failed (%s)%s", row["type"], row["event_id"], redact_url(row["url"]),
            row["attempts"], attempt.error, "; marked failed" if status == "failed" else "; will retry")


async def set_owner_url(pool: Pool, actor: Actor, name: str, url: str | None) -> dict[str, Any]:
    """Set (or with None clear) a user's own webhook URL, audited; shared by the API and the CLI."""
    if url is not None and (problem := outbox.url_problem(url)):
        raise LifecycleError(f"webhook_url: {problem}", "webhook_url")
    async with pool.acquire() as conn, conn.transaction():
        before = await conn.fetchrow(outbox.WEBHOOK_URL_OF, name)
        if before is None:
            raise NotFound(f"no user or service account named {name!r}", "name")
        row = await conn.fetchrow(outbox.SET_WEBHOOK_URL, name, url)
        assert row is not None  # the row was just read in this transaction
        if before["webhook_url"] != url:
            shown = {k: None if v is None else redact_url(v) for k, v in (("before", before["webhook_url"]),
                                                                          ("after", url))}
            await store.write_audit(conn, actor, "principal.webhook", "principal", name, {"webhook_url": shown})
    return {"name": row["name"], "webhook_url": row["webhook_url"]}
