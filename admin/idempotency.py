"""Idempotency-Key for rotate: a retried rotation returns the first response instead of rotating again.

The first response holds the new secret, which must never be written anywhere. So the response is kept
only in this process's memory (24 h), while the database records a hash of the key and of the request.
A retry that reaches a process without the response (after a restart, or another replica) therefore gets
409 saying the rotation already happened, and never a second rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from admin.errors import ApiError
from gateway.core import admin_sql
from gateway.core.store import Pool

IDEMPOTENCY_HEADER = "Idempotency-Key"
KEY_LIFETIME = 24 * 3600.0
MAX_REMEMBERED = 10_000
MAX_KEY_LENGTH = 255

Response = dict[str, Any]


@dataclass(slots=True)
class _Remembered:
    fingerprint: bytes
    at: float
    result: asyncio.Future[Response]

    def __repr__(self) -> str:  # the result holds a secret
        return f"_Remembered(at={self.at!r})"


def check_key(value: str) -> str:
    if not 0 < len(value) <= MAX_KEY_LENGTH or not value.isascii() or not value.isprintable():
        raise ApiError(400, "invalid_request", f"{IDEMPOTENCY_HEADER} must be 1-{MAX_KEY_LENGTH} printable "
                       "ASCII characters", {IDEMPOTENCY_HEADER: "1-255 printable ASCII characters"})
    return value


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\x00".join(parts).encode()).digest()


class RotationReplay:
    """Runs a rotation at most once per (caller, key) within KEY_LIFETIME."""

    def __init__(self, pool: Pool, lifetime: float = KEY_LIFETIME) -> None:
        self.pool = pool
        self.lifetime = lifetime
        self._remembered: dict[tuple[int, bytes], _Remembered] = {}

    async def run(self, principal_id: int, key: str, public_id: str, grace_seconds: int,
                  rotate: Callable[[], Awaitable[Response]]) -> tuple[Response, bool]:
        """(response, replayed): the stored response for a repeated key, else the result of rotate()."""
        self._forget_old()
        key_hash = _digest(key)
        fingerprint = _digest(public_id, str(grace_seconds))
        slot = (principal_id, key_hash)
        known = self._remembered.get(slot)
        if known is not None:
            if known.fingerprint != fingerprint:
                raise _mismatch()
            return dict(await asyncio.shield(known.result)), True
        # Registered before the first await, so a concurrent retry in this process waits for this one.
        entry = _Remembered(fingerprint, time.monotonic(), asyncio.get_running_loop().create_future())
        entry.result.add_done_callback(_consume_exception)
        self._remembered[slot] = entry
        try:
            await self._claim(principal_id, key_hash, public_id, fingerprint)
        except BaseException as exc:
            self._fail(slot, entry, exc)
            raise
        try:
            result = await rotate()
        except BaseException as exc:
            self._fail(slot, entry, exc)
            # The rotation did not happen: free the key so the client may retry with it.
            async with self.pool.acquire() as conn:
                await conn.execute(admin_sql.RELEASE_IDEMPOTENCY_KEY, principal_id, key_hash)
            raise
        entry.result.set_result(result)
        return result, False

    def _fail(self, slot: tuple[int, bytes], entry: _Remembered, exc: BaseException) -> None:
        self._remembered.pop(slot, None)
        if isinstance(exc, Exception):
            entry.result.set_exception(exc)
        else:
            entry.result.cancel()

    async def _claim(self, principal_id: int, key_hash: bytes, public_id: str, fingerprint: bytes) -> None:
        async with self.pool.acquire() as conn:
            claimed = await conn.fetchval(admin_sql.CLAIM_IDEMPOTENCY_KEY, principal_id, key_hash, public_id,
                                          fingerprint, self.lifetime)
            if claimed is not None:
                return
            earlier = await conn.fetchrow(admin_sql.IDEMPOTENCY_KEY_CLAIM, principal_id, key_hash)
        if earlier is None or earlier["fingerprint"] != fingerprint:
            raise _mismatch()
        raise ApiError(409, "already_rotated",
                       f"this {IDEMPOTENCY_HEADER} already rotated credential {public_id} at "
                       f"{earlier['created_at'].isoformat()}; that response (with the new secret) is no "
                       "longer available here; rotate again with a new key if the secret was lost",
                       {IDEMPOTENCY_HEADER: "already used"})

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self.lifetime
        while self._remembered:
            slot, oldest = next(iter(self._remembered.items()))
            if oldest.at > horizon and len(self._remembered) < MAX_REMEMBERED:
                break
            del self._remembered[slot]


def _mismatch() -> ApiError:
    return ApiError(409, "idempotency_mismatch", f"this {IDEMPOTENCY_HEADER} was used for a different request; "
                    "use a new key for each distinct rotation", {IDEMPOTENCY_HEADER: "used for another request"})


def _consume_exception(future: asyncio.Future[Response]) -> None:
    # Waiters may never come; mark the exception as seen so asyncio does not log it as lost.
    if not future.cancelled():
        with contextlib.suppress(BaseException):
            future.exception()
