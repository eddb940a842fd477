"""Scale: the store's credential lookup (gateway.store.AUTH_LOOKUP) with a million credentials in Postgres."""

from __future__ import annotations

import asyncio
import hashlib
import random
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from gateway.core import store
from tests.bench import bench_bulk
from tests.bench.bench_servers import log

# A well-formed argon2id hash (of nothing anyone knows): lookups never verify it, and a real one per row
# would take hours to compute.
DUMMY_HASH = "$argon2id$v=19$m=19456,t=2,p=1$YmVuY2hzY2FsZXNhbHQ$0Qi2tZ1Hh3NwVhJ3qQm9wH0mX1cS0o8Zp0u0j2m2b7E"


def scale_ids(count: int) -> Iterator[str]:
    """count distinct 12-character ids in hash order (not insertion order), so the index is built as by
    random ids: the first 6 hex characters of md5(i) scatter, the last 6 (i in hex) keep them unique."""
    for i in range(count):
        yield hashlib.md5(str(i).encode(), usedforsecurity=False).hexdigest()[:6] + f"{i:06x}"


async def _load_and_measure(database_url: str, count: int, lookups: int) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url, command_timeout=600)
    try:
        owner = await bench_bulk.owner_id(conn, "bench-svc")
        expires = datetime.now(UTC) + timedelta(days=30)
        sample = sorted(random.sample(range(count), min(lookups, count)))
        ids = []
        wanted = iter(sample)
        next_wanted = next(wanted, -1)

        def rows() -> Iterator[tuple[object, ...]]:
            nonlocal next_wanted
            for i, public_id in enumerate(scale_ids(count)):
                if i == next_wanted:
                    ids.append(public_id)
                    next_wanted = next(wanted, -1)
                yield (public_id, "token", DUMMY_HASH, "scale", owner, "bench", expires)

        began = time.monotonic()
        await bench_bulk.copy_credentials(conn, rows(), notify=False)
        await conn.execute("ANALYZE credentials")
        load_seconds = time.monotonic() - began
        total = await conn.fetchval("SELECT count(*) FROM credentials")
        random.shuffle(ids)
        statement = await conn.prepare(store.AUTH_LOOKUP)
        for public_id in ids[:200]:  # warm the statement and the connection
            await statement.fetchrow(public_id)
        times = []
        for public_id in ids:
            t = time.perf_counter()
            row = await statement.fetchrow(public_id)
            times.append(time.perf_counter() - t)
            if row is None:
                raise RuntimeError(f"scale lookup found no row for {public_id}")
        plan = await conn.fetchval("EXPLAIN (FORMAT TEXT) " + store.AUTH_LOOKUP.replace("$1", "'x'"))
    finally:
        await conn.close()
    times.sort()
    return {
        "rows": int(total), "load_seconds": load_seconds, "lookups": len(times),
        "p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))],
        "max_ms": 1000 * times[-1], "plan_top": str(plan),
    }


def run(database_url: str, count: int, lookups: int) -> dict[str, Any]:
    figure = asyncio.run(_load_and_measure(database_url, count, lookups))
    log(f"scale: {figure['rows']} credentials loaded in {figure['load_seconds']:.1f} s; AUTH_LOOKUP p50 "
        f"{figure['p50_ms']:.3f} ms p99 {figure['p99_ms']:.3f} ms over {figure['lookups']} random ids")
    return figure


def section(f: dict[str, Any]) -> list[str]:
    return [
        f"{f['rows']} credentials in Postgres (COPY with a fixed dummy argon2id hash, then ANALYZE: "
        f"{f['load_seconds']:.1f} s). gateway.store.AUTH_LOOKUP as a prepared asyncpg statement, one connection, "
        f"{f['lookups']} random existing ids one after another; the time is the client round trip on 127.0.0.1.",
        "",
        "| credentials | lookups | p50 ms | p99 ms | max ms | plan (top node) |",
        "|---|---|---|---|---|---|",
        f"| {f['rows']} | {f['lookups']} | {f['p50_ms']:.3f} | {f['p99_ms']:.3f} | {f['max_ms']:.3f} | "
        f"{f['plan_top']} |",
    ]
