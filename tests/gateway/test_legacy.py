"""Imported (legacy) keys at the gateway: found without scanning, migrated to argon2id on first use, once.

In-process checks use gateway.auth against real Postgres and Redis; the end-to-end test imports 1,000 mixed rows
with the CLI and calls a real gateway process with every key, unchanged, then rotates one through a real admin
process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest

from admin import credential_import, lifecycle
from gateway.auth import Authenticator
from gateway.core import formats, hashing, legacy
from gateway.core.formats import PresentedLegacy
from gateway.core.settings import Settings
from gateway.entry import Verdict
from gateway.lookup import CredentialLookup
from gateway.memory import MemoryCache
from gateway.redis_tier import RedisTier
from gateway.throttle import FailureThrottle
from tests.admin.test_server import running_admin
from tests.support import Upstream, cli, running_gateway, write_config

CLIENT = "192.0.2.20"


@dataclass
class Replica:
    auth: Authenticator
    argon2: hashing.Argon2Pool

    async def check(self, presented: formats.Presented, client: str = CLIENT) -> Verdict:
        found = self.auth.check(presented, client)
        return found if isinstance(found, Verdict) else await found


@pytest.fixture
async def replicas(settings: Settings, pool: Any) -> AsyncIterator[list[Replica]]:
    """Two gateway processes' worth of verification state, sharing the store and Redis."""
    made: list[tuple[Replica, RedisTier]] = []
    try:
        for _ in range(2):
            redis_tier = RedisTier(settings.redis_url.reveal(), 60, 5)
            argon2 = hashing.pool_from(settings.argon2)
            lookup = CredentialLookup(settings.cache, pool, MemoryCache(100), redis_tier)
            throttle = FailureThrottle(settings.throttle, redis_tier)
            made.append((Replica(Authenticator(settings.secret_key_bytes, lookup, argon2, throttle), argon2),
                         redis_tier))
        yield [r for r, _ in made]
    finally:
        for replica, redis_tier in made:
            replica.argon2.close()
            await redis_tier.close()


async def imported(settings: Settings, pool: Any, *rows: dict[str, Any]) -> list[str]:
    if not await pool.fetchval("SELECT count(*) FROM principals WHERE name = 'svc'"):
        await lifecycle.create_principal(pool, lifecycle.cli_actor(), lifecycle.secret_hasher(settings.argon2), "svc",
                                         service=True)
    text = "".join(json.dumps({"owner": "svc", **r}) + "\n" for r in rows)
    report = await credential_import.import_credentials(pool, lifecycle.cli_actor(), settings.policy,
                                                        settings.argon2, settings.secret_key_bytes, text, "jsonl")
    assert not report.problems, report.problems
    return report.ids


def token(value: str) -> PresentedLegacy:
    found = formats.parse_legacy_token(value.encode())
    assert found is not None
    return found


def pair(client_id: str, secret: str) -> PresentedLegacy:
    found = formats.parse_legacy_key_pair(client_id.encode(), secret.encode())
    assert found is not None
    return found


def pbkdf2(secret: str) -> str:
    raw = hashlib.pbkdf2_hmac("sha256", secret.encode(), b"salty", 1000)
    return f"pbkdf2_sha256$1000$salty${base64.b64encode(raw).decode()}"


async def migrations(pool: Any) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM audit_events WHERE action = 'credential.migrate'"))


@pytest.mark.parametrize("scheme", ["sha256", "sha512"])
async def test_a_hashed_token_is_found_by_its_hash_and_migrated_on_first_use(
    settings: Settings, pool: Any, replicas: list[Replica], scheme: str
) -> None:
    value = "tok_" + scheme + "_0123456789abcdef"
    public_id, = await imported(settings, pool, {"kind": "token", "scheme": scheme,
                                                  "hash": hashlib.new(scheme, value.encode()).hexdigest()})
    one = replicas[0]
    verdict = await one.check(token(value))
    assert verdict.outcome == "ok" and verdict.entry is not None and verdict.entry.public_id == public_id
    row = await pool.fetchrow("SELECT secret_hash, legacy FROM credentials WHERE public_id = $1", public_id)
    assert row["secret_hash"].startswith("$argon2id$") and row["legacy"]  # still the imported key: legacy
    lookups = [r["lookup"] for r in await pool.fetch("SELECT lookup FROM credential_legacy_lookup")]
    assert lookups == [legacy.token_lookup(settings.secret_key_bytes, value)]  # the unsalted hash is gone too
    assert await migrations(pool) == 1
    again = one.auth.check(token(value), CLIENT)
    assert isinstance(again, Verdict) and again.outcome == "ok"  # memory: no I/O
    assert (await one.check(token(value[:-1] + "X"))).outcome == "invalid"


@pytest.mark.parametrize("scheme", ["bcrypt", "pbkdf2_sha256", "sha256"])
async def test_a_key_pair_is_found_by_its_client_id(
    settings: Settings, pool: Any, replicas: list[Replica], scheme: str
) -> None:
    secret = "s3cr3t/" + scheme + "+0123456789"
    hashed = {"bcrypt": bcrypt.hashpw(secret.encode(), bcrypt.gensalt(4)).decode(), "pbkdf2_sha256": pbkdf2(secret),
              "sha256": hashlib.sha256(secret.encode()).hexdigest()}[scheme]
    public_id, = await imported(settings, pool, {"kind": "key", "client_id": "AKIA-" + scheme, "scheme": scheme,
                                                  "hash": hashed})
    one = replicas[0]
    assert (await one.check(pair("AKIA-" + scheme, secret + "x"))).outcome == "invalid"
    assert (await pool.fetchval("SELECT secret_hash FROM credentials")).startswith("legacy$")  # a failure keeps it
    verdict = await one.check(pair("AKIA-" + scheme, secret))
    assert verdict.outcome == "ok" and verdict.entry is not None and verdict.entry.public_id == public_id
    assert (await pool.fetchval("SELECT secret_hash FROM credentials")).startswith("$argon2id$")
    assert await migrations(pool) == 1
    assert (await one.check(token(secret))).outcome == "invalid"  # the secret alone is not a token


async def test_two_replicas_migrate_once(settings: Settings, pool: Any, replicas: list[Replica]) -> None:
    value = "tok_shared_0123456789abcdef"
    await imported(settings, pool, {"kind": "token", "scheme": "sha256",
                                    "hash": hashlib.sha256(value.encode()).hexdigest()})
    verdicts = await asyncio.gather(*(r.check(token(value)) for r in replicas for _ in range(5)))
    assert {v.outcome for v in verdicts} == {"ok"}
    assert await migrations(pool) == 1
    event = await pool.fetchrow("SELECT actor, changes FROM audit_events WHERE action = 'credential.migrate'")
    changes = event["changes"]
    changes = json.loads(changes) if isinstance(changes, str) else changes
    assert event["actor"] == "gateway" and changes == {"from": "sha256", "to": "argon2id"}


async def test_unknown_and_malformed_legacy_keys_cost_no_hash(
    settings: Settings, pool: Any, replicas: list[Replica]
) -> None:
    value = "tok_known_0123456789abcdef"
    await imported(settings, pool, {"kind": "token", "key": value})
    one = replicas[0]
    unknown = token("tok_unknown_0123456789abcdef")
    assert (await one.check(unknown)).outcome == "invalid"
    again = one.auth.check(unknown, CLIENT)
    assert isinstance(again, Verdict) and again.outcome == "invalid"  # negative entry in memory: no I/O
    assert (await one.check(pair("nobody", "whatever-0123456789"))).outcome == "invalid"
    assert one.argon2.verifications == 0
    assert (await one.check(token(value))).outcome == "ok"
    assert one.argon2.verifications == 1
    assert await migrations(pool) == 0  # imported with its plaintext: argon2id from the start


async def test_rotation_ends_legacy(settings: Settings, pool: Any, replicas: list[Replica]) -> None:
    value = "tok_rotate_0123456789abcdef"
    public_id, = await imported(settings, pool, {"kind": "token", "key": value})
    one = replicas[0]
    assert (await one.check(token(value))).outcome == "ok"
    issued = (await lifecycle.rotate_credential(pool, lifecycle.cli_actor(),
                                                lifecycle.secret_hasher(settings.argon2), public_id)).reveal()
    assert issued["legacy"] is False and issued["id"] == public_id
    assert await pool.fetchval("SELECT count(*) FROM credential_legacy_lookup") == 0
    one.auth.lookup.memory.evict(public_id)  # what the change notification does in a gateway
    new = formats.parse_token(issued["token"])
    assert new is not None and (await one.check(new)).outcome == "ok"


# --- end to end: CLI import, gateway and admin processes --------------------------------------------------------


def mixed_rows(count: int) -> tuple[str, list[dict[str, str]]]:
    """A CSV of `count` rows (plaintext, sha256 and bcrypt; tokens and key pairs) and the headers for each."""
    lines = ["owner,name,kind,key,hash,scheme,client_id"]
    calls: list[dict[str, str]] = []
    for i in range(count):
        secret = f"legacy-{i:05d}-" + hashlib.sha256(str(i).encode()).hexdigest()[:20]
        match i % 5:
            case 0:
                lines.append(f"svc,t{i},token,{secret},,,")
                calls.append({"Authorization": f"Bearer {secret}"})
            case 1:
                lines.append(f"svc,t{i},token,,{hashlib.sha256(secret.encode()).hexdigest()},sha256,")
                calls.append({"Authorization": f"Bearer {secret}"})
            case 2:
                lines.append(f"svc,k{i},key,{secret},,,AKIA{i:05d}")
                calls.append({"accessKey": f"AKIA{i:05d}", "secretKey": secret})
            case 3:
                hashed = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(4)).decode()
                lines.append(f"svc,k{i},key,,{hashed},bcrypt,AKIA{i:05d}")
                basic = base64.b64encode(f"AKIA{i:05d}:{secret}".encode()).decode()
                calls.append({"Authorization": f"Basic {basic}"})
            case _:
                lines.append(f"svc,k{i},key,,{hashlib.sha256(secret.encode()).hexdigest()},sha256,AKIA{i:05d}")
                calls.append({"accessKey": f"AKIA{i:05d}", "secretKey": secret})
    return "\n".join(lines) + "\n", calls


async def fetch(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    async with session.get(url, headers=headers) as resp:
        kept = {k: v for k, v in resp.headers.items() if k.lower() not in ("date", "x-request-id")}
        return resp.status, kept, await resp.read()


@pytest.mark.timeout(300)
async def test_a_thousand_imported_keys_work_unchanged(
    env: dict[str, str], pool: Any, upstream: Upstream, tmp_path: Path
) -> None:
    await cli(env, "users", "create", "svc", "--service")
    text, calls = mixed_rows(1000)
    (tmp_path / "keys.csv").write_text(text)
    started = time.perf_counter()
    report = json.loads(await cli(env, "credentials", "import", str(tmp_path / "keys.csv")))
    elapsed = time.perf_counter() - started
    print(f"\nimported 1,000 rows in {report['seconds']:.2f} s (CLI process: {elapsed:.2f} s): {report['by_format']}")
    assert report["imported"] == 1000
    assert report["by_format"] == {"plaintext": 400, "sha256": 400, "bcrypt": 200}
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}])
    root = json.loads(await cli(env, "users", "create", "root", "--admin"))
    async with running_gateway(env, config, tmp_path) as gw, aiohttp.ClientSession() as session:
        gate = asyncio.Semaphore(8)

        async def call(headers: dict[str, str]) -> tuple[int, Any]:
            async with gate, session.get(gw.url + "/echo", headers=headers) as resp:
                return resp.status, await resp.json()

        answers = await asyncio.gather(*(call(h) for h in calls))
        assert [status for status, _ in answers] == [200] * 1000
        users = {body["headers"]["X-Auth-User"] for _, body in answers}
        assert users == {"svc"}
        assert await pool.fetchval("SELECT count(*) FROM credentials WHERE secret_hash LIKE 'legacy$%'") == 0
        assert await pool.fetchval("SELECT count(*) FROM credential_legacy_lookup WHERE lookup LIKE 'sha%'") == 0
        assert await migrations(pool) == 600  # every key imported as a hash, once
        # a wrong legacy key reads exactly like any wrong key
        wrong = [await fetch(session, gw.url + "/x", h) for h in (
            {"Authorization": "Bearer " + calls[0]["Authorization"][7:-1] + "Z"},  # a known-shaped legacy token
            {"Authorization": "Bearer never-imported-0123456789"},
            {"Authorization": "Bearer cgt_" + "A" * 44},  # credgate-shaped, unknown id
            {"accessKey": "AKIA00002", "secretKey": "wrong-secret-0123456789"},
        )]
        assert all(w == wrong[0] for w in wrong[:3]), wrong
        assert wrong[0][0] == 401 and wrong[3][0] == 401 and wrong[3][2] == wrong[0][2]
        # the admin API marks it legacy; rotating gives a credgate-format secret with the same id
        public_id = report["ids"][2]
        jar = aiohttp.CookieJar(unsafe=True)
        async with running_admin(env, tmp_path) as admin, aiohttp.ClientSession(cookie_jar=jar) as api:
            async with api.post(admin.url + "/api/v1/session",
                                json={"username": "root", "password": root["password"]}) as resp:
                csrf = {"X-CSRF-Token": (await resp.json())["csrf_token"]}
            async with api.get(f"{admin.url}/api/v1/credentials/{public_id}") as resp:
                shown = await resp.json()
            assert shown["legacy"] is True and shown["kind"] == "key"
            async with api.post(f"{admin.url}/api/v1/credentials/{public_id}/rotate", json={}, headers=csrf) as resp:
                rotated = await resp.json()
            assert resp.status == 200 and rotated["legacy"] is False and rotated["id"] == public_id
        new = {"accessKey": rotated["client_id"], "secretKey": rotated["secret"]}
        for _ in range(50):  # the change notification reaches the gateway within milliseconds
            if (await fetch(session, gw.url + "/x", calls[2]))[0] == 401:
                break
            await asyncio.sleep(0.05)
        assert (await fetch(session, gw.url + "/x", calls[2]))[0] == 401  # no grace: the old key stopped
        assert (await fetch(session, gw.url + "/x", new))[0] == 200


async def test_a_flood_of_unknown_legacy_keys_is_throttled_by_address(
    settings: Settings, replicas: list[Replica]
) -> None:
    one = replicas[0]
    outcomes = [(await one.check(token(f"never-imported-{i:020d}"), "192.0.2.99")).outcome
                for i in range(settings.throttle.per_address_max_failures + 5)]
    assert outcomes[0] == "invalid" and outcomes[-1] == "throttled"  # no store read once the address is blocked
    assert (await one.check(token("never-imported-" + "x" * 20), "192.0.2.98")).outcome == "invalid"
