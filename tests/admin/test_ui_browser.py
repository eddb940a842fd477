"""The web UI in a real browser (Debian's chromium, headless) against a real admin service and gateway: the words on
the pages are the contract. A user's whole credential life, an administrator's work, isolation, CSRF and escaping,
accessibility (axe-core) of every page, screenshots at two widths, and the keyboard-only secret flow."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, Locator, Page, expect
from playwright.async_api import Error as PlaywrightError

from tests.admin.browser import (
    DELETE,
    DESKTOP,
    PHONE,
    ROTATE,
    Site,
    action,
    browser,
    choose,
    chromium,
    close_secret_dialog,
    create_credential,
    delete_credential,
    eventually,
    no_dialogs,
    open_credential,
    open_page,
    read_key_pair,
    rotate_now,
    secret_dialog,
    set_field,
    sign_in,
    site,
    visit,
)
from tests.support import cli

__all__ = ["browser", "chromium", "site"]

pytestmark = pytest.mark.slow

SCREENSHOTS = Path(__file__).parent / "screenshots"
BLOCKING_IMPACTS = ("serious", "critical")


async def secret_is_gone(page: Page, secret: str) -> None:
    """Once closed, a secret is in no page: not this one, not after a reload, not one step back in history."""
    assert secret not in await page.content()
    await page.reload()
    assert secret not in await page.content()
    try:
        await page.go_back()
    except PlaywrightError as exc:  # the POST's answer was never cached (no-store): chromium shows its own error page
        assert "ERR_CACHE_MISS" in exc.message, exc.message
        await page.wait_for_url("chrome-error://**")
        await page.wait_for_load_state()
    assert secret not in await page.content()


async def test_a_user_creates_uses_rotates_and_deletes_a_key_pair(site: Site, browser: Browser) -> None:
    root_password = await site.user("root", admin=True)
    page = await open_page(browser, site)
    await sign_in(page, "alice", await site.user("alice"))
    await expect(page.get_by_role("heading", name="My credentials")).to_be_visible()

    client_id, secret = await create_credential(page, "deploy-bot")
    assert client_id.startswith("cgk_") and secret.startswith("cgs_")
    await expect(secret_dialog(page)).to_contain_text(site.gateway.url)  # the curl example
    status, seen = await site.call(client_id, secret)
    assert status == 200 and seen["X-Auth-User"] == "alice"
    await close_secret_dialog(page)
    await secret_is_gone(page, secret)

    await open_credential(page, "deploy-bot")
    detail = page.url
    await rotate_now(page)
    same_client_id, new_secret = await read_key_pair(page)
    assert same_client_id == client_id and new_secret != secret
    await close_secret_dialog(page)
    await eventually(site.answers(client_id, secret, 401))
    assert (await site.call(client_id, new_secret))[0] == 200
    await secret_is_gone(page, new_secret)

    await visit(page, detail)
    await delete_credential(page, "deploy-bot")
    await eventually(site.answers(client_id, new_secret, 401))

    audit = await open_page(browser, site)
    await sign_in(audit, "root", root_password)
    await visit(audit, "/audit")
    for event in ("credential.create", "credential.rotate", "credential.revoke"):
        row = audit.get_by_role("row").filter(has_text=event)
        await expect(row).to_have_count(1)
        await expect(row.get_by_role("cell").nth(1)).to_contain_text("alice")  # the Actor column


async def test_an_administrator_issues_api_accounts_moves_credentials_and_disables_users(site: Site,
                                                                                      browser: Browser) -> None:
    page = await open_page(browser, site)
    await sign_in(page, "root", await site.user("root", admin=True))
    await cli(site.env, "groups", "create", "billing")

    # an API account: a service account in a group and its key pair, in one step
    await visit(page, "/api-accounts/new")
    await page.get_by_label("Name of the account").fill("invoicer")
    await set_field(page, "Permission group", "billing")
    await page.get_by_role("button", name="Create account and key").click()
    client_id, secret = await read_key_pair(page)
    status, seen = await site.call(client_id, secret)
    assert status == 200 and seen["X-Auth-User"] == "invoicer"
    assert "billing" in seen["X-Auth-Groups"].split(",")
    await close_secret_dialog(page)

    # Edit → Owner: the gateway sees the new owner at once
    await site.user("alice")
    await site.user("bob")
    shared = await site.key_pair("alice", "shared-key")
    assert (await site.call(shared["client_id"], shared["secret"]))[1]["X-Auth-User"] == "alice"
    await visit(page, f"/credentials/{shared['id']}")
    await action(page, "Edit").click()
    await set_field(page, "Owner", "bob")
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.get_by_role("status")).to_contain_text("Changes saved")

    async def seen_as_bob() -> bool:
        status, seen = await site.call(shared["client_id"], shared["secret"])
        return status == 200 and seen["X-Auth-User"] == "bob"

    await eventually(seen_as_bob)

    # disabling bob suspends his credentials
    await visit(page, "/users")
    await page.get_by_role("link", name="bob", exact=True).click()
    await page.get_by_role("button", name="Disable", exact=True).click()
    await expect(page.get_by_role("status")).to_contain_text("User disabled")
    await visit(page, "/credentials")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name="shared-key", exact=True))
    await expect(row).to_contain_text("Suspended")
    await eventually(site.answers(shared["client_id"], shared["secret"], 401))


async def test_a_user_sees_only_their_own_and_forged_or_hostile_input_does_nothing(site: Site,
                                                                                 browser: Browser) -> None:
    await site.user("bob")
    bobs = await site.key_pair("bob", "bobs-key")
    page = await open_page(browser, site)
    await sign_in(page, "alice", await site.user("alice"))

    # another user's credential reads as missing, whatever the URL; one's own opens (the 404 is not a dead route)
    own = await site.key_pair("alice", "alices-key")
    for suffix in ("", "/edit"):
        await visit(page, f"/credentials/{own['id']}{suffix}")
        await visit(page, f"/credentials/{bobs['id']}{suffix}", status=404)
        await expect(page.get_by_role("heading", name="Not found")).to_be_visible()
        assert "bobs-key" not in await page.content()

    # a form posted without the session's CSRF token is refused, from outside the page or from inside it
    await visit(page, "/credentials/new")
    form = page.get_by_role("dialog", name="Create credential").locator("form")
    target = await form.get_attribute("action") or "/credentials/new"
    forged = await page.request.post(target, form={"name": "forged", "kind": "key"}, max_redirects=0)
    assert forged.status == 403, (target, forged.status)
    fetched = await page.evaluate("async () => (await fetch('/sign-out', {method: 'POST'})).status")
    assert fetched == 403
    await visit(page, "/credentials")  # still signed in, and nothing was created
    await expect(page.get_by_role("heading", name="My credentials")).to_be_visible()
    await expect(page.get_by_text("forged")).to_have_count(0)

    # markup in a name is text
    hostile = "<img src=x onerror=alert(1)>"
    with no_dialogs(page) as fired:
        await create_credential(page, hostile)
        await close_secret_dialog(page)
        await open_credential(page, hostile)
        await expect(page.get_by_text(hostile).first).to_be_visible()
        await visit(page, "/credentials")
        await expect(page.get_by_role("link", name=hostile, exact=True)).to_be_visible()
        assert await page.locator("img[src=x]").count() == 0
    assert fired == []


# --- every page: accessibility and screenshots ---------------------------------------------------------------

Stop = Callable[[str, Page], Awaitable[None]]


async def tour(site: Site, browser: Browser, at_stop: Stop) -> list[str]:
    """Every page of the UI, signed in as an administrator; at_stop(name, page) runs on each. Returns the pages
    that could not be reached, each with why (the tour goes on past them)."""
    root_password = await site.user("root", admin=True)
    await site.user("alice")
    await cli(site.env, "groups", "create", "billing")
    await cli(site.env, "groups", "add-member", "billing", "alice")
    page = await open_page(browser, site)
    missing: list[str] = []
    detail = ["/credentials"]

    async def stop(name: str, reach: Callable[[], Awaitable[Any]]) -> None:
        try:
            await reach()
        except (AssertionError, PlaywrightError) as exc:
            missing.append(f"{name} ({page.url}): {str(exc).strip().splitlines()[0]}")
            return
        await at_stop(name, page)

    async def create_dialog() -> None:
        await action(page, "Create credential").click()
        await expect(page.get_by_role("dialog", name="Create credential")).to_be_visible()

    async def secret() -> None:
        dialog = page.get_by_role("dialog", name="Create credential")
        await dialog.get_by_label("Name", exact=True).fill("tour-key")
        await choose(dialog, "Kind", "Key pair")
        await dialog.get_by_role("button", name="Create credential").click()
        await expect(secret_dialog(page)).to_be_visible()

    async def credential() -> None:
        if await secret_dialog(page).is_visible():
            await close_secret_dialog(page)
        await open_credential(page, "tour-key")
        detail[0] = page.url

    async def from_detail(control: str, shows: Callable[[], Locator]) -> None:
        await visit(page, detail[0])
        await action(page, control).click()
        await expect(shows()).to_be_visible()

    async def linked(listing: str, name: str) -> None:
        await visit(page, listing)
        await page.get_by_role("link", name=name, exact=True).click()
        await page.wait_for_url(f"**{listing}/{name}")

    await stop("sign-in", lambda: visit(page, "/sign-in"))
    await sign_in(page, "root", root_password)
    await stop("my-credentials", lambda: visit(page, "/credentials"))
    await stop("create-dialog", create_dialog)
    await stop("secret-dialog", secret)
    await stop("detail", credential)
    await stop("rotate", lambda: from_detail("Rotate secret", lambda: page.get_by_role("dialog", name=ROTATE)))
    await stop("edit", lambda: from_detail("Edit", lambda: page.get_by_label("Owner", exact=True)))
    await stop("delete", lambda: from_detail("Delete", lambda: page.get_by_role("dialog", name=DELETE)))
    await stop("users", lambda: visit(page, "/users"))
    await stop("user", lambda: linked("/users", "alice"))
    await stop("groups", lambda: visit(page, "/groups"))
    await stop("group", lambda: linked("/groups", "billing"))
    await stop("api-accounts", lambda: visit(page, "/api-accounts/new"))
    await stop("audit", lambda: visit(page, "/audit"))
    return missing


async def test_every_page_has_no_serious_accessibility_violation(site: Site, browser: Browser) -> None:
    axe = Axe()
    found: dict[str, list[str]] = {}
    checked: list[str] = []

    async def check(name: str, page: Page) -> None:
        results = await axe.run(page)
        checked.append(name)
        for violation in results.response["violations"]:
            if violation["impact"] in BLOCKING_IMPACTS:
                found.setdefault(name, []).extend(
                    f"{violation['id']} ({violation['impact']}): {node['html']}" for node in violation["nodes"])

    missing = await tour(site, browser, check)
    print("\naxe checked:", ", ".join(checked))
    for name, lines in found.items():
        print(f"axe {name}:", *lines, sep="\n  ")
    assert not missing, "pages not reached:\n" + "\n".join(missing)
    assert not found, found


async def test_screenshots_of_every_page_at_two_widths(site: Site, browser: Browser) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    taken: list[Path] = []

    async def shoot(name: str, page: Page) -> None:
        for viewport in (DESKTOP, PHONE):
            await page.set_viewport_size(viewport)
            path = SCREENSHOTS / f"{name}-{viewport['width']}.png"
            await page.screenshot(path=path, full_page=True)
            taken.append(path)
        await page.set_viewport_size(DESKTOP)

    missing = await tour(site, browser, shoot)
    print("\nscreenshots:", *(str(p.relative_to(Path.cwd())) for p in taken), sep="\n  ")
    assert not missing, "pages not reached:\n" + "\n".join(missing)


async def tab_to(page: Page, target: Locator, presses: int = 40) -> None:
    """Press Tab until `target` has the focus."""
    for _ in range(presses):
        if await target.evaluate("el => el === document.activeElement"):
            return
        await page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached {target}")


async def test_create_copy_close_with_the_keyboard_only(site: Site, browser: Browser) -> None:
    password = await site.user("alice")
    page = await open_page(browser, site)
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.admin.url)
    keys = page.keyboard
    await visit(page, "/sign-in")
    await tab_to(page, page.get_by_label("Username"))
    await keys.type("alice")
    await tab_to(page, page.get_by_label("Password"))
    await keys.type(password)
    await keys.press("Enter")
    await page.wait_for_url("**/credentials")

    await tab_to(page, action(page, "Create credential"))
    await keys.press("Enter")
    create = page.get_by_role("dialog", name="Create credential")
    await tab_to(page, create.get_by_label("Name", exact=True))
    await keys.type("keyboard-key")
    await tab_to(page, create.get_by_role("button", name="Create credential"))
    await keys.press("Enter")

    dialog = secret_dialog(page)
    await expect(dialog).to_be_visible()
    field = dialog.get_by_label(re.compile(r"^(Secret|Token)$"))
    secret = await field.input_value()
    copy = dialog.locator(f"button[data-copy='{await field.get_attribute('id')}']")
    await tab_to(page, copy)
    await keys.press("Enter")
    await expect(copy).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == secret
    copied = dialog.get_by_label("I have copied the secret")
    await tab_to(page, copied)
    await keys.press("Space")
    await expect(copied).to_be_checked()
    close = dialog.get_by_role("button", name="Close", exact=True)
    await tab_to(page, close)
    await keys.press("Enter")
    await expect(dialog).to_be_hidden()
    assert secret not in await page.content()
