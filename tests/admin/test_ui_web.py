"""admin.ui.web and admin.ui.signin: headers on every page, sign-in and its CSRF, sessions, safe redirects."""

from __future__ import annotations

import re

import pytest
from yarl import URL

from admin.ui.web import CSP, UI_SESSION_COOKIE, safe_next
from tests.admin.world import PASSWORDS, World, world

__all__ = ["world"]

HIDDEN_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


async def sign_in_form(world: World) -> str:
    async with world.client.get("/sign-in") as resp:
        assert resp.status == 200
        match = HIDDEN_TOKEN.search(await resp.text())
    assert match is not None
    return match.group(1)


async def sign_in(world: World, who: str, password: str | None = None,
                  next_path: str = "") -> tuple[int, str, list[str]]:
    """(status, Location, Set-Cookie headers) of a sign-in through the form."""
    token = await sign_in_form(world)
    fields = {"username": who, "password": password or PASSWORDS[who], "csrf_token": token, "next": next_path}
    async with world.client.post("/sign-in", data=fields, allow_redirects=False) as resp:
        return resp.status, resp.headers.get("Location", ""), resp.headers.getall("Set-Cookie", [])


@pytest.mark.parametrize("path", ["/sign-in", "/nowhere", "/credentials", "/static/app.css"])
async def test_every_page_carries_the_security_headers(world: World, path: str) -> None:
    async with world.client.get(path, allow_redirects=False) as resp:
        assert resp.headers["Content-Security-Policy"] == CSP
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Request-Id"]


async def test_pages_need_a_session_and_say_where_to_sign_in(world: World) -> None:
    async with world.client.get("/credentials?status=valid", allow_redirects=False) as resp:
        assert resp.status == 303
        location = URL(resp.headers["Location"])
        assert location.path == "/sign-in" and location.query["next"] == "/credentials?status=valid"
    # a credential header is for the API: pages only know their own session cookie
    async with world.client.get("/credentials", headers=world.bearer("root"), allow_redirects=False) as resp:
        assert resp.status == 303


async def test_sign_in_sets_the_ui_session_and_goes_where_asked(world: World) -> None:
    status, location, set_cookies = await sign_in(world, "alice", next_path="/credentials?kind=token")
    assert (status, location) == (303, "/credentials?kind=token")
    set_cookie = next(h for h in set_cookies if h.startswith(UI_SESSION_COOKIE + "="))
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/;" in set_cookie + ";"
    async with world.client.get("/credentials", allow_redirects=False) as resp:
        assert resp.status == 200 and "alice" in await resp.text()


@pytest.mark.parametrize("who, password, message", [
    ("alice", "wrong-password-123", "Wrong username or password."),
    ("nobody", "whatever-password", "Wrong username or password."),
    ("svc", "anything-at-all-1", "Wrong username or password."),  # service accounts cannot sign in
    ("alice", "", "Enter your username and password."),
])
async def test_failed_sign_in_is_a_page_in_words(world: World, who: str, password: str, message: str) -> None:
    token = await sign_in_form(world)
    async with world.client.post("/sign-in", data={"username": who, "password": password, "csrf_token": token},
                                 allow_redirects=False) as resp:
        assert resp.status in (400, 401)
        assert message in await resp.text()


async def test_sign_in_form_is_tied_to_its_browser(world: World) -> None:
    fields = {"username": "alice", "password": PASSWORDS["alice"], "csrf_token": "forged"}
    async with world.client.post("/sign-in", data=fields, allow_redirects=False) as resp:
        assert resp.status == 403 and "expired" in await resp.text()


async def test_posts_without_the_csrf_token_are_refused(world: World) -> None:
    await sign_in(world, "alice")
    async with world.client.post("/sign-out", data={}, allow_redirects=False) as resp:
        assert resp.status == 403
        assert "did not come from this site" in await resp.text()
    async with world.client.get("/credentials", allow_redirects=False) as resp:
        assert resp.status == 200  # still signed in


async def test_sign_out_ends_the_session(world: World) -> None:
    await sign_in(world, "alice")
    async with world.client.get("/credentials") as resp:
        token = HIDDEN_TOKEN.search(await resp.text())
    assert token is not None
    async with world.client.post("/sign-out", data={"csrf_token": token.group(1)}, allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/sign-in?done=signed-out"
    async with world.client.get("/credentials", allow_redirects=False) as resp:
        assert resp.status == 303


@pytest.mark.parametrize("value, expected", [
    ("/credentials?kind=key", "/credentials?kind=key"),
    ("//evil.example/x", "/credentials"),
    ("https://evil.example/", "/credentials"),
    ("/\\evil.example", "/credentials"),
    (None, "/credentials"),
])
def test_safe_next_never_leaves_the_site(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


async def test_an_unknown_page_is_a_404_page_not_a_traceback(world: World) -> None:
    await sign_in(world, "alice")
    async with world.client.get("/no/such/page") as resp:
        text = await resp.text()
        assert resp.status == 404 and resp.headers["Content-Type"].startswith("text/html")
        assert "Not found" in text and "Traceback" not in text


async def test_an_expired_session_says_so_on_the_sign_in_page(world: World) -> None:
    world.client.session.cookie_jar.update_cookies({UI_SESSION_COOKIE: "no-such-session"})
    async with world.client.get("/credentials") as resp:
        assert str(resp.url.path) == "/sign-in"
        assert "Your session has expired. Sign in again." in await resp.text()
