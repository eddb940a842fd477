"""Real-browser fixtures for the web UI tests: Debian's chromium (installed when missing), started once per session
and driven over CDP by Playwright, a real gateway and admin service per test, and the page helpers the tests share."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Dialog, Locator, Page, ViewportSize, async_playwright, expect

from tests.admin.test_server import AdminProcess, running_admin
from tests.support import GatewayProcess, Upstream, cli, running_gateway, write_config

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_CHROMIUM = "apt-get install -y chromium"
# Headless on a machine whose network is closed: without the background-networking flags chromium keeps
# retrying refused connections (updates, sync, QUIC probes) and slows every page down.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
# Server-rendered pages on 127.0.0.1 answer in milliseconds: a missing element is a missing element, not a slow one.
ACTION_TIMEOUT_MS = 5000
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
SECRET_DIALOG = "Copy your secret now"
# the confirmation dialogs are titled with the credential's name: "Rotate the secret of X", "Delete X?"
ROTATE = re.compile(r"^Rotate")
DELETE = re.compile(r"^Delete")


# --- chromium: one per session ----------------------------------------------------------------------------


def ensure_chromium() -> Path:
    """Debian's chromium, installed with apt when it is missing and we are root; otherwise say how to get it."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0:
        pytest.fail(f"{CHROMIUM} is missing: run `sudo {INSTALL_CHROMIUM}` (the UI tests drive Debian's chromium)")
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = INSTALL_CHROMIUM.split()
    if subprocess.run(install, env=apt_env, check=False).returncode != 0:
        # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update"], env=apt_env, check=False)
        subprocess.run(install, env=apt_env, check=False)
    if not CHROMIUM.exists():
        pytest.fail(f"`{INSTALL_CHROMIUM}` did not install {CHROMIUM}; run it by hand and read its output")
    return CHROMIUM


@pytest.fixture(scope="session")
def chromium() -> Iterator[str]:
    """One headless chromium with a fresh profile for the whole session; yields its CDP WebSocket URL."""
    executable = ensure_chromium()
    profile = Path(tempfile.mkdtemp(prefix="credgate-chromium-"))
    log_path = profile.parent / f"{profile.name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(executable), *CHROMIUM_FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        # chromium writes the port it picked and the browser's CDP path to this file once it listens
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while len(lines := (port_file.read_text().split() if port_file.exists() else [])) < 2:
            assert process.poll() is None, f"chromium exited with {process.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"chromium did not listen within 30s:\n{log_path.read_text()}"
            time.sleep(0.05)
        yield f"ws://127.0.0.1:{lines[0]}{lines[1]}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)
        log_path.unlink(missing_ok=True)


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    """The session's chromium, connected on this test's event loop; contexts made here close with the test."""
    async with async_playwright() as playwright:
        connected = await playwright.chromium.connect_over_cdp(chromium)
        try:
            yield connected
        finally:
            await connected.close()  # closes this test's contexts and disconnects; chromium keeps running


# --- the services: a real gateway and admin service ---------------------------------------------------------


@dataclass
class Site:
    """A gateway and an admin service on 127.0.0.1, on this test's Postgres and Redis, in front of `upstream`."""

    env: dict[str, str]
    admin: AdminProcess
    gateway: GatewayProcess
    upstream: Upstream

    async def user(self, name: str, *, admin: bool = False) -> str:
        """Create a user with the CLI; returns their password."""
        created = json.loads(await cli(self.env, "users", "create", name, *(["--admin"] if admin else [])))
        if "password" in created:
            return str(created["password"])
        return str(json.loads(await cli(self.env, "users", "reset-password", name))["password"])

    async def key_pair(self, owner: str, name: str) -> dict[str, Any]:
        """A key pair made with the CLI: id, client_id and secret."""
        made: dict[str, Any] = json.loads(
            await cli(self.env, "credentials", "create", "--owner", owner, "--kind", "key", "--name", name))
        return made

    async def call(self, client_id: str, secret: str) -> tuple[int, dict[str, str]]:
        """A request through the gateway with a key pair: its status and the headers the upstream received."""
        headers = {"accessKey": client_id, "secretKey": secret}
        async with aiohttp.ClientSession() as session, session.get(self.gateway.url + "/echo",
                                                                   headers=headers) as resp:
            seen = (await resp.json())["headers"] if resp.status == 200 else {}
            return resp.status, seen

    def answers(self, client_id: str, secret: str, status: int) -> Callable[[], Awaitable[bool]]:
        """A check for `eventually`: the gateway answers this key pair with `status`."""

        async def check() -> bool:
            return (await self.call(client_id, secret))[0] == status

        return check


@pytest.fixture
async def site(env: dict[str, str], upstream: Upstream, tmp_path: Path) -> AsyncIterator[Site]:
    config = write_config(tmp_path / "gateway.toml", [{"prefix": "/", "upstream": upstream.url}])
    async with contextlib.AsyncExitStack() as stack:
        gateway = await stack.enter_async_context(running_gateway(env, config, tmp_path))
        # the secret dialog's curl example points at this gateway
        admin = await stack.enter_async_context(
            running_admin({**env, "CREDGATE_ADMIN_GATEWAY_URL": gateway.url}, tmp_path))
        yield Site(env, admin, gateway, upstream)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 1.0) -> None:
    """Wait until check() is true; fail when that takes longer than `seconds`."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"not true within {seconds}s"
        await asyncio.sleep(0.05)


# --- pages ------------------------------------------------------------------------------------------------


async def open_page(browser: Browser, site: Site, viewport: ViewportSize = DESKTOP) -> Page:
    """A page in a new context (its own cookies) whose relative URLs go to the admin service."""
    context = await browser.new_context(base_url=site.admin.url, viewport=viewport)
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    return await context.new_page()


async def visit(page: Page, path: str, status: int = 200) -> None:
    """GET a page and check its status (a missing page fails here at once, not after a locator's timeout)."""
    response = await page.goto(path)
    assert response is not None, path
    assert response.status == status, f"GET {path}: {response.status}, expected {status}"


async def sign_in(page: Page, name: str, password: str) -> None:
    await visit(page, "/sign-in")
    await page.get_by_label("Username").fill(name)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(lambda url: "/sign-in" not in url)


def action(scope: Page | Locator, name: str) -> Locator:
    """A control by its words, whether the page made it a link or a button."""
    return scope.get_by_role("link", name=name, exact=True).or_(
        scope.get_by_role("button", name=name, exact=True)).first


async def choose(scope: Page | Locator, field: str, option: str) -> None:
    """Pick `option` for `field`: a select labelled `field`, or a radio in a fieldset whose legend is `field`."""
    select = scope.get_by_role("combobox", name=field, exact=True)
    if await select.count():
        await select.select_option(label=option)
    else:
        await scope.get_by_role("group", name=field).get_by_role("radio", name=option).check()


async def set_field(scope: Page | Locator, field: str, value: str) -> None:
    """Fill a text field or pick a select's option, whichever the page made `field`."""
    control = scope.get_by_label(field, exact=True)
    if await control.evaluate("el => el.tagName") == "SELECT":
        await control.select_option(label=value)
    else:
        await control.fill(value)


def secret_dialog(page: Page) -> Locator:
    return page.get_by_role("dialog", name=SECRET_DIALOG)


async def read_key_pair(page: Page) -> tuple[str, str]:
    """The client ID and secret from the secret dialog's read-only fields."""
    dialog = secret_dialog(page)
    await expect(dialog).to_be_visible()
    client_id, secret = dialog.get_by_label("Client ID", exact=True), dialog.get_by_label("Secret", exact=True)
    for field in (client_id, secret):
        await expect(field).not_to_be_editable()
    return await client_id.input_value(), await secret.input_value()


async def close_secret_dialog(page: Page) -> None:
    """`Close` stays disabled until `I have copied the secret` is ticked."""
    dialog = secret_dialog(page)
    close = dialog.get_by_role("button", name="Close", exact=True)
    await expect(close).to_be_disabled()
    await dialog.get_by_label("I have copied the secret").check()
    await expect(close).to_be_enabled()
    async with page.expect_navigation():  # away from the one response that holds the secret
        await close.click()
    await expect(dialog).to_be_hidden()


async def create_credential(page: Page, name: str, kind: str = "Key pair") -> tuple[str, str]:
    """From My credentials: `Create credential`, Name, Kind, create; returns the dialog's client ID and secret."""
    await visit(page, "/credentials")
    await action(page, "Create credential").click()
    dialog = page.get_by_role("dialog", name="Create credential")
    await dialog.get_by_label("Name", exact=True).fill(name)
    await choose(dialog, "Kind", kind)
    await dialog.get_by_role("button", name="Create credential").click()
    return await read_key_pair(page)


async def open_credential(page: Page, name: str) -> None:
    """The credential's detail page, reached from My credentials by its name."""
    await visit(page, "/credentials")
    await page.get_by_role("link", name=name, exact=True).click()
    await page.wait_for_url(re.compile(r"/credentials/[^/?]+$"))


async def rotate_now(page: Page) -> None:
    """On a credential's page: `Rotate secret`, the old one stops `Now`; the secret dialog follows."""
    await action(page, "Rotate secret").click()
    dialog = page.get_by_role("dialog", name=ROTATE)
    await dialog.get_by_label("Now", exact=True).check()
    await dialog.get_by_role("button", name="Rotate secret").click()
    await expect(secret_dialog(page)).to_be_visible()


async def delete_credential(page: Page, name: str) -> None:
    """On a credential's page: `Delete`, type its name (the button waits for it), confirm."""
    await action(page, "Delete").click()
    dialog = page.get_by_role("dialog", name=DELETE)
    confirm = dialog.get_by_role("button", name="Delete credential")
    await expect(confirm).to_be_disabled()
    await dialog.get_by_role("textbox").fill(name)
    await confirm.click()
    await expect(page.get_by_role("status")).to_contain_text("Credential deleted")


@contextlib.contextmanager
def no_dialogs(page: Page) -> Iterator[list[str]]:
    """Collect every JavaScript dialog (alert, confirm, prompt) the page opens; each is dismissed."""
    fired: list[str] = []

    async def on_dialog(dialog: Dialog) -> None:
        fired.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    try:
        yield fired
    finally:
        page.remove_listener("dialog", on_dialog)
