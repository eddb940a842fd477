"""Rate limits and quotas with real gateway processes (issue 14): counts shared by workers and gateways through
Redis, route and credential limits together, quotas across restarts and flushes, life without Redis, changes
through the admin API, and the decision metrics."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from pytest_aiohttp import AiohttpClient

from admin.devenv.redis_server import EmbeddedRedis
from gateway.core.settings import Settings
from gateway.core.store import Pool
from tests.admin.world import build_world
from tests.conftest import credgate_env
from tests.gateway.ratelimit_support import (
    WORKER,
    access_outcomes,
    burst,
    client,
    gateways,
    get,
    in_turn,
    issue,
    labelled,
    policy,
    service_account,
    state,
    statuses,
)
from tests.support import Upstream, running_gateway, scrape, server_dir, write_config
from tests.support_faults import Reply, eventually, gauge_is

DEBUG_WORKERS = {"CREDGATE_DEBUG_WORKER_HEADER": "1"}
DECISIONS = "credgate_ratelimit_decisions_total"


def assert_refused(reply: Reply, error: str = "rate_limited") -> None:
    """A 429 with the JSON error body and a Retry-After."""
    assert reply.status == 429, (reply.status, reply.body)
    body = reply.json()
    assert body["error"] == error and isinstance(body["error_description"], str), body
    assert int(reply.headers["Retry-After"]) >= 1


# --- 1 and 6: one credential's rate over workers and gateways, and the decision metrics -------------------------


@pytest.mark.slow
async def test_a_credential_rate_is_shared_by_every_worker_of_every_gateway_and_counted(
        env: dict[str, str], pool: Pool, settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "name": "api", "upstream": upstream.url}])
    await service_account(pool, settings, "svc")
    cred = await issue(pool, settings, "svc", rate_limit="20/minute")
    runs = [await issue(pool, settings, "svc", rate_limit="20/minute") for _ in range(10)]
    async with gateways(env, config, tmp_path, 2, workers=2, extra_env=DEBUG_WORKERS) as (a, b), client() as http:
        urls = [(a if i % 2 == 0 else b).url + f"/burst/{i}" for i in range(30)]
        started = time.monotonic()
        replies = await burst(http, urls, cred.headers)
        took = time.monotonic() - started
        print(f"\n30 requests over 2 gateways x 2 workers in {took:.2f}s")
        assert took < 2.0  # GCRA gives one unit back every 3 s at 20/minute: the burst must be well within

        assert statuses(replies) == {200: 20, 429: 10}, statuses(replies)
        assert len(upstream.seen) == 20
        for gw, mine in ((a, replies[0::2]), (b, replies[1::2])):
            assert len({r.headers[WORKER] for r in mine}) == 2, f"not every worker of {gw.url} answered"
        admitted = [r for r in replies if r.status == 200]
        refused = [r for r in replies if r.status == 429]
        for r in admitted + refused:
            assert policy(r) == {"minute": (20, 60)}
        # Every grant is one atomic step in Redis: the remaining counts are 19, 18, ... 0, once each.
        assert sorted(state(r)["minute"][0] for r in admitted) == list(range(20))
        for r in admitted:
            remaining, whole_in = state(r)["minute"]
            assert abs(whole_in - 3 * (20 - remaining)) <= 2, r.headers["RateLimit"]
        for r in refused:
            assert_refused(r)
            assert int(r.headers["Retry-After"]) in (2, 3), r.headers["Retry-After"]
            remaining, whole_in = state(r)["minute"]
            assert remaining == 0 and 56 <= whole_in <= 60, r.headers["RateLimit"]
        print("Retry-After of the 429s:", sorted(int(r.headers["Retry-After"]) for r in refused))

        # 6: the decisions, summed over both gateways (each supervisor adds up its workers)
        async def decisions(result: str) -> float:
            pages = [await scrape(gw.metrics_port) for gw in (a, b)]
            return sum(labelled(page, DECISIONS, route="api", result=result) for page in pages)

        async def counted() -> bool:
            return await decisions("allowed") == 20 and await decisions("limited") == 10

        await eventually(counted, 3, "allowed 20 and limited 10 in credgate_ratelimit_decisions_total")
        assert await decisions("quota_exceeded") == 0 and await decisions("degraded") == 0

        # After Retry-After seconds the credential has one unit again (GCRA: one every 3 s), not more.
        wait = max(int(r.headers["Retry-After"]) for r in refused)
        await asyncio.sleep(started + took + wait + 0.1 - time.monotonic())
        again = await get(http, a.url + "/again", cred.headers)
        assert again.status == 200, again.body
        assert state(again)["minute"][0] == 0
        assert_refused(await get(http, b.url + "/again", cred.headers))
        assert len(upstream.seen) == 21

        # Accuracy: a fresh credential per run, 30 requests at once over both gateways.
        allowed = []
        for run in runs:
            replies = await burst(http, urls, run.headers)
            assert {r.status for r in replies} <= {200, 429}
            allowed.append(statuses(replies)[200])
        print("allowed per run of 30 at 20/minute:", allowed)
        assert allowed == [20] * 10


# --- 2: a route's limit with a credential's, and per client address ---------------------------------------------


@pytest.mark.slow
async def test_the_smaller_of_route_and_credential_limits_wins_and_open_routes_count_per_address(
        env: dict[str, str], pool: Pool, settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.toml", [
        {"prefix": "/r5", "name": "r5", "upstream": upstream.url, "rate_limit": "5/minute"},
        {"prefix": "/r10", "name": "r10", "upstream": upstream.url, "rate_limit": "10/minute"},
        {"prefix": "/open", "name": "open", "upstream": upstream.url, "auth": "none", "rate_limit": "3/minute"},
    ])
    await service_account(pool, settings, "svc")
    ten = await issue(pool, settings, "svc", rate_limit="10/minute")
    five = await issue(pool, settings, "svc", rate_limit="5/minute")
    async with running_gateway(env, config, tmp_path) as gw:
        async with client() as http:
            # route 5/minute, credential 10/minute: the route refuses the 6th
            replies = await in_turn(http, gw.url + "/r5/x", 8, ten.headers)
            assert [r.status for r in replies] == [200] * 5 + [429] * 3
            for n, r in enumerate(replies[:5]):
                assert policy(r) == {"route-minute": (5, 60), "minute": (10, 60)}
                assert state(r)["route-minute"][0] == 4 - n and state(r)["minute"][0] == 9 - n
            for r in replies[5:]:
                assert_refused(r)
                assert 1 <= int(r.headers["Retry-After"]) <= 12  # GCRA at 5/minute: a unit every 12 s
                assert policy(r) == {"route-minute": (5, 60), "minute": (10, 60)}
                assert state(r)["route-minute"][0] == 0

            # route 10/minute, credential 5/minute: the credential refuses the 6th
            replies = await in_turn(http, gw.url + "/r10/x", 8, five.headers)
            assert [r.status for r in replies] == [200] * 5 + [429] * 3
            for n, r in enumerate(replies[:5]):
                assert policy(r) == {"route-minute": (10, 60), "minute": (5, 60)}
                assert state(r)["minute"][0] == 4 - n
            for r in replies[5:]:
                assert_refused(r)
                assert 1 <= int(r.headers["Retry-After"]) <= 12
                assert state(r)["minute"][0] == 0
            assert len(upstream.seen) == 10

        # auth = "none": 3/minute for each client address
        for address in ("127.0.0.1", "127.0.0.2"):
            async with client(address) as http:
                replies = await in_turn(http, gw.url + "/open/x", 5)
            assert [r.status for r in replies] == [200] * 3 + [429] * 2, address
            assert [state(r)["route-minute"][0] for r in replies] == [2, 1, 0, 0, 0]
            for r in replies:
                assert policy(r) == {"route-minute": (3, 60)}
            for r in replies[3:]:
                assert_refused(r)
                assert 1 <= int(r.headers["Retry-After"]) <= 20  # a unit every 20 s
        assert len(upstream.seen) == 16
        forwarded_for = [bytes(dict(seen["headers"])[b"X-Forwarded-For"]) for seen in upstream.seen[-6:]]
        assert sorted(forwarded_for) == [b"127.0.0.1"] * 3 + [b"127.0.0.2"] * 3, forwarded_for
    # the gateway has stopped: its access log is complete
    outcomes = access_outcomes(gw.log())
    assert outcomes["rate_limited"] == 10, outcomes


# --- 3: a daily quota across restarts and Redis flushes ----------------------------------------------------------

USED_TODAY = """
SELECT coalesce(sum(u.requests), 0) FROM credential_usage u JOIN credentials c ON c.id = u.credential_id
WHERE c.public_id = $1 AND u.day = (now() AT TIME ZONE 'UTC')::date"""


def next_midnight(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def assert_quota_exceeded(reply: Reply) -> None:
    """429 quota_exceeded, resetting at the next UTC midnight, with Retry-After the seconds until then."""
    now = time.time()
    assert_refused(reply, "quota_exceeded")
    midnight = next_midnight(now)
    reset = datetime.fromisoformat(reply.json()["reset"])
    assert reset == midnight, (reply.json()["reset"], midnight)
    assert abs(int(reply.headers["Retry-After"]) - (midnight.timestamp() - now)) <= 2, reply.headers["Retry-After"]
    assert policy(reply) == {"day": (3, 86400)}
    assert state(reply)["day"][0] == 0


@pytest.mark.slow
async def test_a_daily_quota_holds_across_restarts_and_redis_flushes(
        env: dict[str, str], pool: Pool, settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    env = {**env, "CREDGATE_GATEWAY_USAGE_FLUSH_SECONDS": "0.2"}
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "name": "api", "upstream": upstream.url}])
    await service_account(pool, settings, "svc")
    cred = await issue(pool, settings, "svc", quota="3/day")
    if next_midnight(time.time()).timestamp() - time.time() < 30:
        pytest.skip("too close to UTC midnight: the quota period would change during the test")
    redis = aioredis.from_url(env["CREDGATE_REDIS_URL"])

    async def used(count: int) -> bool:
        async with pool.acquire() as conn:
            return int(await conn.fetchval(USED_TODAY, cred.id)) == count

    def assert_admitted(reply: Reply, remaining: int) -> None:
        assert reply.status == 200, reply.body
        assert policy(reply) == {"day": (3, 86400)}
        left, ends_in = state(reply)["day"]
        assert left == remaining and abs(ends_in - (next_midnight(time.time()).timestamp() - time.time())) <= 2

    logs = []
    try:
        async with client() as http:
            async with running_gateway(env, config, tmp_path) as gw:
                assert_admitted(await get(http, gw.url + "/1", cred.headers), 2)
            logs.append(gw.log())
            # Usage is flushed at shutdown too: a restart and a flush must not forget what was just admitted.
            assert await used(1), "the usage of a request admitted just before shutdown never reached Postgres"

            async with running_gateway(env, config, tmp_path) as gw:
                assert_admitted(await get(http, gw.url + "/2", cred.headers), 1)  # Redis still counts
                await eventually(lambda: used(2), 3, "usage flushed to Postgres")
                await redis.flushdb()  # the count starts again from Postgres
                assert_admitted(await get(http, gw.url + "/3", cred.headers), 0)
                assert_quota_exceeded(await get(http, gw.url + "/4", cred.headers))
            logs.append(gw.log())

            await redis.flushdb()
            async with running_gateway(env, config, tmp_path) as gw:
                assert_quota_exceeded(await get(http, gw.url + "/5", cred.headers))
            logs.append(gw.log())
    finally:
        await redis.aclose()
    assert await used(3)
    assert [seen["path"] for seen in upstream.seen] == ["/1", "/2", "/3"]
    assert [access_outcomes(log)["quota_exceeded"] for log in logs] == [0, 1, 1]


# --- 4: Redis killed mid-run, with each on_redis_down -------------------------------------------------------------

# gateway.ratelimit.HEARTBEAT_SECONDS plus one housekeeping sweep and a margin: by then every worker has had a
# heartbeat after both registered, so each counts 2 processes.
SHARE_WAIT = 6.0


async def every_worker(session: aiohttp.ClientSession, url: str, headers: dict[str, str], status: int,
                       workers: int = 2) -> None:
    """Requests on new connections until `workers` distinct workers answered `status`."""
    answered: set[str] = set()

    async def check() -> bool:
        reply = await get(session, url, headers)
        assert reply.status == status, (reply.status, reply.body)
        answered.add(reply.headers[WORKER])
        return len(answered) >= workers

    await eventually(check, 10, f"{workers} workers answering {status}", interval=0.01)


async def during_outage(session: aiohttp.ClientSession, url: str, headers: dict[str, str], mode: str) -> list[Reply]:
    """Requests one after the other until both workers have refused one (at most 40), or 12 when nothing is
    refused ("allow")."""
    replies: list[Reply] = []
    while len(replies) < (12 if mode == "allow" else 40):
        replies.append(await get(session, url, headers))
        refused_by = {r.headers.get(WORKER) for r in replies if r.status == 429}
        if len(refused_by) == 2:
            break
    return replies


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "allow", "deny"])
async def test_redis_killed_mid_run_then_restarted(
        mode: str, database_url: str, pool: Pool, settings: Settings, upstream: Upstream, tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.toml", [
        {"prefix": "/", "name": "api", "upstream": upstream.url},
        # authenticates (and caches) a credential without spending any limit: nobody is in the group
        {"prefix": "/probe", "name": "probe", "upstream": upstream.url, "groups": ["nobody"]},
    ], extra=f'[ratelimit]\non_redis_down = "{mode}"\n')
    await service_account(pool, settings, "svc")
    cred = await issue(pool, settings, "svc", rate_limit="10/minute")
    with server_dir("ratelimit-redis") as data:
        redis = EmbeddedRedis(data / "redis")
        await asyncio.to_thread(redis.start)
        try:
            env = credgate_env(database_url, redis.url, tmp_path)
            async with running_gateway(env, config, tmp_path, workers=2, extra_env=DEBUG_WORKERS) as gw, \
                    client() as http:
                up_since = time.monotonic()
                await every_worker(http, gw.url + "/probe", cred.headers, 403)  # cached in both workers
                assert await gauge_is(gw.metrics_port, "credgate_ratelimit_shared", 1)
                if mode == "local":
                    await asyncio.sleep(up_since + SHARE_WAIT - time.monotonic())
                for remaining in (9, 8):  # counted in Redis while it is there
                    reply = await get(http, gw.url + "/x", cred.headers)
                    assert reply.status == 200 and state(reply)["minute"][0] == remaining, reply.headers
                seen_before = len(upstream.seen)

                await asyncio.to_thread(redis.kill)
                replies = await during_outage(http, gw.url + "/x", cred.headers, mode)
                assert all(r.status < 500 for r in replies), [r.status for r in replies]
                by_worker = {w: statuses([r for r in replies if r.headers[WORKER] == w])
                             for w in {r.headers[WORKER] for r in replies}}
                print(f"\non_redis_down = {mode!r}: answers per worker while Redis is down: {by_worker}")
                if mode == "local":  # each of the 2 workers enforces half of 10/minute
                    assert len(by_worker) == 2
                    assert all(counts == {200: 5, 429: counts[429]} and counts[429] >= 1
                               for counts in by_worker.values()), by_worker
                    for r in replies:
                        assert policy(r) == {"minute": (10, 60)}
                        if r.status == 429:
                            assert_refused(r)
                elif mode == "allow":
                    assert all(r.status == 200 for r in replies)
                    assert not any("RateLimit" in r.headers or "RateLimit-Policy" in r.headers for r in replies)
                else:
                    for r in replies:
                        assert_refused(r)
                        assert r.headers["Retry-After"] == "1"
                assert len(upstream.seen) - seen_before == sum(r.status == 200 for r in replies)

                warning = re.compile(rf"WARNING .*rate limits: shared counting unavailable \(\w+\); "
                                     rf"on_redis_down = '{mode}' until it is back")

                async def warned() -> bool:
                    return len(warning.findall(gw.log())) == 2  # once per worker

                await eventually(warned, 3, "the warning in the gateway log")
                await eventually(lambda: gauge_is(gw.metrics_port, "credgate_ratelimit_shared", 0), 3,
                                 "credgate_ratelimit_shared 0")

                async def degraded() -> bool:
                    page = await scrape(gw.metrics_port)
                    return (labelled(page, DECISIONS, route="api", result="degraded") == len(replies)
                            and labelled(page, DECISIONS, route="api", result="allowed") == 2)

                await eventually(degraded, 3, "every decision without Redis counted as degraded")

                await asyncio.to_thread(redis.start)  # the same port, empty
                back = time.monotonic()

                async def shared_again() -> bool:
                    reply = await get(http, gw.url + "/x", cred.headers)
                    assert reply.status < 500, reply.body
                    return await gauge_is(gw.metrics_port, "credgate_ratelimit_shared", 1)

                lag = await eventually(shared_again, 5, "credgate_ratelimit_shared back to 1", interval=0.05)
                print(f"on_redis_down = {mode!r}: counting in Redis again {time.monotonic() - back:.2f}s "
                      f"after it returned (polled {lag:.2f}s)")
                assert time.monotonic() - back < 2.5

                # A new credential is counted once for both workers again (alone, each would admit 1 of 3).
                fresh = await issue(pool, settings, "svc", rate_limit="3/minute")
                # SO_REUSEPORT may give a few new connections in a row to one worker: go on until both answered.
                replies = await in_turn(http, gw.url + "/x", 8, fresh.headers)
                while len({r.headers[WORKER] for r in replies}) < 2 and len(replies) < 40:
                    replies.append(await get(http, gw.url + "/x", fresh.headers))
                assert len({r.headers[WORKER] for r in replies}) == 2
                assert statuses(replies) == {200: 3, 429: len(replies) - 3}, statuses(replies)
        finally:
            await asyncio.to_thread(redis.stop)


# --- 5: a limit changed through the admin API --------------------------------------------------------------------


@pytest.mark.slow
async def test_a_limit_changed_through_the_admin_api_reaches_every_worker_within_a_second(
        env: dict[str, str], pool: Pool, settings: Settings, aiohttp_client: AiohttpClient, upstream: Upstream,
        tmp_path: Path) -> None:
    world = await build_world(settings, pool, aiohttp_client)
    created = await world.call("POST", "/api/v1/credentials", "root",
                               {"kind": "token", "owner": "svc", "rate_limit": "1000/minute"})
    assert created.status == 201 and created.body["rate_limit"] == "1000/minute", created.text
    token = {"Authorization": f"Bearer {created.body['token']}"}
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "name": "api", "upstream": upstream.url}])
    async with running_gateway(env, config, tmp_path, workers=2, extra_env=DEBUG_WORKERS) as gw, client() as http:
        await eventually(lambda: gauge_is(gw.metrics_port, "credgate_listen_connected", 1), 10,
                         "every worker listening for changes")
        await every_worker(http, gw.url + "/x", token, 200)

        changed = await world.call("PATCH", f"/api/v1/credentials/{created.body['id']}", "root",
                                   {"rate_limit": "2/minute"})
        assert changed.status == 200 and changed.body["rate_limit"] == "2/minute", changed.text
        at = time.monotonic()
        # (seconds after the change, worker, status, the limit the worker applied)
        seen: list[tuple[float, str, int, int]] = []

        def first_refusal(worker: str) -> float | None:
            return next((t for t, w, status, q in seen if w == worker and status == 429 and q == 2), None)

        while time.monotonic() - at < 3:
            for r in await burst(http, [gw.url + "/x"] * 2, token):
                seen.append((time.monotonic() - at, r.headers[WORKER], r.status, policy(r)["minute"][0]))
            workers = {w for _, w, _, _ in seen}
            if len(workers) == 2 and all(first_refusal(w) is not None for w in workers):
                break
            await asyncio.sleep(0.01)
        workers = {w for _, w, _, _ in seen}
        lags = {w: next(t for t, who, _, q in seen if who == w and q == 2) for w in workers}
        print("\nthe new limit applied by each worker after: "
              + ", ".join(f"{w}: {lag * 1000:.0f} ms" for w, lag in sorted(lags.items())))
        assert len(workers) == 2 and all(lag < 1.0 for lag in lags.values()), lags
        for w in workers:  # once a worker has the new limit it keeps it, and refuses beyond it
            after = [(status, q) for t, who, status, q in seen if who == w and t >= lags[w]]
            assert all(q == 2 for _, q in after), after
            refused_at = first_refusal(w)
            assert refused_at is not None and refused_at < 1.0, (w, refused_at)
            assert all(status == 429 for t, who, status, _ in seen if who == w and t >= refused_at)
        assert sum(status == 200 and q == 2 for _, _, status, q in seen) <= 2
