"""argon2id hashing of credential secrets, verification off the event loop, and keyed secret digests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.core.settings import Argon2Settings

__all__ = [
    "Argon2Busy",
    "Argon2Params",
    "Argon2Pool",
    "SecretDigester",
    "digests_equal",
    "hash_secret",
    "hasher_from",
    "make_hasher",
    "needs_rehash",
    "pool_from",
    "secret_digest",
    "verify_hash",
]

_ARGON2ID_PREFIX = "$argon2id$"
# Bumping this tag invalidates every remembered digest at once (e.g. after an encoding change).
_DIGEST_DOMAIN = b"credgate/secret-digest/v1"

_Result = TypeVar("_Result")


@dataclass(frozen=True, slots=True)
class Argon2Params:
    """argon2id cost parameters; the defaults are the OWASP minimum (19 MiB, 2 passes, 1 lane)."""

    memory_kib: int = 19456
    time_cost: int = 2
    parallelism: int = 1


def make_hasher(params: Argon2Params) -> PasswordHasher:
    """An argon2id PasswordHasher with the given cost parameters."""
    return PasswordHasher(
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=32,
        salt_len=16,
        type=Type.ID,
    )


def hasher_from(settings: Argon2Settings) -> PasswordHasher:
    """The deployment's argon2id hasher: every process that hashes or verifies builds it here."""
    return make_hasher(Argon2Params(settings.memory_kib, settings.time_cost, settings.parallelism))


def pool_from(settings: Argon2Settings, observer: Callable[[float], None] | None = None) -> Argon2Pool:
    """The deployment's bounded argon2id worker pool (off the event loop, `concurrency` at once)."""
    pool = Argon2Pool(hasher_from(settings), concurrency=settings.concurrency, queue_limit=settings.queue_limit)
    pool.observer = observer
    return pool


def hash_secret(hasher: PasswordHasher, secret: str) -> str:
    """The encoded `$argon2id$...` hash of a secret (CPU-bound: call it through Argon2Pool on a loop)."""
    return hasher.hash(secret)


def verify_hash(hasher: PasswordHasher, stored_hash: str, secret: str) -> bool:
    """Whether secret matches stored_hash; False for a mismatch or a corrupt or non-argon2id hash."""
    # Only argon2id is ever written; anything else in the store is treated as corrupt.
    if not stored_hash.startswith(_ARGON2ID_PREFIX):
        return False
    try:
        return hasher.verify(stored_hash, secret)
    except (VerificationError, InvalidHashError):
        # VerifyMismatchError is a VerificationError; corrupt encodings raise either class.
        return False


def needs_rehash(hasher: PasswordHasher, stored_hash: str) -> bool:
    """Whether stored_hash was made with other parameters than hasher's (unparseable hashes: True)."""
    try:
        return hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


def _length_prefixed(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


class SecretDigester:
    """secret_digest for one server key, with the key's HMAC pads hashed once (RFC 2104): the same digest for
    about half the cost per call, since the request path computes one per request with a credential."""

    __slots__ = ("_inner", "_outer", "_prefixes")

    def __init__(self, server_key: bytes) -> None:
        if not server_key:
            raise ValueError("server key must not be empty")
        block = hashlib.sha256().block_size
        key = hashlib.sha256(server_key).digest() if len(server_key) > block else server_key
        key = key.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        self._prefixes: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return "SecretDigester(<key hidden>)"

    def digest(self, kind: str, public_id: str, secret: str) -> bytes:
        """HMAC-SHA256 under the server key of (kind, public_id, secret), as secret_digest."""
        return self.digest_bytes(kind, public_id.encode("utf-8"), secret.encode("utf-8"))

    def digest_bytes(self, kind: str, public: bytes, secret_bytes: bytes) -> bytes:
        """`digest` of the UTF-8 encoded public id and secret (a request header's bytes, not decoded first)."""
        prefix = self._prefixes.get(kind)
        if prefix is None:
            prefix = self._prefixes[kind] = _DIGEST_DOMAIN + _length_prefixed(kind.encode("utf-8"))
        inner = self._inner.copy()
        # _length_prefixed, written out: it runs once per request with a credential (two calls fewer, about 1,000
        # instructions per request in tests/bench/instructions.py); tests compare the result with secret_digest
        inner.update(b"".join((prefix, len(public).to_bytes(4, "big"), public, len(secret_bytes).to_bytes(4, "big"),
                               secret_bytes)))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def secret_digest(server_key: bytes, kind: str, public_id: str, secret: str) -> bytes:
    """HMAC-SHA256 under server_key of (kind, public_id, secret): the only form a secret is remembered in."""
    if not server_key:
        raise ValueError("server key must not be empty")
    # Each field is length-prefixed, so no two distinct triples share an encoding.
    message = b"".join(
        (
            _DIGEST_DOMAIN,
            _length_prefixed(kind.encode("utf-8")),
            _length_prefixed(public_id.encode("utf-8")),
            _length_prefixed(secret.encode("utf-8")),
        )
    )
    return hmac.digest(server_key, message, hashlib.sha256)


def digests_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of two digests."""
    return hmac.compare_digest(a, b)


class Argon2Busy(Exception):
    """Raised when the argon2 pool is full (running plus queued reached its bound)."""


class Argon2Pool:
    """Runs argon2 hashing and verification in threads, with bounded concurrency and a bounded queue.

    argon2-cffi releases the GIL, so `concurrency` threads really run in parallel. A slot is held
    until the thread finishes, even if the awaiting task is cancelled, so the bound is never exceeded.
    """

    def __init__(
        self,
        hasher: PasswordHasher,
        *,
        concurrency: int,
        queue_limit: int,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if queue_limit < 0:
            raise ValueError("queue_limit must not be negative")
        self.hasher = hasher
        self.concurrency = concurrency
        self.queue_limit = queue_limit
        self.in_flight = 0
        self.waiting = 0
        self.verifications = 0
        self.rejected = 0
        self.observer: Callable[[float], None] | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._owns_executor = executor is None
        self._executor: concurrent.futures.Executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="argon2"
        )

    async def verify(self, stored_hash: str, secret: str) -> bool:
        """Whether secret matches stored_hash (see verify_hash); raises Argon2Busy when full."""
        timed = await self._run(functools.partial(_timed_verify, self.hasher, stored_hash, secret), self._observe)
        return timed.matched

    async def hash(self, secret: str) -> str:
        """A new argon2id hash of secret; raises Argon2Busy when full."""
        return await self._run(functools.partial(hash_secret, self.hasher, secret), None)

    def close(self) -> None:
        """Shut down the executor if this pool created it (waits for running hashes to finish)."""
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def _run(self, work: Callable[[], _Result], on_result: Callable[[_Result], None] | None) -> _Result:
        if self.in_flight + self.waiting >= self.concurrency + self.queue_limit:
            self.rejected += 1
            raise Argon2Busy("argon2 pool is full")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, work)
        except BaseException:
            self._release_slot()
            raise
        future.add_done_callback(functools.partial(self._on_done, on_result))
        # shield: cancelling the caller must not free the slot while the thread still computes.
        return await asyncio.shield(future)

    def _release_slot(self) -> None:
        self.in_flight -= 1
        self._slots.release()

    def _on_done(self, on_result: Callable[[_Result], None] | None, future: asyncio.Future[_Result]) -> None:
        # Runs on the loop before the awaiting task resumes, so counters are settled when it does.
        self._release_slot()
        if on_result is not None and not future.cancelled() and future.exception() is None:
            on_result(future.result())

    def _observe(self, timed: _TimedResult) -> None:
        self.verifications += 1
        if self.observer is not None:
            self.observer(timed.seconds)


@dataclass(frozen=True, slots=True)
class _TimedResult:
    matched: bool
    seconds: float


def _timed_verify(hasher: PasswordHasher, stored_hash: str, secret: str) -> _TimedResult:
    started = time.perf_counter()
    matched = verify_hash(hasher, stored_hash, secret)
    return _TimedResult(matched, time.perf_counter() - started)
