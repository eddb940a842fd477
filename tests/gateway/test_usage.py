"""Usage counters: batched in memory, every request written to Postgres, including at shutdown."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.usage import UsageRecorder


async def _credential(pool: Any) -> int:
    async with pool.acquire() as conn:
        owner = await conn.fetchval("INSERT INTO principals (name, kind) VALUES ('u', 'service') RETURNING id")
        return int(await conn.fetchval(
            "INSERT INTO credentials (public_id, kind, secret_hash, owner_id, created_by) "
            "VALUES ('usageusage12', 'token', '$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA', $1, 'test') "
            "RETURNING id", owner))


async def _written(pool: Any, cid: int) -> int:
    async with pool.acquire() as conn:
        return int(await conn.fetchval(
            "SELECT coalesce(sum(requests), 0) FROM credential_usage WHERE credential_id = $1", cid))


async def test_every_request_is_written_even_when_the_block_ends_during_a_flush(pool: Any) -> None:
    cid = await _credential(pool)
    for _ in range(5):  # the block ends at a different point of the flush cycle each time
        async with UsageRecorder(pool, interval=0.005).running() as usage:
            for _ in range(20):
                usage.record(cid)
                await asyncio.sleep(0.001)
    assert await _written(pool, cid) == 100


async def test_a_failed_flush_keeps_its_counters(pool: Any) -> None:
    cid = await _credential(pool)
    usage = UsageRecorder(pool, interval=60)
    usage.record(cid)
    usage.record(cid)
    async with pool.acquire() as conn:  # hold the table so the write waits, then cancel it mid-write
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE credential_usage IN EXCLUSIVE MODE")
        flushing = asyncio.create_task(usage.flush())
        await asyncio.sleep(0.2)
        flushing.cancel()
        await asyncio.gather(flushing, return_exceptions=True)
        await tx.rollback()
    await usage.flush()
    assert await _written(pool, cid) == 2
