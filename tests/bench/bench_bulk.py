"""Credentials made in bulk for the further figures: real argon2id hashes from a process pool, rows written
straight into Postgres (COPY), and the bench's own settings read the way the gateway reads them."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from gateway.core import formats, hashing
from gateway.core.settings import Settings, load_settings

COLUMNS = ("public_id", "kind", "secret_hash", "name", "owner_id", "created_by", "expires_at")


def bench_settings(env: dict[str, str], config: Path) -> Settings:
    return load_settings(config, env)


def argon2_params(settings: Settings) -> hashing.Argon2Params:
    a = settings.argon2
    return hashing.Argon2Params(memory_kib=a.memory_kib, time_cost=a.time_cost, parallelism=a.parallelism)


def _hash_chunk(params: hashing.Argon2Params, secrets: Sequence[str]) -> list[str]:
    hasher = hashing.make_hasher(params)
    return [hashing.hash_secret(hasher, s) for s in secrets]


def hash_many(params: hashing.Argon2Params, secrets: Sequence[str]) -> list[str]:
    """argon2id hashes of secrets with the gateway's own hashing code, one process per core."""
    procs = os.cpu_count() or 1
    # small chunks: an interrupted run waits for at most one chunk per process
    size = max(1, min(8, -(-len(secrets) // procs)))
    chunks = [secrets[i:i + size] for i in range(0, len(secrets), size)]
    # fork: the harness runs no threads here, and the children need the parent's sys.path
    pool = ProcessPoolExecutor(max_workers=procs, mp_context=multiprocessing.get_context("fork"))
    try:
        results = pool.map(_hash_chunk, [params] * len(chunks), chunks)
        return [h for chunk in results for h in chunk]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class KeyPair:
    public_id: str
    client_id: str
    secret: str


@dataclass(frozen=True)
class Token:
    public_id: str
    token: str


def new_key_pairs(count: int, distinct_secrets: int) -> tuple[list[KeyPair], list[str]]:
    """count key pairs with distinct ids; secret i % distinct_secrets each. Returns them and the distinct secrets."""
    distinct = [formats.generate_key_secret() for _ in range(max(1, min(distinct_secrets, count)))]
    ids = unique_public_ids(count)
    pairs = [KeyPair(pid, formats.client_id_for(pid), distinct[i % len(distinct)]) for i, pid in enumerate(ids)]
    return pairs, distinct


def new_tokens(count: int) -> list[Token]:
    return [Token(pid, formats.generate_token(pid)) for pid in unique_public_ids(count)]


def unique_public_ids(count: int) -> list[str]:
    ids: set[str] = set()
    while len(ids) < count:
        ids.add(formats.new_public_id())
    return list(ids)


async def owner_id(conn: asyncpg.Connection, name: str) -> int:
    value = await conn.fetchval("SELECT id FROM principals WHERE name = $1", name)
    if value is None:
        raise RuntimeError(f"principal {name} not found")
    return int(value)


async def copy_credentials(conn: asyncpg.Connection, rows: Iterable[tuple[object, ...]], *,
                           notify: bool) -> None:
    """COPY rows (COLUMNS order) into credentials. notify=False skips the change-notification trigger
    (session_replication_role = replica): new ids need no eviction, and a million NOTIFYs would only
    make every running gateway do a million evictions."""
    if not notify:
        await conn.execute("SET session_replication_role = replica")
    try:
        await conn.copy_records_to_table("credentials", records=rows, columns=COLUMNS)
    finally:
        if not notify:
            await conn.execute("SET session_replication_role = DEFAULT")


def credential_row(public_id: str, kind: str, secret_hash: str, owner: int, name: str) -> tuple[object, ...]:
    expires = datetime.now(UTC) + timedelta(days=30)
    return (public_id, kind, secret_hash, name, owner, "bench", expires)
