"""Gateway metrics end to end: a scripted mix of requests over 2 workers, then exact counts in one scrape."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.formats import generate_key_secret, generate_token
from gateway.metrics import GatewayMetrics
from tests.support import Upstream, cli, free_port, running_gateway, scrape, write_config

pytestmark = pytest.mark.slow

Sample = tuple[str, dict[str, str], float]


def samples(text: str) -> list[Sample]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def by_labels(text: str, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """Non-zero samples of `name`, keyed by the given label values (summed over the rest)."""
    totals: dict[tuple[str, ...], float] = {}
    for sample_name, sample_labels, value in samples(text):
        if sample_name == name and value:
            key = tuple(sample_labels[label] for label in labels)
            totals[key] = totals.get(key, 0.0) + value
    return totals


ROUTES: list[dict[str, Any]] = [
    {"prefix": "/api", "name": "api"},
    {"prefix": "/finance", "name": "finance", "groups": ["finance"]},
    {"prefix": "/public", "name": "public", "auth": "none"},
]


async def test_scripted_mix_counts_exactly_across_two_workers(
        env: dict[str, str], upstream: Upstream, tmp_path: Path, database_url: str) -> None:
    closed_port = free_port()  # nothing listens there: connect refused
    routes: list[dict[str, Any]] = [{**r, "upstream": upstream.url} for r in ROUTES]
    routes.append({"prefix": "/down", "name": "down", "upstream": f"http://127.0.0.1:{closed_port}"})
    config = write_config(tmp_path / "gw.toml", routes,
                          extra="[throttle]\nmax_failures = 3\nper_address_max_failures = 1000\n")
    await cli(env, "groups", "create", "finance")
    await cli(env, "users", "create", "svc", "--service")
    await cli(env, "users", "create", "carol", "--service")
    ok = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "token"))
    wrong = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "token"))
    hammered = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "key"))
    expired = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "token"))
    suspended = json.loads(await cli(env, "credentials", "create", "--owner", "carol", "--kind", "token"))
    await cli(env, "users", "disable", "carol")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE credentials SET expires_at = now() - interval '1 hour' WHERE public_id = $1",
                           expired["id"])
    finally:
        await conn.close()

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def basic(client_id: str, secret: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}

    # (method, path, headers, expected status); run one at a time so the throttle counts are exact
    script: list[tuple[str, str, dict[str, str], int]] = [
        *[("GET", f"/api/items/{i}", bearer(ok["token"]), 200) for i in range(4)],
        *[("POST", "/api/items", bearer(ok["token"]), 200) for _ in range(2)],
        ("PURGE", "/api/items/9", bearer(ok["token"]), 200),  # an unusual method is labelled OTHER
        ("GET", "/public/page", {}, 200),
        *[("GET", "/api/items/1", {}, 401) for _ in range(3)],
        *[("GET", "/api/items/1", bearer(generate_token(wrong["id"])), 401) for _ in range(2)],
        ("GET", "/api/items/1", bearer("not-a-credential"), 401),
        *[("GET", "/api/items/1", bearer(expired["token"]), 401) for _ in range(2)],
        ("GET", "/api/items/1", bearer(suspended["token"]), 401),
        *[("GET", "/finance/report", bearer(ok["token"]), 403) for _ in range(2)],
        # max_failures = 3: three wrong secrets run argon2 and read invalid, the next two are throttled
        *[("GET", "/api/items/1", basic(hammered["client_id"], generate_key_secret()), 401) for _ in range(3)],
        *[("GET", "/api/items/1", basic(hammered["client_id"], generate_key_secret()), 429) for _ in range(2)],
        *[("GET", "/down/x", bearer(ok["token"]), 502) for _ in range(2)],
    ]
    expected_requests = {
        ("api", "GET", "2xx", "ok"): 4,
        ("api", "POST", "2xx", "ok"): 2,
        ("api", "OTHER", "2xx", "ok"): 1,
        ("public", "GET", "2xx", "none"): 1,
        ("api", "GET", "4xx", "missing"): 3,
        ("api", "GET", "4xx", "invalid"): 2 + 1 + 3,
        ("api", "GET", "4xx", "expired"): 2,
        ("api", "GET", "4xx", "suspended"): 1,
        ("finance", "GET", "4xx", "forbidden"): 2,
        ("api", "GET", "4xx", "throttled"): 2,
        ("down", "GET", "5xx", "ok"): 2,
    }
    workers: set[str] = set()
    async with running_gateway(env, config, tmp_path, workers=2,
                               extra_env={"CREDGATE_DEBUG_WORKER_HEADER": "1"}) as gw:
        # fresh connections: SO_REUSEPORT spreads them over both workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for method, path, headers, status in script:
                async with s.request(method, gw.url + path, headers=headers) as r:
                    await r.read()
                    assert r.status == status, (method, path, r.status)
                    if "X-Credgate-Worker" in r.headers:  # the data plane's own 502s carry none
                        workers.add(r.headers["X-Credgate-Worker"])
        total = len(script)
        deadline = time.monotonic() + 5
        # A worker records a request just after its last byte went out, and publishes its counters and then its
        # histograms every 0.25 s: a scrape between the two sees the one without the other. Wait for both.
        while True:
            text = await scrape(gw.metrics_port)
            if (sum(by_labels(text, "credgate_requests_total", "route").values()) >= total
                    and sum(by_labels(text, "credgate_request_duration_seconds_count", "route").values()) >= total
                    and sum(by_labels(text, "credgate_upstream_duration_seconds_count", "route").values()) >= 10):
                break
            assert time.monotonic() < deadline, "the scrape never showed every request"
            await asyncio.sleep(0.05)

    assert len(workers) == 2, "both workers should have served part of the mix"
    got = by_labels(text, "credgate_requests_total", "route", "method", "status", "outcome")
    assert got == expected_requests
    assert by_labels(text, "credgate_upstream_errors_total", "kind") == {("connect",): 2}
    assert by_labels(text, "credgate_request_duration_seconds_count", "route") == {
        ("api",): 21, ("public",): 1, ("finance",): 2, ("down",): 2}
    # forwarded requests only; a refused connect still times the attempt
    assert by_labels(text, "credgate_upstream_duration_seconds_count", "route") == {
        ("api",): 7, ("public",): 1, ("down",): 2}
    # one argon2 run per distinct (credential, secret): ok, expired, suspended, 2 wrong, 3 hammered
    assert by_labels(text, "credgate_argon2_verifications_total") == {(): 8}
    assert sum(by_labels(text, "credgate_cache_lookups_total", "tier", "result").values()) > 0

    # Cardinality: label values come from the config and fixed sets, never from the request.
    forbidden_values = [ok["id"], wrong["id"], hammered["id"], hammered["client_id"], expired["id"],
                        suspended["id"], ok["token"], "/api/items", "/finance/report", "/down/x", "PURGE"]
    for value in forbidden_values:
        assert value not in text, value
    label_values: dict[str, set[str]] = {}
    for name, labels, _value in samples(text):
        if name.startswith("credgate_"):
            for label, value in labels.items():
                label_values.setdefault(label, set()).add(value)
    assert label_values["route"] <= {"api", "finance", "public", "down", "-", "_credgate"}
    assert label_values["method"] <= {"GET", "POST", "OTHER"}
    assert label_values["status"] <= {"2xx", "4xx", "5xx"}


def test_unusual_methods_and_status_map_to_fixed_labels() -> None:
    """The in-process side of the same promise: what the client controls never mints a label value."""
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    for method in ("BREW", "get", "X" * 200, "GET"):
        metrics.count_request("api", method, 200, "ok")
    metrics.count_request("api", "GET", 0, "ok")  # the client went away before any response
    metrics.count_request("api", "GET", 799, "ok")
    metrics.upstream_error("client_abort")  # client-side: not an upstream error
    metrics.upstream_error(None)
    metrics.upstream_error("timeout")
    metrics.flush()
    counted = Counter[tuple[str, ...]]()
    for family in registry.collect():
        for s in family.samples:
            if s.name == "credgate_requests_total":
                counted[(s.labels["method"], s.labels["status"])] += int(s.value)
            if s.name == "credgate_upstream_errors_total" and s.value:
                counted[("upstream", s.labels["kind"])] += int(s.value)
    assert counted == {("OTHER", "2xx"): 3, ("GET", "2xx"): 1, ("GET", "none"): 1, ("GET", "other"): 1,
                       ("upstream", "timeout"): 1}
    # one bound child per distinct label set, however many distinct methods were sent
    assert len(metrics._bound_requests) == 4
