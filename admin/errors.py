"""The admin API's one error shape, {"error", "message", "fields"}, and its JSON encoding."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from aiohttp import web

from admin.lifecycle import LifecycleError

# Every response is private to its caller and may carry a secret shown once: never cache it anywhere.
BASE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

# The code an aiohttp HTTPException (raised by the router or the body reader) is reported with.
HTTP_CODES = {
    400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 429: "throttled",
    500: "internal_error", 503: "unavailable",
}


class ApiError(Exception):
    """A refusal answered as JSON; `fields` names the offending request fields."""

    def __init__(self, status: int, code: str, message: str, fields: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = dict(fields or {})
        self.headers = dict(headers or {})

    @classmethod
    def from_lifecycle(cls, exc: LifecycleError) -> ApiError:
        return cls(exc.status, exc.code, exc.message, {exc.field: exc.message} if exc.field else None)


def unauthorized(message: str = "authentication required") -> ApiError:
    # No Basic challenge: it would make browsers pop up a login dialog over the web UI.
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="credgate-admin"'})


def forbidden(message: str = "this needs the admin role") -> ApiError:
    return ApiError(403, "forbidden", message)


def not_found(message: str, field: str | None = None) -> ApiError:
    return ApiError(404, "not_found", message, {field: message} if field else None)


def invalid(fields: Mapping[str, str], message: str = "the request has invalid fields") -> ApiError:
    return ApiError(400, "invalid_request", message, fields)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value: Any) -> str:
    return json.dumps(value, default=_default, separators=(",", ":"))


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(text=dumps(data), status=status, content_type="application/json",
                        headers={**BASE_HEADERS, **(headers or {})})


def no_content() -> web.Response:
    return web.Response(status=204, headers=BASE_HEADERS)


def error_response(error: ApiError) -> web.Response:
    body = {"error": error.code, "message": error.message, "fields": error.fields}
    return json_response(body, error.status, error.headers)


def from_http_exception(exc: web.HTTPException) -> ApiError:
    """The JSON form of an aiohttp HTTPException (404/405 from the router, 413 from the body reader)."""
    status = exc.status
    headers = {"Allow": exc.headers["Allow"]} if status == 405 and "Allow" in exc.headers else None
    messages = {
        404: "no such resource", 405: f"method not allowed; allowed: {exc.headers.get('Allow', '')}",
        413: "request body too large",
    }
    code = HTTP_CODES.get(status, "invalid_request" if status < 500 else "internal_error")
    return ApiError(status, code, messages.get(status, exc.reason), headers=headers)
