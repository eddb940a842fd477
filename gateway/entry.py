"""What a gateway process knows about one credential (from the store or from Redis), and the verdict it gives.

A credential is remembered with the keyed digests (HMAC under the server key) of the secrets that passed
argon2id, each tied to a fingerprint of the hash it was verified against: when the stored hash changes
(rotation), old digests stop matching without any coordination. No entry ever holds a secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Final, Literal

from gateway.core.rate_policy import CredentialLimits, credential_limits
from gateway.core.store import AuthRecord

logger = logging.getLogger(__name__)

# What authentication concluded; "token_expired" is an OAuth access token past its own expiry.
Outcome = Literal["ok", "invalid", "expired", "suspended", "throttled", "unavailable", "token_expired"]


def fingerprint(secret_hash: str | None) -> str:
    """Short digest of a stored hash: identifies which secret a remembered verification belongs to."""
    if not secret_hash:
        return ""
    return hashlib.sha256(secret_hash.encode()).hexdigest()[:16]


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
    digests: list[tuple[bytes, str]] = field(default_factory=list)  # (digest, fingerprint of hash verified)
    # Hashes kept in process memory only (never in Redis), so a new secret needs no extra query.
    secret_hash: str = ""
    previous_hash: str = ""
    header_blocks: dict[bytes, bytes] = field(default_factory=dict)  # per auth method, prebuilt
    ok_verdict: Verdict | None = None  # Verdict("ok", self), built once by status_of

    def __repr__(self) -> str:
        return f"CachedCredential(public_id={self.public_id!r}, owner={self.owner_name!r})"

    def block(self, key: bytes) -> bytes | None:
        """The identity header lines prebuilt for this auth method (or access-token scope), if any."""
        return self.header_blocks.get(key)

    def keep_block(self, key: bytes, block: bytes) -> None:
        """Remember a prebuilt identity block; clients choose scopes, so only a few are kept per entry."""
        if len(self.header_blocks) < 16:
            self.header_blocks[key] = block

    def matches(self, digest: bytes, now: float) -> bool:
        """Whether this secret digest was verified against a hash that is still accepted (constant time)."""
        found = False
        for known, fp in self.digests:
            if hmac.compare_digest(known, digest) and (
                fp == self.current_fp or (fp == self.previous_fp and now < self.previous_until)
            ):
                found = True
        return found

    def add_digest(self, digest: bytes, fp: str) -> None:
        if not any(hmac.compare_digest(d, digest) and f == fp for d, f in self.digests):
            # keep the list tiny: only digests for hashes still accepted
            self.digests = [(d, f) for d, f in self.digests if f in (self.current_fp, self.previous_fp)]
            self.digests.append((digest, fp))

    @classmethod
    def from_record(cls, rec: AuthRecord, fetched: float) -> CachedCredential:
        prev_until = (
            rec.previous_expires_at.timestamp() if rec.previous_expires_at and rec.previous_secret_hash else 0.0
        )
        return cls(
            public_id=rec.public_id,
            credential_id=rec.id,
            kind=rec.kind,
            name=rec.name,
            owner_id=rec.owner_id,
            owner_name=rec.owner_name,
            owner_disabled=rec.owner_disabled,
            revoked=rec.revoked_at is not None,
            expires_at=rec.expires_at.timestamp() if rec.expires_at else None,
            creator=rec.creator,
            groups=frozenset(rec.groups),
            current_fp=fingerprint(rec.secret_hash),
            previous_fp=fingerprint(rec.previous_secret_hash) if prev_until else "",
            previous_until=prev_until,
            fetched=fetched,
            stored_at=time.time(),
            seq=rec.change_seq,
            secret_hash=rec.secret_hash,
            previous_hash=rec.previous_secret_hash or "",
            limits=credential_limits(rec.rate_limit, rec.quota),
        )

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
            kind=d["k"],
            name=d["n"],
            owner_id=int(d["oid"]),
            owner_name=d["o"],
            owner_disabled=bool(d["od"]),
            revoked=bool(d["rv"]),
            expires_at=d["x"],
            creator=d["c"],
            groups=frozenset(d["g"]),
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
                with contextlib.suppress(ValueError):
                    entry.digests.append((bytes.fromhex(name[2:].decode()), fp.decode()))
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
