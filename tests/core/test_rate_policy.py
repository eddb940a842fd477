"""Rate-limit and quota policies: the accepted texts, the errors that say what is expected, quota periods."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from gateway.core.rate_policy import (
    QUOTA_PATTERN,
    RATE_PATTERN,
    Policy,
    PolicyError,
    credential_limits,
    optional_policy,
    parse_policy,
    period,
)


@pytest.mark.parametrize(
    ("text", "kind", "count", "unit", "window"),
    [
        ("100/minute", "rate", 100, "minute", 60),
        ("1/second", "rate", 1, "second", 1),
        (" 5000/hour ", "rate", 5000, "hour", 3600),
        ("3/day", "quota", 3, "day", 86400),
        ("100000/month", "quota", 100000, "month", 30 * 86400),
        ("999999999/second", "rate", 999_999_999, "second", 1),
    ],
)
def test_parses(text: str, kind: str, count: int, unit: str, window: int) -> None:
    policy = parse_policy(text, kind)  # type: ignore[arg-type]
    assert policy == Policy(count, unit)
    assert policy.kind == kind and policy.window == window
    assert str(policy) == text.strip()


@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        ("100/day", "rate", "expected N/second or N/minute or N/hour"),
        ("100/minute", "quota", "expected N/day or N/month"),
        ("0/minute", "rate", "between 1 and 999,999,999"),
        ("1000000000/second", "rate", "between 1 and 999,999,999"),
        ("-1/minute", "rate", "expected"),
        ("1.5/minute", "rate", "expected"),
        ("100 per minute", "rate", "expected"),
        ("100/minutes", "rate", "expected"),
        ("", "rate", "expected"),
    ],
)
def test_refuses_with_what_is_expected(text: str, kind: str, message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        parse_policy(text, kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [None, "", "  ", "none", "NONE"])
def test_empty_and_none_mean_no_policy(text: str | None) -> None:
    assert optional_policy(text, "rate") is None


def test_database_patterns_accept_what_the_parser_accepts() -> None:
    for text in ("1/second", "60/minute", "999999999/hour"):
        assert re.fullmatch(RATE_PATTERN.strip("^$"), text)
    for text in ("3/day", "100000/month"):
        assert re.fullmatch(QUOTA_PATTERN.strip("^$"), text)
    for text in ("0/minute", "1000000000/hour", "3/week"):
        assert not re.fullmatch(RATE_PATTERN.strip("^$"), text)


def test_credential_limits_are_shared_instances() -> None:
    assert credential_limits(None, None) is None
    assert credential_limits("", "") is None
    a = credential_limits("10/minute", "5/day")
    assert a is credential_limits("10/minute", "5/day")
    assert a is not None and a.rate == Policy(10, "minute") and a.quota == Policy(5, "day")
    only_quota = credential_limits(None, "7/month")
    assert only_quota is not None and only_quota.rate is None


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_day_period_is_the_utc_calendar_day() -> None:
    p = period("day", _at("2026-12-03T23:59:59"))
    assert p.key == "d20261203"
    assert p.start == datetime(2026, 12, 3, tzinfo=UTC) and p.end == datetime(2026, 12, 4, tzinfo=UTC)
    assert p.seconds == 86400


@pytest.mark.parametrize(
    ("at", "key", "end", "days"),
    [
        ("2026-12-31T12:00:00", "m202612", datetime(2027, 1, 1, tzinfo=UTC), 31),
        ("2028-02-29T00:00:00", "m202802", datetime(2028, 3, 1, tzinfo=UTC), 29),
        ("2027-02-01T00:00:00", "m202702", datetime(2027, 3, 1, tzinfo=UTC), 28),
    ],
)
def test_month_period_is_the_utc_calendar_month(at: str, key: str, end: datetime, days: int) -> None:
    p = period("month", _at(at))
    assert p.key == key and p.end == end and p.seconds == days * 86400


def test_a_rate_unit_has_no_period() -> None:
    with pytest.raises(ValueError, match="not a quota unit"):
        period("minute", 0.0)
