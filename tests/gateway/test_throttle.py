"""gateway.throttle against real Redis (and without it), and a lockout attempt through a real gateway process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.core.formats import generate_key_secret
from gateway.core.settings import ThrottleSettings
from gateway.redis_tier import RedisTier
from gateway.throttle import FailureThrottle
from tests.support import Upstream, cli, free_port, metric, running_gateway, scrape, write_config

LIMITS = ThrottleSettings(max_failures=3, per_address_max_failures=5, per_id_max_failures=7, window_seconds=60)
ID, OTHER_ID = "victimId0001", "otherId00002"
ATTACKER, OWNER = "192.0.2.66", "198.51.100.7"

MakeThrottle = Callable[..., FailureThrottle]


@pytest.fixture(params=["redis", "no redis", "redis unreachable"])
async def make_throttle(request: pytest.FixtureRequest, clean_redis_url: str) -> AsyncIterator[MakeThrottle]:
    """FailureThrottles sharing one Redis (as workers and replicas do), none, or one nobody answers at."""
    url = {"redis": clean_redis_url, "no redis": "", "redis unreachable": f"redis://127.0.0.1:{free_port()}/0"}
    tiers: list[RedisTier] = []

    def make(settings: ThrottleSettings = LIMITS) -> FailureThrottle:
        tiers.append(RedisTier(url[request.param], 60, 5))
        return FailureThrottle(settings, tiers[-1])

    yield make
    for tier in tiers:
        await tier.close()


async def outcomes(throttle: FailureThrottle, attempts: list[tuple[str, str]]) -> list[int | None]:
    """reserve() for each (id, address), one after another: None reserved, else Retry-After."""
    return [await throttle.reserve(public_id, address) for public_id, address in attempts]


async def test_one_address_is_throttled_for_one_id_and_nothing_else(make_throttle: MakeThrottle) -> None:
    throttle = make_throttle()
    assert await outcomes(throttle, [(ID, ATTACKER)] * 3) == [None] * 3
    retry_after = await throttle.reserve(ID, ATTACKER)
    assert retry_after is not None and 1 <= retry_after <= 60
    assert await throttle.reserve(ID, OWNER) is None  # the owner, from elsewhere
    assert await throttle.reserve(OTHER_ID, ATTACKER) is None  # the attacker, on another id


async def test_refused_attempts_never_count_against_the_id(make_throttle: MakeThrottle) -> None:
    throttle = make_throttle()
    results = await outcomes(throttle, [(ID, ATTACKER)] * 100)
    assert results[:3] == [None] * 3 and None not in results[3:]
    # 3 reserved of per_id_max_failures = 7: fresh addresses still get through
    assert await outcomes(throttle, [(ID, f"203.0.113.{n}") for n in range(4)]) == [None] * 4


async def test_one_address_is_throttled_over_every_id(make_throttle: MakeThrottle) -> None:
    throttle = make_throttle()
    assert await outcomes(throttle, [(f"id{n:010d}", ATTACKER) for n in range(5)]) == [None] * 5
    assert await throttle.reserve("id9999999999", ATTACKER) is not None
    assert await throttle.reserve("id9999999999", OWNER) is None


async def test_unknown_ids_count_against_the_address(make_throttle: MakeThrottle) -> None:
    throttle = make_throttle()
    for _ in range(3):
        throttle.note_address_failure(ATTACKER)
    assert throttle.blocked_address_locally(ATTACKER) is None
    assert await outcomes(throttle, [(ID, ATTACKER), (OTHER_ID, ATTACKER)]) == [None, None]
    assert await throttle.reserve("id9999999999", ATTACKER) is not None
    throttle.note_address_failure(ATTACKER)
    throttle.note_address_failure(ATTACKER)
    assert throttle.blocked_address_locally(ATTACKER) is not None


async def test_one_id_is_throttled_over_every_address(make_throttle: MakeThrottle) -> None:
    throttle = make_throttle()
    spread = [(ID, f"203.0.113.{n}") for n in range(7)]
    assert await outcomes(throttle, spread) == [None] * 7
    retry_after = await throttle.reserve(ID, OWNER)
    assert retry_after is not None and 1 <= retry_after <= 60
    assert await throttle.reserve(OTHER_ID, OWNER) is None


async def test_a_success_gives_its_slot_back(make_throttle: MakeThrottle) -> None:
    throttle = make_throttle()
    for _ in range(20):  # far past every limit, had they been failures
        assert await throttle.reserve(ID, OWNER) is None
        await throttle.refund(ID, OWNER)
    assert await outcomes(throttle, [(ID, OWNER)] * 3) == [None] * 3
    assert await throttle.reserve(ID, OWNER) is not None


async def test_the_limits_end_with_their_window(make_throttle: MakeThrottle) -> None:
    throttle = make_throttle(
        ThrottleSettings(max_failures=2, per_address_max_failures=50, per_id_max_failures=100, window_seconds=0.3)
    )
    assert await outcomes(throttle, [(ID, ATTACKER)] * 3) == [None, None, 1]  # Retry-After rounds up to 1 s
    await asyncio.sleep(0.35)
    assert await outcomes(throttle, [(ID, ATTACKER)] * 3) == [None, None, 1]


async def test_a_refund_after_the_window_does_not_open_the_next(make_throttle: MakeThrottle) -> None:
    throttle = make_throttle(
        ThrottleSettings(max_failures=2, per_address_max_failures=50, per_id_max_failures=100, window_seconds=0.3)
    )
    assert await throttle.reserve(ID, OWNER) is None
    await asyncio.sleep(0.35)
    await throttle.refund(ID, OWNER)  # its window is gone: nothing to give back
    assert await outcomes(throttle, [(ID, OWNER)] * 3) == [None, None, 1]


@pytest.mark.parametrize(
    ("attempts", "allowed"),
    [
        ([(ID, ATTACKER)] * 200, LIMITS.max_failures),
        ([(f"id{n:010d}", ATTACKER) for n in range(200)], LIMITS.per_address_max_failures),
        ([(ID, f"203.0.113.{n}") for n in range(200)], LIMITS.per_id_max_failures),
    ],
    ids=["one address, one id", "one address, every id", "every address, one id"],
)
async def test_a_concurrent_burst_never_passes_a_limit(
    make_throttle: MakeThrottle, attempts: list[tuple[str, str]], allowed: int
) -> None:
    throttle = make_throttle()
    results = await asyncio.gather(*(throttle.reserve(public_id, address) for public_id, address in attempts))
    assert results.count(None) == allowed


async def test_workers_sharing_redis_share_the_limits(clean_redis_url: str) -> None:
    tiers = [RedisTier(clean_redis_url, 60, 5) for _ in range(4)]
    try:
        workers = [FailureThrottle(LIMITS, tier) for tier in tiers]
        assert await outcomes(workers[0], [(OTHER_ID, ATTACKER)] * 3) == [None] * 3
        # another worker refuses the address for that id, and its refusals reserve nothing in its memory either
        assert None not in await outcomes(workers[1], [(OTHER_ID, ATTACKER)] * 10)
        assert await workers[1].reserve(OTHER_ID, OWNER) is None
        attempts = [worker.reserve(ID, f"203.0.113.{n % 9}") for n in range(50) for worker in workers]
        results = await asyncio.gather(*attempts)
        assert results.count(None) == LIMITS.per_id_max_failures
    finally:
        for tier in tiers:
            await tier.close()


# --- the lockout attempt, through a real gateway with two workers ------------------------------------------------


def from_address(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from `address`: the gateway throttles by the TCP peer, and every 127/8
    address is this machine's loopback, so two addresses are two clients as the gateway sees them."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), force_close=True))


async def argon2_runs(metrics_port: int) -> float:
    await asyncio.sleep(1.0)  # workers flush their metrics every 0.25 s
    return metric(await scrape(metrics_port), "credgate_argon2_verifications_total") or 0.0


@pytest.mark.slow
async def test_wrong_secrets_from_one_address_do_not_lock_the_owner_out(
    env: dict[str, str], upstream: Upstream, tmp_path: Path
) -> None:
    defaults = ThrottleSettings()
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}])
    await cli(env, "users", "create", "svc", "--service")
    key: dict[str, Any] = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "key"))

    async def call(session: aiohttp.ClientSession, gw_url: str, secret: str) -> tuple[int, str | None]:
        headers = {"accessKey": key["client_id"], "secretKey": secret}
        async with session.get(gw_url + "/x", headers=headers) as r:
            return r.status, r.headers.get("Retry-After")

    async with running_gateway(env, config, tmp_path, workers=2) as gw:
        async with from_address("127.0.0.2") as attacker:
            attack = await asyncio.gather(*(call(attacker, gw.url, generate_key_secret()) for _ in range(50)))
        statuses = [status for status, _ in attack]
        assert statuses.count(401) == defaults.max_failures and statuses.count(429) == 50 - defaults.max_failures
        runs_in_attack = await argon2_runs(gw.metrics_port)
        assert runs_in_attack <= defaults.max_failures

        async with from_address("127.0.0.1") as owner:
            assert await call(owner, gw.url, key["secret"]) == (200, None)
        assert await argon2_runs(gw.metrics_port) == runs_in_attack + 1  # the secret was not cached: argon2 ran

        async with from_address("127.0.0.2") as attacker:
            status, retry_after = await call(attacker, gw.url, generate_key_secret())
        assert status == 429 and retry_after is not None and 1 <= int(retry_after) <= defaults.window_seconds
    print(f"\n50 wrong secrets from one address: argon2 ran {runs_in_attack:.0f} times (limit {defaults.max_failures})")
