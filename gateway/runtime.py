"""One gateway worker's resources, opened in order and closed in reverse: store pool, Redis, caches,
argon2 pool, invalidation listener, usage flusher, access log, health probe and the proxy server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.accesslog import AccessLog
from gateway.app import JSON, NO_STORE, Gateway
from gateway.auth import Authenticator
from gateway.cache import InvalidationListener, MemoryCache, RedisTier
from gateway.core import hashing, store
from gateway.core.errors import STORE_ERRORS
from gateway.core.settings import Settings, parse_listen
from gateway.denylist import TokenDenylist
from gateway.headers import make_policy
from gateway.metrics import GatewayMetrics
from gateway.oauth import OAuthEndpoints
from gateway.proxy import Exchange, ProxyLimits, ProxyServer, Respond, start_server
from gateway.throttle import FailureThrottle
from gateway.tokens import AccessTokenVerifier, SigningKeys
from gateway.usage import UsageRecorder

logger = logging.getLogger(__name__)


class GatewayRuntime:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.server: ProxyServer | None = None
        self.store_up = False
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        s = self.settings
        # min_size=0: the gateway starts (and serves what it can) even while Postgres is down
        self.pool = await store.create_pool(s.database_url.reveal(), min_size=0, max_size=s.database_pool_size)
        self.redis = RedisTier(s.redis_url.reveal(), s.cache.redis_ttl, s.cache.negative_ttl)
        self.redis.on_state = lambda up: self.metrics.redis_up.set(1 if up else 0)
        self.metrics.redis_up.set(1 if self.redis.client is not None else 0)
        self.metrics.redis_configured.set(1 if self.redis.client is not None else 0)
        self.memory = MemoryCache(s.cache.max_entries)
        self.argon2 = hashing.pool_from(s.argon2, observer=self._argon2_observed)
        self.throttle = FailureThrottle(s.throttle, self.redis)
        self.auth = Authenticator(
            s, self.pool, self.memory, self.redis, self.argon2, self.throttle, observe=self.metrics.cache_lookup
        )
        self.listener = InvalidationListener(s.database_url.reveal(), self.memory, self.redis, self.pool)
        self.listener.on_event = self._invalidated
        self.auth.store_reachable = lambda: self.listener.connected
        self.listener.on_state = self._listening
        self.metrics.listen_connected.set(0)
        self.usage = UsageRecorder(self.pool, s.gateway.usage_flush_seconds)
        self.access_log = AccessLog(s.gateway.access_log)
        g = s.gateway
        names = g.identity_headers
        self.policy = make_policy(
            names.names(),
            access_key_header=g.access_key_header,
            secret_key_header=g.secret_key_header,
            keep_credentials=g.keep_credential_headers,
            trusted_proxies=g.trusted_proxies,
        )
        self.gateway = Gateway(s, self.policy, self.auth, self.metrics, self.usage, self.access_log)
        self.gateway.own[b"/_credgate/health"] = self._health
        self.gateway.own[b"/_credgate/ready"] = self._ready
        # OAuth2: the token endpoints issue access tokens, the gateway accepts them, the denylist follows NOTIFY
        self.denylist = TokenDenylist(self.pool, s.cache.memory_ttl)
        keys = SigningKeys.from_settings(s)
        self.gateway.tokens = AccessTokenVerifier(keys, self.auth, self.denylist)
        OAuthEndpoints(
            s, self.policy, self.auth, keys, self.gateway.tokens, self.denylist, self.gateway.worker_id
        ).register(self.gateway.own)
        self.listener.on_token_revoked = self.denylist.on_event
        self.denylist.start()
        self.listener.start()
        self.usage.start()
        self.access_log.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._probe_store()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._flush_metrics()))
        host, port = parse_listen(s.gateway.listen)
        limits = ProxyLimits(
            max_header_bytes=g.limits.max_header_bytes,
            max_headers=g.limits.max_headers,
            max_request_line=g.limits.max_request_line,
            max_body_bytes=g.limits.max_body_bytes,
            head_timeout=g.limits.head_timeout,
            idle_timeout=g.limits.idle_timeout,
            body_timeout=g.limits.body_timeout,
            upstream_idle=g.limits.upstream_idle,
        )
        self.server = await start_server(self.gateway, host, port, limits=limits, reuse_port=True)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown(self.settings.gateway.shutdown_timeout)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.listener.close()
        await self.denylist.close()
        await self.usage.close()
        await self.access_log.close()
        self.metrics.flush()
        self.argon2.close()
        await self.redis.close()
        await self.pool.close()
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            from prometheus_client import multiprocess

            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(os.getpid())

    # --- hooks ---

    def _argon2_observed(self, seconds: float) -> None:
        self.metrics.argon2_verifications.inc()
        self.metrics.argon2_seconds.observe(seconds)

    def _listening(self, up: bool) -> None:
        self.metrics.listen_connected.set(1 if up else 0)
        if up:  # revocations made while the channel was down were not heard: reload the denylist
            self.denylist.resync()

    def _invalidated(self, lag: float) -> None:
        self.metrics.invalidations.inc()
        self.metrics.invalidation_lag.observe(lag)

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.metrics.flush()

    async def _probe_store(self) -> None:
        """Every 2 s: is the store reachable (readiness, store_up), pool use, argon2 queue, cache size."""
        while True:
            try:
                async with self.pool.acquire(timeout=2) as conn:
                    await conn.fetchval("SELECT 1", timeout=2)
                self.store_up = True
            except STORE_ERRORS:
                self.store_up = False
            m = self.metrics
            m.store_up.set(1 if self.store_up else 0)
            m.db_pool_in_use.set(self.pool.get_size() - self.pool.get_idle_size())
            m.argon2_queue.set(self.argon2.in_flight + self.argon2.waiting)
            m.cache_entries.set(len(self.memory))
            m.argon2_rejected.inc(self.argon2.rejected - getattr(self, "_rejected_seen", 0))
            self._rejected_seen = self.argon2.rejected
            await asyncio.sleep(2.0)

    def _health(self, ex: Exchange) -> Respond:
        return Respond(200, [JSON, NO_STORE], b'{"status":"ok"}')

    def _ready(self, ex: Exchange) -> Respond:
        if self.store_up:
            return Respond(200, [JSON, NO_STORE], b'{"status":"ready"}')
        return Respond(503, [JSON, NO_STORE, (b"Retry-After", b"2")], b'{"status":"store unavailable"}')
