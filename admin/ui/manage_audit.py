"""The Audit log page: every change, newest first, filtered by actor, action, target and time range, in pages."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from admin.ui.credential_forms import when
from admin.ui.manage_forms import PAGE_SIZE, cursor_of
from admin.ui.web import render, require_admin_page
from admin.views.audit import NO_CURSOR, public_event
from admin.views.common import services, storable
from gateway.core import store

TEXT_FILTERS = {"actor": 200, "action": 100, "target": 200}  # the JSON API's limits


def parse_moment(text: str, *, end_of_day: bool = False) -> datetime:
    """A date (`2027-01-31`), a browser's datetime-local (`2027-01-31T09:30`) or an RFC 3339 time; UTC unless a
    zone is given. A bare date as the end of a range means the whole of that day. ValueError otherwise."""
    if len(text) > 64:
        raise ValueError(text)
    if len(text) == 10:
        day = datetime.fromisoformat(text).replace(tzinfo=UTC)
        return day + timedelta(days=1) if end_of_day else day
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _filters(request: web.Request) -> tuple[dict[str, str], dict[str, Any], dict[str, str]]:
    """(the filter values as typed, as the query takes them, problems in words by field)."""
    typed = {name: request.query.get(name, "").strip() for name in (*TEXT_FILTERS, "from", "to")}
    checked: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, limit in TEXT_FILTERS.items():
        if len(typed[name]) > limit or not storable(typed[name]):
            errors[name] = f"At most {limit} characters."
        checked[name] = typed[name] or None
    for name in ("from", "to"):
        checked[name] = None
        if typed[name]:
            try:
                checked[name] = parse_moment(typed[name], end_of_day=name == "to")
            except (ValueError, OverflowError):
                errors[name] = "Enter a date and time, e.g. 2027-01-31 09:30 (UTC)."
    if not errors and checked["from"] and checked["to"] and checked["from"] >= checked["to"]:
        errors["to"] = "The end of the range must be after its start."
    return typed, checked, errors


def _changes(value: Any) -> str:
    """An event's changes as compact JSON text (escaped by the template like everything else)."""
    if isinstance(value, str):  # asyncpg hands jsonb over as its text
        try:
            value = json.loads(value)
        except ValueError:
            return str(value)
    return "" if not value else json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


async def audit_page(request: web.Request) -> web.Response:
    require_admin_page(request)
    typed, checked, errors = _filters(request)
    cursor = cursor_of(request)
    events: list[dict[str, Any]] = []
    next_cursor = None
    if not errors:
        async with services(request).pool.acquire() as conn:
            rows = await conn.fetch(store.LIST_AUDIT, checked["actor"], checked["target"], checked["action"],
                                    checked["from"], checked["to"], NO_CURSOR if cursor is None else cursor,
                                    PAGE_SIZE + 1)
        events = [{**public_event(r), "when": when(r["at"]), "changes_text": _changes(r["changes"])}
                  for r in rows[:PAGE_SIZE]]
        next_cursor = rows[PAGE_SIZE - 1]["id"] if len(rows) > PAGE_SIZE else None
    kept = {k: v for k, v in typed.items() if v}
    return render(request, "audit.html", {
        "events": events, "filters": typed, "errors": errors, "filtered": bool(kept),
        "first_page": "/audit" + ("?" + urlencode(kept) if kept else ""),
        "older": None if next_cursor is None else "/audit?" + urlencode({**kept, "cursor": next_cursor}),
        "paged": cursor is not None}, status=400 if errors else 200)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/audit", audit_page)
