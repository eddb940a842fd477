"""gateway.entry and gateway.memory without I/O: what a cached credential remembers, and how compactly."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.core.store import AuthRecord
from gateway.entry import DIGEST_SIZE, MAX_BLOCKS, CachedCredential, Shared, fingerprint
from gateway.memory import MemoryCache

ARGON2 = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"
PREVIOUS = "$argon2id$v=19$m=19456,t=2,p=1$b2xkc2FsdG9sZHNhbHQ$b2xkaGFzaG9sZGhhc2hvbGRoYXNob2xkaGFzaG9sZGg"


def record(public_id: str = "abcdefghijkl", **changes: Any) -> AuthRecord:
    values: dict[str, Any] = dict(
        id=1,
        public_id=public_id,
        kind="key",
        secret_hash=ARGON2,
        previous_secret_hash=None,
        previous_expires_at=None,
        name="ci",
        expires_at=None,
        revoked_at=None,
        owner_id=7,
        owner_name="svc",
        owner_disabled=False,
        creator="cli:root",
        groups=("finance", "hr"),
        change_seq=3,
    )
    values.update(changes)
    return AuthRecord(**values)


def copy(text: str) -> str:
    """An equal string that is not the same object (as two store reads give)."""
    return "".join(list(text))


def digest(n: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest()


def rotated() -> CachedCredential:
    later = datetime.now(UTC) + timedelta(hours=1)
    return CachedCredential.from_record(record(previous_secret_hash=PREVIOUS, previous_expires_at=later), 0.0)


def test_digests_are_tied_to_the_hash_they_were_verified_against() -> None:
    entry = rotated()
    now = time.time()
    entry.add_digest(digest(1), entry.current_fp)
    entry.add_digest(digest(2), entry.previous_fp)
    entry.add_digest(digest(3), fingerprint("$argon2id$another"))  # a hash this entry no longer accepts
    assert entry.matches(digest(1), now) and entry.matches(digest(2), now)
    assert not entry.matches(digest(3), now) and not entry.matches(digest(4), now)
    assert not entry.matches(digest(2), entry.previous_until)  # the previous secret only within its grace
    assert entry.matches(digest(1), entry.previous_until)
    assert entry.digests == [(digest(1), entry.current_fp), (digest(2), entry.previous_fp)]


def test_several_digests_per_hash_are_kept_once_each() -> None:
    entry = CachedCredential.from_record(record(), 0.0)
    for n in (1, 2, 1, 3, 2):
        entry.add_digest(digest(n), entry.current_fp)
    assert [d for d, _fp in entry.digests] == [digest(1), digest(2), digest(3)]
    assert all(entry.matches(digest(n), time.time()) for n in (1, 2, 3))
    assert not entry.matches(digest(4), time.time()) and not entry.matches(b"", time.time())
    assert not entry.matches(digest(1)[:16], time.time()) and not entry.matches(digest(1) * 2, time.time())
    with pytest.raises(ValueError, match="digest"):
        entry.add_digest(b"short", entry.current_fp)


def test_a_fresh_entry_knows_no_digest() -> None:
    entry = CachedCredential.from_record(record(), 0.0)
    assert entry.digests == [] and not entry.matches(b"", time.time()) and not entry.matches(digest(1), time.time())


@pytest.mark.parametrize("stored", [ARGON2, "legacy$sha256$" + "ab" * 32, "no-dollar", "$", "$$", "é$ü$x"])
def test_the_stored_hash_is_kept_exactly(stored: str) -> None:
    entry = CachedCredential.from_record(record(secret_hash=stored), 0.0)
    assert entry.secret_hash == stored and entry.current_fp == fingerprint(stored)
    assert stored not in repr(entry)


def test_hashes_with_the_same_parameters_share_them() -> None:
    one = CachedCredential.from_record(record("a" * 12), 0.0)
    two = CachedCredential.from_record(record("b" * 12, secret_hash=copy(PREVIOUS)), 0.0)
    assert one.hash_params == "$argon2id$v=19$m=19456,t=2,p=1$" and one.hash_params is two.hash_params
    assert two.secret_hash == PREVIOUS


def test_rotation_keeps_the_previous_hash_within_its_grace_only() -> None:
    entry = rotated()
    assert entry.previous_hash == PREVIOUS and entry.previous_fp == fingerprint(PREVIOUS) and entry.previous_until
    expired = CachedCredential.from_record(
        record(previous_secret_hash=PREVIOUS, previous_expires_at=datetime.now(UTC) - timedelta(hours=1)), 0.0
    )
    assert expired.previous_until < time.time()


def test_equal_names_and_groups_are_shared_between_entries() -> None:
    one = CachedCredential.from_record(record("a" * 12), 0.0)
    two = CachedCredential.from_record(
        record("b" * 12, kind=copy("key"), owner_name=copy("svc"), creator=copy("cli:root"), groups=("hr", "finance")),
        0.0,
    )
    assert one.owner_name is two.owner_name and one.creator is two.creator and one.kind is two.kind
    assert one.groups is two.groups and one.groups == frozenset({"finance", "hr"})
    shared = CachedCredential.from_redis("c" * 12, one.to_redis().encode(), 0.0)
    assert shared.owner_name is one.owner_name and shared.groups is one.groups


def test_the_shared_table_is_bounded() -> None:
    table = Shared[str](3)
    first = table(copy("x"))
    assert table(copy("x")) is first
    for name in ("a", "b", "c"):
        table(name)
    assert len(table.values) <= 3
    again = copy("x")
    assert table(again) is again  # forgotten once full: a new instance, the same value


def test_redis_round_trip_keeps_the_record_and_never_the_hashes() -> None:
    entry = rotated()
    entry.add_digest(digest(1), entry.current_fp)
    fields = {
        b"r": entry.to_redis().encode(),
        b"d:" + digest(1).hex().encode(): entry.current_fp.encode(),
        b"d:" + digest(2).hex().encode(): entry.previous_fp.encode(),
        b"d:zz": entry.current_fp.encode(),
        b"d:" + b"ab" * 8: entry.current_fp.encode(),
    }  # malformed
    shared = CachedCredential.from_redis_fields(entry.public_id, fields, 0.0)
    assert shared is not None and shared.secret_hash == "" and shared.previous_hash == ""
    assert ARGON2 not in entry.to_redis() and PREVIOUS not in entry.to_redis()
    assert shared.digests == [(digest(1), entry.current_fp), (digest(2), entry.previous_fp)]
    for name in (
        "credential_id",
        "kind",
        "name",
        "owner_id",
        "owner_name",
        "owner_disabled",
        "revoked",
        "expires_at",
        "creator",
        "groups",
        "current_fp",
        "previous_fp",
        "previous_until",
        "stored_at",
        "seq",
        "limits",
    ):
        assert getattr(shared, name) == getattr(entry, name), name


def test_identity_blocks_one_slot_then_a_few_more() -> None:
    entry = CachedCredential.from_record(record(), 0.0)
    assert entry.block(b"bearer") is None and entry.block(b"") is None
    entry.keep_block(b"bearer", b"one")
    assert entry.block(b"bearer") == b"one" and entry.more_blocks is None and entry.block(b"basic") is None
    entry.keep_block(b"bearer", b"again")
    assert entry.block(b"bearer") == b"again" and entry.more_blocks is None
    for n in range(2 * MAX_BLOCKS):
        entry.keep_block(b"oauth scope-%d" % n, b"block %d" % n)
    kept = [n for n in range(2 * MAX_BLOCKS) if entry.block(b"oauth scope-%d" % n) == b"block %d" % n]
    assert kept == list(range(MAX_BLOCKS - 1)) and entry.block(b"bearer") == b"again"


def test_memory_indexes_owners_compactly() -> None:
    memory = MemoryCache(10)
    one = CachedCredential.from_record(record("a" * 12), 0.0)
    memory.put(one)
    assert memory.by_owner == {7: "a" * 12} and memory.owned(7) == ["a" * 12]
    memory.put(one)  # again: still one id
    assert memory.owned(7) == ["a" * 12]
    for public_id in ("b" * 12, "c" * 12):
        memory.put(CachedCredential.from_record(record(public_id), 0.0))
    assert memory.owned(7) == ["a" * 12, "b" * 12, "c" * 12]
    memory.put(CachedCredential.from_record(record("b" * 12, owner_id=8), 0.0))  # moved to another owner
    assert memory.owned(7) == ["a" * 12, "c" * 12] and memory.owned(8) == ["b" * 12]
    memory.evict("a" * 12)
    assert memory.owned(7) == ["c" * 12]
    assert memory.evict_owner(7) == ["c" * 12] and memory.owned(7) == [] and 7 not in memory.by_owner
    memory.evict("b" * 12)
    assert memory.by_owner == {} and len(memory) == 0 and memory.evict_owner(8) == []


def test_memory_is_bounded_and_unindexes_what_it_drops() -> None:
    memory = MemoryCache(3)
    for n in range(5):
        memory.put(CachedCredential.from_record(record(f"{n:012d}", owner_id=n % 2), 0.0))
    memory.put_negative("z" * 12, 60)
    assert len(memory) == 3 and list(memory.entries) == [f"{3:012d}", f"{4:012d}", "z" * 12]
    assert memory.owned(0) == [f"{4:012d}"] and memory.owned(1) == [f"{3:012d}"]


def test_digest_size_is_the_secret_digest_size() -> None:
    from gateway.core import hashing

    assert len(hashing.secret_digest(b"k" * 32, "key", "abcdefghijkl", "secret")) == DIGEST_SIZE
