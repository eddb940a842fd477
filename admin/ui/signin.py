"""Signing in and out of the web UI: the same users, sessions, throttle and audit as the API's POST /session."""

from __future__ import annotations

import hmac
import secrets

from aiohttp import web

from admin.auth import REQUEST_ID, actor_for, current, source_address
from admin.errors import ApiError
from admin.ui.web import UI_SESSION_COOKIE, form, public, redirect, render, safe_next
from admin.views.common import services

MAX_PASSWORD_LENGTH = 1024
# Before there is a session, the sign-in form is tied to its browser by a random cookie it must echo
# (double submit): another site cannot sign a victim in as someone else.
LOGIN_CSRF_COOKIE = "credgate_ui_signin"


def _sign_in_form(request: web.Request, context: dict[str, object], status: int = 200) -> web.Response:
    token = secrets.token_urlsafe(24)
    response = render(request, "sign_in.html", {**context, "csrf_token": token}, status=status)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="Strict", secure=request.secure,
                        path="/sign-in", max_age=3600)
    return response


@public
async def sign_in_page(request: web.Request) -> web.Response:
    return _sign_in_form(request, {"next": safe_next(request.query.get("next")), "error": None, "username": ""})


@public
async def sign_in(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    username = fields.get("username", "").strip()[:128]
    password = fields.get("password", "")[:MAX_PASSWORD_LENGTH]
    target = safe_next(fields.get("next"))
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "").encode()
    if not expected or not hmac.compare_digest(fields.get("csrf_token", "").encode(), expected):
        return _sign_in_form(request, {"next": target, "username": username,
                                       "error": "The sign-in form expired. Try again."}, status=403)
    if not username or not password:
        return _sign_in_form(request, {"next": target, "username": username,
                                       "error": "Enter your username and password."}, status=400)
    svc = services(request)
    try:
        _identity, token = await svc.auth.login(username, password, request[REQUEST_ID], source_address(request))
    except ApiError as exc:
        message = ("Wrong username or password." if exc.status == 401 else exc.message)
        response = _sign_in_form(request, {"next": target, "username": username, "error": message},
                                 status=exc.status)
        for name, value in exc.headers.items():
            response.headers[name] = value
        return response
    response = web.HTTPSeeOther(target)
    response.set_cookie(UI_SESSION_COOKIE, token, httponly=True, samesite="Strict", secure=request.secure,
                        path="/", max_age=int(svc.settings.admin.session_ttl))
    response.del_cookie(LOGIN_CSRF_COOKIE, path="/sign-in")
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    await services(request).auth.logout(current(request), actor_for(request))
    response = redirect("/sign-in", "signed-out")
    response.del_cookie(UI_SESSION_COOKIE, path="/")
    return response


async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/credentials")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", home)
    router.add_get("/sign-in", sign_in_page)
    router.add_post("/sign-in", sign_in)
    router.add_post("/sign-out", sign_out)
