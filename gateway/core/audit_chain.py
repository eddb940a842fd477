"""The audit log's hash chain (migration 006): verifying it row by row, and exporting the log as JSON lines."""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.core.store import Connection, Pool, Record

# The first row's prev_hash: there is no previous row.
GENESIS = bytes(32)
# Rows per query while walking or exporting: memory stays bounded whatever the log's size.
BATCH_ROWS = 5_000

CHAIN_HEAD = "SELECT seq, hash FROM audit_chain_head"
# `computed` is what the row's hash must be given its stored prev_hash and its content, recomputed by the same
# database functions the insert trigger uses (so the canonical text exists once, in the migration).
_CHAIN_COLUMNS = """
SELECT id, chain_seq, prev_hash, row_hash,
       credgate_audit_link(prev_hash, credgate_audit_canonical(
           chain_seq, id, at, actor, actor_id, auth_method, action, target_type, target, changes,
           request_id, source)) AS computed
FROM audit_events"""
CHAIN_BATCH = _CHAIN_COLUMNS + """
WHERE chain_seq > $1 AND chain_seq <= $2
ORDER BY chain_seq LIMIT $3"""
CHAIN_ROW = _CHAIN_COLUMNS + " WHERE chain_seq = $1"
# changes as text: decoded here, whether or not the connection has a jsonb codec.
EXPORT_BATCH = """
SELECT id, chain_seq, at, actor, actor_id, auth_method, action, target_type, target, changes::text AS changes,
       request_id, source, prev_hash, row_hash
FROM audit_events
WHERE at >= $1 AND ($2::timestamptz IS NULL OR at < $2) AND chain_seq > $3
ORDER BY chain_seq LIMIT $4"""

Queries = Connection | Pool


@dataclass(frozen=True, slots=True)
class ChainPoint:
    """A verified link: the chain position and hash of the last row checked (position 0: the empty chain)."""

    seq: int = 0
    hash: bytes = GENESIS


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """Where the chain first stops holding: the row (None when the break is after the last row) and why."""

    chain_seq: int
    reason: str
    id: int | None = None

    def describe(self) -> str:
        where = f"row id={self.id}" if self.id is not None else "the end of the chain"
        return f"audit chain broken at {where} (chain position {self.chain_seq}): {self.reason}"


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of one walk: how many rows were checked, the last good link, and the first break if any."""

    checked: int
    last: ChainPoint
    head: ChainPoint
    broken: ChainBreak | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok, "checked": self.checked, "head_seq": self.head.seq, "head_hash": self.head.hash.hex()}
        if self.broken is not None:
            out.update(broken_id=self.broken.id, broken_chain_seq=self.broken.chain_seq, reason=self.broken.reason)
        return out


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


async def verify(db: Queries, start: ChainPoint | None = None, *, batch: int = BATCH_ROWS) -> ChainReport:
    """Walk the chain from `start` (default: the beginning) up to the head read first, and report the first break.

    Rows committed after the head was read are left for the next walk: a row and the head move in one
    transaction, so every row up to the head's position is committed and visible. Checking each row:
    its position follows the previous one (else rows were deleted), its prev_hash is the previous row's hash
    (else rows were reordered or a hash forged), and its hash matches its content (else the row was altered).
    """
    head_row = await db.fetchrow(CHAIN_HEAD)
    if head_row is None:
        return ChainReport(0, ChainPoint(), ChainPoint(), ChainBreak(0, "the chain head row is missing"))
    head = ChainPoint(int(head_row["seq"]), bytes(head_row["hash"]))
    last = start or ChainPoint()
    if last.seq > 0:  # an incremental walk: the row it continues from must still be the one verified
        kept = await db.fetchrow(CHAIN_ROW, last.seq)
        if kept is None or not _same(bytes(kept["row_hash"]), last.hash) or \
                not _same(bytes(kept["row_hash"]), bytes(kept["computed"])):
            why = "was deleted" if kept is None else "changed since it was verified"
            return ChainReport(0, last, head, ChainBreak(
                last.seq, f"the row verified at this position {why}", None if kept is None else int(kept["id"])))
    if head.seq < last.seq:
        return ChainReport(0, last, head, ChainBreak(
            head.seq, f"the chain head went back from position {last.seq} to {head.seq}"))
    checked = 0
    while last.seq < head.seq:
        rows = await db.fetch(CHAIN_BATCH, last.seq, head.seq, batch)
        if not rows:
            break
        for row in rows:
            seq, row_id = int(row["chain_seq"]), int(row["id"])
            broken = _check(row["prev_hash"], row["row_hash"], row["computed"], seq, last)
            if broken is not None:
                return ChainReport(checked, last, head, ChainBreak(seq, broken, row_id))
            last = ChainPoint(seq, bytes(row["row_hash"]))
            checked += 1
    if last.seq != head.seq:
        missing = f"{last.seq + 1}" if last.seq + 1 == head.seq else f"{last.seq + 1} to {head.seq}"
        return ChainReport(checked, last, head, ChainBreak(
            last.seq + 1, f"the chain head is at position {head.seq} but position(s) {missing} are missing "
                          "(the newest rows were deleted)"))
    if not _same(last.hash, head.hash):
        return ChainReport(checked, last, head, ChainBreak(
            head.seq, "the chain head's hash is not the last row's hash (the head or the last row was forged)"))
    return ChainReport(checked, last, head)


def _check(prev_hash: bytes, row_hash: bytes, computed: bytes, seq: int, last: ChainPoint) -> str | None:
    """Why a row does not continue the chain after `last`, or None when it does."""
    if seq != last.seq + 1:
        gap = f"{last.seq + 1}" if last.seq + 2 == seq else f"{last.seq + 1} to {seq - 1}"
        return f"chain position(s) {gap} before it are missing (rows were deleted)"
    if not _same(bytes(prev_hash), last.hash):
        return "its prev_hash is not the previous row's hash (rows were reordered or a hash was forged)"
    if not _same(bytes(row_hash), bytes(computed)):
        return "its content does not match its hash (the row was altered, or its hash forged)"
    return None


async def export(db: Queries, since: datetime, until: datetime | None = None, *,
                 batch: int = BATCH_ROWS) -> AsyncIterator[dict[str, Any]]:
    """The audit events with since <= at < until, in chain order, as JSON-ready dicts (hashes in hex)."""
    after = 0
    while True:
        rows = await db.fetch(EXPORT_BATCH, since, until, after, batch)
        for row in rows:
            yield event_dict(row)
        if len(rows) < batch:
            return
        after = int(rows[-1]["chain_seq"])


def event_dict(row: Record) -> dict[str, Any]:
    """One exported event: the row's columns, `at` in UTC ISO 8601 with a Z, `changes` as an object."""
    at: datetime = row["at"]
    return {
        "id": row["id"],
        "chain_seq": row["chain_seq"],
        "at": at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "actor": row["actor"],
        "actor_id": row["actor_id"],
        "auth_method": row["auth_method"],
        "action": row["action"],
        "target_type": row["target_type"],
        "target": row["target"],
        "changes": json.loads(row["changes"]),
        "request_id": row["request_id"],
        "source": row["source"],
        "prev_hash": bytes(row["prev_hash"]).hex(),
        "hash": bytes(row["row_hash"]).hex(),
    }


def json_line(event: dict[str, Any]) -> str:
    """One compact JSON line (keys in column order) for a SIEM."""
    return json.dumps(event, separators=(",", ":"))
