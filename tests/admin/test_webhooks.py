"""Lifecycle events as webhooks: the outbox is written in the change's transaction, the expiry scan and the
rate-limit record fire once, and real admin processes deliver every event signed, once per idempotency id,
after a crash, with two replicas, and mark a hopeless delivery failed (API and metric)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from admin import lifecycle
from admin.webhooks import backoff
from gateway.core import outbox
from gateway.core.settings import SettingsError, load_settings
from gateway.core.store import Pool
from tests.admin.test_server import running_admin
from tests.admin.webhook_receiver import Receiver, verify
from tests.support import cli

SECRET = "whsec-test-" + "s" * 24
PASSWORD = "root-password-1234"
pytestmark = pytest.mark.timeout(30)


def hook_env(env: dict[str, str], url: str, **extra: str) -> dict[str, str]:
    return {**env, "CREDGATE_WEBHOOKS_URLS": url, "CREDGATE_WEBHOOKS_SECRET": SECRET,
            "CREDGATE_WEBHOOKS_TIMEOUT": "1", "CREDGATE_WEBHOOKS_RETRY_FOR": "60",
            "CREDGATE_WEBHOOKS_EXPIRY_SCAN_SECONDS": "0.5", **extra}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver(SECRET).start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
def make_credential(pool: Pool, env: dict[str, str]) -> Callable[..., Awaitable[str]]:
    settings = load_settings(None, env=env)
    hasher = lifecycle.secret_hasher(settings.argon2)

    async def make(owner: str = "alice", **kwargs: Any) -> str:
        if await pool.fetchval("SELECT count(*) FROM principals WHERE name = $1", owner) == 0:
            await lifecycle.create_principal(pool, lifecycle.cli_actor(), hasher, owner, admin=owner == "root",
                                             password=PASSWORD if owner == "root" else None)
        issued = await lifecycle.create_credential(pool, lifecycle.cli_actor(), hasher, settings.policy, owner=owner,
                                                   kind="token", name="ci", **kwargs)
        return str(issued.credential["id"])

    return make


async def events(pool: Pool) -> list[tuple[str, str, dict[str, Any]]]:
    rows = await pool.fetch("SELECT type, event_id, data FROM webhook_events ORDER BY id")
    return [(r["type"], str(r["event_id"]), r["data"]) for r in rows]


async def until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


# --- the outbox, in process ------------------------------------------------------------------------------


async def test_lifecycle_changes_write_their_events_in_the_same_transaction(
        pool: Pool, make_credential: Callable[..., Awaitable[str]], settings: Any) -> None:
    public_id = await make_credential()
    hasher = lifecycle.secret_hasher(settings.argon2)
    await lifecycle.rotate_credential(pool, lifecycle.cli_actor(), hasher, public_id)
    await lifecycle.revoke_credential(pool, lifecycle.cli_actor(), public_id)
    got = await events(pool)
    assert [t for t, _, _ in got] == ["credential.created", "credential.rotated", "credential.revoked"]
    data = got[0][2]
    assert data["credential"]["id"] == public_id and data["credential"]["owner"] == "alice"
    assert data["credential"]["kind"] == "token" and data["credential"]["name"] == "ci"
    assert data["actor"].startswith("cli:") and data["at"] and data["credential"]["expires_at"]
    with pytest.raises(RuntimeError):  # a change that rolls back takes its event with it
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO audit_events (actor, action, target_type, target) "
                               "VALUES ('psql', 'credential.revoke', 'credential', $1)", public_id)
            raise RuntimeError
    assert len(await events(pool)) == 3


async def test_exposure_and_owner_deletion_become_events(
        pool: Pool, make_credential: Callable[..., Awaitable[str]]) -> None:
    exposed = await make_credential()
    await pool.execute("INSERT INTO audit_events (actor, action, target_type, target, changes) VALUES "
                       "('leaks', 'credential.exposed', 'credential', $1, $2::text::jsonb)", exposed,
                       json.dumps({"url": "https://github.com/o/r/blob/x", "source": "github"}))
    owned = await make_credential(owner="bob")
    await lifecycle.delete_principal(pool, lifecycle.cli_actor(), "bob")
    got = [(t, d["credential"]["id"], d.get("url")) for t, _, d in await events(pool) if t != "credential.created"]
    assert got == [("credential.exposed", exposed, "https://github.com/o/r/blob/x"),
                   ("credential.revoked", owned, None)]


async def test_expiry_scan_fires_each_threshold_once(pool: Pool,
                                                     make_credential: Callable[..., Awaitable[str]]) -> None:
    public_id = await make_credential(expires_in_days=5)
    async with pool.acquire() as conn:
        for _ in range(2):
            await outbox.scan_expiry(conn)
        assert [(t, d.get("days")) for t, _, d in await events(pool)][1:] == [("credential.expiring", 7)]
        await conn.execute("UPDATE credentials SET expires_at = now() + interval '20 hours' WHERE public_id = $1",
                           public_id)
        await outbox.scan_expiry(conn)
        await conn.execute("UPDATE credentials SET expires_at = now() - interval '1 minute' WHERE public_id = $1",
                           public_id)
        for _ in range(2):
            await outbox.scan_expiry(conn)
    assert [(t, d.get("days")) for t, _, d in await events(pool)][2:] == [
        ("credential.expiring", 1), ("credential.expired", None)]
    async with pool.acquire() as conn, conn.transaction():  # cheap: both scans are ranges on the expiry index
        await conn.execute("SET LOCAL enable_seqscan = off")
        for sql, args in ((outbox.SCAN_EXPIRING, (list(outbox.EXPIRING_DAYS), 14)),
                          (outbox.SCAN_EXPIRED, (outbox.EXPIRED_LOOKBACK_DAYS,))):
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
            assert "credentials_expires_idx" in plan, plan


async def test_rate_limited_is_recorded_at_most_once_an_hour(
        pool: Pool, make_credential: Callable[..., Awaitable[str]]) -> None:
    await make_credential()
    cred_id = await pool.fetchval("SELECT id FROM credentials")
    async with pool.acquire() as conn:
        for _ in range(3):
            await outbox.record_rate_limited(conn, [cred_id, cred_id])
    assert [t for t, _, _ in await events(pool)].count("credential.rate_limited") == 1
    await pool.execute("UPDATE webhook_events SET fanned_out = true, created_at = now() - interval '31 days'")
    async with pool.acquire() as conn:
        await outbox.scan_expiry(conn)  # finished events are pruned after outbox.KEEP_DAYS
    assert await events(pool) == []


async def test_two_workers_never_claim_the_same_delivery(
        pool: Pool, make_credential: Callable[..., Awaitable[str]]) -> None:
    for _ in range(6):
        await make_credential()
    await pool.execute(outbox.FAN_OUT, ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"], 100)

    async def claim() -> list[int]:
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(outbox.CLAIM_DUE, 8, 30.0)
            await asyncio.sleep(0.2)  # both claims overlap
            return [r["id"] for r in rows]

    first, second = await asyncio.gather(claim(), claim())
    assert len(first) + len(second) == 12 and not set(first) & set(second)
    assert await pool.fetch(outbox.CLAIM_DUE, 8, 30.0) == []  # leased: nobody else posts them meanwhile


async def test_owner_url_gets_its_credentials_events_and_is_set_from_the_cli(
        env: dict[str, str], pool: Pool, make_credential: Callable[..., Awaitable[str]]) -> None:
    await make_credential(owner="bob")
    out = json.loads(await cli(env, "users", "set-webhook", "bob", "https://hooks.example/bob"))
    assert out == {"name": "bob", "webhook_url": "https://hooks.example/bob"}
    assert await pool.fetchval("SELECT count(*) FROM audit_events WHERE action = 'principal.webhook'") == 1
    await make_credential(owner="bob")
    await make_credential(owner="carol")
    await pool.execute(outbox.FAN_OUT, ["https://all.example/"], 100)
    rows = await pool.fetch("SELECT e.data -> 'credential' ->> 'owner' AS owner, d.url FROM webhook_deliveries d "
                            "JOIN webhook_events e ON e.id = d.event_id ORDER BY d.id")
    assert sorted((r["owner"], r["url"]) for r in rows) == [
        ("bob", "https://all.example/"), ("bob", "https://all.example/"), ("bob", "https://hooks.example/bob"),
        ("bob", "https://hooks.example/bob"), ("carol", "https://all.example/")]
    with pytest.raises(RuntimeError, match="http"):
        await cli(env, "users", "set-webhook", "bob", "ftp://nope")
    await cli(env, "users", "set-webhook", "bob", "none")
    assert await pool.fetchval("SELECT webhook_url FROM principals WHERE name = 'bob'") is None


def test_signature_verifies_as_documented() -> None:
    body = b'{"id":"x"}'
    now = int(time.time())
    header = outbox.signature(SECRET, now, body)
    assert verify(SECRET, header, body) and outbox.verify_signature(SECRET, header, body, now)
    assert not verify(SECRET, header, body + b" ")
    assert not verify("other", header, body)
    assert not verify(SECRET, outbox.signature(SECRET, now - 3600, body), body)  # a replay of an old one
    assert [backoff(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8] and backoff(50) == 600


@pytest.mark.parametrize(("extra", "problem"), [
    ({"CREDGATE_WEBHOOKS_URLS": "https://hooks.example/x"}, "webhooks.secret: required"),
    ({"CREDGATE_WEBHOOKS_URLS": "ftp://hooks.example/x", "CREDGATE_WEBHOOKS_SECRET": SECRET}, "webhooks.urls"),
    ({"CREDGATE_WEBHOOKS_RETRY_FOR": "0"}, "must be greater than 0"),
])
def test_settings_refuse_unusable_webhooks(env: dict[str, str], extra: dict[str, str], problem: str) -> None:
    with pytest.raises(SettingsError, match=problem):
        load_settings(None, env={**env, **extra})


# --- real admin processes ----------------------------------------------------------------------------------


async def test_failing_receiver_gets_every_event_once_signed(
        env: dict[str, str], tmp_path: Path, pool: Pool, receiver: Receiver, settings: Any,
        make_credential: Callable[..., Awaitable[str]]) -> None:
    receiver.fail_first = 2
    async with running_admin(hook_env(env, receiver.url), tmp_path) as admin:
        public_id = await make_credential()
        await lifecycle.revoke_credential(pool, lifecycle.cli_actor(), public_id)
        await make_credential(owner="bob", expires_in_days=3)
        await until(lambda: pool.fetchval("SELECT count(*) = 4 FROM webhook_events"), 10, "the expiry scan")
        want = {event_id for _, event_id, _ in await events(pool)}
        await until(lambda: asyncio.sleep(0, set(receiver.accepted_ids()) >= want), 15, "every event")
        await asyncio.sleep(1.5)  # anything delivered twice would show up by now
        async with aiohttp.ClientSession() as session, session.get(admin.metrics_url) as resp:
            metrics = await resp.text()
    assert sorted(receiver.accepted_ids()) == sorted(want) and receiver.bad_signatures == 0
    assert {e["type"] for e in receiver.accepted} == {"credential.created", "credential.revoked",
                                                      "credential.expiring"}
    assert all(n == 3 for n in receiver.attempts.values())
    assert 'credgate_webhook_deliveries_total{result="delivered"} 4.0' in metrics


async def test_killed_mid_delivery_still_delivers_after_restart(
        env: dict[str, str], tmp_path: Path, pool: Pool, receiver: Receiver,
        make_credential: Callable[..., Awaitable[str]]) -> None:
    receiver.hang_first = True
    run_env = hook_env(env, receiver.url)
    async with running_admin(run_env, tmp_path) as admin:
        await make_credential()
        await asyncio.wait_for(receiver.first_seen.wait(), 10)
        admin.process.kill()  # SIGKILL while the post is in flight: nothing recorded it
        await admin.process.wait()
    await make_credential(owner="bob")  # committed while no admin process runs at all
    want = {event_id for _, event_id, _ in await events(pool)}
    (tmp_path / "again").mkdir()
    async with running_admin(run_env, tmp_path / "again"):
        await until(lambda: asyncio.sleep(0, set(receiver.accepted_ids()) >= want), 15, "delivery after restart")
    assert sorted(receiver.accepted_ids()) == sorted(want)


async def test_two_replicas_never_deliver_one_event_twice(
        env: dict[str, str], tmp_path: Path, pool: Pool, receiver: Receiver,
        make_credential: Callable[..., Awaitable[str]]) -> None:
    receiver.delay = 0.2
    run_env = hook_env(env, receiver.url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running_admin(run_env, tmp_path / "a") as a, running_admin(run_env, tmp_path / "b") as b:
        for _ in range(8):
            await make_credential()
        want = {event_id for _, event_id, _ in await events(pool)}
        await until(lambda: asyncio.sleep(0, set(receiver.accepted_ids()) >= want), 15, "every event")
        await asyncio.sleep(1)
        leaders = [admin for admin in (a, b) if "this admin process delivers lifecycle events" in admin.log()]
    assert len(leaders) == 1
    assert sorted(receiver.accepted_ids()) == sorted(want)
    assert receiver.max_in_flight == 1 and all(n == 1 for n in receiver.attempts.values())


async def test_hopeless_delivery_is_marked_failed_and_listed(
        env: dict[str, str], tmp_path: Path, pool: Pool, receiver: Receiver,
        make_credential: Callable[..., Awaitable[str]]) -> None:
    receiver.always_fail = True
    await make_credential(owner="root")
    await pool.execute("DELETE FROM webhook_events")  # only the next event matters here
    async with running_admin(hook_env(env, receiver.url, CREDGATE_WEBHOOKS_RETRY_FOR="2"), tmp_path) as admin, \
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        await make_credential(owner="root")
        await until(lambda: pool.fetchval("SELECT count(*) = 1 FROM webhook_deliveries WHERE status = 'failed'"),
                    15, "the delivery to be marked failed")
        async with session.post(admin.url + "/api/v1/session",
                                json={"username": "root", "password": PASSWORD}) as resp:
            assert resp.status == 200
        async with session.get(admin.url + "/api/v1/webhooks/deliveries?status=failed") as resp:
            assert resp.status == 200
            listed = json.loads(await resp.text())["items"]
        async with session.get(admin.metrics_url) as resp:
            metrics = await resp.text()
    assert [(d["type"], d["status"], d["last_status"], d["url"]) for d in listed] == [
        ("credential.created", "failed", 500, receiver.url)]
    assert listed[0]["attempts"] >= 2 and "500" in listed[0]["last_error"]
    assert 'credgate_webhook_deliveries_total{result="failed"} 1.0' in metrics
    assert receiver.accepted == []
