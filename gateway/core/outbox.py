"""The lifecycle-event outbox (migration 007): its SQL, the webhook body and signature, typed helpers.

Events are written by the database in the transaction of the change (an audit trigger), by the expiry scan
and by the gateway (`RECORD_RATE_LIMITED`); the admin service's worker (admin.webhooks) delivers them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from gateway.core.redaction import redact_url
from gateway.core.store import Connection, Record, json_encode

EVENT_TYPES = ("credential.created", "credential.rotated", "credential.revoked", "credential.exposed",
               "credential.expiring", "credential.expired", "credential.rate_limited")
# Days before expiry at which credential.expiring fires, once each.
EXPIRING_DAYS = (14, 7, 1)
# An expiry older than this is not reported any more: the scan stays a bounded range on the expiry index.
EXPIRED_LOOKBACK_DAYS = 7
DELIVERY_STATUSES = ("pending", "delivered", "failed")

ID_HEADER = "Credgate-Webhook-Id"
SIGNATURE_HEADER = "Credgate-Signature"

# Credentials refused for their rate limit: one credential.rate_limited event per credential and clock hour
# (the dedup key ends in the hour's epoch). $1: bigint[] of credentials.id. Cheap to call for every refusal
# batch: a repeat within the hour is one index probe and no row.
RECORD_RATE_LIMITED = """
SELECT credgate_webhook_event('credential.rate_limited', ids.id, 'gateway', now(), '{}'::jsonb,
       'rate_limited:' || ids.id || ':' || extract(epoch FROM date_trunc('hour', now()))::bigint)
FROM unnest($1::bigint[]) AS ids(id)"""

# The expiry scan: each threshold once per credential and expiry time (a renewed credential is reported
# again), only the nearest threshold not yet passed (a 5-day credential gets the 7-day and 1-day events,
# not a late 14-day one); both range scans run on credentials_expires_idx (migration 001).
SCAN_EXPIRING = """
SELECT credgate_webhook_event('credential.expiring', c.id, 'system', now(),
         jsonb_build_object('days', t.days),
         'expiring:' || c.id || ':' || t.days || ':' || extract(epoch FROM c.expires_at)::bigint)
  FROM credentials c
  CROSS JOIN LATERAL (SELECT min(d) AS days FROM unnest($1::int[]) AS d
                      WHERE c.expires_at <= now() + d * interval '1 day') t
WHERE c.revoked_at IS NULL AND c.expires_at > now() AND c.expires_at <= now() + $2 * interval '1 day'"""
SCAN_EXPIRED = """
SELECT credgate_webhook_event('credential.expired', c.id, 'system', c.expires_at, '{}'::jsonb,
         'expired:' || c.id || ':' || extract(epoch FROM c.expires_at)::bigint)
  FROM credentials c
WHERE c.revoked_at IS NULL AND c.expires_at <= now() AND c.expires_at > now() - $1 * interval '1 day'"""

# New events become one delivery per destination: the deployment's URLs ($1) and the owner's own.
FAN_OUT = """
WITH batch AS (
  SELECT e.id, e.owner_id FROM webhook_events e WHERE NOT e.fanned_out ORDER BY e.id LIMIT $2
  FOR UPDATE SKIP LOCKED
), added AS (
  INSERT INTO webhook_deliveries (event_id, url)
  SELECT DISTINCT b.id, u.url FROM batch b
  CROSS JOIN LATERAL (SELECT unnest($1::text[]) AS url
                      UNION SELECT p.webhook_url FROM principals p
                      WHERE p.id = b.owner_id AND p.webhook_url IS NOT NULL) u
  ON CONFLICT (event_id, url) DO NOTHING
)
UPDATE webhook_events e SET fanned_out = true FROM batch WHERE e.id = batch.id"""

# Claim due deliveries: locked rows of another worker are skipped, and a claimed row's next attempt moves past
# this attempt's deadline ($2 seconds, the lease), so nobody else posts it meanwhile, even after a crash.
CLAIM_DUE = """
WITH due AS (
  SELECT d.id FROM webhook_deliveries d
  WHERE d.status = 'pending' AND d.next_attempt_at <= now()
  ORDER BY d.next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries d SET attempts = d.attempts + 1, next_attempt_at = now() + $2 * interval '1 second'
FROM due, webhook_events e
WHERE d.id = due.id AND e.id = d.event_id
RETURNING d.id, d.url, d.attempts, d.created_at, e.event_id, e.type, e.created_at AS event_at, e.data"""
MARK_DELIVERED = """
UPDATE webhook_deliveries SET status = 'delivered', finished_at = now(), last_status = $2, last_error = ''
WHERE id = $1"""
# A failed attempt: retry after $4 seconds unless that is past the delivery's creation plus retry_for ($5).
MARK_ATTEMPT_FAILED = """
UPDATE webhook_deliveries SET last_status = $2, last_error = $3,
  status = CASE WHEN now() + $4 * interval '1 second' > created_at + $5 * interval '1 second'
                THEN 'failed' ELSE 'pending' END,
  finished_at = CASE WHEN now() + $4 * interval '1 second' > created_at + $5 * interval '1 second'
                     THEN now() END,
  next_attempt_at = now() + $4 * interval '1 second'
WHERE id = $1 RETURNING status"""
# Finished events are kept this long (the admin API lists their deliveries), then deleted with them.
KEEP_DAYS = 30
PRUNE = """
DELETE FROM webhook_events e WHERE e.created_at < now() - $1 * interval '1 day' AND e.fanned_out
  AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id AND d.status = 'pending')"""
COUNT_PENDING = "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
LIST_DELIVERIES = """
SELECT d.id, e.event_id, e.type, d.url, d.status, d.attempts, d.next_attempt_at, d.last_status, d.last_error,
       d.created_at, d.finished_at, e.data -> 'credential' ->> 'id' AS credential
FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id
WHERE ($1::text IS NULL OR d.status = $1) AND d.id < $2
ORDER BY d.id DESC LIMIT $3"""

SET_WEBHOOK_URL = """
UPDATE principals SET webhook_url = $2, updated_at = now() WHERE name = $1 AND deleted_at IS NULL
RETURNING name, webhook_url"""
WEBHOOK_URL_OF = "SELECT name, webhook_url FROM principals WHERE name = $1 AND deleted_at IS NULL"


def body_of(row: Record) -> bytes:
    """The JSON body of an event: the same bytes on every attempt (keys sorted, compact)."""
    envelope = {"id": str(row["event_id"]), "type": row["type"], "created_at": row["event_at"],
                "data": json.loads(row["data"]) if isinstance(row["data"], str) else row["data"]}
    return json.dumps(json.loads(json_encode(envelope)), sort_keys=True, separators=(",", ":")).encode()


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The Credgate-Signature value: `t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: str, header: str, body: bytes, now: int, tolerance: int = 300) -> bool:
    """What a receiver does: recompute, compare in constant time, refuse a stale timestamp (replays)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if not fields.get("t", "").isdigit() or abs(now - int(fields["t"])) > tolerance:
        return False
    expected = signature(secret, int(fields["t"]), body).rpartition("v1=")[2]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def url_problem(url: str) -> str | None:
    """Why a webhook URL is unusable, or None: http(s), a host, no whitespace, at most 2000 characters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a URL"
    if not url.startswith(("http://", "https://")) or not parts.hostname:
        return "an http:// or https:// URL with a host expected"
    if len(url) > 2000 or any(ch.isspace() or ord(ch) < 32 for ch in url):
        return "at most 2000 characters and no whitespace expected"
    return None


async def record_rate_limited(conn: Connection, credential_ids: Sequence[int]) -> None:
    """One credential.rate_limited event per credential and hour (see RECORD_RATE_LIMITED)."""
    if credential_ids:
        await conn.execute(RECORD_RATE_LIMITED, list(credential_ids))


async def scan_expiry(conn: Connection) -> int:
    """Record due credential.expiring and credential.expired events and prune old finished ones; returns how
    many credentials it looked at."""
    expiring = await conn.execute(SCAN_EXPIRING, list(EXPIRING_DAYS), max(EXPIRING_DAYS))
    expired = await conn.execute(SCAN_EXPIRED, EXPIRED_LOOKBACK_DAYS)
    await conn.execute(PRUNE, KEEP_DAYS)
    return sum(int(tag.rpartition(" ")[2] or 0) for tag in (expiring, expired))  # "SELECT <rows>"


def public_delivery(row: Record) -> dict[str, Any]:
    """A delivery as the admin API shows it (the URL without a password)."""
    fields = ("id", "event_id", "type", "status", "attempts", "next_attempt_at", "last_status", "last_error",
              "created_at", "finished_at", "credential")
    out = {name: row[name] for name in fields}
    out["event_id"] = str(out["event_id"])
    out["url"] = redact_url(row["url"])
    return out
