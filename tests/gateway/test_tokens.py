"""Access tokens: the signed format, key rotation, the no-I/O verifier, the denylist and secretless loading."""

from __future__ import annotations

import asyncio
import base64
import json
import string
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from admin import lifecycle
from gateway.auth import Authenticator
from gateway.core import hashing, store
from gateway.core.formats import generate_token, new_public_id
from gateway.core.settings import Settings
from gateway.denylist import MAX_REVOKED_PER_CREDENTIAL, TokenDenylist
from gateway.entry import CachedCredential, Negative, Verdict, fingerprint
from gateway.extract import PresentedAccessToken, Refusal, extract
from gateway.grants import INVALID_TOKEN, TOKEN_EXPIRED, AccessTokenVerifier, Grant, decide
from gateway.lookup import CredentialLookup
from gateway.memory import MemoryCache
from gateway.redis_tier import RedisTier, credential_key
from gateway.throttle import FailureThrottle
from gateway.tokens import ACCESS_TOKEN_PREFIX, AccessToken, SigningKeys, looks_like_access_token

SERVER_KEY = b"k" * 40
OLD_SERVER_KEY = "o" * 40
FP = "0123456789abcdef"


def keys(kid: str = "k1", previous: tuple[str, ...] = ()) -> SigningKeys:
    return SigningKeys(SERVER_KEY, kid, previous)


def issue(signer: SigningKeys, scope: tuple[str, ...] = ("finance", "ops"), ttl: int = 3600,
          public_id: str = "AAAAAAAAAAAA", fp: str = FP) -> tuple[str, AccessToken]:
    now = int(time.time())
    return signer.sign(public_id, fp, scope, now, now + ttl)


# --- the format ------------------------------------------------------------------------------------------------


def test_round_trip_is_compact_url_safe_and_prefixed() -> None:
    text, made = issue(keys())
    parsed = keys().parse(text)
    assert parsed is not None
    assert (parsed.kid, parsed.public_id, parsed.fingerprint, parsed.jti, parsed.issued_at, parsed.expires_at,
            parsed.scope) == (made.kid, made.public_id, made.fingerprint, made.jti, made.issued_at,
                              made.expires_at, frozenset({"finance", "ops"}))
    assert text.startswith(ACCESS_TOKEN_PREFIX) and len(text) < 160
    assert set(text[4:]) <= set(string.ascii_letters + string.digits + "-_")
    assert keys().parse(text.encode()) is not None
    assert issue(keys())[0] != text  # a fresh jti every time
    assert "jti" in repr(parsed) and FP not in repr(parsed)


def test_empty_scope_round_trips() -> None:
    text, _ = issue(keys(), scope=())
    parsed = keys().parse(text)
    assert parsed is not None and parsed.scope == frozenset() and parsed.scope_text == ""


def test_every_single_character_change_is_rejected() -> None:
    text, _ = issue(keys())
    signer = keys()
    alphabet = string.ascii_letters + string.digits + "-_"
    for index in range(len(text)):
        replacement = alphabet[(alphabet.index(text[index]) + 1) % len(alphabet)] if text[index] in alphabet else "A"
        assert signer.parse(text[:index] + replacement + text[index + 1:]) is None, index


def test_every_truncation_and_extension_is_rejected() -> None:
    text, _ = issue(keys())
    signer = keys()
    for end in range(len(text)):
        assert signer.parse(text[:end]) is None, end
    for extra in ("A", "AA", "AAAA", "=", "==", ".", " "):
        assert signer.parse(text + extra) is None, extra


def test_non_canonical_spelling_is_rejected() -> None:
    """The last character's unused low bits must be zero: one token, one spelling."""
    signer = keys()
    for _ in range(20):
        text, _made = issue(signer)
        if len(text[4:]) % 4 in (2, 3):
            break
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    last = alphabet.index(text[-1])
    twin = text[:-1] + alphabet[last + 1]  # same decoded bytes when the low bits are unused
    assert base64.urlsafe_b64decode(twin[4:] + "==") == base64.urlsafe_b64decode(text[4:] + "==")
    assert signer.parse(twin) is None


@given(st.binary(max_size=300))
def test_parse_never_raises(tail: bytes) -> None:
    assert keys().parse(ACCESS_TOKEN_PREFIX.encode() + tail) is None
    assert keys().parse(ACCESS_TOKEN_PREFIX + base64.urlsafe_b64encode(tail).decode().rstrip("=")) is None


def test_other_server_key_or_kid_is_rejected() -> None:
    text, _ = issue(keys())
    assert SigningKeys(b"z" * 40, "k1").parse(text) is None
    assert keys("k2").parse(text) is None


def test_previous_keys_verify_until_removed() -> None:
    old = SigningKeys(OLD_SERVER_KEY.encode(), "k1")
    text, _ = issue(old)
    rotated = keys("k2", (f"k1:{OLD_SERVER_KEY}",))
    parsed = rotated.parse(text)
    assert parsed is not None and parsed.kid == "k1"
    new_text, _ = issue(rotated)
    assert rotated.parse(new_text) is not None and rotated.parse(new_text).kid == "k2"  # type: ignore[union-attr]
    assert old.parse(new_text) is None
    assert keys("k2").parse(text) is None  # removed: no longer verifies
    # same server key, only the key id changed: the old id must still be listed to keep verifying
    same_key_old = issue(keys("k1"))[0]
    assert keys("k2", (f"k1:{SERVER_KEY.decode()}",)).parse(same_key_old) is not None


@pytest.mark.parametrize("previous", [("k1:" + "x" * 40,), ("k9:" + "x" * 40, "k9:" + "y" * 40), (":" + "x" * 40,)])
def test_ambiguous_or_empty_key_ids_are_refused(previous: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="key id"):
        SigningKeys(SERVER_KEY, "k1", previous)


def test_shape_check_and_extraction() -> None:
    text, _ = issue(keys())
    assert looks_like_access_token(text.encode())
    for bad in (b"cga_", b"cga_" + b"A" * 20, b"cga_" + b"A" * 100 + b"!", b"cgt_" + b"A" * 120,
                b"cga_" + b"A" * 5000):
        assert not looks_like_access_token(bad)
    found = extract((b"Bearer " + text.encode(),), (), (), True)
    assert isinstance(found, tuple) and isinstance(found[0], PresentedAccessToken) and found[1] == "oauth"
    assert text not in repr(found[0])
    refused = extract((b"Bearer " + text.encode(),), (), ())  # the admin API does not take access tokens
    assert isinstance(refused, Refusal) and refused.reason == "malformed"
    credential = generate_token(new_public_id())
    found = extract((b"bearer " + credential.encode(),), (), (), True)
    assert isinstance(found, tuple) and found[1] == "bearer"
    forged = extract((b"Bearer cga_" + b"A" * 130,), (), (), True)
    assert isinstance(forged, tuple) and isinstance(forged[0], PresentedAccessToken)  # shape only: signature later


# --- the decision --------------------------------------------------------------------------------------------


def entry(**changes: Any) -> CachedCredential:
    values: dict[str, Any] = dict(
        public_id="AAAAAAAAAAAA", credential_id=1, kind="key", name="ci", owner_id=7, owner_name="svc",
        owner_disabled=False, revoked=False, expires_at=None, creator="cli:root",
        groups=frozenset({"finance", "hr"}), current_fp=FP, previous_fp="", previous_until=0.0,
        fetched=time.monotonic(), stored_at=time.time(), seq=0)
    values.update(changes)
    return CachedCredential(**values)


@pytest.mark.parametrize(("changes", "outcome"), [
    ({}, "ok"),
    ({"current_fp": "fedcba9876543210"}, "invalid"),  # rotated since the token was issued
    ({"revoked": True}, "invalid"),
    ({"kind": "token"}, "invalid"),
    ({"expires_at": time.time() - 1}, "expired"),
    ({"owner_disabled": True}, "suspended"),
])
def test_a_token_is_as_good_as_its_credential(changes: dict[str, Any], outcome: str) -> None:
    _, token = issue(keys())
    grant = decide(token, entry(**changes))
    assert grant.outcome == outcome
    if outcome == "ok":
        # the token asked for finance and ops; the owner is in finance and hr now
        assert grant.scope == frozenset({"finance"}) and grant.entry is not None


def offline_authenticator(settings: Settings) -> Authenticator:
    """An Authenticator with no store, no Redis and no argon2: any I/O attempt would fail loudly."""
    redis_tier = RedisTier("", 1, 1)
    lookup = CredentialLookup(settings.cache, cast(Any, None), MemoryCache(100), redis_tier)
    throttle = FailureThrottle(settings.throttle, redis_tier)
    return Authenticator(settings.secret_key_bytes, lookup, cast(Any, None), throttle)


def test_verification_needs_no_io(settings: Settings) -> None:
    auth = offline_authenticator(settings)
    denylist = TokenDenylist(cast(Any, None), 60)
    denylist.loaded = True  # as after its first load
    verifier = AccessTokenVerifier(keys(), auth.lookup, denylist)
    text, token = issue(keys())
    assert verifier.verify(text[:-2]) is INVALID_TOKEN
    assert verifier.verify(text[:-1] + ("A" if text[-1] != "A" else "B")) is INVALID_TOKEN
    expired_text, _ = issue(keys(), ttl=-1)
    assert verifier.verify(expired_text) is TOKEN_EXPIRED
    auth.lookup.memory.put(entry())
    grant = verifier.verify(text)
    assert isinstance(grant, Grant) and grant.outcome == "ok" and grant.scope == frozenset({"finance"})
    denylist.on_event({"t": "j", "id": token.jti, "exp": token.expires_at})
    assert verifier.verify(text) is INVALID_TOKEN
    other_text, _ = issue(keys())
    assert isinstance(verifier.verify(other_text), Grant)
    denylist.on_event({"t": "j", "id": token.public_id, "before": int(time.time()), "exp": time.time() + 60})
    assert verifier.verify(other_text) is INVALID_TOKEN  # covered by the watermark
    later = keys().sign(token.public_id, FP, ("finance",), int(time.time()) + 5, int(time.time()) + 60)[0]
    assert verifier.verify(later).outcome == "ok"  # type: ignore[union-attr]


async def test_unknown_denylist_means_503_not_200(settings: Settings) -> None:
    """Until a worker has loaded the denylist once, it cannot tell a revoked token from a good one."""
    auth = offline_authenticator(settings)
    auth.lookup.memory.put(entry())
    denylist = TokenDenylist(cast(Any, None), 60)
    denylist.load_failed = True  # as when the store is down since the worker started
    verifier = AccessTokenVerifier(keys(), auth.lookup, denylist)
    pending = verifier.verify(issue(keys())[0])
    assert not isinstance(pending, Grant)
    grant = await pending
    assert grant.outcome == "unavailable" and grant.retry_after > 0


# --- against real Postgres and Redis ---------------------------------------------------------------------------


@pytest.fixture
async def authenticator(settings: Settings, pool: Any) -> AsyncIterator[Authenticator]:
    redis_tier = RedisTier(settings.redis_url.reveal(), 60, 1)
    argon2 = hashing.Argon2Pool(hashing.make_hasher(hashing.Argon2Params(memory_kib=1024, time_cost=1)), concurrency=1,
                                queue_limit=8)
    try:
        lookup = CredentialLookup(settings.cache, pool, MemoryCache(100), redis_tier)
        yield Authenticator(settings.secret_key_bytes, lookup, argon2, FailureThrottle(settings.throttle, redis_tier))
    finally:
        argon2.close()
        await redis_tier.close()


async def key_pair(pool: Any, settings: Settings) -> lifecycle.IssuedSecret:
    actor = store.Actor("cli:test")
    hash_secret = lifecycle.secret_hasher(settings.argon2)
    await lifecycle.create_group(pool, actor, "finance")
    await lifecycle.create_principal(pool, actor, hash_secret, "svc", service=True, groups=["finance"])
    return await lifecycle.create_credential(pool, actor, hash_secret, settings.policy, owner="svc", kind="key")


async def record(lookup: CredentialLookup, public_id: str) -> CachedCredential | Negative | Verdict:
    found = lookup.record(public_id)
    return found if isinstance(found, (CachedCredential, Negative)) else await found


async def test_record_reads_without_a_secret(authenticator: Authenticator, pool: Any, settings: Settings) -> None:
    lookup = authenticator.lookup
    unknown = new_public_id()
    assert isinstance(await record(lookup, unknown), Negative)  # unknown: refused
    assert lookup.memory.get(unknown) is not None  # negatively cached: a flood costs no queries
    issued = await key_pair(pool, settings)
    public_id = issued.reveal()["id"]
    loaded = await record(lookup, public_id)
    assert isinstance(loaded, CachedCredential) and loaded.groups == frozenset({"finance"})
    assert loaded.digests == [] and lookup.memory.get(public_id) is loaded
    stored_hash = await pool.fetchval("SELECT secret_hash FROM credentials WHERE public_id = $1", public_id)
    assert loaded.current_fp == fingerprint(stored_hash)
    assert lookup.redis.client is not None
    fields = await lookup.redis.client.hgetall(credential_key(public_id))
    assert set(fields) == {b"r"}  # the record only: no digest, no hash
    lookup.memory.evict(public_id)
    from_redis = await record(lookup, public_id)
    assert isinstance(from_redis, CachedCredential) and from_redis.secret_hash == ""


async def test_denylist_revocation_reaches_another_process_view(pool: Any, database_url: str,
                                                                settings: Settings) -> None:
    issued = await key_pair(pool, settings)
    public_id = issued.reveal()["id"]
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    import asyncpg

    listener = await asyncpg.connect(database_url)
    await listener.add_listener(store.NOTIFY_CHANNEL, lambda *a: received.put_nowait(json.loads(a[3])))
    try:
        here, there = TokenDenylist(pool, 60), TokenDenylist(pool, 60)
        assert await there.load() and there.loaded and len(there) == 0
        _, token = issue(keys(), public_id=public_id)
        await here.revoke(token, 3600)
        assert here.is_revoked(token)
        event = await asyncio.wait_for(received.get(), 5)
        assert event["t"] == "j" and event["id"] == token.jti and event["exp"] == token.expires_at
        there.on_event(event)  # what the invalidation listener hands over
        assert there.is_revoked(token)
        fresh = TokenDenylist(pool, 60)
        await fresh.load()
        assert fresh.is_revoked(token) and not fresh.is_revoked(issue(keys(), public_id=public_id)[1])
    finally:
        await listener.close()


async def test_denylist_is_bounded_per_credential(pool: Any, settings: Settings) -> None:
    issued = await key_pair(pool, settings)
    public_id = issued.reveal()["id"]
    denylist = TokenDenylist(pool, 60)
    now = int(time.time())
    signer = keys()
    tokens = [signer.sign(public_id, FP, (), now - 10, now + 600)[1] for _ in range(MAX_REVOKED_PER_CREDENTIAL)]
    for token in tokens:
        await denylist.revoke(token, 3600)
    assert await pool.fetchval("SELECT count(*) FROM oauth_revoked_tokens") == MAX_REVOKED_PER_CREDENTIAL
    older = signer.sign(public_id, FP, (), now - 5, now + 600)[1]
    one_more = signer.sign(public_id, FP, (), now, now + 600)[1]
    newer = signer.sign(public_id, FP, (), now + 1, now + 600)[1]
    await denylist.revoke(one_more, 3600)
    assert await pool.fetchval("SELECT count(*) FROM oauth_revoked_tokens") == MAX_REVOKED_PER_CREDENTIAL
    row = await pool.fetchrow("SELECT issued_before, expires_at FROM oauth_revoked_before WHERE public_id = $1",
                              public_id)
    assert row["issued_before"] == now and row["expires_at"].timestamp() == now + 3600
    fresh = TokenDenylist(pool, 60)
    await fresh.load()
    assert fresh.is_revoked(one_more) and fresh.is_revoked(older) and not fresh.is_revoked(newer)
    assert len(fresh) == MAX_REVOKED_PER_CREDENTIAL + 1


async def test_denylist_forgets_expired_tokens(pool: Any, settings: Settings) -> None:
    issued = await key_pair(pool, settings)
    public_id = issued.reveal()["id"]
    denylist = TokenDenylist(pool, 60)
    now = int(time.time())
    short = keys().sign(public_id, FP, (), now, now + 1)[1]
    await denylist.revoke(short, 3600)
    assert denylist.is_revoked(short)
    await asyncio.sleep(1.1)
    await denylist.load()
    assert len(denylist) == 0
    await denylist.revoke(keys().sign(public_id, FP, (), now, now + 60)[1], 3600)  # prunes the expired row
    assert await pool.fetchval("SELECT count(*) FROM oauth_revoked_tokens") == 1
