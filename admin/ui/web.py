"""What every page of the web UI shares: rendering, security headers, the session, CSRF on forms, error pages.

Pages are server-rendered (aiohttp-jinja2, autoescaped) and work without JavaScript: forms post and redirect.
A page request is authenticated only by the UI's own session cookie (never by a credential header), and every
POST must carry the session's CSRF token as the form field `csrf_token`. Failures become a page in words with
the right status, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web

from admin.auth import IDENTITY, REQUEST_ID, Identity, current
from admin.errors import ApiError
from admin.lifecycle import LifecycleError
from admin.views.common import services
from gateway.core.errors import STORE_UNAVAILABLE

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UI_SESSION_COOKIE = "credgate_ui_session"
CSRF_FIELD = "csrf_token"
# No inline script or style anywhere: everything the pages run or wear comes from /static/.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; frame-ancestors 'none'; "
       "form-action 'self'; base-uri 'none'")
PAGE_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # pages show credentials and may show a secret once: never cached, never restored by the back button
    "Cache-Control": "no-store",
}
# Handlers any visitor may reach (the sign-in page itself, and the static files).
PUBLIC: set[Handler] = set()
# Short success notices, chosen by a code in the redirect's query string (never user text in a URL).
NOTICES = {
    "created": "Credential created.",
    "rotated": "Secret rotated.",
    "updated": "Changes saved.",
    "deleted": "Credential deleted.",
    "signed-out": "You are signed out.",
    "session-expired": "Your session has expired. Sign in again.",
    "user-created": "User created.",
    "api-account-created": "API account created.",
    "user-disabled": "User disabled: their credentials are suspended.",
    "user-enabled": "User enabled.",
    "user-deleted": "User deleted.",
    "password-reset": "Password reset.",
    "group-created": "Group created.",
    "group-deleted": "Group deleted.",
    "member-added": "Member added.",
    "member-removed": "Member removed.",
}


def public(handler: Handler) -> Handler:
    """Mark a page handler as reachable without signing in."""
    PUBLIC.add(handler)
    return handler


def is_page(request: web.Request) -> bool:
    """Everything outside the JSON API is the UI."""
    return not (request.path == "/api/v1" or request.path.startswith("/api/"))


def render(request: web.Request, template: str, context: dict[str, Any] | None = None, *, status: int = 200
           ) -> web.Response:
    """A page: the template with what every page needs (who is signed in, the CSRF token, the notice)."""
    identity = request.get(IDENTITY)
    page: dict[str, Any] = {
        "me": identity,
        "csrf_token": identity.csrf_token if identity is not None else "",
        "notice": NOTICES.get(request.query.get("done", "")),
        "request_id": request.get(REQUEST_ID, ""),
        "path": request.path,
    }
    page.update(context or {})
    response = aiohttp_jinja2.render_template(template, request, page, status=status)
    return response


def redirect(location: str, done: str | None = None) -> web.HTTPSeeOther:
    """POST → redirect → GET, optionally with a success notice."""
    if done is not None:
        location += ("&" if "?" in location else "?") + "done=" + quote(done)
    return web.HTTPSeeOther(location)


def safe_next(value: str | None) -> str:
    """Where to go after signing in: only a path on this site (never `//host` or a scheme)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/credentials"


async def form(request: web.Request) -> dict[str, str]:
    """The posted form's fields (a repeated field keeps its last value)."""
    data = await request.post()
    return {key: value for key, value in data.items() if isinstance(value, str)}


def check_csrf(request: web.Request, identity: Identity, fields: Mapping[str, str]) -> None:
    sent = fields.get(CSRF_FIELD, "").encode()
    expected = (identity.csrf_token or "").encode()
    if not expected or not hmac.compare_digest(sent, expected):
        raise ApiError(403, "csrf_failed", "This form has expired or did not come from this site. Reload the "
                       "page and try again.")


async def _signed_in(request: web.Request) -> Identity | None:
    token = request.cookies.get(UI_SESSION_COOKIE)
    if token is None:
        return None
    try:
        return await services(request).auth.session_identity(token)
    except ApiError:
        return None  # expired or signed out: the sign-in page says so


@web.middleware
async def pages_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """For every UI request: deadline, session, CSRF, security headers, and errors as pages."""
    if not is_page(request):
        return await handler(request)
    response: web.StreamResponse
    deadline = services(request).settings.admin.store_timeout
    try:
        async with asyncio.timeout(deadline):
            response = await _authorised(request, handler)
        if isinstance(response, web.HTTPException):  # a redirect returned rather than raised
            response = _plain(response)
    except web.HTTPException as exc:
        response = _plain(exc) if exc.status < 400 else _error_page(request, exc.status, _http_message(exc))
    except ApiError as exc:
        response = _error_page(request, exc.status, exc.message)
    except LifecycleError as exc:
        response = _error_page(request, exc.status, exc.message)
    except TimeoutError:
        response = _error_page(request, 503, "The database did not answer in time. Try again in a few seconds.")
    except STORE_UNAVAILABLE:
        response = _error_page(request, 503, "The database is unavailable. Try again in a few seconds.")
    except Exception:
        logger.exception("page %s %s failed (request %s)", request.method, request.path, request.get(REQUEST_ID))
        response = _error_page(request, 500, "Something went wrong on our side. Quote request id "
                               f"{request.get(REQUEST_ID, '-')} when you report it.")
    for name, value in PAGE_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def _authorised(request: web.Request, handler: Handler) -> web.StreamResponse:
    route_handler = request.match_info.handler
    if request.match_info.http_exception is not None or route_handler in PUBLIC or request.path.startswith("/static/"):
        return await handler(request)
    identity = await _signed_in(request)
    if identity is None:
        target = request.path_qs if request.method == "GET" else "/credentials"
        # a cookie that no longer opens a session: it expired or was signed out elsewhere; say so
        expired = "&done=session-expired" if UI_SESSION_COOKIE in request.cookies else ""
        raise web.HTTPSeeOther("/sign-in?next=" + quote(target, safe="/") + expired)
    request[IDENTITY] = identity
    if request.method not in ("GET", "HEAD"):
        check_csrf(request, identity, await form(request))
    return await handler(request)


def require_admin_page(request: web.Request) -> Identity:
    """The signed-in administrator; anyone else gets a 403 page."""
    identity = current(request)
    if not identity.is_admin:
        raise ApiError(403, "forbidden", "Only administrators can open this page.")
    return identity


def _plain(exc: web.HTTPException) -> web.Response:
    """A redirect as an ordinary response (aiohttp no longer accepts exceptions as responses), cookies kept."""
    response = web.Response(status=exc.status, headers=exc.headers)
    for name, morsel in exc.cookies.items():
        response.cookies[name] = morsel
    return response


def _http_message(exc: web.HTTPException) -> str:
    return {
        404: "There is no such page, or you may not see it.",
        405: "That action is not available here.",
        413: "What you sent is too large.",
    }.get(exc.status, exc.reason)


def _error_page(request: web.Request, status: int, message: str) -> web.Response:
    titles = {400: "Check what you entered", 403: "Not allowed", 404: "Not found", 409: "Conflict",
              429: "Too many attempts", 503: "Temporarily unavailable"}
    response = render(request, "error.html", {"title": titles.get(status, "Error"), "message": message,
                                              "status": status}, status=status)
    if status == 503:
        response.headers["Retry-After"] = "5"
    return response
