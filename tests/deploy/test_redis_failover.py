"""Redis failover under load: a primary, a replica and three Sentinels, the gateway given the Sentinels; the
primary is killed, no request fails, argon2 stays bounded, and the shared tier is used again on the promoted
replica."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.core.formats import generate_token, new_public_id
from gateway.redis_tier import credential_key
from tests.conftest import credgate_env
from tests.deploy.stores import Load, RedisSentinels, redis_sentinels
from tests.support import GatewayProcess, Upstream, cli, metric, running_gateway, scrape, write_config
from tests.support_faults import bearer, create_token, eventually, gauge_is, http_get, workers_answering

pytestmark = pytest.mark.slow

WORKERS = 2
# memory_ttl short: the load goes back to Redis every half second, so the failover is on its path (with the
# default of a minute every answer would come from process memory and Redis would never be asked).
CONFIG = "[cache]\nmemory_ttl = 0.5\n[throttle]\nper_address_max_failures = 1000000\n"


def unknown_token() -> str:
    return generate_token(new_public_id())


def always(token: str) -> Callable[[], str]:
    return lambda: token


async def argon2_runs(gw: GatewayProcess) -> float:
    return metric(await scrape(gw.metrics_port), "credgate_argon2_verifications_total") or 0.0


async def in_redis(port: int, public_id: str) -> bool:
    client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        return bool(await client.exists(credential_key(public_id)))
    finally:
        await client.aclose()


async def tokens(env: dict[str, str], count: int) -> list[dict[str, Any]]:
    """`count` new tokens of service account svc (created by the caller), made by concurrent CLI processes."""
    return list(await asyncio.gather(*(create_token(env, "svc", create_owner=False) for _ in range(count))))


async def promoted(rs: RedisSentinels) -> bool:
    return await rs.master_port() == {rs.replica.port}


async def test_primary_killed_sentinels_promote_the_replica(
    tmp_path: Path, upstream: Upstream, database_url: str
) -> None:
    async with redis_sentinels() as rs:
        env = credgate_env(database_url, rs.url, tmp_path)
        await cli(env, "users", "create", "svc", "--service")
        warm, fresh, after = await tokens(env, 3), await tokens(env, 2), await tokens(env, 1)
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}], extra=CONFIG)
        async with running_gateway(env, config, tmp_path, workers=WORKERS,
                                   extra_env={"CREDGATE_DEBUG_WORKER_HEADER": "1"}) as gw:
            await eventually(lambda: gauge_is(gw.metrics_port, "credgate_listen_connected", 1), 10, "listening")
            for token in warm:  # one verification each serves both workers, through the shared tier
                await workers_answering(gw.url + "/x", token["token"], 200, WORKERS)
                assert await in_redis(rs.primary.port, token["id"])
            assert await argon2_runs(gw) == len(warm)

            streams = {f"warm{i}": always(t["token"]) for i, t in enumerate(warm)}
            streams["unknown"] = unknown_token  # each one asks Redis, then the store: 401
            load = Load(gw.url + "/x", streams)
            async with load.running():
                await asyncio.sleep(1.0)
                killed = time.monotonic()
                rs.primary.send(signal.SIGKILL)
                await asyncio.to_thread(rs.primary.wait, 5)
                await eventually(lambda: gauge_is(gw.metrics_port, "credgate_redis_up", 0), 5, "redis_up 0")
                # Credentials never verified, first seen while there is no shared tier: each worker verifies
                # each at most once (its own memory), so argon2 runs are bounded by workers x credentials.
                for token in fresh:
                    await workers_answering(gw.url + "/x", token["token"], 200, WORKERS)
                during_outage = await argon2_runs(gw) - len(warm)
                await eventually(lambda: promoted(rs), 30, "the Sentinels promoting the replica")
                promotion = time.monotonic()

                async def used_again() -> bool:
                    assert (await http_get(gw.url + "/x", bearer(unknown_token()))).status == 401
                    return await gauge_is(gw.metrics_port, "credgate_redis_up", 1)

                await eventually(used_again, 15, "every worker using Redis again", interval=0.1)
                shared_again = time.monotonic()
                await asyncio.sleep(0.5)

            # The clients' view: not one request failed, whatever Redis did.
            failed = [s for s in load.samples if s.status not in (200, 401)]
            assert not failed, failed[:10]
            assert all(load.statuses(name) == {200} for name in streams if name != "unknown")
            assert load.statuses("unknown") == {401}
            assert 0 < during_outage <= len(fresh) * WORKERS, during_outage
            slowest = max(s.elapsed for s in load.samples if s.started >= killed)

            # The shared tier works again on the new master: one verification serves both workers.
            before = await argon2_runs(gw)
            await workers_answering(gw.url + "/x", after[0]["token"], 200, WORKERS)
            assert await argon2_runs(gw) == before + 1
            assert await in_redis(rs.replica.port, after[0]["id"])
            assert await in_redis(rs.replica.port, warm[0]["id"])  # replicated before the failover
    print(
        f"\nredis failover: {len(load.samples)} requests, 0 failed (slowest {slowest * 1000:.0f} ms after the kill); "
        f"replica promoted {promotion - killed:.2f}s after the kill, shared tier used again by every worker "
        f"{shared_again - killed:.2f}s after it ({shared_again - promotion:.2f}s after the promotion); argon2 runs "
        f"while Redis was away: {during_outage:.0f} for {len(fresh)} new credentials x {WORKERS} workers"
    )
