"""A credential's rate limit and quota as the admin side accepts them: checked with gateway.core.rate_policy
and stored as its canonical text, or NULL for no limit. Pure: no I/O, so the API, CLI and forms share it."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final, Literal

from gateway.core.rate_policy import PolicyError, PolicyKind, optional_policy
from gateway.core.store import Record

LimitField = Literal["rate_limit", "quota"]
FIELDS: Final[dict[LimitField, PolicyKind]] = {"rate_limit": "rate", "quota": "quota"}
# Longer than any valid policy ("999999999/second" is 16): a longer value is refused without echoing it whole.
MAX_TEXT_LENGTH = 32


class Keep(enum.Enum):
    """An update's "not given": the stored value stays (None, "" and "none" clear it)."""

    KEEP = "keep"


KEEP: Final = Keep.KEEP
Change = str | None | Keep
Limits = dict[str, str | None]  # keyed by LimitField


class LimitError(ValueError):
    """A value that is not a policy of its field's kind; the message says what is expected."""

    def __init__(self, message: str, field: LimitField) -> None:
        super().__init__(message)
        self.message = message
        self.field: LimitField = field


# What a refusal is raised as: LimitError, or the caller's own error taking (message, field).
Refuse = Callable[[str, LimitField], Exception]


def canonical(value: str | None, field: LimitField) -> str | None:
    """`" 100/minute "` → "100/minute"; None, "" and "none" → None; LimitError otherwise."""
    if value is not None and len(value) > MAX_TEXT_LENGTH:
        raise LimitError(f"at most {MAX_TEXT_LENGTH} characters, e.g. {example(field)}", field)
    try:
        policy = optional_policy(value, FIELDS[field])
    except PolicyError as exc:
        raise LimitError(str(exc), field) from None
    return None if policy is None else str(policy)


def example(field: LimitField) -> str:
    return "100/minute" if field == "rate_limit" else "100000/month"


def resolve_limits(rate_limit: Change, quota: Change, current: Record | None = None,
                   refuse: Refuse = LimitError) -> Limits:
    """The values to store, in FIELDS' order: each checked, KEEP taking `current`'s value (none: no limit)."""
    resolved: Limits = {}
    pairs: tuple[tuple[LimitField, Change], ...] = (("rate_limit", rate_limit), ("quota", quota))
    for field, value in pairs:
        if isinstance(value, Keep):
            resolved[field] = None if current is None else current[field]
            continue
        try:
            resolved[field] = canonical(value, field)
        except LimitError as exc:
            raise refuse(exc.message, field) from None
    return resolved
