"""Revocation lag: time from the COMMIT of a revoking UPDATE to the first 401 from every gateway worker.

Each token is first cached by every worker (fresh connections until every worker, told apart by the debug
header X-Credgate-Worker, has answered 200 with it). Then the harness revokes it with asyncpg, takes the time
once COMMIT has returned, and polls with many fresh connections (SO_REUSEPORT spreads them over the workers)
until each worker has answered 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from tests.bench import bench_bulk, bench_servers
from tests.bench.bench_coldpath import ARGON2_METRIC
from tests.bench.bench_servers import Gateway, log

REVOKE = "UPDATE credentials SET revoked_at = now(), updated_at = now() WHERE public_id = $1"
POLLERS = 16
LAG_TIMEOUT = 5.0  # a revocation not seen by every worker after this long counts as this long (and is reported)


@dataclass
class Answer:
    status: int
    worker: str
    at: float


async def probe(port: int, token: str) -> Answer | None:
    """One request on a fresh connection; None when the connection failed."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        at = time.perf_counter()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    worker = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "x-credgate-worker":
            worker = value.strip()
    return Answer(status, worker, at)


async def _until_every_worker(port: int, token: str, workers: set[str], status: int,
                              deadline: float) -> dict[str, float]:
    """Poll with POLLERS concurrent fresh connections until every worker gave `status`; worker -> first time."""
    first: dict[str, float] = {}

    async def poller() -> None:
        while len(first) < len(workers) and time.perf_counter() < deadline:
            answer = await probe(port, token)
            if answer is not None and answer.status == status and answer.worker not in first:
                first[answer.worker] = answer.at

    await asyncio.gather(*(poller() for _ in range(POLLERS)))
    return first


async def _warm(gw: Gateway, tokens: list[bench_bulk.Token]) -> int:
    """Have every worker cache every token; returns how many tokens some worker never answered 200 for."""
    workers = {str(pid) for pid in gw.workers}
    warm_failures = 0
    for t in tokens:
        seen = await _until_every_worker(gw.port, t.token, workers, 200, time.perf_counter() + 10)
        if set(seen) != workers:
            warm_failures += 1
    return warm_failures


async def _revoke_all(gw: Gateway, database_url: str, tokens: list[bench_bulk.Token]) -> dict[str, Any]:
    workers = {str(pid) for pid in gw.workers}
    lags: list[float] = []
    per_worker: list[float] = []
    timeouts = 0
    conn = await asyncpg.connect(database_url)
    try:
        for t in tokens:
            async with conn.transaction():
                await conn.execute(REVOKE, t.public_id)
            committed = time.perf_counter()
            first = await _until_every_worker(gw.port, t.token, workers, 401, committed + LAG_TIMEOUT)
            if set(first) != workers:
                timeouts += 1
                lags.append(LAG_TIMEOUT)
            else:
                lags.append(max(first.values()) - committed)
            per_worker.extend(at - committed for at in first.values())
    finally:
        await conn.close()
    return {"lags": lags, "per_worker": per_worker, "timeouts": timeouts}


def run(gw: Gateway, database_url: str, params: Any, count: int) -> dict[str, Any]:
    tokens = bench_bulk.new_tokens(count)
    hashes = bench_bulk.hash_many(params, [t.token for t in tokens])

    async def insert() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            owner = await bench_bulk.owner_id(conn, "bench-svc")
            rows = [bench_bulk.credential_row(t.public_id, "token", h, owner, "revocation")
                    for t, h in zip(tokens, hashes, strict=True)]
            await bench_bulk.copy_credentials(conn, rows, notify=True)
        finally:
            await conn.close()

    asyncio.run(insert())
    warm_failures = asyncio.run(_warm(gw, tokens))
    argon2_before = bench_servers.scrape(gw.metrics_port, ARGON2_METRIC)
    result = asyncio.run(_revoke_all(gw, database_url, tokens))
    argon2_during = int(bench_servers.scrape(gw.metrics_port, ARGON2_METRIC) - argon2_before)
    lags = sorted(result["lags"])
    figure = {
        "workers": len(gw.workers), "revocations": len(lags), "timeouts": result["timeouts"],
        "warm_failures": warm_failures, "argon2_during_revocations": argon2_during,
        "p50_ms": 1000 * statistics.median(lags) if lags else None,
        "p99_ms": 1000 * _percentile(lags, 99) if lags else None,
        "max_ms": 1000 * lags[-1] if lags else None,
        "per_worker_p50_ms": 1000 * statistics.median(result["per_worker"]) if result["per_worker"] else None,
    }
    log(f"revocation lag over {figure['workers']} workers: p50 {figure['p50_ms']} ms, p99 {figure['p99_ms']} ms, "
        f"max {figure['max_ms']} ms, timeouts {figure['timeouts']}, argon2 verifications while revoking "
        f"{argon2_during}")
    return figure


def _percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, round(pct / 100 * len(values) + 0.4999))
    return values[min(len(values), rank) - 1]


def section(f: dict[str, Any]) -> list[str]:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"{f['revocations']} tokens, each cached by all {f['workers']} workers first; then `UPDATE credentials SET "
        "revoked_at = now()` in a transaction with asyncpg, the clock read once COMMIT returned, and "
        f"{POLLERS} pollers on fresh connections until every worker (X-Credgate-Worker) answered 401. "
        "The 4-worker gateway is not pinned (both cores, with the pollers).",
        "",
        "| revocations | p50 ms | p99 ms | max ms | median per-worker lag ms | not seen by every worker "
        f"within {LAG_TIMEOUT:g} s | tokens not cached by every worker first | argon2 verifications while "
        "revoking (metrics) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {f['revocations']} | {ms(f['p50_ms'])} | {ms(f['p99_ms'])} | {ms(f['max_ms'])} | "
        f"{ms(f['per_worker_p50_ms'])} | {f['timeouts']} | {f['warm_failures']} | "
        f"{f['argon2_during_revocations']} |",
    ]
    return lines
