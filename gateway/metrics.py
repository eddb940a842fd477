"""The gateway's Prometheus metrics, created on a registry passed in; label children bound once where hot."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ARGON2_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OUTCOMES = ("ok", "none", "missing", "invalid", "expired", "suspended", "forbidden", "throttled", "unavailable",
            "bad_request")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "credgate_requests", "Requests by route, method, status class and auth outcome",
            ["route", "method", "status", "outcome"], registry=registry)
        self.request_seconds = Histogram(
            "credgate_request_duration_seconds", "Time from request head to response end", ["route"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.upstream_seconds = Histogram(
            "credgate_upstream_duration_seconds", "Time from forwarding to the upstream's response end", ["route"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.cache_lookups = Counter(
            "credgate_cache_lookups", "Credential cache lookups by tier and result", ["tier", "result"],
            registry=registry)
        self.argon2_verifications = Counter(
            "credgate_argon2_verifications", "argon2id verifications run", registry=registry)
        self.argon2_seconds = Histogram(
            "credgate_argon2_duration_seconds", "argon2id verification time", buckets=ARGON2_BUCKETS,
            registry=registry)
        self.argon2_queue = Gauge(
            "credgate_argon2_queue_length", "argon2id verifications running or waiting", registry=registry,
            multiprocess_mode="livesum")
        self.argon2_rejected = Counter(
            "credgate_argon2_rejected", "Verifications refused because the argon2 queue was full", registry=registry)
        self.upstream_errors = Counter(
            "credgate_upstream_errors", "Upstream failures by kind", ["kind"], registry=registry)
        self.invalidations = Counter(
            "credgate_invalidations", "Change notifications received", registry=registry)
        self.invalidation_lag = Histogram(
            "credgate_invalidation_lag_seconds", "Commit time to local eviction", buckets=LAG_BUCKETS,
            registry=registry)
        self.redis_up = Gauge("credgate_redis_up", "Redis reachable (1) or not (0)", registry=registry,
                              multiprocess_mode="min")
        self.store_up = Gauge("credgate_store_up", "Postgres reachable (1) or not (0)", registry=registry,
                              multiprocess_mode="min")
        self.listen_connected = Gauge(
            "credgate_listen_connected", "Invalidation channel connected (1) or not (0)", registry=registry,
            multiprocess_mode="min")
        self.db_pool_in_use = Gauge(
            "credgate_db_pool_in_use", "Database connections in use", registry=registry, multiprocess_mode="livesum")
        self.cache_entries = Gauge(
            "credgate_cache_entries", "Credentials held in process memory", registry=registry,
            multiprocess_mode="livesum")
        self._bound_requests: dict[tuple[str, str, str, str], Counter] = {}
        self._bound_route: dict[str, tuple[Histogram, Histogram]] = {}
        self._bound_cache: dict[tuple[str, str], Counter] = {}

    def count_request(self, route: str, method: str, status: int, outcome: str) -> None:
        key = (route, method, str(status // 100) + "xx", outcome)
        child = self._bound_requests.get(key)
        if child is None:
            label_method = method if method in METHODS else "OTHER"
            child = self._bound_requests[key] = self.requests.labels(route, label_method, key[2], outcome)
        child.inc()

    def observe_latency(self, route: str, total: float, upstream: float | None) -> None:
        pair = self._bound_route.get(route)
        if pair is None:
            pair = self._bound_route[route] = (self.request_seconds.labels(route), self.upstream_seconds.labels(route))
        pair[0].observe(total)
        if upstream is not None:
            pair[1].observe(upstream)

    def cache_lookup(self, tier: str, result: str) -> None:
        child = self._bound_cache.get((tier, result))
        if child is None:
            child = self._bound_cache[(tier, result)] = self.cache_lookups.labels(tier, result)
        child.inc()
