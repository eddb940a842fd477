"""gateway.lookup against real Postgres and Redis: the memory -> Redis -> store walk, negatives, stale fallback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from admin import lifecycle
from gateway.core import store
from gateway.core.formats import new_public_id
from gateway.core.settings import Settings
from gateway.entry import UNAVAILABLE, CachedCredential, Negative, Verdict
from gateway.lookup import UNKNOWN, Coalescer, CredentialLookup, StoreDown, StoreHealth
from gateway.memory import MemoryCache
from gateway.redis_tier import RedisTier, credential_key, negative_key

Seen = list[tuple[str, str]]


@pytest.fixture
async def tiers(settings: Settings, pool: Any) -> AsyncIterator[tuple[CredentialLookup, Seen]]:
    seen: Seen = []
    redis_tier = RedisTier(settings.redis_url.reveal(), 60, 5)
    try:
        lookup = CredentialLookup(settings.cache, pool, MemoryCache(100), redis_tier,
                                  observe=lambda tier, result: seen.append((tier, result)))
        yield lookup, seen
    finally:
        await redis_tier.close()


async def make_key(pool: Any, settings: Settings, owner: str = "svc") -> str:
    actor = lifecycle.cli_actor()
    hash_secret = lifecycle.secret_hasher(settings.argon2)
    await lifecycle.create_principal(pool, actor, hash_secret, owner, service=True)
    issued = await lifecycle.create_credential(pool, actor, hash_secret, settings.policy, owner=owner, kind="key")
    public_id: str = issued.reveal()["id"]
    return public_id


async def record(lookup: CredentialLookup, public_id: str) -> CachedCredential | Negative | Verdict:
    found = lookup.record(public_id)
    return found if isinstance(found, (CachedCredential, Negative)) else await found


async def test_walk_reads_the_store_once_then_redis_then_memory(
    tiers: tuple[CredentialLookup, Seen], pool: Any, settings: Settings
) -> None:
    lookup, seen = tiers
    public_id = await make_key(pool, settings)
    first = await record(lookup, public_id)
    assert isinstance(first, CachedCredential) and first.secret_hash.startswith("$argon2id$")
    assert seen == [("memory", "miss"), ("redis", "miss"), ("store", "hit")]
    seen.clear()
    assert lookup.record(public_id) is first  # memory now answers without I/O
    assert seen == [("memory", "hit")]
    seen.clear()
    lookup.memory.evict(public_id)
    second = await record(lookup, public_id)  # published to Redis by the first walk
    assert isinstance(second, CachedCredential) and second.current_fp == first.current_fp
    assert second.secret_hash == ""  # hashes never travel through Redis
    assert seen == [("memory", "miss"), ("redis", "hit")]


async def test_unknown_ids_are_remembered_in_both_tiers(tiers: tuple[CredentialLookup, Seen]) -> None:
    lookup, seen = tiers
    unknown = new_public_id()
    assert await record(lookup, unknown) is UNKNOWN
    assert isinstance(lookup.fresh(unknown), Negative)
    assert lookup.redis.client is not None
    assert await lookup.redis.client.exists(negative_key(unknown))
    lookup.memory.evict(unknown)
    seen.clear()
    assert await record(lookup, unknown) is UNKNOWN  # Redis knows: no store query
    assert seen == [("memory", "miss"), ("redis", "negative")]


async def test_an_entry_read_before_a_change_notification_is_not_reused(
    tiers: tuple[CredentialLookup, Seen], pool: Any, settings: Settings
) -> None:
    lookup, seen = tiers
    public_id = await make_key(pool, settings)
    assert isinstance(await record(lookup, public_id), CachedCredential)
    await pool.execute("UPDATE credentials SET revoked_at = now() WHERE public_id = $1", public_id)
    seq = await pool.fetchval(store.CHANGE_SEQUENCE)
    lookup.memory.changed(seq, public_id=public_id)  # what the invalidation listener does on the notification
    lookup.memory.evict(public_id)
    seen.clear()
    found = await record(lookup, public_id)
    assert ("redis", "miss") in seen and ("store", "hit") in seen  # the Redis copy predates the change
    assert isinstance(found, CachedCredential) and found.revoked


async def test_an_eviction_during_a_walk_keeps_its_result_out_of_memory(
    tiers: tuple[CredentialLookup, Seen], pool: Any, settings: Settings
) -> None:
    lookup, _seen = tiers
    public_id = await make_key(pool, settings)
    walk = lookup.begin(public_id)
    stored = await lookup.from_store(walk, None)
    assert isinstance(stored, CachedCredential)
    lookup.memory.evict("someone-else")  # any eviction bumps the generation
    lookup.remember(walk, stored)
    await lookup.publish(walk, stored)
    assert lookup.memory.get(public_id) is None
    assert lookup.redis.client is not None
    assert not await lookup.redis.client.exists(credential_key(public_id))


async def test_store_down_serves_a_recent_entry_and_refuses_the_rest(
    tiers: tuple[CredentialLookup, Seen], pool: Any, settings: Settings
) -> None:
    lookup, _seen = tiers
    public_id = await make_key(pool, settings)
    known = await record(lookup, public_id)
    assert isinstance(known, CachedCredential)
    lookup.memory.mark_all_stale()
    await lookup.redis.delete([public_id])
    await pool.close()  # every further store read fails
    walk = lookup.begin(public_id)
    assert walk.stale is known
    assert await lookup.from_store(walk, None) is known  # read within stale_ttl: still served
    known.stored_at = time.time() - settings.cache.stale_ttl - 1
    assert await lookup.from_store(lookup.begin(public_id), None) is UNAVAILABLE
    assert await lookup.from_store(lookup.begin(new_public_id()), None) is UNAVAILABLE  # never 401


async def test_concurrent_loads_of_one_id_share_one_walk(
    tiers: tuple[CredentialLookup, Seen], pool: Any, settings: Settings
) -> None:
    lookup, seen = tiers
    public_id = await make_key(pool, settings)
    results = await asyncio.gather(*(record(lookup, public_id) for _ in range(10)))
    assert all(r is results[0] for r in results)
    assert seen.count(("store", "hit")) == 1


async def test_coalescer_shares_one_answer_and_survives_a_cancelled_caller() -> None:
    started = 0
    gate = asyncio.Event()

    async def slow() -> int:
        nonlocal started
        started += 1
        await gate.wait()
        return 42

    coalescer: Coalescer[str, int] = Coalescer()
    first = asyncio.ensure_future(coalescer.run("k", slow))
    second = asyncio.ensure_future(coalescer.run("k", slow))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second == 42 and started == 1
    assert await coalescer.run("k", slow) == 42 and started == 2  # finished questions are asked afresh


async def test_revoked_entries_in_redis_answer_without_the_store(
    tiers: tuple[CredentialLookup, Seen], pool: Any, settings: Settings
) -> None:
    lookup, seen = tiers
    public_id = await make_key(pool, settings)
    await pool.execute("UPDATE credentials SET revoked_at = now() WHERE public_id = $1", public_id)
    first = await record(lookup, public_id)
    assert isinstance(first, CachedCredential) and first.revoked
    lookup.memory.evict(public_id)
    seen.clear()
    walk = lookup.begin(public_id)
    found = await lookup.from_redis(walk, b"a digest nobody verified")
    assert isinstance(found, CachedCredential) and found.revoked  # revocation needs no secret to be known
    assert seen == [("redis", "hit")]


async def test_a_failed_store_read_marks_the_store_down_then_one_read_probes_it() -> None:
    health = StoreHealth()
    with pytest.raises(TimeoutError), health.attempt():
        raise TimeoutError  # a read past its deadline
    with pytest.raises(StoreDown), health.attempt():
        pass  # the others answer at once
    health.down_until = time.monotonic() - 0.01  # a second later
    with health.attempt(), pytest.raises(StoreDown), health.attempt():
        pass  # only one probe at a time
    assert health.down_until == 0.0 and not health.probing  # the probe succeeded: the outage is over
    with health.attempt():
        pass
