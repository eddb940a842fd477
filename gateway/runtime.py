"""One gateway worker's resources, opened in order by one async context manager and closed in reverse.

Store pool, Redis, the caches and the credential lookup, argon2 pool, invalidation listener, token denylist,
usage flusher, access log, health probe and the proxy server. If opening any of them fails, everything opened
before it is closed again (contextlib.AsyncExitStack), so a worker that cannot start leaks nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from gateway.accesslog import AccessLog
from gateway.app import JSON, NO_STORE, Gateway
from gateway.auth import Authenticator
from gateway.core import database, hashing, outbox, store
from gateway.core.errors import STORE_ERRORS
from gateway.core.settings import Settings, parse_listen
from gateway.core.tasks import background
from gateway.denylist import TokenDenylist
from gateway.forward_auth import ForwardAuth
from gateway.grants import AccessTokenVerifier
from gateway.headers import make_policy
from gateway.http.exchange import Exchange, Respond
from gateway.http.server import ProxyServer, start_server
from gateway.identity import HEADER as IDENTITY_HEADER
from gateway.identity import JWKS_PATH, IdentitySigner
from gateway.invalidation import InvalidationListener
from gateway.leaks import LeakEndpoint
from gateway.lookup import CredentialLookup
from gateway.memory import MemoryCache
from gateway.metrics import GatewayMetrics
from gateway.oauth import OAuthEndpoints
from gateway.ratelimit import RateLimiter
from gateway.redis_tier import RedisTier
from gateway.throttle import FailureThrottle
from gateway.tokens import SigningKeys
from gateway.usage import UsageRecorder

logger = logging.getLogger(__name__)

# How often the store is probed for readiness and the sampled gauges are refreshed.
_PROBE_SECONDS = 2.0
# How often this worker's metric increments are published to the shared multiprocess files.
_METRICS_FLUSH_SECONDS = 0.25


@dataclass(slots=True)
class StoreProbe:
    """Whether the store answered the last probe (readiness, `credgate_store_up`)."""

    up: bool = False
    argon2_rejected_seen: int = 0


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, registry: CollectorRegistry | None = None) -> AsyncIterator[ProxyServer]:
    """Open everything one worker needs and serve until the block ends; then drain and close it all."""
    s = settings
    metrics = GatewayMetrics(registry or CollectorRegistry())
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(_worker_gone, metrics)
        # min_size=0: the gateway starts (and serves what it can) even while Postgres is down
        pool = await database.create_pool(s.database_url.reveal(), min_size=0, max_size=s.database_pool_size,
                                           statement_cache_size=s.database_statement_cache_size)
        stack.push_async_callback(pool.close)
        redis_tier = RedisTier(
            s.redis_url.reveal(), s.cache.redis_ttl, s.cache.negative_ttl, on_state=metrics.redis_up.set,
            timeout=s.cache.redis_timeout,
        )
        stack.push_async_callback(redis_tier.close)
        metrics.redis_up.set(1 if redis_tier.client is not None else 0)
        metrics.redis_configured.set(1 if redis_tier.client is not None else 0)
        argon2 = hashing.pool_from(s.argon2, observer=metrics.argon2_verified)
        stack.callback(argon2.close)

        memory = MemoryCache(s.cache.max_entries)
        denylist = TokenDenylist(pool, s.cache.memory_ttl, s.cache.store_timeout)

        def listening(up: bool) -> None:
            metrics.listen_connected.set(1 if up else 0)
            if up:  # revocations made while the channel was down were not heard: reload the denylist
                denylist.resync()

        metrics.listen_connected.set(0)
        listener = InvalidationListener(
            s.database_listen_url.reveal() or s.database_url.reveal(), memory, redis_tier, pool,
            timeout=s.cache.store_timeout,
            on_event=metrics.invalidated, on_state=listening, on_token_revoked=denylist.on_event,
        )
        lookup = CredentialLookup(
            s.cache, pool, memory, redis_tier,
            observe=metrics.cache_lookup, store_reachable=lambda: listener.connected,
        )
        auth = Authenticator(s.secret_key_bytes, lookup, argon2, FailureThrottle(s.throttle, redis_tier))
        keys = SigningKeys.from_settings(s)
        verifier = AccessTokenVerifier(keys, lookup, denylist)
        g = s.gateway
        policy = make_policy(
            (*g.identity_headers.names(), IDENTITY_HEADER),  # a client-sent Credgate-Identity is spoofed too
            access_key_header=g.access_key_header,
            secret_key_header=g.secret_key_header,
            keep_credentials=g.keep_credential_headers,
            trusted_proxies=g.trusted_proxies,
        )
        usage = await stack.enter_async_context(UsageRecorder(pool, g.usage_flush_seconds).running())
        access_log = await stack.enter_async_context(AccessLog(g.access_log).running())
        limiter = RateLimiter(
            redis_tier.client, pool, on_redis_down=s.ratelimit.on_redis_down, processes=g.workers,
            redis_timeout=s.cache.redis_timeout, store_timeout=s.cache.store_timeout,
            count=metrics.ratelimit_decision, shared=lambda up: metrics.ratelimit_shared.set(1 if up else 0),
            saturated=metrics.ratelimit_saturated.set, report_refused=lambda ids: _record_refused(pool, ids, s),
        )
        metrics.ratelimit_shared.set(1 if redis_tier.client is not None else 0)
        # always running: credentials get limits through the admin API at any time
        await stack.enter_async_context(limiter.running())
        signer = IdentitySigner.from_settings(s)
        gateway = Gateway(s, policy, auth, metrics, usage, access_log, tokens=verifier, limiter=limiter, signer=signer)
        probe = StoreProbe()
        gateway.own[b"/_credgate/health"] = _health
        gateway.own[b"/_credgate/ready"] = lambda ex: _ready(probe)
        OAuthEndpoints(s, policy, auth, keys, verifier, denylist, gateway.worker_id).register(gateway.own)
        if s.leaks.path:  # the secret-scanning partner endpoint (off by default)
            LeakEndpoint(s.leaks, pool, argon2, gateway.worker_id).register(gateway.own)
        if signer is not None:
            jwks = Respond(200, [(b"Content-Type", b"application/json"), (b"Cache-Control", b"max-age=300")],
                           signer.jwks)
            gateway.own[JWKS_PATH.encode()] = lambda ex: jwks

        await stack.enter_async_context(denylist.running())
        await stack.enter_async_context(listener.running())
        await stack.enter_async_context(background(_probe_store(pool, metrics, argon2, memory, probe), "store probe"))
        await stack.enter_async_context(background(_flush_metrics(metrics), "metrics flush"))
        host, port = parse_listen(g.listen)
        server = await start_server(gateway, host, port, limits=g.limits, reuse_port=True)
        stack.push_async_callback(server.shutdown, g.shutdown_timeout)
        if s.forward_auth.listen:
            decider = ForwardAuth(s, policy, auth, metrics, usage, access_log, tokens=verifier, own={},
                                  limiter=limiter, signer=signer)
            decider.configure_peers(s.forward_auth.trusted_proxies)
            fa_host, fa_port = parse_listen(s.forward_auth.listen)
            forward_auth = await start_server(decider, fa_host, fa_port, limits=g.limits, reuse_port=True)
            stack.push_async_callback(forward_auth.shutdown, g.shutdown_timeout)
        yield server


async def _record_refused(pool: store.Pool, credential_ids: list[int], s: Settings) -> None:
    """credential.rate_limited lifecycle events for credentials the limiter refused (gateway.core.outbox)."""
    async with database.within(pool, s.cache.store_timeout) as conn:
        await outbox.record_rate_limited(conn, credential_ids)


def _worker_gone(metrics: GatewayMetrics) -> None:
    """Publish the last increments; tell the supervisor's metrics collector this process is gone."""
    metrics.flush()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(os.getpid())


async def _flush_metrics(metrics: GatewayMetrics) -> None:
    while True:
        await asyncio.sleep(_METRICS_FLUSH_SECONDS)
        metrics.flush()


async def _probe_store(
    pool: store.Pool, metrics: GatewayMetrics, argon2: hashing.Argon2Pool, memory: MemoryCache, probe: StoreProbe
) -> None:
    """Is the store reachable (readiness, store_up); pool use, argon2 queue and cache size, sampled."""
    while True:
        try:
            async with pool.acquire(timeout=_PROBE_SECONDS) as conn:
                await conn.fetchval(store.PING, timeout=_PROBE_SECONDS)
            probe.up = True
        except STORE_ERRORS:
            probe.up = False
        metrics.store_up.set(1 if probe.up else 0)
        metrics.db_pool_in_use.set(pool.get_size() - pool.get_idle_size())
        metrics.argon2_queue.set(argon2.in_flight + argon2.waiting)
        metrics.cache_entries.set(len(memory))
        metrics.argon2_rejected.inc(argon2.rejected - probe.argon2_rejected_seen)
        probe.argon2_rejected_seen = argon2.rejected
        await asyncio.sleep(_PROBE_SECONDS)


def _health(ex: Exchange) -> Respond:
    return Respond(200, [JSON, NO_STORE], b'{"status":"ok"}')


def _ready(probe: StoreProbe) -> Respond:
    if probe.up:
        return Respond(200, [JSON, NO_STORE], b'{"status":"ready"}')
    return Respond(503, [JSON, NO_STORE, (b"Retry-After", b"2")], b'{"status":"store unavailable"}')
