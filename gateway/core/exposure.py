"""Leaked credentials: which reported strings are live credgate secrets, and revoking those as exposed.

Shared by the gateway's secret-scanning endpoint (gateway.leaks) and `credgate credentials report-leak`. A
reported string counts as a true positive only when it parses as a credgate credential and verifies against
the stored argon2id hash (the current secret, or a rotated-out one still within its grace period). Each true
positive is revoked with the reason `exposed` and the URL it was found at, in the same transaction as its
`credential.exposed` audit event; the change trigger then tells every gateway process. Reported strings are
never stored, logged or echoed: findings carry their SHA-256 only.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from gateway.core import formats, store
from gateway.core.formats import Presented
from gateway.core.hashing import Argon2Busy

__all__ = [
    "ACTION",
    "MAX_URL_LENGTH",
    "REASON",
    "Finding",
    "Report",
    "Verify",
    "candidates",
    "credential_fields",
    "handle_reports",
    "revoke_exposed",
    "token_hash",
]

ACTION: Final = "credential.exposed"
REASON: Final = "exposed"
# Longer URLs are cut (the column has the same bound); a code host's URLs are far shorter.
MAX_URL_LENGTH: Final = 2048
# A bare key-pair secret names no credential: it is tried against the client ids reported at the same URL (the
# file it was found in), at most this many, so that a report's argon2 work stays bounded.
_PAIRING_LIMIT: Final = 4
# When the argon2 pool is full (proxied traffic has it busy), wait and try again this many times.
_BUSY_RETRIES: Final = 50
_BUSY_WAIT_SECONDS: Final = 0.05

Label = Literal["true_positive", "false_positive"]
# (stored hash, secret) -> whether they match; argon2 off the event loop (hashing.Argon2Pool.verify).
Verify = Callable[[str, str], Awaitable[bool]]

CREDENTIALS_FOR_EXPOSURE = """
SELECT public_id, kind, secret_hash, previous_secret_hash,
       coalesce(previous_expires_at > now(), false) AS previous_live
FROM credentials WHERE public_id = ANY($1::text[])"""
# Like every revocation, this also ends a rotation's grace period.
REVOKE_EXPOSED = """
UPDATE credentials SET revoked_at = now(), revoked_reason = 'exposed', exposed_url = $2,
       previous_secret_hash = NULL, previous_expires_at = NULL, updated_at = now()
WHERE public_id = $1 AND revoked_at IS NULL RETURNING id"""


@dataclass(frozen=True, slots=True, repr=False)
class Report:
    """One reported string and where it was found (the code host's `token`, `type`, `url`, `source`)."""

    token: str
    type: str = ""
    url: str = ""
    source: str = ""

    def __repr__(self) -> str:  # the reported string may be a live secret: never in a repr
        return f"Report(type={self.type!r}, url={self.url!r}, source={self.source!r})"


@dataclass(frozen=True, slots=True)
class Finding:
    """The answer for one reported string: its SHA-256, the reporter's type, the label; the credential it was."""

    token_hash: str
    token_type: str
    label: Label
    public_id: str | None = None  # the credential it verified against; None for a false positive
    revoked: bool = False  # whether this report revoked it (False when it was revoked already)

    def answer(self) -> dict[str, str]:
        """The code host's response item (no credential id: the reporter learns only the label)."""
        return {"token_hash": self.token_hash, "token_type": self.token_type, "label": self.label}


@dataclass(slots=True)
class _Reported:
    report: Report
    tries: list[Presented] = field(default_factory=list)
    matched: str | None = None


def credential_fields(row: store.Record, now: datetime) -> dict[str, Any]:
    """What the admin API adds to a credential (a row of store.CREDENTIAL_COLUMNS): why it was revoked, where
    it was found exposed, and its status as people read it (`revoked (exposed)`)."""
    reason = row["revoked_reason"]
    status = store.credential_status(row, now)
    return {
        "revocation_reason": reason,
        "exposed_url": row["exposed_url"],
        "status_label": f"{status} ({reason})" if reason and status == "revoked" else status,
    }


def token_hash(token: str) -> str:
    """The hex SHA-256 of a reported string: how findings name it."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def candidates(token: str, client_ids: Sequence[str] = ()) -> list[Presented]:
    """The credentials a reported string may be (format checks only, no I/O): a bearer token, a key pair as
    `client_id:secret`, or a bare key secret paired with `client_ids` (public ids reported alongside it)."""
    presented = formats.parse_token(token)
    if presented is not None:
        return [presented]
    client_id, sep, secret = token.partition(":")
    if sep:
        pair = formats.parse_key_pair(client_id, secret)
        return [] if pair is None else [pair]
    bare = formats.parse_key_secret(token)
    if bare is None:
        return []  # a client id alone is public, not a leak; anything else is not a credgate credential
    return [Presented("key", public_id, bare) for public_id in list(dict.fromkeys(client_ids))[:_PAIRING_LIMIT]]


def _client_ids_by_url(reports: Iterable[Report]) -> dict[str, list[str]]:
    """The public ids of the client ids reported, by the URL they were found at."""
    found: dict[str, list[str]] = {}
    for report in reports:
        public_id = formats.parse_client_id(report.token.partition(":")[0])
        if public_id is not None:
            found.setdefault(report.url, []).append(public_id)
    return found


async def handle_reports(
    pool: store.Pool, verify: Verify, reports: Sequence[Report], actor: store.Actor, *, concurrency: int
) -> list[Finding]:
    """Classify every reported string, revoke the live credentials among them as exposed (each in one
    transaction with its audit event); one finding per report, in order. argon2 runs at most `concurrency`
    verifications of this call at once."""
    unique: dict[str, _Reported] = {}
    by_url = _client_ids_by_url(reports)
    for report in reports:
        key = token_hash(report.token)
        if key not in unique:
            unique[key] = _Reported(report, candidates(report.token, by_url.get(report.url, ())))
    public_ids = sorted({p.public_id for item in unique.values() for p in item.tries})
    rows = {r["public_id"]: r for r in await pool.fetch(CREDENTIALS_FOR_EXPOSURE, public_ids)} if public_ids else {}
    slots = asyncio.Semaphore(max(1, concurrency))

    async def match(item: _Reported) -> None:
        for presented in item.tries:
            row = rows.get(presented.public_id)
            if row is None or row["kind"] != presented.kind:
                continue
            hashes = [row["secret_hash"]]
            if row["previous_live"] and row["previous_secret_hash"]:
                hashes.append(row["previous_secret_hash"])
            for stored in hashes:
                async with slots:
                    if await _verified(verify, stored, presented.secret):
                        item.matched = presented.public_id
                        return

    await asyncio.gather(*(match(item) for item in unique.values()))
    revoked: set[str] = set()
    for item in unique.values():
        if item.matched is not None and item.matched not in revoked:
            report = item.report
            if await revoke_exposed(pool, actor, item.matched, report.url, report.source):
                revoked.add(item.matched)
    findings: list[Finding] = []
    answered: set[str] = set()
    for report in reports:
        key = token_hash(report.token)
        matched = unique[key].matched
        first = key not in answered
        answered.add(key)
        if matched is None:
            findings.append(Finding(key, report.type, "false_positive"))
        else:
            findings.append(Finding(key, report.type, "true_positive", matched, first and matched in revoked))
    return findings


async def _verified(verify: Verify, stored_hash: str, secret: str) -> bool:
    for attempt in range(_BUSY_RETRIES):
        try:
            return await verify(stored_hash, secret)
        except Argon2Busy:
            if attempt == _BUSY_RETRIES - 1:
                raise
            await asyncio.sleep(_BUSY_WAIT_SECONDS)
    return False  # not reached: the loop returns or raises


async def revoke_exposed(pool: store.Pool, actor: store.Actor, public_id: str, url: str, source: str) -> bool:
    """Revoke a credential as exposed at `url`, with its `credential.exposed` audit event in the same
    transaction; False (nothing written) when it was revoked already."""
    url = url[:MAX_URL_LENGTH]
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(REVOKE_EXPOSED, public_id, url or None)
        if row is None:
            return False
        await store.write_audit(conn, actor, ACTION, "credential", public_id, {"url": url, "source": source})
    return True
