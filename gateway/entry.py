"""What a gateway process knows about one credential (from the store or from Redis), and the verdict it gives.

A credential is remembered with the keyed digests (HMAC under the server key) of the secrets that passed
argon2id, each tied to the hash it was verified against (the current one or, within its grace, the previous
one): when the stored hash changes (rotation), the fingerprints change and old digests stop matching without
any coordination. No entry ever holds a secret.

A worker holds up to `cache.max_entries` of these, so they are kept small: equal strings and group sets are
shared between entries, and nothing is allocated for what most credentials never have (a second identity
block, a second digest, a previous hash).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Final, Generic, Literal, TypeVar

from gateway.core.rate_policy import CredentialLimits, credential_limits
from gateway.core.store import AuthRecord

logger = logging.getLogger(__name__)

# What authentication concluded; "token_expired" is an OAuth access token past its own expiry.
Outcome = Literal["ok", "invalid", "expired", "suspended", "throttled", "unavailable", "token_expired"]

# The size of a secret's digest (HMAC-SHA256, gateway.core.hashing.secret_digest).
DIGEST_SIZE: Final = 32
# Identity blocks kept per entry (one per auth method or access-token scope; clients choose scopes).
MAX_BLOCKS: Final = 16


def fingerprint(secret_hash: str | None) -> str:
    """Short digest of a stored hash: identifies which secret a remembered verification belongs to."""
    if not secret_hash:
        return ""
    return hashlib.sha256(secret_hash.encode()).hexdigest()[:16]


_T = TypeVar("_T")


class Shared(Generic[_T]):
    """One instance of each equal value (an owner's name, a set of groups) for all the entries that hold it.

    Bounded: when full it starts over, so entries built afterwards share new instances (only memory, never
    behaviour, depends on it).
    """

    __slots__ = ("limit", "values")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.values: dict[_T, _T] = {}

    def __call__(self, value: _T) -> _T:
        kept = self.values.get(value)
        if kept is None:
            if len(self.values) >= self.limit:
                self.values.clear()
            self.values[value] = kept = value
        return kept


# Kinds, owner names, creators and hash parameters; group sets.
shared_text: Final = Shared[str](4096)
shared_groups: Final = Shared[frozenset[str]](1024)


def _split_hash(secret_hash: str) -> tuple[str, bytes]:
    """A stored hash as (its parameters, shared; the rest): `$argon2id$v=19$m=..,t=..,p=..$` and `salt$hash`."""
    end = secret_hash.rfind("$", 0, max(secret_hash.rfind("$"), 0)) + 1
    return shared_text(secret_hash[:end]), secret_hash[end:].encode()


def _each_digest(digests: bytes) -> list[bytes]:
    return [digests[start : start + DIGEST_SIZE] for start in range(0, len(digests), DIGEST_SIZE)]


def _known(digests: bytes, digest: bytes) -> bool:
    """Whether `digest` is one of `digests` (concatenated), in constant time: every one is compared."""
    if len(digests) == DIGEST_SIZE:  # one: the usual case, and the hot path
        return hmac.compare_digest(digests, digest)
    found = False
    for start in range(0, len(digests), DIGEST_SIZE):
        found |= hmac.compare_digest(digests[start : start + DIGEST_SIZE], digest)
    return found


@dataclass(slots=True)
class CachedCredential:
    """What a process knows about one credential; built from the store or from Redis."""

    public_id: str
    credential_id: int
    kind: str
    name: str
    owner_id: int
    owner_name: str
    owner_disabled: bool
    revoked: bool
    expires_at: float | None  # epoch seconds
    creator: str
    groups: frozenset[str]
    current_fp: str
    previous_fp: str
    previous_until: float  # epoch seconds; the previous secret works until then
    fetched: float  # time.monotonic() when confirmed against Redis or the store; -inf once marked stale
    stored_at: float  # epoch seconds of the last read from the store (travels through Redis)
    seq: int  # the change sequence that read saw (migration 004; travels through Redis)
    limits: CredentialLimits | None = None  # its rate limit and quota (migration 005), shared instances
    # The digests (DIGEST_SIZE bytes each, concatenated: one object however many) of the secrets verified
    # against the hash of current_fp, and against the hash of previous_fp (accepted until previous_until).
    current_digests: bytes = field(default=b"", init=False)
    previous_digests: bytes = field(default=b"", init=False)
    # Hashes kept in process memory only (never in Redis), so a new secret needs no extra query. The current
    # one is split in two (see `secret_hash`): its parameters are shared with every hash that has the same.
    hash_params: str = field(default="", init=False)
    hash_rest: bytes = field(default=b"", init=False)
    previous_hash: str = ""
    # Identity header lines prebuilt per auth method or access-token scope: usually just one (see `block`).
    block_key: bytes = field(default=b"", init=False)
    first_block: bytes | None = field(default=None, init=False)
    more_blocks: dict[bytes, bytes] | None = field(default=None, init=False)
    ok_verdict: Verdict | None = None  # Verdict("ok", self), built once by status_of

    def __repr__(self) -> str:
        return f"CachedCredential(public_id={self.public_id!r}, owner={self.owner_name!r})"

    @property
    def secret_hash(self) -> str:
        """The current stored hash ("" when read from Redis: hashes never travel there)."""
        return self.hash_params + self.hash_rest.decode()

    def keep_hashes(self, current: str, previous: str) -> None:
        """Keep the stored hashes (in process memory only), so that a new secret is verified without a query."""
        self.hash_params, self.hash_rest = _split_hash(current) if current else ("", b"")
        self.previous_hash = previous

    def block(self, key: bytes) -> bytes | None:
        """The identity header lines prebuilt for this auth method (or access-token scope), if any."""
        if key == self.block_key:
            return self.first_block
        more = self.more_blocks
        return None if more is None else more.get(key)

    def keep_block(self, key: bytes, block: bytes) -> None:
        """Remember a prebuilt identity block; clients choose scopes, so only a few are kept per entry."""
        if self.first_block is None or key == self.block_key:
            self.block_key, self.first_block = key, block
        elif self.more_blocks is None:
            self.more_blocks = {key: block}
        elif len(self.more_blocks) < MAX_BLOCKS - 1:
            self.more_blocks[key] = block

    @property
    def digests(self) -> list[tuple[bytes, str]]:
        """The remembered digests, each with the fingerprint of the hash it was verified against."""
        return [(d, self.current_fp) for d in _each_digest(self.current_digests)] + [
            (d, self.previous_fp) for d in _each_digest(self.previous_digests)
        ]

    def matches(self, digest: bytes, now: float) -> bool:
        """Whether this secret digest was verified against a hash that is still accepted (constant time)."""
        found = _known(self.current_digests, digest)
        if now < self.previous_until:
            found |= _known(self.previous_digests, digest)
        return found

    def add_digest(self, digest: bytes, fp: str) -> None:
        """Remember a digest verified against the hash with fingerprint `fp`; kept only while this entry still
        accepts that hash (the current or the previous one)."""
        if len(digest) != DIGEST_SIZE:
            raise ValueError("not a secret digest")
        if fp == self.current_fp:
            if not _known(self.current_digests, digest):
                self.current_digests += digest
        elif fp == self.previous_fp and not _known(self.previous_digests, digest):
            self.previous_digests += digest

    @classmethod
    def from_record(cls, rec: AuthRecord, fetched: float) -> CachedCredential:
        prev_until = (
            rec.previous_expires_at.timestamp() if rec.previous_expires_at and rec.previous_secret_hash else 0.0
        )
        entry = cls(
            public_id=rec.public_id,
            credential_id=rec.id,
            kind=shared_text(rec.kind),
            name=rec.name,
            owner_id=rec.owner_id,
            owner_name=shared_text(rec.owner_name),
            owner_disabled=rec.owner_disabled,
            revoked=rec.revoked_at is not None,
            expires_at=rec.expires_at.timestamp() if rec.expires_at else None,
            creator=shared_text(rec.creator),
            groups=shared_groups(frozenset(rec.groups)),
            current_fp=fingerprint(rec.secret_hash),
            previous_fp=fingerprint(rec.previous_secret_hash) if prev_until else "",
            previous_until=prev_until,
            fetched=fetched,
            stored_at=time.time(),
            seq=rec.change_seq,
            limits=credential_limits(rec.rate_limit, rec.quota),
        )
        entry.keep_hashes(rec.secret_hash, rec.previous_secret_hash or "")
        return entry

    def to_redis(self) -> str:
        return json.dumps(
            {
                "cid": self.credential_id,
                "k": self.kind,
                "n": self.name,
                "oid": self.owner_id,
                "o": self.owner_name,
                "od": self.owner_disabled,
                "rv": self.revoked,
                "x": self.expires_at,
                "c": self.creator,
                "g": sorted(self.groups),
                "fp": self.current_fp,
                "pfp": self.previous_fp,
                "pu": self.previous_until,
                "sa": self.stored_at,
                "sq": self.seq,
                "rl": None if self.limits is None or self.limits.rate is None else str(self.limits.rate),
                "q": None if self.limits is None or self.limits.quota is None else str(self.limits.quota),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_redis(cls, public_id: str, raw: bytes, fetched: float) -> CachedCredential:
        d = json.loads(raw)
        return cls(
            public_id=public_id,
            credential_id=int(d["cid"]),
            kind=shared_text(d["k"]),
            name=d["n"],
            owner_id=int(d["oid"]),
            owner_name=shared_text(d["o"]),
            owner_disabled=bool(d["od"]),
            revoked=bool(d["rv"]),
            expires_at=d["x"],
            creator=shared_text(d["c"]),
            groups=shared_groups(frozenset(d["g"])),
            current_fp=d["fp"],
            previous_fp=d["pfp"],
            previous_until=float(d["pu"]),
            fetched=fetched,
            stored_at=float(d["sa"]),
            seq=int(d.get("sq", -1)),  # written by an older version: re-validated after any change
            limits=credential_limits(d.get("rl"), d.get("q")),
        )

    @classmethod
    def from_redis_fields(cls, public_id: str, fields: dict[bytes, bytes], fetched: float) -> CachedCredential | None:
        """The Redis tier's hash for a credential (record plus verified digests); None when absent or malformed."""
        raw = fields.get(b"r")
        if raw is None:
            return None
        try:
            entry = cls.from_redis(public_id, raw, fetched)
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed Redis cache entry for credential %s", public_id)
            return None
        for name, fp in fields.items():
            if name.startswith(b"d:"):
                with contextlib.suppress(ValueError):  # malformed: could never match a digest anyway
                    entry.add_digest(bytes.fromhex(name[2:].decode()), fp.decode())
        return entry


@dataclass(slots=True)
class Negative:
    """An id the store does not know, remembered briefly so floods of it cost no I/O."""

    until: float  # time.monotonic()


@dataclass(slots=True, frozen=True)
class Verdict:
    """The decision about a presented credential (with the credential when its secret verified)."""

    outcome: Outcome
    entry: CachedCredential | None = None
    retry_after: int = 0


INVALID: Final = Verdict("invalid")
UNAVAILABLE: Final = Verdict("unavailable", retry_after=5)
BUSY: Final = Verdict("unavailable", retry_after=1)


def status_of(entry: CachedCredential, now: float) -> Verdict:
    """The decision for a credential whose secret verified."""
    if entry.revoked:
        return INVALID
    if entry.expires_at is not None and entry.expires_at <= now:
        return Verdict("expired", entry)
    if entry.owner_disabled:
        return Verdict("suspended", entry)
    verdict = entry.ok_verdict
    if verdict is None:  # built once per cache entry: the hot path allocates no Verdict
        verdict = entry.ok_verdict = Verdict("ok", entry)
    return verdict
