"""Cold path: requests/s when every request presents a never-seen key pair (argon2id bound), and how many
argon2 verifications the gateways ran for them (the metrics scrape) against how many credentials they saw."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from gateway.redis_tier import credential_key
from tests.bench import bench_bulk, bench_procs, bench_servers
from tests.bench.bench_servers import Gateway, log
from tests.bench.bench_wrk import Load, rotation_script, run_wrk

ARGON2_METRIC = "credgate_argon2_verifications_total"


@dataclass(frozen=True)
class ColdRun:
    label: str
    gateway: Gateway
    cpus: dict[int, set[int]]  # worker index -> cores
    wrk_cpus: str
    repeat: int  # requests per credential in a row (> 1: the same credential reaches several workers at once)


def prepare(database_url: str, settings_params: Any, count: int, distinct_secrets: int,
            work: Path) -> tuple[list[bench_bulk.KeyPair], float]:
    """count never-seen key pairs in the store; returns them and the seconds the argon2 hashing took."""
    pairs, distinct = bench_bulk.new_key_pairs(count, distinct_secrets)
    began = time.monotonic()
    hashes = dict(zip(distinct, bench_bulk.hash_many(settings_params, distinct), strict=True))
    hashing_seconds = time.monotonic() - began

    async def insert() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            owner = await bench_bulk.owner_id(conn, "bench-svc")
            rows = [bench_bulk.credential_row(p.public_id, "key", hashes[p.secret], owner, "cold") for p in pairs]
            await bench_bulk.copy_credentials(conn, rows, notify=False)
        finally:
            await conn.close()

    asyncio.run(insert())
    return pairs, hashing_seconds


def _credential_file(path: Path, pairs: list[bench_bulk.KeyPair]) -> Path:
    path.write_text("".join(f"{p.client_id}\t{p.secret}\n" for p in pairs))
    path.chmod(0o600)
    return path


def _access_log_since(path: Path, offset: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    records = []
    for line in data.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _settled(metrics_port: int, limit: float = 60.0) -> float:
    """The verification count once it stops moving: verifications queued for clients wrk has already dropped
    still run (their result is cached), and they must be counted against the credentials they verified."""
    deadline = time.monotonic() + limit
    last = bench_servers.scrape(metrics_port, ARGON2_METRIC)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = bench_servers.scrape(metrics_port, ARGON2_METRIC)
        if now == last:
            break
        last = now
    return last


def verified_in_redis(redis_url: str, pairs: list[bench_bulk.KeyPair]) -> int:
    """How many of these credentials Redis remembers a verified secret digest for (fields "d:<hex>")."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        pipe = client.pipeline(transaction=False)
        for p in pairs:
            pipe.hkeys(credential_key(p.public_id))
        return sum(1 for keys in pipe.execute() if any(k.startswith(b"d:") for k in keys))
    finally:
        client.close()


def measure(run: ColdRun, pairs: list[bench_bulk.KeyPair], *, conns: int, seconds: float, work: Path,
            aux_cpu: int, raw_dir: Path, redis_url: str) -> dict[str, Any]:
    gw = run.gateway
    creds = _credential_file(work / f"cold-{run.label}.tsv", pairs)
    script = rotation_script(work)
    offset = gw.access_log.stat().st_size if gw.access_log.exists() else 0
    before = bench_servers.scrape(gw.metrics_port, ARGON2_METRIC)
    for index, cores in run.cpus.items():
        bench_procs.pin([gw.workers[index]], cores)
    try:
        result = run_wrk(f"{gw.url}/", Load(conns=conns, threads=1, cpus=run.wrk_cpus), seconds, script=script,
                         env={"WRK_CRED_FILE": str(creds), "WRK_CRED_REPEAT": str(run.repeat)},
                         raw_out=raw_dir / f"cold-{run.label}.txt")
        verifications = _settled(gw.metrics_port) - before
    finally:
        bench_procs.pin(gw.workers, {aux_cpu})
    verified = verified_in_redis(redis_url, pairs)
    records = [r for r in _access_log_since(gw.access_log, offset) if r.get("auth_method")]
    statuses = Counter(int(r["status"]) for r in records)
    seen = {r["credential"] for r in records if r.get("credential")}
    ok = {r["credential"] for r in records if r.get("credential") and r["status"] == 200}
    figure = {
        "label": run.label, "workers": len(gw.workers), "repeat": run.repeat,
        "rps": result.rps if result else None, "p50_ms": result.p50_ms if result else None,
        "p99_ms": result.p99_ms if result else None, "wrk_requests": result.requests if result else 0,
        "wrk_errors": result.errors if result else None, "logged_requests": len(records),
        "statuses": dict(statuses), "credentials_seen": len(seen), "credentials_ok": len(ok),
        "credentials_verified": verified, "argon2_verifications": int(verifications), "pool_size": len(pairs),
        "wrapped": bool(result and result.requests > len(pairs) * run.repeat),
    }
    log(f"cold {run.label}: {figure['rps']} req/s, {verified} credentials verified (Redis), "
        f"{int(verifications)} argon2 verifications; access log: {len(seen)} credentials, statuses {dict(statuses)}")
    return figure


def section(figures: list[dict[str, Any]], count: int, distinct: int, hashing_seconds: float, *, conns: int,
            seconds: float) -> list[str]:
    lines = [
        f"{count} key pairs, never seen by any gateway (not in memory or Redis), written into Postgres with "
        f"COPY; {distinct} distinct secrets among them, each a real argon2id hash made by the harness with "
        f"gateway.core.hashing and the configured parameters ({hashing_seconds:.1f} s in a process pool). Every "
        "credential has its own id, so every first use is a full cold path (Redis miss, store read, argon2id), "
        f"whatever its secret. wrk (-c{conns}, {seconds:g} s, no warm-up) rotates through them (conf/rotate.lua) "
        "presenting accessKey/secretKey. After wrk stops, the harness waits for the argon2 count "
        "(credgate_argon2_verifications_total on the metrics listener) to settle, since verifications queued for "
        "dropped connections still run, then counts the credentials Redis holds a verified digest for: one "
        "verification per credential means the two numbers are equal. The access log columns count answered "
        "requests.",
        "",
        "| run | req/s | p50 ms | p99 ms | requests per credential | credentials verified (Redis) | "
        "argon2 verifications (metrics) | verifications per credential | credentials in access log | statuses |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        per = f["argon2_verifications"] / f["credentials_verified"] if f["credentials_verified"] else 0.0
        lines.append(
            f"| {f['label']} | {_num(f['rps'], 0)} | {_num(f['p50_ms'])} | {_num(f['p99_ms'])} | {f['repeat']} | "
            f"{f['credentials_verified']} | {f['argon2_verifications']} | {per:.3f} | {f['credentials_seen']} | "
            f"{f['statuses']} |")
    if any(f["wrapped"] for f in figures):
        lines.append("")
        lines.append("The rotation wrapped around (more requests than credentials): raise --cold-credentials.")
    return lines


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
