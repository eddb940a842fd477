"""What every view needs: the app's services, the JSON body, field and query checks, pagination."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from admin.auth import AdminAuth
from admin.errors import ApiError, invalid
from admin.idempotency import RotationReplay
from admin.metrics import AdminMetrics
from gateway.core import hashing
from gateway.core.settings import Settings
from gateway.core.store import Pool

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


@dataclass(frozen=True, slots=True)
class Services:
    """The admin app's resources, opened and closed by the app's cleanup context."""

    settings: Settings
    pool: Pool
    argon2: hashing.Argon2Pool
    auth: AdminAuth
    replay: RotationReplay
    metrics: AdminMetrics

    async def hash_secret(self, secret: str) -> str:
        return await self.argon2.hash(secret)


SERVICES = web.AppKey("credgate_admin_services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; 413 past admin.max_body_bytes, 400 for anything malformed."""
    limit = services(request).settings.admin.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", f"request body exceeds {limit} bytes")
    raw = await request.read()  # the app's client_max_size stops a chunked body at the same limit
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    return data


def storable(text: str) -> bool:
    """Whether Postgres can store the text: no NUL character and no lone surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def path_name(request: web.Request, key: str = "name") -> str:
    """A user or group name from the path; one no principal or group could have is simply not found."""
    value = request.match_info[key]
    if not 0 < len(value) <= 128 or not value.isascii() or not value.isprintable():
        raise ApiError(404, "not_found", "no such user or group", {key: "not found"})
    return value


def parse_time(text: str) -> datetime:
    """An RFC 3339 timestamp with a zone, as UTC; ValueError otherwise."""
    if len(text) > 64:
        raise ValueError(text)
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(text)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(text) from None


class Fields:
    """Checks named values one by one and collects every problem, reported at once by done()."""

    def __init__(self, data: Mapping[str, Any], allowed: Iterable[str] | None = None) -> None:
        self.data = data
        self.errors: dict[str, str] = {}
        if allowed is not None:
            known = set(allowed)
            self.errors.update({k: "unknown field" for k in data if k not in known})

    def fail(self, name: str, message: str) -> None:
        self.errors.setdefault(name, message)

    def done(self) -> None:
        if self.errors:
            raise invalid(self.errors)

    # --- JSON body values ---

    def string(self, name: str, *, required: bool = False, max_length: int = 200) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                self.fail(name, "required")
            return None
        if not isinstance(value, str) or len(value) > max_length or not storable(value):
            self.fail(name, f"a string of at most {max_length} characters expected")
            return None
        if required and not value:
            self.fail(name, "must not be empty")
            return None
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            self.fail(name, "true or false expected")
            return default
        return value

    def integer(self, name: str, *, minimum: int, maximum: int, default: int | None = None) -> int | None:
        value = self.data.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            self.fail(name, f"an integer from {minimum} to {maximum} expected")
            return None
        return value

    def timestamp(self, name: str) -> datetime | None:
        value = self.data.get(name)
        if value is None:
            return None
        try:
            if not isinstance(value, str):
                raise ValueError(name)
            return parse_time(value)
        except ValueError:
            self.fail(name, "an RFC 3339 date-time with a time zone expected, e.g. 2027-01-01T00:00:00Z")
            return None

    def expiry_days(self, name: str) -> int | Literal["never"] | None:
        value = self.data.get(name)
        if value is None or value == "never":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
            self.fail(name, "a whole number of days >= 1, or \"never\"")
            return None
        return value

    def names(self, name: str, max_items: int = 100) -> list[str]:
        value = self.data.get(name, [])
        if not isinstance(value, list) or len(value) > max_items or \
                not all(isinstance(v, str) and 0 < len(v) <= 128 and storable(v) for v in value):
            self.fail(name, f"a list of at most {max_items} names expected")
            return []
        return list(dict.fromkeys(value))

    # --- query string values (always strings) ---

    def query_choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        value = self.data.get(name)
        if value is not None and value not in choices:
            self.fail(name, "one of " + ", ".join(choices))
            return None
        return value

    def query_text(self, name: str, max_length: int = 200) -> str | None:
        value = self.data.get(name)
        if value is not None and (len(value) > max_length or not storable(value)):
            self.fail(name, f"at most {max_length} characters")
            return None
        return value

    def query_int(self, name: str, *, minimum: int, maximum: int, default: int) -> int:
        text = self.data.get(name)
        if text is None:
            return default
        if not (text.isascii() and text.isdigit()) or len(text) > 18 or not minimum <= int(text) <= maximum:
            self.fail(name, f"an integer from {minimum} to {maximum} expected")
            return default
        return int(text)

    def query_time(self, name: str) -> datetime | None:
        text = self.data.get(name)
        if text is None:
            return None
        try:
            return parse_time(text)
        except ValueError:
            self.fail(name, "an RFC 3339 date-time with a time zone expected, e.g. 2027-01-01T00:00:00Z")
            return None


def query_fields(request: web.Request, allowed: Iterable[str], paginated: bool = True) -> Fields:
    """Query parameters (each at most once) checked as Fields; with paginated, also limit and cursor."""
    query = request.query
    repeated = {k for k in query if len(query.getall(k)) > 1}
    fields = Fields({k: query[k] for k in query}, {*allowed, *(("limit", "cursor") if paginated else ())})
    for name in repeated:
        fields.fail(name, "give this parameter once")
    return fields


def page_limit(fields: Fields) -> int:
    return fields.query_int("limit", minimum=1, maximum=MAX_LIMIT, default=DEFAULT_LIMIT)


def id_cursor(fields: Fields) -> int | None:
    """A numeric keyset cursor (the last id of the previous page)."""
    text = fields.data.get("cursor")
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        fields.fail("cursor", "not a cursor returned by this API")
        return None
    return int(text)


def page(items: list[dict[str, Any]], next_cursor: Any) -> dict[str, Any]:
    return {"items": items, "next_cursor": None if next_cursor is None else str(next_cursor)}
