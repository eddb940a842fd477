"""The access-token denylist: tokens revoked one by one (RFC 7009), remembered only until their natural expiry.

Postgres holds the rows (migration 003); every gateway process keeps the live ones in memory, hears of new
ones through the credgate_auth channel ("t": "j"), reloads after a lost channel and every `refresh` seconds,
so a check on the request path is a dict lookup. Per credential, at most MAX_REVOKED_PER_CREDENTIAL live
tokens are listed one by one; past that a revocation becomes a watermark covering every token the
credential got up to the revoked one's issue time, so no client can grow the list without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

from gateway.core import database, store
from gateway.core.errors import STORE_ERRORS
from gateway.core.tasks import background
from gateway.tokens import AccessToken

logger = logging.getLogger(__name__)

# A client revoking more live tokens than this is revoking in bulk: its older tokens all go at once.
MAX_REVOKED_PER_CREDENTIAL: Final = 100


class TokenDenylist:
    """In-memory view of the revoked-token tables; `is_revoked` is the only call on the request path."""

    def __init__(self, pool: store.Pool, refresh: float, timeout: float = 2.0) -> None:
        self.pool = pool
        self.refresh = refresh
        self.timeout = timeout  # the deadline of a load or a revocation, the wait for a connection included
        self.tokens: dict[str, float] = {}  # jti -> token expiry (epoch seconds)
        self.before: dict[str, tuple[int, float]] = {}  # public id -> (issued at or before, expiry)
        self.loaded = False  # until the first load, nobody can tell whether a token was revoked
        self.load_failed = False  # the last load could not reach the store
        self._loaded = asyncio.Event()
        self._wake = asyncio.Event()

    def is_revoked(self, token: AccessToken) -> bool:
        if token.jti in self.tokens:
            return True
        watermark = self.before.get(token.public_id)
        return watermark is not None and token.issued_at <= watermark[0]

    def __len__(self) -> int:
        return len(self.tokens) + len(self.before)

    # --- keeping up to date ---

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TokenDenylist]:
        """Load now and keep reloading (every `refresh` seconds, and on `resync`) for the block's duration."""
        async with background(self._run(), "token denylist"):
            yield self

    def resync(self) -> None:
        """Reload now (the invalidation channel came back: notifications may have been missed)."""
        self._wake.set()

    async def wait_loaded(self) -> None:
        await self._loaded.wait()

    def on_event(self, event: Mapping[str, Any]) -> None:
        """A "t": "j" notification (see migration 003): remember the revocation at once."""
        try:
            ident, expires = str(event["id"]), float(event["exp"])
            before = int(event["before"]) if "before" in event else None
        except (KeyError, TypeError, ValueError):
            logger.warning("ignoring a malformed token revocation payload")
            return
        if before is None:
            self.tokens[ident] = max(expires, self.tokens.get(ident, 0.0))
        else:
            old = self.before.get(ident, (0, 0.0))
            self.before[ident] = (max(before, old[0]), max(expires, old[1]))

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            await self.load()
            # a failed first load is retried soon: tokens get 503 until it succeeds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh if self.loaded else 1.0)

    async def load(self) -> bool:
        """Merge the live rows into memory and drop expired entries; False when the store is unreachable."""
        try:
            async with database.within(self.pool, self.timeout) as conn:
                tokens = await conn.fetch(store.LIVE_REVOKED_TOKENS)
                before = await conn.fetch(store.LIVE_REVOKED_BEFORE)
        except STORE_ERRORS as exc:
            logger.warning("could not load the token denylist: %s", exc.__class__.__name__)
            self.load_failed = True
            return False
        # Merged, never replaced: a notification handled while the query ran may not be in its snapshot.
        for row in tokens:
            self.on_event({"id": row["jti"], "exp": row["exp"]})
        for row in before:
            self.on_event({"id": row["public_id"], "before": row["issued_before"], "exp": row["exp"]})
        now = time.time()
        self.tokens = {jti: exp for jti, exp in self.tokens.items() if exp > now}
        self.before = {pid: mark for pid, mark in self.before.items() if mark[1] > now}
        self.loaded, self.load_failed = True, False
        self._loaded.set()
        return True

    # --- revoking ---

    async def revoke(self, token: AccessToken, max_ttl: int) -> None:
        """Record the revocation (the NOTIFY reaches every process) and apply it here at once.

        Raises one of STORE_ERRORS when the store is unreachable: the revocation did not happen.
        """
        async with database.within(self.pool, self.timeout) as conn:
            async with conn.transaction():
                live = await conn.fetchval(store.COUNT_LIVE_REVOKED, token.public_id)
                if live < MAX_REVOKED_PER_CREDENTIAL:
                    await conn.execute(store.INSERT_REVOKED_TOKEN, token.jti, token.public_id, float(token.expires_at))
                    event: dict[str, Any] = {"id": token.jti, "exp": token.expires_at}
                else:
                    # covers tokens issued up to this one's iat, which live at most max_ttl from then
                    expires = max(token.expires_at, token.issued_at + max_ttl)
                    await conn.execute(store.UPSERT_REVOKED_BEFORE, token.public_id, token.issued_at, float(expires))
                    event = {"id": token.public_id, "before": token.issued_at, "exp": expires}
            await conn.execute(store.PRUNE_REVOKED_TOKENS)
            await conn.execute(store.PRUNE_REVOKED_BEFORE)
        self.on_event(event)
