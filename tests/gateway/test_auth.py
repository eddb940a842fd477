"""gateway.auth against real Postgres and Redis: when argon2 runs, what is remembered, what each status reads as."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import pytest

from admin import lifecycle
from gateway.auth import Authenticator
from gateway.core import hashing
from gateway.core.formats import (
    Presented,
    client_id_for,
    generate_key_secret,
    generate_token,
    parse_key_pair,
    parse_token,
)
from gateway.core.settings import Settings
from gateway.entry import Verdict
from gateway.extract import Refusal, extract, shortcut
from gateway.lookup import CredentialLookup
from gateway.memory import MemoryCache
from gateway.redis_tier import RedisTier
from gateway.throttle import FailureThrottle

CLIENT = "192.0.2.10"


@dataclass
class Rig:
    auth: Authenticator
    argon2: hashing.Argon2Pool
    pool: Any
    settings: Settings

    async def check(self, presented: Presented, client: str = CLIENT) -> Verdict:
        found = self.auth.check(presented, client)
        return found if isinstance(found, Verdict) else await found

    def now(self, presented: Presented) -> Verdict | Awaitable[Verdict]:
        return self.auth.check(presented, CLIENT)


@pytest.fixture
async def rig(settings: Settings, pool: Any) -> AsyncIterator[Rig]:
    redis_tier = RedisTier(settings.redis_url.reveal(), 60, 5)
    argon2 = hashing.pool_from(settings.argon2)
    try:
        lookup = CredentialLookup(settings.cache, pool, MemoryCache(100), redis_tier)
        auth = Authenticator(settings.secret_key_bytes, lookup, argon2, FailureThrottle(settings.throttle, redis_tier))
        yield Rig(auth, argon2, pool, settings)
    finally:
        argon2.close()
        await redis_tier.close()


async def issue(rig: Rig, kind: str = "token", owner: str = "svc") -> tuple[Presented, str]:
    actor = lifecycle.cli_actor()
    hash_secret = lifecycle.secret_hasher(rig.settings.argon2)
    if await rig.pool.fetchval("SELECT count(*) FROM principals WHERE name = $1", owner) == 0:
        await lifecycle.create_principal(rig.pool, actor, hash_secret, owner, service=True)
    issued = (await lifecycle.create_credential(rig.pool, actor, hash_secret, rig.settings.policy, owner=owner,
                                                kind=kind)).reveal()
    presented = parse_token(issued["token"]) if kind == "token" else parse_key_pair(issued["client_id"],
                                                                                     issued["secret"])
    assert presented is not None
    return presented, issued["id"]


def wrong(presented: Presented) -> Presented:
    return Presented(presented.kind, presented.public_id, presented.secret[:-8] + "x" * 8)


async def test_argon2_runs_once_then_memory_answers_synchronously(rig: Rig) -> None:
    presented, _ = await issue(rig)
    verdict = await rig.check(presented)
    assert verdict.outcome == "ok" and verdict.entry is not None and verdict.entry.owner_name == "svc"
    assert rig.argon2.verifications == 1
    again = rig.now(presented)
    assert isinstance(again, Verdict) and again is verdict  # one HMAC and a dict lookup: no I/O, no allocation
    rig.auth.lookup.memory.evict(presented.public_id)
    assert (await rig.check(presented)).outcome == "ok"  # Redis remembers the digest
    assert rig.argon2.verifications == 1


@pytest.mark.parametrize("kind", ["token", "key"])
async def test_wrong_secret_unknown_id_and_other_kind_all_read_invalid(rig: Rig, kind: str) -> None:
    presented, _ = await issue(rig, kind)
    assert (await rig.check(wrong(presented))).outcome == "invalid"
    unknown = Presented(presented.kind, "A" * 12, presented.secret)
    assert (await rig.check(unknown)).outcome == "invalid"
    other_kind = Presented("key" if kind == "token" else "token", presented.public_id, presented.secret)
    assert (await rig.check(other_kind)).outcome == "invalid"
    assert rig.argon2.verifications == 1  # only the wrong secret of the right kind cost argon2


async def test_concurrent_requests_with_one_secret_share_one_argon2(rig: Rig) -> None:
    presented, _ = await issue(rig)
    verdicts = await asyncio.gather(*(rig.check(presented) for _ in range(20)))
    assert {v.outcome for v in verdicts} == {"ok"}
    assert rig.argon2.verifications == 1


async def test_revoked_is_invalid_without_argon2(rig: Rig) -> None:
    presented, public_id = await issue(rig)
    await lifecycle.revoke_credential(rig.pool, lifecycle.cli_actor(), public_id)
    assert (await rig.check(presented)).outcome == "invalid"
    assert (await rig.check(wrong(presented))).outcome == "invalid"
    assert rig.argon2.verifications == 0


async def test_status_is_revealed_only_after_the_secret_verified(rig: Rig) -> None:
    presented, public_id = await issue(rig)
    await rig.pool.execute("UPDATE credentials SET expires_at = now() - interval '1 day' WHERE public_id = $1",
                           public_id)
    assert (await rig.check(wrong(presented))).outcome == "invalid"
    assert (await rig.check(presented)).outcome == "expired"
    suspended, _ = await issue(rig, owner="suspended-svc")
    await lifecycle.set_disabled(rig.pool, lifecycle.cli_actor(), "suspended-svc", True)
    assert (await rig.check(suspended)).outcome == "suspended"


async def test_rotation_with_grace_accepts_both_secrets_then_only_the_new(rig: Rig) -> None:
    old, public_id = await issue(rig, "key")
    assert (await rig.check(old)).outcome == "ok"
    rotated = (await lifecycle.rotate_credential(rig.pool, lifecycle.cli_actor(),
                                                 lifecycle.secret_hasher(rig.settings.argon2), public_id,
                                                 grace_seconds=60)).reveal()
    new = parse_key_pair(rotated["client_id"], rotated["secret"])
    assert new is not None and new.public_id == old.public_id
    rig.auth.lookup.memory.evict(public_id)  # as the change notification would
    await rig.auth.lookup.redis.delete([public_id])
    assert (await rig.check(new)).outcome == "ok"
    assert (await rig.check(old)).outcome == "ok"  # previous hash, within its grace
    await rig.pool.execute("UPDATE credentials SET previous_expires_at = now() WHERE public_id = $1", public_id)
    rig.auth.lookup.memory.evict(public_id)
    await rig.auth.lookup.redis.delete([public_id])
    assert (await rig.check(old)).outcome == "invalid"
    assert (await rig.check(new)).outcome == "ok"


async def test_wrong_secrets_are_throttled_before_argon2(rig: Rig) -> None:
    presented, _ = await issue(rig)
    limit = rig.settings.throttle.max_failures
    outcomes = [(await rig.check(wrong(presented))).outcome for _ in range(limit + 3)]
    assert outcomes[:limit] == ["invalid"] * limit
    assert set(outcomes[limit:]) == {"throttled"}
    assert rig.argon2.verifications == limit


async def test_a_throttled_address_is_refused_from_memory(rig: Rig) -> None:
    """Past its limit in this process, an address is refused for that id at once: the verdict comes without an
    await (no Redis, no store read), while other addresses still get the usual answer."""
    presented, _ = await issue(rig)
    for _ in range(rig.settings.throttle.max_failures):
        assert (await rig.check(wrong(presented))).outcome == "invalid"
    refused = rig.now(wrong(presented))
    assert isinstance(refused, Verdict) and refused.outcome == "throttled" and refused.retry_after >= 1
    right = rig.now(presented)  # the right secret from that address too, unless this process knows it already
    assert isinstance(right, Verdict) and right.outcome == "throttled"
    assert (await rig.check(wrong(presented), client="192.0.2.11")).outcome == "invalid"


async def test_weaker_stored_hash_is_rehashed_after_a_successful_verify(rig: Rig) -> None:
    presented, public_id = await issue(rig)
    weak = hashing.hash_secret(hashing.make_hasher(hashing.Argon2Params(memory_kib=512, time_cost=1)),
                               presented.secret)
    await rig.pool.execute("UPDATE credentials SET secret_hash = $2 WHERE public_id = $1", public_id, weak)
    assert (await rig.check(presented)).outcome == "ok"
    stored = await rig.pool.fetchval("SELECT secret_hash FROM credentials WHERE public_id = $1", public_id)
    assert stored != weak and not hashing.needs_rehash(rig.argon2.hasher, stored)


def remembered(rig: Rig, headers: tuple[tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...]]) -> Verdict | None:
    """The request path's shortcut: gateway.extract.shortcut, then Authenticator.remembered."""
    parts = shortcut(*headers)
    return None if parts is None else rig.auth.remembered(parts[0], parts[1], parts[2])


async def full_path(rig: Rig, headers: tuple[tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...]]) -> str:
    found = extract(*headers)
    return found.reason if isinstance(found, Refusal) else (await rig.check(found[0])).outcome


def bearer(token: str) -> tuple[tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...]]:
    return (b"Bearer " + token.encode(),), (), ()


async def test_the_shortcut_answers_as_the_full_path_or_not_at_all(rig: Rig) -> None:
    token, _ = await issue(rig)
    pair, _ = await issue(rig, kind="key")
    client_id = client_id_for(pair.public_id).encode()
    forms = {
        "bearer": bearer(token.secret),
        "headers": ((), (client_id,), (pair.secret.encode(),)),
        "basic": ((b"Basic " + base64.b64encode(client_id + b":" + pair.secret.encode()),), (), ()),
    }
    for form, headers in forms.items():
        if form != "basic":  # memory knows nothing yet: the full path verifies (Basic sends the same key pair)
            assert remembered(rig, headers) is None
        assert await full_path(rig, headers) == "ok"
        verdict = remembered(rig, headers)
        assert verdict is not None and verdict is await rig.check(extract(*headers)[0])  # type: ignore[index]
    assert rig.argon2.verifications == 2
    # Right shape, wrong secret: well-formed, a wrong checksum, another case, not ASCII. Memory has no digest.
    for other in (generate_token(token.public_id), token.secret[:-1] + "x", token.secret.upper(),
                  token.secret[:30] + "é" + token.secret[32:]):
        assert remembered(rig, bearer(other)) is None
        assert await full_path(rig, bearer(other)) in ("invalid", "malformed")
    wrong_pair = ((), (client_id,), (generate_key_secret().encode(),))
    assert remembered(rig, wrong_pair) is None and await full_path(rig, wrong_pair) == "invalid"


@pytest.mark.parametrize("status", ["expired", "suspended", "revoked"])
async def test_the_shortcut_tells_a_status_as_the_full_path_does(rig: Rig, status: str) -> None:
    token, public_id = await issue(rig, owner=f"{status}-svc")
    actor = lifecycle.cli_actor()
    if status == "expired":
        await rig.pool.execute("UPDATE credentials SET expires_at = now() - interval '1 day' WHERE public_id = $1",
                               public_id)
    elif status == "suspended":
        await lifecycle.set_disabled(rig.pool, actor, f"{status}-svc", True)
    else:
        await lifecycle.revoke_credential(rig.pool, actor, public_id)
    outcome = await full_path(rig, bearer(token.secret))
    verdict = remembered(rig, bearer(token.secret))
    if status == "revoked":  # memory remembers it revoked: the full path refuses it without any hash
        assert outcome == "invalid" and verdict is None
    else:
        assert outcome == status and verdict is not None and verdict.outcome == status
