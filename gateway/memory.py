"""The process-local cache tier: public id -> CachedCredential (or Negative), with an owner index for evictions.

The owner index costs little per credential: an owner with one cached credential is indexed by that id alone,
one with more by an insertion-ordered dict used as a set (smaller than a set in CPython).
"""

from __future__ import annotations

import math
import time

from gateway.entry import CachedCredential, Negative


class MemoryCache:
    """Process-local tier: public id -> CachedCredential (or Negative), with an owner index for evictions."""

    def __init__(self, max_entries: int) -> None:
        self.entries: dict[str, CachedCredential | Negative] = {}
        self.by_owner: dict[int, str | dict[str, None]] = {}  # owner id -> its cached public id(s)
        self.max_entries = max_entries
        # Bumped on every eviction; a store read that started before a bump must not be cached.
        self.generation = 0
        # The change sequence (migration 004) of the last change heard of, per credential, per owner and for
        # everything: a shared entry whose store read saw fewer changes is stale and never used again.
        self.credential_changed: dict[str, int] = {}
        self.owner_changed: dict[int, int] = {}
        self.all_changed = -1

    def get(self, public_id: str) -> CachedCredential | Negative | None:
        return self.entries.get(public_id)

    def put(self, entry: CachedCredential) -> None:
        old = self.entries.get(entry.public_id)
        if isinstance(old, CachedCredential) and old.owner_id != entry.owner_id:
            self._unindex(old)
        self.entries[entry.public_id] = entry
        self._index(entry)
        self._bound()

    def put_negative(self, public_id: str, ttl: float) -> None:
        self.entries[public_id] = Negative(time.monotonic() + ttl)
        self._bound()

    def _bound(self) -> None:
        while len(self.entries) > self.max_entries:
            oldest = next(iter(self.entries))
            self.evict(oldest)

    def _index(self, entry: CachedCredential) -> None:
        owner_id, public_id = entry.owner_id, entry.public_id
        ids = self.by_owner.get(owner_id)
        if ids is None:
            self.by_owner[owner_id] = public_id
        elif isinstance(ids, str):
            if ids != public_id:
                self.by_owner[owner_id] = {ids: None, public_id: None}
        else:
            ids[public_id] = None

    def _unindex(self, entry: CachedCredential) -> None:
        owner_id, public_id = entry.owner_id, entry.public_id
        ids = self.by_owner.get(owner_id)
        if ids is None:
            return
        if isinstance(ids, str):
            if ids == public_id:
                del self.by_owner[owner_id]
            return
        ids.pop(public_id, None)
        if not ids:
            del self.by_owner[owner_id]

    def owned(self, owner_id: int) -> list[str]:
        """The public ids of the owner's cached credentials."""
        ids = self.by_owner.get(owner_id)
        return [] if ids is None else [ids] if isinstance(ids, str) else list(ids)

    def evict(self, public_id: str) -> None:
        self.generation += 1
        entry = self.entries.pop(public_id, None)
        if isinstance(entry, CachedCredential):
            self._unindex(entry)

    def changed(self, seq: int, public_id: str | None = None, owner_id: int | None = None) -> None:
        """Record change number `seq` (see `outdated`), about a credential, an owner or (neither) everything.

        Notifications arrive in commit order, so when a record grows too large it can be replaced by "every
        change up to this one" without missing any.
        """
        if public_id is not None:
            if len(self.credential_changed) > 100_000:
                self.credential_changed.clear()
                self.all_changed = max(self.all_changed, seq)
            self.credential_changed[public_id] = seq
        if owner_id is not None:
            if len(self.owner_changed) > 100_000:
                self.owner_changed.clear()
                self.all_changed = max(self.all_changed, seq)
            self.owner_changed[owner_id] = seq
        if public_id is None and owner_id is None:
            self.all_changed = max(self.all_changed, seq)

    def outdated(self, entry: CachedCredential) -> bool:
        """Whether the entry's store read saw fewer changes than one that concerns it (it may predate it)."""
        seen = entry.seq
        return (
            seen < self.all_changed
            or seen < self.credential_changed.get(entry.public_id, -1)
            or seen < self.owner_changed.get(entry.owner_id, -1)
        )

    def evict_owner(self, owner_id: int) -> list[str]:
        ids = self.owned(owner_id)
        for public_id in ids:
            self.evict(public_id)
        return ids

    def mark_all_stale(self) -> None:
        """Nothing may be served as fresh any more; entries stay only as a fallback during a store outage."""
        self.generation += 1
        for entry in self.entries.values():
            if isinstance(entry, CachedCredential):
                entry.fetched = -math.inf

    def __len__(self) -> int:
        return len(self.entries)
