"""What the credential pages show and accept, without I/O: row views, status words, list filters and pages,
the expiry field, the usage chart and the usage example. admin.ui.credentials does the requests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlencode

from admin.credential_limits import LimitError, LimitField, canonical
from gateway.core import formats
from gateway.core.settings import PolicySettings

PAGE_SIZE = 50
MAX_SEARCH_LENGTH = 200
CHART_DAYS = 30
KIND_LABELS = {"token": "Token", "key": "Key pair"}
STATUS_LABELS = {"valid": "Valid", "expires-soon": "Expires soon", "expired": "Expired", "suspended": "Suspended",
                 "revoked": "Revoked"}
# The status filter: "" (the default) shows everything but revoked credentials, which only a filter asks for.
STATUS_FILTERS = {"": ("valid", "expires-soon", "expired", "suspended"), "all": tuple(STATUS_LABELS),
                  **{code: (code,) for code in STATUS_LABELS}}
# When the old secret stops after a rotation: the form's choice → grace seconds.
GRACE_CHOICES = {"now": ("Now", 0), "1h": ("After 1 hour", 3600), "24h": ("After 24 hours", 86400)}
# The lifecycle's field names → the form field an error is shown next to.
FORM_FIELDS = {"expires_at": ("expires", "Expires"), "expires_in_days": ("expires", "Expires"),
               "name": ("name", "Name"), "kind": ("kind", "Kind"), "owner": ("owner", "Owner"),
               "rate_limit": ("rate_limit", "Rate limit"), "quota": ("quota", "Quota")}
LIMIT_FIELDS: tuple[LimitField, ...] = ("rate_limit", "quota")


def status_code(credential: Mapping[str, Any], now: datetime, warning_days: int) -> str:
    """The lifecycle's status, with `expires-soon` for a valid credential inside the expiry-warning window."""
    status = str(credential["status"])
    expires = credential["expires_at"]
    if status == "valid" and expires is not None and expires <= now + timedelta(days=warning_days):
        return "expires-soon"
    return status


def when(value: datetime | None, never: str = "Never") -> dict[str, str]:
    """A time for a `<time>` element: machine-readable and in words (UTC)."""
    if value is None:
        return {"iso": "", "text": never}
    value = value.astimezone(UTC)
    return {"iso": value.isoformat().replace("+00:00", "Z"), "text": value.strftime("%Y-%m-%d %H:%M UTC")}


def credential_view(credential: Mapping[str, Any], now: datetime, warning_days: int) -> dict[str, Any]:
    """A credential (lifecycle.public_credential) as the templates show it."""
    code = status_code(credential, now, warning_days)
    public_id = str(credential["id"])
    is_key = credential["kind"] == "key"
    grace = credential.get("previous_secret_expires_at")
    return {
        "id": public_id,
        "name": credential["name"],
        # what the delete dialog asks to type: the name, or the id of a credential created without one
        "confirm_text": credential["name"] or public_id,
        "kind": KIND_LABELS.get(str(credential["kind"]), str(credential["kind"])),
        "identifier": credential["client_id"] if is_key else formats.TOKEN_PREFIX + public_id,
        "identifier_label": "Client ID" if is_key else "Token prefix",
        "owner": credential["owner"],
        "created_by": credential["created_by"],
        "created": when(credential["created_at"]),
        "expires": when(credential["expires_at"]),
        "last_used": when(credential["last_used_at"]),
        "rotated": when(credential["rotated_at"]) if credential["rotated_at"] else None,
        "grace_until": when(grace) if grace else None,
        "status_code": code,
        "status": STATUS_LABELS.get(code, code.title()),
        "revoked": code == "revoked",
        "rate_limit": credential.get("rate_limit") or "None",
        "quota": credential.get("quota") or "None",
    }


# --- the list's filters and pages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListQuery:
    """The list page's query string, checked: unknown values fall back to the default view."""

    status: str = ""
    kind: str = ""
    search: str = ""
    after: int | None = None  # the next page: ids below this one
    before: int | None = None  # the previous page: ids above this one

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> ListQuery:
        status = query.get("status", "")
        kind = query.get("kind", "")
        return cls(status=status if status in STATUS_FILTERS else "", kind=kind if kind in KIND_LABELS else "",
                   search=query.get("q", "").strip()[:MAX_SEARCH_LENGTH],
                   after=_cursor(query.get("after")), before=_cursor(query.get("before")))

    @property
    def statuses(self) -> list[str]:
        return list(STATUS_FILTERS[self.status])

    def patterns(self) -> tuple[str | None, str | None]:
        """LIKE patterns for the search: on the name (any case), and on the public id inside a client ID
        or token (`cgk_<id><checksum>`, `cgt_<id>…`: a pasted client ID or token prefix finds its credential)."""
        if not self.search:
            return None, None
        text = self.search
        for prefix in (formats.CLIENT_ID_PREFIX, formats.TOKEN_PREFIX):
            if text.startswith(prefix):
                text = text[len(prefix):][:formats.PUBLIC_ID_LENGTH]
                break
        return f"%{_like_escape(self.search)}%", f"%{_like_escape(text)}%"

    def link(self, **cursor: int) -> str:
        """/credentials with these filters and a page cursor."""
        params = {"status": self.status, "kind": self.kind, "q": self.search, **{k: str(v) for k, v in cursor.items()}}
        query = urlencode({k: v for k, v in params.items() if v})
        return "/credentials" + ("?" + query if query else "")


def _cursor(value: str | None) -> int | None:
    if value is None or not value.isdecimal() or len(value) > 19:
        return None
    return int(value)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def page_links(query: ListQuery, ids: Sequence[int], more: bool) -> dict[str, str | None]:
    """Next/Previous links for a page of ids (newest first); `more` = the query found another row beyond it."""
    if not ids:
        return {"next": None, "previous": query.link() if query.after or query.before else None}
    backwards = query.before is not None
    has_next = query.before is not None or more
    has_previous = query.after is not None or (backwards and more)
    return {"next": query.link(after=ids[-1]) if has_next else None,
            "previous": query.link(before=ids[0]) if has_previous else None}


# --- the create and edit forms -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExpiryBounds:
    """What the `Expires` date input allows, from the policy (the lifecycle still checks every value)."""

    today: date
    default: date
    maximum: date
    allow_never: bool

    @classmethod
    def of(cls, policy: PolicySettings, now: datetime) -> ExpiryBounds:
        today = now.astimezone(UTC).date()
        return cls(today, today + timedelta(days=policy.default_expiry_days),
                   today + timedelta(days=policy.max_expiry_days), policy.allow_never_expires)

    def context(self) -> dict[str, Any]:
        return {"min_date": (self.today + timedelta(days=1)).isoformat(), "max_date": self.maximum.isoformat(),
                "allow_never": self.allow_never}


Expiry = datetime | Literal["never"] | None


def parse_expiry(fields: Mapping[str, str], now: datetime) -> tuple[Expiry, str | None]:
    """The `Expires` date (or `Never`) → an expiry at this time of day on that date (UTC), or an error message.

    The time of day is now's, so the default date gives exactly the policy's default lifetime and the
    maximum date exactly its maximum. No date at all gives None: the lifecycle applies the default.
    """
    if fields.get("never") == "on":
        return "never", None
    text = fields.get("expires", "").strip()
    if not text:
        return None, None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        return None, "Expires: enter a date like 2030-01-31."
    if day <= now.astimezone(UTC).date():
        return None, "Expires: choose a date after today."
    return datetime.combine(day, now.astimezone(UTC).timetz()), None


def expiry_changed(expiry: Expiry, current: datetime | None) -> bool:
    """Whether the edit form asks for another expiry: a different date, or `Never` toggled. An untouched date
    keeps the exact expiry (and is not re-checked against a policy that may have changed since)."""
    if expiry is None:
        return False
    if expiry == "never" or current is None:
        return expiry != "never" or current is not None
    return expiry.date() != current.astimezone(UTC).date()


def parse_limits(fields: Mapping[str, str]) -> tuple[dict[LimitField, str | None], dict[str, str]]:
    """`Rate limit` and `Quota` (empty: no limit) → the canonical values, and a message per field refused."""
    values: dict[LimitField, str | None] = {}
    errors: dict[str, str] = {}
    for field in LIMIT_FIELDS:
        try:
            values[field] = canonical(fields.get(field, ""), field)
        except LimitError as exc:
            errors.update(field_errors(field, exc.message))
    return values, errors


def field_errors(field: str | None, message: str) -> dict[str, str]:
    """A lifecycle error's message, next to the form field it names (or above the form)."""
    if field in FORM_FIELDS:
        name, label = FORM_FIELDS[field]
        return {name: f"{label}: {message}."}
    return {"form": message[:1].upper() + message[1:] + "."}


# --- the detail page -----------------------------------------------------------------------------------------------


def usage_chart(per_day: Mapping[date, int], today: date, days: int = CHART_DAYS) -> dict[str, Any]:
    """Requests per day as SVG bars (geometry computed here: the page has no script and no inline style)."""
    height, bar, gap, top = 120, 16, 4, 14
    series = [(today - timedelta(days=days - 1 - i), 0) for i in range(days)]
    series = [(day, per_day.get(day, 0)) for day, _ in series]
    peak = max((n for _, n in series), default=0) or 1
    bars = []
    for i, (day, count) in enumerate(series):
        h = round((height - top) * count / peak) if count else 0
        bars.append({"x": i * (bar + gap), "y": height - h, "width": bar, "height": h,
                     "title": f"{day.isoformat()}: {count} request{'' if count == 1 else 's'}"})
    total = sum(n for _, n in series)
    first, last = series[0][0].isoformat(), series[-1][0].isoformat()
    return {"bars": bars, "width": days * (bar + gap), "height": height + 16, "total": total, "peak": peak,
            "first": first, "last": last, "label_y": height + 12,
            "summary": f"Requests per day for the last {days} days: {total} in total, at most {peak if total else 0} "
                       f"on one day ({first} to {last})."}


# --- the secret dialog -----------------------------------------------------------------------------------------------


def secret_view(revealed: Mapping[str, Any], gateway_url: str, headers: tuple[str, str] = ("accessKey", "secretKey")
                ) -> dict[str, Any]:
    """The once-only secret: the read-only fields to copy and a curl example with the right header
    (`headers`: the gateway's access-key and secret-key header names)."""
    url = gateway_url.rstrip("/") + "/"
    if revealed.get("token"):
        token = str(revealed["token"])
        fields = [{"id": "secret-token", "label": "Token", "value": token}]
        example = f'curl -H "Authorization: Bearer {token}" {url}'
    else:
        client_id, secret = str(revealed["client_id"]), str(revealed["secret"])
        fields = [{"id": "secret-client-id", "label": "Client ID", "value": client_id},
                  {"id": "secret-secret", "label": "Secret", "value": secret}]
        example = (f"curl -u {client_id}:{secret} {url}\n# or with headers:\n"
                   f'curl -H "{headers[0]}: {client_id}" -H "{headers[1]}: {secret}" {url}')
    return {"fields": fields, "example": example}
