"""The admin service's Prometheus metrics (registry passed in): API requests, credential gauges, webhooks."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.core import outbox, store
from gateway.core.store import Pool

logger = logging.getLogger(__name__)

STATUSES = ("valid", "expired", "suspended", "revoked")
# Clients choose the method string: anything else is counted as OTHER so labels stay few.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
EXPIRING_WINDOWS = (7, 30)
# Gauges are refreshed by one aggregate query this often: cheap, and fresh enough for expiry alerts.
REFRESH_SECONDS = 30.0


class AdminMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "credgate_admin_requests", "Admin API requests by route template, method and status",
            ["route", "method", "status"], registry=registry)
        self.credentials = Gauge(
            "credgate_admin_credentials", "Credentials by status", ["status"], registry=registry)
        self.expiring = Gauge(
            "credgate_admin_credentials_expiring", "Valid credentials that expire within the given number of days",
            ["within_days"], registry=registry)
        self.webhook_deliveries = Counter(
            "credgate_webhook_deliveries", "Webhook delivery attempts by result (delivered, retry, failed for good)",
            ["result"], registry=registry)
        for result in ("delivered", "retry", "failed"):
            self.webhook_deliveries.labels(result)
        self.webhook_pending = Gauge(
            "credgate_webhook_deliveries_pending", "Webhook deliveries not yet delivered or failed", registry=registry)
        self.refresh_errors = Counter(
            "credgate_admin_gauge_refresh_errors", "Failed credential gauge refreshes", registry=registry)
        self.audit_chain_ok = Gauge(
            "credgate_audit_chain_ok", "1 while the audit log's hash chain verifies, 0 once a row breaks it",
            registry=registry)

    def count_request(self, route: str, method: str, status: int) -> None:
        self.requests.labels(route, method if method in METHODS else "OTHER", str(status)).inc()

    async def refresh(self, pool: Pool) -> None:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(store.CREDENTIAL_GAUGES)
            self.webhook_pending.set(await conn.fetchval(outbox.COUNT_PENDING))
        assert row is not None  # an aggregate without GROUP BY always gives one row
        for status in STATUSES:
            self.credentials.labels(status).set(row[status])
        for days in EXPIRING_WINDOWS:
            self.expiring.labels(str(days)).set(row[f"expiring_{days}d"])

    async def refresh_forever(self, pool: Pool, every: float = REFRESH_SECONDS) -> None:
        while True:
            try:
                await self.refresh(pool)
            except Exception:  # the database may be away for a while; the gauges keep their last values
                self.refresh_errors.inc()
                logger.warning("credential gauge refresh failed", exc_info=True)
            await asyncio.sleep(every)
