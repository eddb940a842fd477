"""Tests for gateway.core.hashing: argon2id parameters, verification, digests and the bounded pool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
from collections.abc import Callable, Iterator
from typing import Literal

import pytest
from argon2 import PasswordHasher

from gateway.core.hashing import (
    Argon2Busy,
    Argon2Params,
    Argon2Pool,
    SecretDigester,
    digests_equal,
    hash_secret,
    make_hasher,
    needs_rehash,
    secret_digest,
    verify_hash,
)

# Small parameters keep the suite fast; one test below uses the production defaults.
FAST = Argon2Params(memory_kib=1024, time_cost=1, parallelism=1)
SECRET = "cgt_AAAAAAAAAAAAsecretsecretsecretsecretse000000"
SERVER_KEY = b"k" * 32


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return make_hasher(FAST)


@pytest.fixture(scope="module")
def stored_hash(hasher: PasswordHasher) -> str:
    return hash_secret(hasher, SECRET)


# --- hashing and verification -------------------------------------------------------------------


def test_defaults_are_owasp_minimum() -> None:
    assert Argon2Params() == Argon2Params(memory_kib=19456, time_cost=2, parallelism=1)


def test_hash_is_argon2id_with_configured_parameters(stored_hash: str) -> None:
    assert re.fullmatch(r"\$argon2id\$v=19\$m=1024,t=1,p=1\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+", stored_hash)


def test_default_parameters_hash_and_verify() -> None:
    hasher = make_hasher(Argon2Params())
    stored = hash_secret(hasher, SECRET)
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_hash(hasher, stored, SECRET)
    assert not needs_rehash(hasher, stored)


def test_hashes_are_salted(hasher: PasswordHasher, stored_hash: str) -> None:
    assert hash_secret(hasher, SECRET) != stored_hash


def test_verify_accepts_the_right_secret(hasher: PasswordHasher, stored_hash: str) -> None:
    assert verify_hash(hasher, stored_hash, SECRET) is True


@pytest.mark.parametrize("wrong", ["", SECRET[:-1], SECRET + "0", SECRET.swapcase(), "é" + SECRET[1:]])
def test_verify_rejects_a_wrong_secret(hasher: PasswordHasher, stored_hash: str, wrong: str) -> None:
    assert verify_hash(hasher, stored_hash, wrong) is False


def _corruptions(stored: str) -> list[str]:
    salt_and_hash = stored.split("$", 4)[4]
    return [
        "",
        "garbage",
        "$argon2id$",
        stored[:-5],
        stored[:-1] + "!",
        stored.replace("p=1", "p=0"),
        stored.replace("m=1024", "m=99999999999"),
        stored.replace("v=19", "v=99"),
        "$argon2id$v=19$m=1024,t=1,p=1$$",
        "$argon2id$v=19$m=1024,t=1,p=1$" + salt_and_hash.split("$")[0],
        # A valid argon2i hash of the same secret: only argon2id is ever accepted.
        "$argon2i$" + stored[len("$argon2id$") :],
        "$2b$12$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234",
        "\x00" * 100,
    ]


def test_verify_returns_false_for_corrupt_hashes(hasher: PasswordHasher, stored_hash: str) -> None:
    for corrupt in _corruptions(stored_hash):
        assert verify_hash(hasher, corrupt, SECRET) is False, corrupt


def test_argon2i_hash_of_the_right_secret_is_refused() -> None:
    from argon2 import Type

    argon2i = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=Type.I)
    stored = argon2i.hash(SECRET)
    assert stored.startswith("$argon2i$")
    assert verify_hash(make_hasher(FAST), stored, SECRET) is False


def test_needs_rehash(stored_hash: str) -> None:
    assert not needs_rehash(make_hasher(FAST), stored_hash)
    assert needs_rehash(make_hasher(Argon2Params(memory_kib=2048, time_cost=1, parallelism=1)), stored_hash)
    assert needs_rehash(make_hasher(Argon2Params(memory_kib=1024, time_cost=2, parallelism=1)), stored_hash)
    assert needs_rehash(make_hasher(Argon2Params(memory_kib=1024, time_cost=1, parallelism=2)), stored_hash)
    assert needs_rehash(make_hasher(FAST), "garbage")


# --- keyed digests --------------------------------------------------------------------------------


def test_digest_is_constant_for_the_same_input() -> None:
    first = secret_digest(SERVER_KEY, "token", "abcdefghijkl", SECRET)
    assert len(first) == 32
    assert first == secret_digest(SERVER_KEY, "token", "abcdefghijkl", SECRET)
    assert digests_equal(first, secret_digest(SERVER_KEY, "token", "abcdefghijkl", SECRET))


@pytest.mark.parametrize("key", [SERVER_KEY, b"k", b"k" * 64, b"k" * 65, bytes(range(256))])
@pytest.mark.parametrize(("kind", "public_id", "secret"), [("token", "abcdefghijkl", SECRET), ("key", "x", ""),
                                                           ("token", "abcdefghijkl", "ünïcode")])
def test_the_digester_gives_secret_digest(key: bytes, kind: str, public_id: str, secret: str) -> None:
    """The request path's digester (HMAC pads hashed once) is the same function: cached digests stay valid."""
    digester = SecretDigester(key)
    assert digester.digest(kind, public_id, secret) == secret_digest(key, kind, public_id, secret)
    assert digester.digest(kind, public_id, secret) == secret_digest(key, kind, public_id, secret)  # reused pads
    assert "k" * 8 not in repr(digester)


def test_the_digester_refuses_an_empty_key() -> None:
    with pytest.raises(ValueError, match="server key"):
        SecretDigester(b"")


@pytest.mark.parametrize(
    ("key", "kind", "public_id", "secret"),
    [
        (b"j" * 32, "token", "abcdefghijkl", SECRET),
        (SERVER_KEY, "key", "abcdefghijkl", SECRET),
        (SERVER_KEY, "token", "abcdefghijkm", SECRET),
        (SERVER_KEY, "token", "abcdefghijkl", SECRET[:-1] + "1"),
        # Moving characters between fields must change the digest (unambiguous encoding).
        (SERVER_KEY, "tokena", "bcdefghijkl", SECRET),
        (SERVER_KEY, "token", "abcdefghijk", "l" + SECRET),
        (SERVER_KEY, "token", "abcdefghijkl" + SECRET, ""),
    ],
)
def test_digest_differs_per_key_kind_id_and_secret(
    key: bytes, kind: str, public_id: str, secret: str
) -> None:
    reference = secret_digest(SERVER_KEY, "token", "abcdefghijkl", SECRET)
    other = secret_digest(key, kind, public_id, secret)
    assert not digests_equal(reference, other)


def test_digest_does_not_contain_the_secret() -> None:
    digest = secret_digest(SERVER_KEY, "token", "abcdefghijkl", SECRET)
    assert SECRET.encode() not in digest


def test_digest_refuses_an_empty_key() -> None:
    with pytest.raises(ValueError):
        secret_digest(b"", "token", "abcdefghijkl", SECRET)


# --- the bounded pool -----------------------------------------------------------------------------


class GatedHasher(PasswordHasher):
    """A real argon2id hasher whose verify blocks on a gate and records how many run at once."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.running = 0
        self.max_running = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        self.started.release()
        try:
            if not self.gate.wait(timeout=10):
                raise TimeoutError("test gate never opened")
            return super().verify(hash, password)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def gated() -> Iterator[GatedHasher]:
    gated = GatedHasher()
    yield gated
    gated.gate.set()  # never leave a worker thread blocked


async def _wait_for(predicate: Callable[[], bool]) -> None:
    """Poll a condition that changes in another thread, for at most about five seconds."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def test_pool_verifies_and_hashes(hasher: PasswordHasher, stored_hash: str) -> None:
    pool = Argon2Pool(hasher, concurrency=2, queue_limit=2)
    try:
        assert await pool.verify(stored_hash, SECRET) is True
        assert await pool.verify(stored_hash, "wrong") is False
        assert await pool.verify("corrupt", SECRET) is False
        new_hash = await pool.hash(SECRET)
        assert new_hash.startswith("$argon2id$v=19$m=1024,t=1,p=1$")
        assert verify_hash(hasher, new_hash, SECRET)
        assert pool.verifications == 3  # hashing is not a verification
        assert pool.in_flight == 0
        assert pool.waiting == 0
        assert pool.rejected == 0
    finally:
        pool.close()


async def test_pool_bounds_concurrency(gated: GatedHasher) -> None:
    stored = gated.hash(SECRET)
    pool = Argon2Pool(gated, concurrency=2, queue_limit=10)
    try:
        tasks = [asyncio.create_task(pool.verify(stored, SECRET)) for _ in range(6)]
        await _wait_for(lambda: pool.in_flight == 2 and pool.waiting == 4)
        # Give the loop a moment to (wrongly) start more work, then let everything through.
        await asyncio.sleep(0.05)
        assert gated.running == 2
        gated.gate.set()
        assert await asyncio.gather(*tasks) == [True] * 6
        assert gated.max_running == 2
        assert pool.verifications == 6
        assert (pool.in_flight, pool.waiting, pool.rejected) == (0, 0, 0)
    finally:
        gated.gate.set()  # a failing test must not leave close() waiting on a blocked thread
        pool.close()


async def test_pool_with_real_parallel_work_never_exceeds_concurrency() -> None:
    hasher = make_hasher(FAST)
    stored = hash_secret(hasher, SECRET)
    pool = Argon2Pool(hasher, concurrency=3, queue_limit=100)
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, pool.in_flight)
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())
    try:
        results = await asyncio.gather(*(pool.verify(stored, SECRET) for _ in range(30)))
        assert all(results)
        assert 1 <= peak <= 3
        assert pool.verifications == 30
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        pool.close()


async def test_pool_raises_busy_when_full(gated: GatedHasher) -> None:
    stored = gated.hash(SECRET)
    pool = Argon2Pool(gated, concurrency=1, queue_limit=1)
    try:
        running = asyncio.create_task(pool.verify(stored, SECRET))
        queued = asyncio.create_task(pool.verify(stored, SECRET))
        await _wait_for(lambda: pool.in_flight == 1 and pool.waiting == 1)

        with pytest.raises(Argon2Busy):
            await pool.verify(stored, SECRET)
        with pytest.raises(Argon2Busy):
            await pool.hash(SECRET)
        assert pool.rejected == 2

        gated.gate.set()
        assert list(await asyncio.gather(running, queued)) == [True, True]
        assert pool.verifications == 2  # rejected calls never ran
        # Capacity is back once the work is done.
        assert await pool.verify(stored, SECRET) is True
    finally:
        gated.gate.set()  # a failing test must not leave close() waiting on a blocked thread
        pool.close()


async def test_cancelled_caller_keeps_its_slot_until_the_thread_finishes(gated: GatedHasher) -> None:
    stored = gated.hash(SECRET)
    pool = Argon2Pool(gated, concurrency=1, queue_limit=0)
    try:
        task = asyncio.create_task(pool.verify(stored, SECRET))
        await asyncio.to_thread(gated.started.acquire, True, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The argon2 thread is still busy, so the pool must still count it as full.
        assert pool.in_flight == 1
        with pytest.raises(Argon2Busy):
            await pool.verify(stored, SECRET)
        gated.gate.set()
        await _wait_for(lambda: pool.in_flight == 0)
        assert await pool.verify(stored, SECRET) is True
        assert pool.verifications == 2
    finally:
        gated.gate.set()  # a failing test must not leave close() waiting on a blocked thread
        pool.close()


async def test_cancelled_waiter_leaves_the_queue(gated: GatedHasher) -> None:
    stored = gated.hash(SECRET)
    pool = Argon2Pool(gated, concurrency=1, queue_limit=1)
    try:
        running = asyncio.create_task(pool.verify(stored, SECRET))
        queued = asyncio.create_task(pool.verify(stored, SECRET))
        await _wait_for(lambda: pool.waiting == 1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert pool.waiting == 0
        gated.gate.set()
        assert await running is True
        assert pool.verifications == 1
        assert (pool.in_flight, pool.waiting) == (0, 0)
    finally:
        gated.gate.set()  # a failing test must not leave close() waiting on a blocked thread
        pool.close()


async def test_observer_receives_each_verification_duration(hasher: PasswordHasher, stored_hash: str) -> None:
    pool = Argon2Pool(hasher, concurrency=1, queue_limit=0)
    durations: list[float] = []
    pool.observer = durations.append
    try:
        await pool.verify(stored_hash, SECRET)
        await pool.verify(stored_hash, "wrong")
        await pool.hash(SECRET)
        assert len(durations) == 2
        assert all(0 < seconds < 5 for seconds in durations)
    finally:
        pool.close()


async def test_pool_uses_a_given_executor_and_does_not_shut_it_down(
    hasher: PasswordHasher, stored_hash: str
) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-argon2") as executor:
        pool = Argon2Pool(hasher, concurrency=1, queue_limit=0, executor=executor)
        assert await pool.verify(stored_hash, SECRET) is True
        pool.close()
        # Still usable: the pool did not own it.
        assert executor.submit(lambda: 42).result(timeout=5) == 42


async def test_verification_runs_off_the_event_loop(gated: GatedHasher) -> None:
    stored = gated.hash(SECRET)
    pool = Argon2Pool(gated, concurrency=1, queue_limit=0)
    try:
        task = asyncio.create_task(pool.verify(stored, SECRET))
        await asyncio.to_thread(gated.started.acquire, True, 5)
        # The loop is free while argon2 is blocked in its thread.
        ticks = 0
        for _ in range(5):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and not task.done()
        gated.gate.set()
        assert await task is True
    finally:
        gated.gate.set()  # a failing test must not leave close() waiting on a blocked thread
        pool.close()


@pytest.mark.parametrize(("concurrency", "queue_limit"), [(0, 1), (1, -1)])
def test_pool_rejects_bad_bounds(hasher: PasswordHasher, concurrency: int, queue_limit: int) -> None:
    with pytest.raises(ValueError):
        Argon2Pool(hasher, concurrency=concurrency, queue_limit=queue_limit)
