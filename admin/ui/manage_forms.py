"""What the administrator pages share: posted names checked into words beside their field, a lifecycle refusal
shown beside the field it names, and page cursors."""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

from admin.errors import ApiError
from admin.lifecycle import LifecycleError
from admin.views.common import storable

PAGE_SIZE = 50
# Longer than any principal or group name: longer text is refused before it reaches the database.
MAX_NAME_LENGTH = 128


def sentence(message: str) -> str:
    """A lifecycle message (`a principal named 'x' already exists`) as a sentence on a page."""
    text = message[:1].upper() + message[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def refusal(exc: LifecycleError | ApiError, field_names: dict[str, str] | None = None,
            default: str = "form") -> dict[str, str]:
    """{form field: message} for a refusal; `field_names` maps the lifecycle's field names to the form's."""
    field = (exc.field or default) if isinstance(exc, LifecycleError) else next(iter(exc.fields), default)
    field = (field_names or {}).get(field, field)
    return {field: sentence(exc.message)}


def check_name(value: str, label: str) -> str | None:
    """Why a typed name cannot be one (in words), or None; its pattern is the database's to check."""
    if not value:
        return f"Enter {label}."
    if len(value) > MAX_NAME_LENGTH or not storable(value):
        return f"{label[:1].upper() + label[1:]} must be at most {MAX_NAME_LENGTH} characters."
    return None


def cursor_of(request: web.Request) -> int | None:
    """The keyset cursor of a page link (`?cursor=<id>`); a link that is not one is refused in words."""
    text = request.query.get("cursor")
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise ApiError(400, "invalid_request", "This page link is not valid. Start again from the first page.")
    return int(text)


def path(*parts: str) -> str:
    """A site path from names (each quoted): path('users', name, 'delete') → /users/<name>/delete."""
    return "/" + "/".join(quote(p, safe="") for p in parts)
