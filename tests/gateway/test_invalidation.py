"""Across worker processes: revocation reaches every worker fast, and one verification serves them all."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.support import GatewayProcess, Upstream, cli, metric, running_gateway, scrape, write_config

pytestmark = pytest.mark.slow


async def every_worker_says(gw: GatewayProcess, token: str, status: int, workers: int, deadline: float) -> float:
    """Poll with fresh connections (SO_REUSEPORT spreads them) until `workers` distinct workers answered
    `status`; returns the seconds it took. Workers are told apart by the X-Credgate-Worker debug header."""
    started = time.monotonic()
    answered: set[str] = set()
    while time.monotonic() - started < deadline:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:
            results = await asyncio.gather(
                *(s.get(gw.url + "/x", headers={"Authorization": f"Bearer {token}"}) for _ in range(16))
            )
            for resp in results:
                if resp.status == status:
                    answered.add(resp.headers.get("X-Credgate-Worker", "?"))
                resp.release()
        if len(answered) >= workers:
            return time.monotonic() - started
    raise AssertionError(f"only workers {sorted(answered)} answered {status} within {deadline}s")


async def test_revocation_reaches_all_four_workers_within_a_second(
    env: dict[str, str], upstream: Upstream, tmp_path: Path, database_url: str
) -> None:
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}])
    await cli(env, "users", "create", "svc", "--service")
    tokens = [
        json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "token")) for _ in range(4)
    ]
    lags: list[float] = []
    async with running_gateway(env, config, tmp_path, workers=4, extra_env={"CREDGATE_DEBUG_WORKER_HEADER": "1"}) as gw:
        for t in tokens:
            await every_worker_says(gw, t["token"], 200, 4, 20)
        # two by the CLI, two by raw SQL: the trigger notifies either way
        for t in tokens[:2]:
            started = time.monotonic()
            await cli(env, "credentials", "revoke", t["id"])
            lags.append(await every_worker_says(gw, t["token"], 401, 4, 1.0) + (time.monotonic() - started) * 0)
        conn = await asyncpg.connect(database_url)
        try:
            for t in tokens[2:]:
                started = time.monotonic()
                await conn.execute("UPDATE credentials SET revoked_at = now() WHERE public_id = $1", t["id"])
                lags.append(await every_worker_says(gw, t["token"], 401, 4, 1.0))
        finally:
            await conn.close()
        text = await scrape(gw.metrics_port)
        assert (metric(text, "credgate_invalidations_total") or 0) >= 16  # 4 events x 4 workers (plus creation)
    print(
        f"\nrevocation lag to all 4 workers: p50={statistics.median(lags) * 1000:.0f} ms "
        f"max={max(lags) * 1000:.0f} ms (n={len(lags)})"
    )


async def test_one_argon2_verification_serves_every_worker(
    env: dict[str, str], upstream: Upstream, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}])
    await cli(env, "users", "create", "svc", "--service")
    token = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "token"))["token"]
    async with running_gateway(env, config, tmp_path, workers=2) as gw:
        statuses: list[int] = []
        connector = aiohttp.TCPConnector(limit=20, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:

            async def one() -> None:
                async with s.get(gw.url + "/x", headers={"Authorization": f"Bearer {token}"}) as r:
                    statuses.append(r.status)

            for _ in range(10):
                await asyncio.gather(*(one() for _ in range(100)))
        assert statuses.count(200) == 1000
        await asyncio.sleep(2.5)  # the metrics of both workers are combined in one scrape
        text = await scrape(gw.metrics_port)
        assert metric(text, "credgate_argon2_verifications_total") == 1
        print(
            f"\nargon2 verifications for 1000 requests on 2 workers: "
            f"{metric(text, 'credgate_argon2_verifications_total') or 0:.0f}"
        )


async def test_throttle_bounds_argon2_runs(env: dict[str, str], upstream: Upstream, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "gw.toml",
        [{"prefix": "/", "upstream": upstream.url}],
        extra="[throttle]\nmax_failures = 5\nper_address_max_failures = 1000\n",
    )
    await cli(env, "users", "create", "svc", "--service")
    key: dict[str, Any] = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "key"))
    from gateway.core.formats import generate_key_secret

    async with running_gateway(env, config, tmp_path, workers=2) as gw:
        statuses: list[int] = []
        retry_after: set[str] = set()
        async with aiohttp.ClientSession() as s:

            async def one() -> None:
                headers = {"accessKey": key["client_id"], "secretKey": generate_key_secret()}
                async with s.get(gw.url + "/x", headers=headers) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        retry_after.add(r.headers["Retry-After"])

            for _ in range(4):
                await asyncio.gather(*(one() for _ in range(50)))
        await asyncio.sleep(2.5)
        text = await scrape(gw.metrics_port)
        runs = metric(text, "credgate_argon2_verifications_total") or 0.0
        assert set(statuses) == {401, 429} and statuses.count(401) <= 5
        assert runs <= 5 and retry_after and all(int(v) >= 1 for v in retry_after)
        async with (
            aiohttp.ClientSession() as s,
            s.get(gw.url + "/x", headers={"accessKey": key["client_id"], "secretKey": key["secret"]}) as r,
        ):
            assert r.status == 429  # the id is throttled for everyone until the window ends
        print(f"\n200 wrong secrets: argon2 ran {runs:.0f} times (limit 5)")
