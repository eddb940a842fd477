"""Postgres failover under load: a real primary and streaming standby, the gateway pointed at both hosts; the
primary crashes, the standby is promoted, and clients see a bounded outage for uncached credentials only."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.core import database
from gateway.core.formats import generate_token, new_public_id
from tests.conftest import credgate_env
from tests.deploy.stores import Load, postgres_pair
from tests.support import GatewayProcess, Upstream, running_gateway, write_config
from tests.support_faults import (
    LISTEN_APPLICATION,
    bearer,
    create_token,
    eventually,
    gauge_is,
    http_get,
    workers_answering,
)

pytestmark = pytest.mark.slow

WORKERS = 2
# Unknown ids from one test address must not trip the per-address failure throttle while the load runs.
NO_ADDRESS_THROTTLE = "[throttle]\nper_address_max_failures = 1000000\n"


def unknown_token() -> str:
    """A well-formed token whose id no store knows: every one needs the store."""
    return generate_token(new_public_id())


async def listen_backends_on(url: str) -> int:
    """How many gateway LISTEN connections the server that accepts writes now serves."""
    conn = await database.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                                       LISTEN_APPLICATION))
    finally:
        await conn.close()


async def every_worker_says(gw: GatewayProcess, token: str, status: int, within: float) -> float:
    """Rounds of 16 concurrent requests on fresh connections until every worker answered `status`; seconds."""
    started = time.monotonic()
    answered: set[str] = set()
    while time.monotonic() - started < within:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            replies = await asyncio.gather(*(session.get(gw.url + "/x", headers=bearer(token)) for _ in range(16)))
            for reply in replies:
                if reply.status == status:
                    answered.add(reply.headers["X-Credgate-Worker"])
                reply.release()
        if len(answered) >= WORKERS:
            return time.monotonic() - started
    raise AssertionError(f"only workers {sorted(answered)} answered {status} within {within}s")


async def test_primary_crash_then_standby_promoted(tmp_path: Path, upstream: Upstream, clean_redis_url: str) -> None:
    async with postgres_pair() as pg:
        env = credgate_env(pg.url, clean_redis_url, tmp_path)
        cached = await create_token(env, "svc")
        uncached, revoked_later = [await create_token(env, "svc", create_owner=False) for _ in range(2)]
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}],
                              extra=NO_ADDRESS_THROTTLE)
        async with running_gateway(env, config, tmp_path, workers=WORKERS,
                                   extra_env={"CREDGATE_DEBUG_WORKER_HEADER": "1"}) as gw:
            await eventually(lambda: gauge_is(gw.metrics_port, "credgate_listen_connected", 1), 10, "listening")
            for token in (cached, revoked_later):
                await workers_answering(gw.url + "/x", token["token"], 200, WORKERS)
            assert await listen_backends_on(pg.url) == WORKERS

            forwarded_before = len(upstream.seen)
            load = Load(gw.url + "/x", {
                "cached": lambda: cached["token"],
                "unknown": unknown_token,  # needs the store every time: 401 when it answers, 503 when not
            })
            async with load.running():
                await asyncio.sleep(1.0)
                crashed = time.monotonic()
                await asyncio.to_thread(pg.crash_primary)
                # An uncached credential from now on: 503 while no host accepts writes, 200 once one does.
                uncached_load = Load(gw.url + "/x", {"uncached": lambda: uncached["token"]})
                async with uncached_load.running():
                    await asyncio.sleep(2.0)  # the outage, with the standby still read-only
                    assert uncached_load.statuses("uncached") == {503}, uncached_load.samples
                    promoted = time.monotonic()
                    await pg.promote_standby()

                    async def uncached_verifies() -> bool:
                        return any(s.status == 200 for s in uncached_load.of("uncached", since=promoted))

                    await eventually(uncached_verifies, 15, "an uncached credential verifying on the new primary")
                    uncached_back = min(s.started + s.elapsed for s in uncached_load.of("uncached", since=promoted)
                                        if s.status == 200)
                await eventually(lambda: gauge_is(gw.metrics_port, "credgate_listen_connected", 1), 10,
                                 "every worker's LISTEN connection back")
                listening_back = time.monotonic()

                async def every_worker_listens_on_the_new_primary() -> bool:
                    return await listen_backends_on(pg.url) == WORKERS

                await eventually(every_worker_listens_on_the_new_primary, 5, "LISTEN on the promoted standby")
                await asyncio.sleep(0.5)

            # The clients' view. Cached: never anything but 200. Uncached: 503 (never 401, never forwarded)
            # until a host accepted writes again. Unknown: 401 or 503, never 200.
            assert load.statuses("cached") == {200}, sorted(load.statuses("cached"))
            assert uncached_load.statuses("uncached") <= {200, 503}
            assert load.statuses("unknown") <= {401, 503} and 503 in load.statuses("unknown")
            answered_200 = sum(1 for s in load.samples + uncached_load.samples if s.status == 200)
            assert len(upstream.seen) - forwarded_before == answered_200  # nothing else went through
            outage = load.window("unknown", lambda status: status == 503)
            assert outage is not None
            during = [s for s in load.of("cached", since=crashed) if s.started < uncached_back]
            slowest_cached = max(s.elapsed for s in during)
            assert uncached_back - promoted < 5, uncached_back - promoted
            assert outage[1] - promoted < 5, f"the store answered again only {outage[1] - promoted:.2f}s after"

            # A revocation after the failover reaches every worker through the new primary's NOTIFY.
            conn = await database.connect(pg.url)
            try:
                await conn.execute("UPDATE credentials SET revoked_at = now() WHERE public_id = $1",
                                   revoked_later["id"])
                lag = await every_worker_says(gw, revoked_later["token"], 401, 1.0)
            finally:
                await conn.close()
            # and the admin side (the CLI, a new process) writes to the new primary through the same URL
            created_after = await create_token(env, "svc", create_owner=False)
            assert (await http_get(gw.url + "/x", bearer(created_after["token"]))).status == 200
    print(
        f"\npostgres failover: cached credential {len(during)} requests during the outage, all 200 "
        f"(slowest {slowest_cached * 1000:.0f} ms); store-backed requests 503 for "
        f"{outage[1] - outage[0]:.2f}s (first at {outage[0] - crashed:+.2f}s from the crash); uncached credential "
        f"503 from the crash to {uncached_back - crashed:.2f}s, 200 {uncached_back - promoted:.2f}s after the "
        f"promotion; the store answering every worker {outage[1] - promoted:.2f}s and LISTEN back on every worker "
        f"{listening_back - promoted:.2f}s after the promotion; "
        f"revocation lag after failover {lag * 1000:.0f} ms"
    )
