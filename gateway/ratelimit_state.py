"""What one process knows of each rate limit or quota (`Bucket`: its lease of shared units, what Redis said last)
and the RateLimit-Policy / RateLimit fields (draft-ietf-httpapi-ratelimit-headers-11) it reports from that."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from gateway.core.rate_policy import Policy
from gateway.redis_tier import rate_key

LEASE_DIVISOR = 1000

@dataclass(slots=True)
class Limited:
    """A refusal: 429 with `error` ("rate_limited" or "quota_exceeded"), Retry-After and the RateLimit fields."""

    error: str
    description: str
    retry_after: int
    reset: float | None  # epoch seconds when a quota period ends
    policy: bytes  # the RateLimit-Policy field value
    state: bytes  # the RateLimit field value


Decision = bytes | Limited  # bytes: the header lines to add to the forwarded response


class Bucket:
    """One limit as this process sees it: its lease of shared units and what Redis said last."""

    __slots__ = ("admitted", "busy", "credential_id", "debt", "denied_until", "head", "key", "last_used", "lease",
                 "lease_until", "local_tat", "local_used", "name", "period_end", "period_key", "policy", "policy_item",
                 "refused", "remaining", "reset_at", "subject", "units")

    def __init__(self, name: str, policy: Policy, subject: str, credential_id: int = 0) -> None:
        """`credential_id`: the credential counted (0 for a route's count per client address)."""
        self.name = b'"' + name.encode() + b'"'
        self.policy = policy
        self.subject = subject
        self.credential_id = credential_id
        self.key = rate_key(subject, policy.unit) if policy.kind == "rate" else ""
        self.period_key = ""
        self.period_end = 0.0  # a quota period's end, epoch seconds
        self.set_policy_item(self.name + f";q={policy.count};w={policy.window}".encode())
        self.lease = self.base_lease
        self.units = 0  # leased and unused (negative: admitted beyond the lease, owed to the shared count)
        self.debt = 0  # admitted while deciding locally, owed to the shared count
        self.lease_until = 0.0
        self.remaining = policy.count  # the shared remaining after the last grant
        self.reset_at = 0.0  # monotonic time when the allowance is whole again (a quota: its period's end)
        self.denied_until = 0.0
        self.last_used = time.monotonic()
        self.busy: asyncio.Future[None] | None = None
        self.local_tat = 0.0
        self.local_used = 0
        self.admitted = 0  # decisions since the last saturation check (SATURATION_SECONDS)
        self.refused = 0

    def set_policy_item(self, item: bytes) -> None:
        self.policy_item = item
        self.head = b"RateLimit-Policy: " + item + b"\r\nRateLimit: " + self.name + b";r="

    @property
    def base_lease(self) -> int:
        return max(1, self.policy.count // LEASE_DIVISOR) if self.policy.count >= 2 * LEASE_DIVISOR else 1

    def state_item(self, now: float, remaining: int | None = None) -> bytes:
        r = max(0, self.remaining + self.units - self.local_used) if remaining is None else remaining
        return self.name + b";r=" + str(r).encode() + b";t=" + str(max(0, math.ceil(self.reset_at - now))).encode()


def field_values(buckets: tuple[Bucket, ...], now: float, denied: Bucket | None = None) -> tuple[bytes, bytes]:
    """RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers-11): one item per bucket."""
    if len(buckets) == 1:
        b = buckets[0]
        return b.policy_item, b.state_item(now, 0 if b is denied else None)
    return (b", ".join([b.policy_item for b in buckets]),
            b", ".join([b.state_item(now, 0 if b is denied else None) for b in buckets]))


def fields(buckets: tuple[Bucket, ...], now: float) -> bytes:
    """The two fields as header lines, for a forwarded response."""
    if len(buckets) == 1:  # the common case, from a prebuilt head: 0.4 µs instead of 1.1 per request
        b = buckets[0]
        r = b.remaining + b.units - b.local_used
        return (b.head + str(r if r > 0 else 0).encode() + b";t=" + str(max(0, math.ceil(b.reset_at - now))).encode()
                + b"\r\n")
    policy, state = field_values(buckets, now)
    return b"RateLimit-Policy: " + policy + b"\r\nRateLimit: " + state + b"\r\n"
