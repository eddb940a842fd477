"""The gateway's Prometheus metrics, created on a registry passed in; label children bound once where hot.

Every label takes values from a small fixed set or from the configuration (route names), never from the
request: no credential id, raw path or client-chosen method string ever becomes a label value. Workers
write to prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set by the supervisor), so one
scrape of the supervisor's metrics listener sees the sum over all workers.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ARGON2_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

# Any other method is counted as OTHER: a client must not be able to mint label values.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
OUTCOMES = (
    "ok",
    "none",  # the route needs no credential (auth = "none"), an own endpoint, or no route matched
    "missing",
    "invalid",
    "expired",
    "suspended",
    "forbidden",
    "throttled",
    "unavailable",
    "bad_request",  # malformed path, conflicting credentials, refused protocol upgrade
    "rate_limited",
    "quota_exceeded",
)
# credgate_ratelimit_decisions_total{result}: "degraded" is any decision taken without Redis (on_redis_down).
RATELIMIT_RESULTS = ("allowed", "limited", "quota_exceeded", "degraded")
# "none": no response status was sent (the client went away or the connection broke first).
STATUS_CLASSES = {0: "none", 1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
CACHE_TIERS = ("memory", "redis", "store")
CACHE_RESULTS = ("hit", "miss", "negative")
# The upstream-side values of proxy.Outcome.error; client-side errors (client_abort, ...) are not counted.
UPSTREAM_ERROR_KINDS = ("connect", "connect_timeout", "timeout", "reset", "bad_response")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "credgate_requests",
            "Requests by route, method, status class and auth outcome",
            ["route", "method", "status", "outcome"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "credgate_request_duration_seconds",
            "Time from request head to response end",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_seconds = Histogram(
            "credgate_upstream_duration_seconds",
            "Time from forwarding to the upstream's response end",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache_lookups = Counter(
            "credgate_cache_lookups",
            "Credential cache lookups by tier and result",
            ["tier", "result"],
            registry=registry,
        )
        self.argon2_verifications = Counter(
            "credgate_argon2_verifications", "argon2id verifications run", registry=registry
        )
        self.argon2_seconds = Histogram(
            "credgate_argon2_duration_seconds", "argon2id verification time", buckets=ARGON2_BUCKETS, registry=registry
        )
        self.argon2_queue = Gauge(
            "credgate_argon2_queue_length",
            "argon2id verifications running or waiting",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.argon2_rejected = Counter(
            "credgate_argon2_rejected", "Verifications refused because the argon2 queue was full", registry=registry
        )
        self.upstream_errors = Counter(
            "credgate_upstream_errors", "Upstream failures by kind", ["kind"], registry=registry
        )
        self.invalidations = Counter("credgate_invalidations", "Change notifications received", registry=registry)
        self.invalidation_lag = Histogram(
            "credgate_invalidation_lag_seconds", "Commit time to local eviction", buckets=LAG_BUCKETS, registry=registry
        )
        # The 0/1 health gauges take the minimum over live workers: one worker cut off is worth an alert.
        # "live" modes drop a dead worker's last value, so a restarted worker does not inherit it.
        self.redis_up = Gauge(
            "credgate_redis_up", "Redis reachable (1) or not (0)", registry=registry, multiprocess_mode="livemin"
        )
        self.redis_configured = Gauge(
            "credgate_redis_configured",
            "A Redis URL is configured (1) or the gateway runs without Redis (0)",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.store_up = Gauge(
            "credgate_store_up", "Postgres reachable (1) or not (0)", registry=registry, multiprocess_mode="livemin"
        )
        self.listen_connected = Gauge(
            "credgate_listen_connected",
            "Invalidation channel connected (1) or not (0)",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.db_pool_in_use = Gauge(
            "credgate_db_pool_in_use", "Database connections in use", registry=registry, multiprocess_mode="livesum"
        )
        self.cache_entries = Gauge(
            "credgate_cache_entries",
            "Credentials held in process memory",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.ratelimit_decisions = Counter(
            "credgate_ratelimit_decisions",
            "Rate-limit and quota decisions by route and result",
            ["route", "result"],
            registry=registry,
        )
        self.ratelimit_shared = Gauge(
            "credgate_ratelimit_shared",
            "Rate limits counted in Redis (1) or decided by ratelimit.on_redis_down (0)",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.ratelimit_saturated = Gauge(
            "credgate_ratelimit_saturated_credentials",
            "Credentials refused by a rate limit or quota on most of their requests in the last minute",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._bound_requests: dict[tuple[str, str, int, str], Counter] = {}
        self._bound_ratelimit: dict[tuple[str, str], Counter] = {}
        self._pending_ratelimit: dict[tuple[str, str], int] = {}
        self._bound_route: dict[str, tuple[Histogram, Histogram]] = {}
        # Bound up front: every series exists (at 0) from the first scrape, so rate() and ratios work at once.
        self._bound_cache = {
            (tier, result): self.cache_lookups.labels(tier, result) for tier in CACHE_TIERS for result in CACHE_RESULTS
        }
        self._bound_upstream_errors = {kind: self.upstream_errors.labels(kind) for kind in UPSTREAM_ERROR_KINDS}
        self._pending_requests: dict[tuple[str, str, int, str], int] = {}
        self._pending_latency: dict[str, _PendingLatency] = {}
        self._pending_cache: dict[tuple[str, str], int] = {}

    # The per-request calls below only add to plain dicts; flush() (every 0.25 s and at shutdown) moves the
    # totals into prometheus_client. In multiprocess mode every inc()/observe() is a locked mmap write, which
    # cost more than the rest of a cached-auth request; batching makes it one write per series per flush.

    def count_request(self, route: str, method: str, status: int, outcome: str) -> None:
        """One finished request; `method` as the client sent it, `status` 0 when none was sent."""
        if method not in METHODS:  # the client chooses the method: never let it mint keys or labels
            method = "OTHER"
        key = (route, method, status // 100, outcome)
        pending = self._pending_requests
        pending[key] = pending.get(key, 0) + 1

    def observe_latency(self, route: str, total: float, upstream: float | None) -> None:
        pending = self._pending_latency.get(route)
        if pending is None:
            pending = self._pending_latency[route] = _PendingLatency(len(LATENCY_BUCKETS) + 1)
        pending.total_counts[bisect_left(LATENCY_BUCKETS, total)] += 1
        pending.total_sum += total
        if upstream is not None:
            pending.upstream_counts[bisect_left(LATENCY_BUCKETS, upstream)] += 1
            pending.upstream_sum += upstream

    def flush(self) -> None:
        """Publish the batched request counts and latencies."""
        if self._pending_requests:
            pending, self._pending_requests = self._pending_requests, {}
            for key, n in pending.items():
                child = self._bound_requests.get(key)
                if child is None:
                    route, method, status_class, outcome = key
                    label = STATUS_CLASSES.get(status_class, "other")
                    child = self._bound_requests[key] = self.requests.labels(route, method, label, outcome)
                child.inc(n)
        if self._pending_latency:
            latency, self._pending_latency = self._pending_latency, {}
            for route, p in latency.items():
                pair = self._bound_route.get(route)
                if pair is None:
                    pair = self._bound_route[route] = (
                        self.request_seconds.labels(route),
                        self.upstream_seconds.labels(route),
                    )
                _add_observations(pair[0], p.total_counts, p.total_sum)
                _add_observations(pair[1], p.upstream_counts, p.upstream_sum)
        if self._pending_ratelimit:
            self._flush_ratelimit()
        if self._pending_cache:
            cache, self._pending_cache = self._pending_cache, {}
            for pair_key, n in cache.items():
                cache_child = self._bound_cache.get(pair_key)
                if cache_child is None:
                    cache_child = self._bound_cache[pair_key] = self.cache_lookups.labels(*pair_key)
                cache_child.inc(n)

    def ratelimit_decision(self, route: str, result: str) -> None:
        key = (route, result)
        self._pending_ratelimit[key] = self._pending_ratelimit.get(key, 0) + 1

    def _flush_ratelimit(self) -> None:
        pending, self._pending_ratelimit = self._pending_ratelimit, {}
        for key, n in pending.items():
            child = self._bound_ratelimit.get(key)
            if child is None:
                child = self._bound_ratelimit[key] = self.ratelimit_decisions.labels(*key)
            child.inc(n)

    def upstream_error(self, kind: str | None) -> None:
        """Count an upstream failure; None and client-side kinds (client_abort, ...) are ignored."""
        if kind is not None:
            child = self._bound_upstream_errors.get(kind)
            if child is not None:
                child.inc()

    def cache_lookup(self, tier: str, result: str) -> None:
        key = (tier, result)
        self._pending_cache[key] = self._pending_cache.get(key, 0) + 1

    def argon2_verified(self, seconds: float) -> None:
        self.argon2_verifications.inc()
        self.argon2_seconds.observe(seconds)

    def invalidated(self, lag: float) -> None:
        """A change notification arrived `lag` seconds after its commit."""
        self.invalidations.inc()
        self.invalidation_lag.observe(lag)


class _PendingLatency:
    """Histogram observations not yet published: one count per bucket (the last is +Inf) and the sums."""

    __slots__ = ("total_counts", "total_sum", "upstream_counts", "upstream_sum")

    def __init__(self, buckets: int) -> None:
        self.total_counts = [0] * buckets
        self.upstream_counts = [0] * buckets
        self.total_sum = 0.0
        self.upstream_sum = 0.0


def _add_observations(child: Histogram, counts: list[int], total: float) -> None:
    """Add many observations to a histogram child at once.

    prometheus_client has no public bulk observe; a child keeps one value per bucket (non-cumulative,
    ending with +Inf) and one for the sum, as its observe() shows, and those are what this increments.
    """
    if not any(counts):
        return
    buckets = child._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    child._sum.inc(total)
