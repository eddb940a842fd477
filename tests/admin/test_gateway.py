"""Changes made through the admin API as a real gateway process sees them: rotation with grace, disable and
enable, owner change and revoke, each felt within a second; and no secret in the gateway's log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.admin.world import World, world
from tests.support import GatewayProcess, Upstream, running_gateway, write_config

__all__ = ["world"]

PROPAGATION_SECONDS = 1.0


@pytest.fixture
async def gateway(env: dict[str, str], upstream: Upstream, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}])
    async with running_gateway(env, config, tmp_path) as gw:
        yield gw


async def through(gw: GatewayProcess, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/echo", headers=headers) as resp:
        body = await resp.json(content_type=None) if resp.status == 200 else None
        return resp.status, body


async def within(seconds: float, check: Callable[[], Any]) -> float:
    """Seconds until check() is true; fails when that takes longer than `seconds`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"not seen within {seconds}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_rotate_with_grace_at_the_gateway(world: World, gateway: GatewayProcess) -> None:
    issued = await world.credential("svc", name="grace")
    old = bearer(str(issued.token))
    assert (await through(gateway, old))[0] == 200  # now cached in the gateway
    path = f"/api/v1/credentials/{issued.credential['id']}/rotate"
    rotated = await world.call("POST", path, "root", {"grace_seconds": 2}, headers={"Idempotency-Key": "g-1"})
    retried = await world.call("POST", path, "root", {"grace_seconds": 2}, headers={"Idempotency-Key": "g-1"})
    assert rotated.status == retried.status == 200 and retried.body == rotated.body
    new = bearer(rotated.body["token"])
    assert (await through(gateway, new))[0] == 200  # the new secret works at once
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline - 0.3:  # the old one keeps working until the deadline...
        assert (await through(gateway, old))[0] == 200
        await asyncio.sleep(0.2)

    async def old_refused() -> bool:
        return (await through(gateway, old))[0] == 401

    await within(3.0, old_refused)  # ...and stops right after it
    assert (await through(gateway, new))[0] == 200


async def test_disable_suspends_every_credential_within_a_second(world: World, gateway: GatewayProcess) -> None:
    token = await world.credential("bob")
    key = await world.credential("bob", kind="key")
    presented = [bearer(str(token.token)), {"accessKey": str(key.client_id), "secretKey": str(key.secret)}]
    for headers in presented:
        assert (await through(gateway, headers))[0] == 200

    async def all_are(status: int) -> bool:
        statuses = [(await through(gateway, headers))[0] for headers in presented]
        return statuses == [status] * len(presented)

    assert (await world.call("POST", "/api/v1/users/bob/disable", "root")).status == 200
    await within(PROPAGATION_SECONDS, lambda: all_are(401))
    listed = await world.call("GET", "/api/v1/credentials?owner=bob", "root")
    assert {c["status"] for c in listed.body["items"]} == {"suspended"}
    assert (await world.call("POST", "/api/v1/users/bob/enable", "root")).status == 200
    await within(PROPAGATION_SECONDS, lambda: all_are(200))


async def test_revoke_and_owner_change_reach_the_gateway_within_a_second(world: World,
                                                                         gateway: GatewayProcess) -> None:
    issued = await world.credential("alice")
    headers = bearer(str(issued.token))
    status, body = await through(gateway, headers)
    assert status == 200 and body["headers"]["X-Auth-User"] == "alice"
    ident = issued.credential["id"]
    assert (await world.call("PATCH", f"/api/v1/credentials/{ident}", "root", {"owner": "bob"})).status == 200

    async def owned_by_bob() -> bool:
        status, body = await through(gateway, headers)
        return status == 200 and body["headers"]["X-Auth-User"] == "bob"

    await within(PROPAGATION_SECONDS, owned_by_bob)
    assert (await world.call("DELETE", f"/api/v1/credentials/{ident}", "root")).status == 204

    async def refused() -> bool:
        return (await through(gateway, headers))[0] == 401

    await within(PROPAGATION_SECONDS, refused)


async def test_no_secret_or_hash_in_the_gateway_log(world: World, gateway: GatewayProcess) -> None:
    made = await world.call("POST", "/api/v1/credentials", "root", {"kind": "key", "owner": "svc"})
    rotated = await world.call("POST", f"/api/v1/credentials/{made.body['id']}/rotate", "root", {})
    for secret_of in (made.body, rotated.body):
        headers = {"accessKey": secret_of["client_id"], "secretKey": secret_of["secret"]}
        await through(gateway, headers)
    async with world.pool.acquire() as conn:
        hashes = [h for row in await conn.fetch("SELECT secret_hash, previous_secret_hash FROM credentials")
                  for h in row if h]
    log = gateway.log()
    assert log  # the gateway did write its log
    for secret in [made.body["secret"], rotated.body["secret"], *world.tokens.values(), *hashes]:
        assert secret not in log
