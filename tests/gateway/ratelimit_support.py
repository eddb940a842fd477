"""Helpers for the rate-limit process tests: credentials with limits, bursts of requests, the RateLimit fields."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from admin import lifecycle
from gateway.core.settings import Settings
from gateway.core.store import Pool
from tests.support import GatewayProcess, start_gateway
from tests.support_faults import Reply, bearer

WORKER = "X-Credgate-Worker"
_ITEM = re.compile(r'"([a-z-]+)";(\w)=(\d+);(\w)=(\d+)')


@dataclass(frozen=True)
class Issued:
    """A credential made for a test: its public id and its bearer token."""

    id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)


async def issue(pool: Pool, settings: Settings, owner: str, *, rate_limit: str | None = None,
                quota: str | None = None) -> Issued:
    """A bearer token for `owner` (which must exist) with these limits, written as the CLI would write it."""
    hash_secret = lifecycle.secret_hasher(settings.argon2)
    issued = await lifecycle.create_credential(pool, lifecycle.cli_actor(), hash_secret, settings.policy,
                                               owner=owner, kind="token", rate_limit=rate_limit, quota=quota)
    assert issued.token is not None
    return Issued(str(issued.credential["id"]), str(issued.token))


async def service_account(pool: Pool, settings: Settings, name: str) -> None:
    hash_secret = lifecycle.secret_hasher(settings.argon2)
    await lifecycle.create_principal(pool, lifecycle.cli_actor(), hash_secret, name, service=True)


async def get(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> Reply:
    async with session.get(url, headers=headers or {}) as resp:
        return Reply(resp.status, dict(resp.headers), await resp.read())


def client(local_address: str = "127.0.0.1") -> aiohttp.ClientSession:
    """A session whose every request opens a new connection (so that SO_REUSEPORT may pick any worker),
    from `local_address` (any 127.x address reaches a gateway listening on 127.0.0.1)."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0, local_addr=(local_address, 0))
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10))


async def burst(session: aiohttp.ClientSession, urls: Sequence[str], headers: dict[str, str] | None = None
                ) -> list[Reply]:
    """One request to each URL, all at once."""
    return list(await asyncio.gather(*(get(session, url, headers) for url in urls)))


async def in_turn(session: aiohttp.ClientSession, url: str, count: int,
                  headers: dict[str, str] | None = None) -> list[Reply]:
    """`count` requests to `url`, one after the other."""
    return [await get(session, url, headers) for _ in range(count)]


def statuses(replies: Sequence[Reply]) -> Counter[int]:
    return Counter(r.status for r in replies)


def items(field: str) -> dict[str, tuple[int, int]]:
    """A RateLimit or RateLimit-Policy field as {name: (first parameter, second parameter)}: (r, t) or (q, w)."""
    found = {m.group(1): (int(m.group(3)), int(m.group(5))) for m in _ITEM.finditer(field)}
    assert ", ".join(m.group(0) for m in _ITEM.finditer(field)) == field, f"not a list of items: {field!r}"
    return found


def policy(reply: Reply) -> dict[str, tuple[int, int]]:
    """RateLimit-Policy as {name: (q, w)}."""
    return items(reply.headers["RateLimit-Policy"])


def state(reply: Reply) -> dict[str, tuple[int, int]]:
    """RateLimit as {name: (r, t)}."""
    return items(reply.headers["RateLimit"])


def labelled(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` in a Prometheus text page whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+-]+)$", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def access_outcomes(log: str) -> Counter[str]:
    """auth_outcome of every access-log line in a gateway's output."""
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return Counter(line["auth_outcome"] for line in lines if "auth_outcome" in line)


@contextlib.asynccontextmanager
async def gateways(env: Mapping[str, str], config: Path, tmp: Path, count: int, **kwargs: Any
                   ) -> AsyncIterator[list[GatewayProcess]]:
    """`count` gateways started side by side (each a supervisor and its workers), all stopped afterwards."""
    started = await asyncio.gather(*(asyncio.to_thread(start_gateway, env, config, tmp, **kwargs)
                                     for _ in range(count)), return_exceptions=True)
    running = [gw for gw in started if isinstance(gw, GatewayProcess)]
    try:
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        yield running
    finally:
        await asyncio.gather(*(asyncio.to_thread(gw.stop) for gw in running))
