"""No revocation lost across a lost change feed: a change committed while a gateway was not listening is
enforced on every worker of every replica soon after it listens again, whatever Redis still holds.

Two replicas (gateway processes on their own ports) of two workers each share one private Postgres and
Redis. The feed is lost two ways: the LISTEN backends are ended in the very transaction that revokes (so
the notification goes to nobody), or the gateways' role is cut off from Postgres while the CLI, as another
role, revokes. Run with `pytest -s` to see the measured lags.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from gateway.redis_tier import credential_key
from tests.support import GatewayProcess, Upstream, cli, running_gateway, write_config
from tests.support_faults import (
    TERMINATE_LISTEN_BACKENDS,
    WORKER_HEADER,
    PrivateStores,
    bearer,
    create_token,
    eventually,
    http_get,
    listen_backends,
    login_role,
    private_stores,
    run_script,
    sql_name,
    workers_answering,
)

REPLICAS, WORKERS = 2, 2
# The contract: seconds from a process listening again to the lost revocation being enforced there.
ENFORCED_WITHIN = 2.0
GATEWAY_ROLE = "credgate_gateway"
# Every 401 of the polling below is a failed verification from one address: the throttle must not turn it
# into a 429.
NO_THROTTLE = "[throttle]\nmax_failures = 100000\nper_address_max_failures = 100000\nper_id_max_failures = 100000\n"

# What a gateway's role may do is cut off (and given back) by another role; ALTER ROLE commits on its own,
# before the connections are ended, so that none of them can come back in between.
CUT_OFF = f'ALTER ROLE "{GATEWAY_ROLE}" NOLOGIN'
END_GATEWAY_CONNECTIONS = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    f"WHERE usename = '{GATEWAY_ROLE}' AND application_name LIKE 'credgate%'"
)
GATEWAY_CONNECTIONS = "SELECT count(*) FROM pg_stat_activity WHERE usename = $1"
HEAL = f'ALTER ROLE "{GATEWAY_ROLE}" LOGIN'


async def revoke_in_the_terminating_transaction(stores: PrivateStores, public_id: str) -> None:
    """One psql-style call: end every LISTEN backend and revoke, in one implicit transaction. The backends
    die before the commit, so the revocation's notification reaches no gateway."""
    await run_script(stores.postgres.url, f"{TERMINATE_LISTEN_BACKENDS};\n"
                                          f"UPDATE credentials SET revoked_at = now() WHERE public_id = "
                                          f"'{sql_name(public_id)}'")


async def revoke_during_a_partition(stores: PrivateStores, public_id: str) -> None:
    """The gateways' role may not log in and its connections are ended; the CLI (the superuser) revokes; then
    the role may log in again."""
    await run_script(stores.postgres.url, CUT_OFF)
    await run_script(stores.postgres.url, END_GATEWAY_CONNECTIONS)
    conn = await asyncpg.connect(stores.postgres.url)
    try:
        async def cut_off() -> bool:
            return int(await conn.fetchval(GATEWAY_CONNECTIONS, GATEWAY_ROLE)) == 0

        await eventually(cut_off, 5, "every gateway connection ended")
    finally:
        await conn.close()
    await cli(stores.env, "credentials", "revoke", public_id)
    await run_script(stores.postgres.url, HEAL)


LOSE_THE_FEED: dict[str, Callable[[PrivateStores, str], Awaitable[None]]] = {
    "listen-ended-in-the-revoking-transaction": revoke_in_the_terminating_transaction,
    "role-partitioned-while-the-cli-revokes": revoke_during_a_partition,
}


async def cached_everywhere(gateways: list[GatewayProcess], stores: PrivateStores,
                            credential: dict[str, Any]) -> dict[int, set[str]]:
    """Requests until every worker of every replica answered 200 (each has verified the credential and holds
    it in memory) and Redis holds it; returns each replica's (by port) worker ids."""
    workers = {gw.port: await workers_answering(gw.url + "/x", credential["token"], 200, WORKERS)
               for gw in gateways}
    client = aioredis.from_url(stores.redis.url)
    try:
        assert await client.exists(credential_key(credential["id"])) == 1, "Redis does not hold the credential"
    finally:
        await client.aclose()
    return workers


async def listening_again(conn: asyncpg.Connection, before: set[int], expected: int) -> float:
    """Wait until `expected` LISTEN backends run that are none of `before`; returns time.monotonic() then."""
    async def back() -> bool:
        return len(await listen_backends(conn) - before) >= expected

    await eventually(back, 15, f"{expected} new LISTEN connections", interval=0.01)
    return time.monotonic()


async def refused_everywhere(gateways: list[GatewayProcess], workers: dict[int, set[str]], token: str,
                             within: float) -> float:
    """Requests with `token` to each replica in turn until every worker of every replica answered 401; fails
    when that takes more than `within` seconds or a worker accepts the token again after refusing it.
    Returns the seconds it took."""
    started = time.monotonic()
    refused: set[tuple[int, str]] = set()
    waiting = {(port, worker) for port, ids in workers.items() for worker in ids}
    while waiting:
        elapsed = time.monotonic() - started
        assert elapsed < within, f"still accepted after {elapsed:.2f}s by (port, worker) {sorted(waiting)}"
        for gw in gateways:
            reply = await http_get(gw.url + "/x", bearer(token), limit=within)
            answered = (gw.port, reply.headers.get(WORKER_HEADER, "?"))
            assert answered in refused | waiting, f"an unknown worker answered: {answered}"
            if reply.status == 401:
                refused.add(answered)
                waiting.discard(answered)
            else:
                assert reply.status == 200, (answered, reply.status, reply.body)
                assert answered not in refused, f"{answered} accepted the revoked credential after refusing it"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("lose_the_feed", list(LOSE_THE_FEED), ids=list(LOSE_THE_FEED))
async def test_a_revocation_made_while_not_listening_is_enforced_once_listening(
        tmp_path: Path, upstream: Upstream, lose_the_feed: str) -> None:
    async with private_stores(tmp_path) as stores, contextlib.AsyncExitStack() as stack:
        credential = await create_token(stores.env, "svc")
        gateway_env = {**stores.env, "CREDGATE_DATABASE_URL": await login_role(stores.postgres, GATEWAY_ROLE)}
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}], extra=NO_THROTTLE)
        gateways = list(await asyncio.gather(*(
            stack.enter_async_context(running_gateway(gateway_env, config, tmp_path, workers=WORKERS,
                                                      extra_env={"CREDGATE_DEBUG_WORKER_HEADER": "1"}))
            for _ in range(REPLICAS))))
        conn = await asyncpg.connect(stores.postgres.url)
        stack.push_async_callback(conn.close)

        async def all_listening() -> bool:
            return len(await listen_backends(conn)) == REPLICAS * WORKERS

        await eventually(all_listening, 10, "every worker of every replica listening")
        workers = await cached_everywhere(gateways, stores, credential)
        before = await listen_backends(conn)

        lost_at = time.monotonic()
        await LOSE_THE_FEED[lose_the_feed](stores, credential["id"])
        revoked = json.loads(await cli(stores.env, "credentials", "show", credential["id"]))
        assert revoked["status"] == "revoked", revoked
        back_at = await listening_again(conn, before, REPLICAS * WORKERS)
        lag = await refused_everywhere(gateways, workers, credential["token"], ENFORCED_WITHIN)
        print(f"\n[{lose_the_feed}] feed lost -> every LISTEN connection back: {back_at - lost_at:.2f}s; "
              f"back -> 401 on all {REPLICAS * WORKERS} workers of {REPLICAS} replicas: {lag:.3f}s")
