"""Rate-limit and quota policies: `N/second|minute|hour` is a rate, `N/day|month` a quota, parsed in one place.

A rate is enforced as GCRA (a sliding allowance of N per window, refilled continuously); a quota counts the
requests of a calendar day or month in UTC and resets at its end.
"""

from __future__ import annotations

import calendar
import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600}
QUOTA_UNITS = ("day", "month")
MAX_COUNT = 999_999_999
PolicyKind = Literal["rate", "quota"]

_SHAPE = re.compile(r"([0-9]{1,10})/([a-z]+)")
# The same shapes as CHECK constraints in migration 005, so a row written with psql is also parseable.
RATE_PATTERN = "^[1-9][0-9]{0,8}/(second|minute|hour)$"
QUOTA_PATTERN = "^[1-9][0-9]{0,8}/(day|month)$"


class PolicyError(ValueError):
    """A policy text that does not parse; the message says what is expected."""


@dataclass(frozen=True, slots=True)
class Policy:
    count: int
    unit: str

    @property
    def kind(self) -> PolicyKind:
        return "rate" if self.unit in RATE_UNITS else "quota"

    @property
    def window(self) -> int:
        """Seconds in a rate's window (a quota's nominal period: its `period()` gives the exact one)."""
        return RATE_UNITS.get(self.unit) or (86400 if self.unit == "day" else 30 * 86400)

    def __str__(self) -> str:
        return f"{self.count}/{self.unit}"

    def per_second(self) -> float:
        return self.count / self.window


def parse_policy(text: str, kind: PolicyKind) -> Policy:
    """`100/minute` → Policy(100, "minute"); PolicyError naming the accepted forms otherwise."""
    units = tuple(RATE_UNITS) if kind == "rate" else QUOTA_UNITS
    expected = " or ".join(f"N/{u}" for u in units)
    match = _SHAPE.fullmatch(text.strip())
    if match is None or match.group(2) not in units:
        raise PolicyError(f"expected {expected} with N a whole number, e.g. 100/{units[1]}; got {text!r}")
    count = int(match.group(1))
    if not 1 <= count <= MAX_COUNT:
        raise PolicyError(f"N must be between 1 and {MAX_COUNT:,}; got {count}")
    return Policy(count, match.group(2))


def optional_policy(text: str | None, kind: PolicyKind) -> Policy | None:
    """A stored or submitted value: None, "" and "none" mean no policy."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    return parse_policy(text, kind)


@dataclass(frozen=True, slots=True)
class Period:
    """One calendar day or month of a quota, in UTC."""

    key: str  # names the period in Redis keys, e.g. "d20261203" or "m202612"
    start: datetime
    end: datetime

    @property
    def seconds(self) -> int:
        return int((self.end - self.start).total_seconds())


def period(unit: str, now: float) -> Period:
    at = datetime.fromtimestamp(now, UTC)
    if unit == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        end = datetime.fromtimestamp(start.timestamp() + 86400, UTC)
        return Period(f"d{start:%Y%m%d}", start, end)
    if unit != "month":
        raise ValueError(f"{unit!r} is not a quota unit")
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = calendar.monthrange(start.year, start.month)[1]
    end = datetime.fromtimestamp(start.timestamp() + days * 86400, UTC)
    return Period(f"m{start:%Y%m}", start, end)


@dataclass(frozen=True, slots=True)
class CredentialLimits:
    """A credential's own policies; cached credentials share one instance per distinct pair."""

    rate: Policy | None
    quota: Policy | None


@functools.lru_cache(maxsize=1024)
def credential_limits(rate_limit: str | None, quota: str | None) -> CredentialLimits | None:
    """The stored texts (validated by the store's CHECK constraints) as shared policies; None when neither is set."""
    if not rate_limit and not quota:
        return None
    return CredentialLimits(optional_policy(rate_limit, "rate"), optional_policy(quota, "quota"))
