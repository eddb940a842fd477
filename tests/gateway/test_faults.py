"""Degraded modes with real processes: Redis killed and restarted, Postgres stopped and started, and
upstreams that refuse, hang or answer garbage. Each store test owns the servers it breaks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.core.formats import generate_token, new_public_id
from gateway.redis_tier import credential_key
from tests.support import (
    GatewayProcess,
    Upstream,
    cli,
    free_port,
    metric,
    running_gateway,
    scrape,
    write_config,
)
from tests.support_faults import (
    Reply,
    bearer,
    create_token,
    eventually,
    gauge_is,
    http_get,
    private_stores,
    scripted_upstream,
)

# Unknown ids from one test address must not trip the per-address failure throttle while it polls.
NO_ADDRESS_THROTTLE = "[throttle]\nper_address_max_failures = 100000\n"
WORKER = "X-Credgate-Worker"


def unknown_token() -> str:
    """A well-formed token whose id no store knows: it passes the format check and needs a lookup."""
    return generate_token(new_public_id())


async def argon2_runs(gw: GatewayProcess) -> float:
    return metric(await scrape(gw.metrics_port), "credgate_argon2_verifications_total") or 0.0


async def every_worker_answers(gw: GatewayProcess, token: str | None, status: int, workers: int,
                               within: float = 10) -> None:
    """Sequential requests on fresh connections until `workers` distinct workers answered `status`;
    token None sends a new unknown token each time (each one makes a worker consult Redis and Postgres)."""
    answered: set[str] = set()

    async def check() -> bool:
        reply = await http_get(gw.url + "/x", bearer(token or unknown_token()))
        assert reply.status in (status, 200, 401), (reply.status, reply.body)
        if reply.status == status:
            answered.add(reply.headers.get(WORKER, "?"))
        return len(answered) >= workers

    await eventually(check, within, f"{workers} workers answering {status}", interval=0.02)


async def redis_used_again(gw: GatewayProcess) -> bool:
    """One lookup that consults Redis (an unknown id), then: does every worker report Redis up?
    (The gauge keeps each worker's last observation; the supervisor shows the minimum.)"""
    assert (await http_get(gw.url + "/x", bearer(unknown_token()))).status == 401
    return await gauge_is(gw.metrics_port, "credgate_redis_up", 1)


async def listening(gw: GatewayProcess) -> None:
    """Wait for the invalidation listener: a verification that races its (re)connection is not cached."""
    await eventually(lambda: gauge_is(gw.metrics_port, "credgate_listen_connected", 1), 10,
                     "the invalidation listener connected")


def assert_unavailable(reply: Reply) -> None:
    """An outage answer: 503 with Retry-After and a JSON body, never a 401 challenge."""
    assert reply.status == 503, (reply.status, reply.body)
    assert int(reply.headers["Retry-After"]) >= 1
    assert reply.json() == {"error": "temporarily_unavailable",
                            "error_description": "credential store unavailable; retry later"}
    assert "WWW-Authenticate" not in reply.headers


# --- Redis ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_redis_killed_mid_run_then_restarted(tmp_path: Path, upstream: Upstream) -> None:
    async with private_stores(tmp_path) as stores:
        env = stores.env
        known = await create_token(env, "svc")
        never_seen = await create_token(env, "svc", create_owner=False)
        after_restart = await create_token(env, "svc", create_owner=False)
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}],
                              extra=NO_ADDRESS_THROTTLE)
        async with running_gateway(env, config, tmp_path, workers=2,
                                   extra_env={"CREDGATE_DEBUG_WORKER_HEADER": "1"}) as gw:
            await listening(gw)
            await every_worker_answers(gw, known["token"], 200, 2)  # verified once, in both workers' memory
            assert await argon2_runs(gw) == 1

            await asyncio.to_thread(stores.redis.kill)
            for _ in range(20):
                started = time.monotonic()
                reply = await http_get(gw.url + "/x", bearer(known["token"]))
                assert reply.status == 200 and time.monotonic() - started < 1.0
            assert await argon2_runs(gw) == 1  # served from memory: no store, no argon2
            reply = await http_get(gw.url + "/x", bearer(never_seen["token"]))
            assert reply.status == 200, reply.body  # Postgres + argon2 without Redis
            assert reply.json()["headers"]["X-Auth-Credential-Id"] == never_seen["id"]
            assert await argon2_runs(gw) == 2
            await every_worker_answers(gw, None, 401, 2)  # both workers have now met the dead Redis
            await eventually(lambda: gauge_is(gw.metrics_port, "credgate_redis_up", 0), 5, "redis_up 0")

            await asyncio.to_thread(stores.redis.start)  # same port, empty
            await eventually(lambda: redis_used_again(gw), 10, "redis_up back to 1 on every worker", interval=0.1)
            # One verification on one worker serves the other through Redis again.
            await every_worker_answers(gw, after_restart["token"], 200, 2)
            assert await argon2_runs(gw) == 3
            client = aioredis.from_url(stores.redis.url)
            try:
                assert await client.exists(credential_key(after_restart["id"])) == 1
            finally:
                await client.aclose()


@pytest.mark.slow
async def test_redis_down_when_the_gateway_starts(tmp_path: Path, upstream: Upstream) -> None:
    async with private_stores(tmp_path) as stores:
        env = stores.env
        first = await create_token(env, "svc")
        second = await create_token(env, "svc", create_owner=False)
        await asyncio.to_thread(stores.redis.stop)
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}],
                              extra=NO_ADDRESS_THROTTLE)
        async with running_gateway(env, config, tmp_path) as gw:
            await listening(gw)
            for _ in range(3):
                reply = await http_get(gw.url + "/x", bearer(first["token"]))
                assert reply.status == 200, reply.body
            assert await argon2_runs(gw) == 1
            await eventually(lambda: gauge_is(gw.metrics_port, "credgate_redis_up", 0), 5, "redis_up 0")

            await asyncio.to_thread(stores.redis.start)
            await eventually(lambda: redis_used_again(gw), 10, "the gateway using Redis once it is up", interval=0.1)
            reply = await http_get(gw.url + "/x", bearer(second["token"]))
            assert reply.status == 200, reply.body
            client = aioredis.from_url(stores.redis.url)
            try:
                assert await client.exists(credential_key(second["id"])) == 1
            finally:
                await client.aclose()


# --- Postgres -------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_postgres_stopped_then_started(tmp_path: Path, upstream: Upstream) -> None:
    async with private_stores(tmp_path) as stores:
        env = stores.env
        cached = await create_token(env, "svc")
        uncached = await create_token(env, "svc", create_owner=False)
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}],
                              extra=NO_ADDRESS_THROTTLE)
        async with running_gateway(env, config, tmp_path) as gw:
            await listening(gw)
            assert (await http_get(gw.url + "/x", bearer(cached["token"]))).status == 200

            async def ready_is(status: int) -> bool:
                return (await http_get(gw.url + "/_credgate/ready")).status == status

            await eventually(lambda: ready_is(200), 5, "ready before the outage")

            await asyncio.to_thread(stores.postgres.stop)
            for _ in range(5):
                reply = await http_get(gw.url + "/x", bearer(cached["token"]))
                assert reply.status == 200, reply.body
            forwarded = len(upstream.seen)
            assert_unavailable(await http_get(gw.url + "/x", bearer(uncached["token"])))
            assert_unavailable(await http_get(gw.url + "/x", bearer(unknown_token())))
            assert len(upstream.seen) == forwarded  # nothing unverified went through
            await eventually(lambda: ready_is(503), 6, "ready 503 while Postgres is down")
            ready = await http_get(gw.url + "/_credgate/ready")
            assert ready.json() == {"status": "store unavailable"} and ready.headers["Retry-After"]

            await asyncio.to_thread(stores.postgres.start)  # same port and data

            async def uncached_works() -> bool:
                return (await http_get(gw.url + "/x", bearer(uncached["token"]))).status == 200

            await eventually(uncached_works, 10, "an uncached credential verifying again", interval=0.2)
            await eventually(lambda: ready_is(200), 6, "ready 200 after the outage")
            await listening(gw)  # reconnected after the outage
            await cli(env, "credentials", "revoke", cached["id"])

            async def revoked() -> bool:
                return (await http_get(gw.url + "/x", bearer(cached["token"]))).status == 401

            await eventually(revoked, 2, "a revoke after recovery reaching the gateway")


@pytest.mark.slow
@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "no-redis"])
async def test_cached_credential_expires_after_stale_ttl(tmp_path: Path, upstream: Upstream,
                                                         with_redis: bool) -> None:
    stale_ttl, memory_ttl = 2.0, 0.5
    async with private_stores(tmp_path) as stores:
        env = stores.env
        cached = await create_token(env, "svc")
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}],
                              extra=f"[cache]\nmemory_ttl = {memory_ttl}\nstale_ttl = {stale_ttl}\n")
        extra_env = {} if with_redis else {"CREDGATE_REDIS_URL": ""}
        async with running_gateway(env, config, tmp_path, extra_env=extra_env) as gw:
            await listening(gw)
            assert (await http_get(gw.url + "/x", bearer(cached["token"]))).status == 200
            verified_at = time.monotonic()
            await asyncio.to_thread(stores.postgres.stop)
            reply = await http_get(gw.url + "/x", bearer(cached["token"]))
            assert time.monotonic() - verified_at < stale_ttl
            assert reply.status == 200, f"within stale_ttl a cached credential keeps working: {reply}"

            # (seconds since the verification, status) until the first refusal or well past stale_ttl
            statuses: list[tuple[float, int]] = []
            while time.monotonic() - verified_at < stale_ttl + memory_ttl + 2:
                reply = await http_get(gw.url + "/x", bearer(cached["token"]))
                statuses.append((round(time.monotonic() - verified_at, 2), reply.status))
                if reply.status != 200:
                    assert_unavailable(reply)
                    break
                await asyncio.sleep(0.2)
            assert statuses[-1][1] == 503, f"still served with Postgres down, past stale_ttl: {statuses}"
            assert statuses[-1][0] >= stale_ttl - 0.1, f"refused before stale_ttl: {statuses}"


# --- upstream failures ----------------------------------------------------------------------------------------


MALFORMED_RESPONSES = {
    "not-http": b"HELLO THERE\r\n\r\n",
    "length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nhello\r\n0\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "bad-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
    "status-out-of-range": b"HTTP/1.1 999 Nope\r\nContent-Length: 0\r\n\r\n",
    "folded-header": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\nContent-Length: 0\r\n\r\n",
    "gzip-coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx",
    "unasked-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "truncated-head": b"HTTP/1.1 200 OK\r\nContent-Le",
}


def gateway_for(env: dict[str, str], tmp_path: Path,
                upstream_url: str) -> contextlib.AbstractAsyncContextManager[GatewayProcess]:
    """A gateway whose one route has 1-second connect and read timeouts."""
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream_url, "read_timeout": 1,
                                                  "connect_timeout": 1}])
    return running_gateway(env, config, tmp_path)


async def test_upstream_refusing_is_502(env: dict[str, str], tmp_path: Path) -> None:
    token = await create_token(env, "svc")
    async with gateway_for(env, tmp_path, f"http://127.0.0.1:{free_port()}") as gw:
        reply = await http_get(gw.url + "/x", bearer(token["token"]))
        assert reply.status == 502
        assert reply.headers["Content-Type"] == "application/json"
        assert reply.json() == {"error": "bad_gateway", "error_description": "upstream connection failed"}


async def test_upstream_hanging_is_504_after_read_timeout(env: dict[str, str], tmp_path: Path) -> None:
    token = await create_token(env, "svc")
    async with scripted_upstream(None) as hung, gateway_for(env, tmp_path, hung.url) as gw:
        started = time.monotonic()
        reply = await http_get(gw.url + "/x", bearer(token["token"]))
        elapsed = time.monotonic() - started
        assert reply.status == 504, reply.body
        assert reply.headers["Content-Type"] == "application/json"
        assert reply.json() == {"error": "gateway_timeout", "error_description": "upstream did not respond in time"}
        assert 0.9 <= elapsed < 2.5, elapsed
        assert hung.connections == 1 and b"GET /x HTTP/1.1\r\n" in hung.received


async def test_upstream_malformed_responses_are_502(env: dict[str, str], tmp_path: Path) -> None:
    token = await create_token(env, "svc")
    async with contextlib.AsyncExitStack() as stack:
        upstreams = {name: await stack.enter_async_context(scripted_upstream(reply))
                     for name, reply in MALFORMED_RESPONSES.items()}
        config = write_config(tmp_path / "gw.toml", [{"prefix": f"/{name}", "upstream": up.url, "read_timeout": 2}
                                                     for name, up in upstreams.items()])
        gw = await stack.enter_async_context(running_gateway(env, config, tmp_path))
        wrong: dict[str, tuple[int, bytes]] = {}
        for name in MALFORMED_RESPONSES:
            reply = await http_get(f"{gw.url}/{name}/x", bearer(token["token"]))
            body = reply.json() if reply.headers.get("Content-Type") == "application/json" else {}
            if reply.status != 502 or body.get("error") != "bad_gateway" or body.get("error_description") not in (
                    "upstream sent an invalid response", "upstream closed the connection"):
                wrong[name] = (reply.status, reply.body)
            assert upstreams[name].connections == 1, name
        assert not wrong, wrong
