"""Every wait on Postgres and Redis on the request path has a deadline: a frozen store (SIGSTOP: connections
are accepted, nothing answers) costs one deadline and a 503 (Postgres) or nothing visible (Redis), never a
hang. Gateway requests, the OAuth token endpoint and the admin API. Run with `pytest -s` to see the timings."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.admin.test_server import running_admin
from tests.gateway.test_faults import NO_ADDRESS_THROTTLE, assert_unavailable, listening
from tests.support import GatewayProcess, Upstream, cli, running_gateway, write_config
from tests.support_faults import PrivateStores, Reply, bearer, create_token, frozen, private_stores, timed_request

STORE_TIMEOUT = 1.0  # cache.store_timeout in these tests (default 1.5)
REDIS_TIMEOUT = 0.5  # cache.redis_timeout (the default)
ADMIN_STORE_TIMEOUT = 1.0  # admin.store_timeout in these tests (default 5)
# What a deadline may be overrun by: scheduling on two shared cores, the response itself.
SLACK = 0.5
# How long a request that answers from memory may take while a store is frozen: no store wait at all.
FROM_MEMORY = 0.5
# Seconds before giving up on an answer: well past every deadline, so that a hang fails as such.
HANG = 6.0
DEADLINES = {"CREDGATE_CACHE_STORE_TIMEOUT": str(STORE_TIMEOUT), "CREDGATE_CACHE_REDIS_TIMEOUT": str(REDIS_TIMEOUT)}


def gateway_for(stores: PrivateStores, tmp_path: Path,
                upstream: Upstream) -> contextlib.AbstractAsyncContextManager[GatewayProcess]:
    """One worker (the store is marked down per process) with this file's deadlines."""
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}], extra=NO_ADDRESS_THROTTLE)
    return running_gateway(stores.env, config, tmp_path, extra_env=DEADLINES)


async def get(gw: GatewayProcess, token: str) -> tuple[Reply, float]:
    reply, took = await timed_request("GET", gw.url + "/x", bearer(token), limit=HANG)
    assert reply is not None, f"no answer within {HANG}s"
    return reply, took


async def cached_answers_at_once(gw: GatewayProcess, credential: dict[str, Any], times: int = 3) -> list[float]:
    """A credential this worker has verified answers 200 without waiting on the frozen store."""
    took = []
    for _ in range(times):
        reply, seconds = await get(gw, credential["token"])
        assert reply.status == 200, (reply.status, reply.body)
        assert reply.json()["headers"]["X-Auth-Credential-Id"] == credential["id"]
        assert seconds < FROM_MEMORY, f"a cached credential took {seconds:.2f}s"
        took.append(round(seconds, 3))
    return took


@pytest.mark.slow
async def test_frozen_postgres_a_never_seen_credential_is_503_within_store_timeout(
        tmp_path: Path, upstream: Upstream) -> None:
    async with private_stores(tmp_path) as stores:
        cached = await create_token(stores.env, "svc")
        first = await create_token(stores.env, "svc", create_owner=False)
        second = await create_token(stores.env, "svc", create_owner=False)
        async with gateway_for(stores, tmp_path, upstream) as gw:
            await listening(gw)
            assert (await get(gw, cached["token"]))[0].status == 200
            forwarded = len(upstream.seen)
            with frozen(stores.postgres):
                waiting = asyncio.create_task(get(gw, first["token"]))
                await asyncio.sleep(0.2)
                meanwhile = await cached_answers_at_once(gw, cached)  # while the first one waits on the store
                reply, first_took = await waiting
                assert_unavailable(reply)
                assert first_took < STORE_TIMEOUT + SLACK, f"the first never-seen credential took {first_took:.2f}s"
                # The store is down for this process now: the next one does not wait the deadline again.
                reply, second_took = await get(gw, second["token"])
                assert_unavailable(reply)
                assert second_took < STORE_TIMEOUT / 2, f"the second never-seen credential took {second_took:.2f}s"
                after = await cached_answers_at_once(gw, cached)
                assert len(upstream.seen) == forwarded + len(meanwhile) + len(after)  # nothing unverified went on
        print(f"\nfrozen Postgres, store_timeout {STORE_TIMEOUT}s: first never-seen 503 in {first_took:.3f}s, "
              f"second in {second_took:.3f}s; cached 200 in {meanwhile} (meanwhile), {after} (after)")


@pytest.mark.slow
async def test_frozen_redis_a_never_seen_credential_still_verifies(tmp_path: Path, upstream: Upstream) -> None:
    async with private_stores(tmp_path) as stores:
        cached = await create_token(stores.env, "svc")
        first = await create_token(stores.env, "svc", create_owner=False)
        second = await create_token(stores.env, "svc", create_owner=False)
        async with gateway_for(stores, tmp_path, upstream) as gw:
            await listening(gw)
            assert (await get(gw, cached["token"]))[0].status == 200
            took: dict[str, float] = {}
            with frozen(stores.redis):
                waiting = asyncio.create_task(get(gw, first["token"]))
                await asyncio.sleep(0.1)
                meanwhile = await cached_answers_at_once(gw, cached)
                for name, credential, pending in (("first", first, waiting), ("second", second, None)):
                    reply, took[name] = await (pending or get(gw, credential["token"]))
                    assert reply.status == 200, (name, reply.status, reply.body)  # memory and Postgres suffice
                    assert reply.json()["headers"]["X-Auth-Credential-Id"] == credential["id"]
                    assert took[name] < 2.0, f"the {name} never-seen credential took {took[name]:.2f}s"
                after = await cached_answers_at_once(gw, cached)
        print(f"\nfrozen Redis, redis_timeout {REDIS_TIMEOUT}s: never-seen 200 in {took['first']:.3f}s, then "
              f"{took['second']:.3f}s; cached 200 in {meanwhile} (meanwhile), {after} (after)")


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode(),
            "Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.slow
async def test_frozen_postgres_the_token_endpoint_is_503_within_store_timeout(
        tmp_path: Path, upstream: Upstream) -> None:
    async with private_stores(tmp_path) as stores:
        await cli(stores.env, "users", "create", "svc", "--service")
        key = json.loads(await cli(stores.env, "credentials", "create", "--owner", "svc", "--kind", "key"))
        async with gateway_for(stores, tmp_path, upstream) as gw:
            await listening(gw)
            with frozen(stores.postgres):
                reply, took = await timed_request("POST", gw.url + "/oauth/token", basic(key["client_id"],
                                                  key["secret"]), "grant_type=client_credentials", limit=HANG)
            assert reply is not None, f"no answer within {HANG}s"
            assert reply.status == 503, (reply.status, reply.body)
            assert reply.json()["error"] == "temporarily_unavailable"
            assert int(reply.headers["Retry-After"]) >= 1
            assert took < STORE_TIMEOUT + SLACK, f"the token endpoint took {took:.2f}s"
        print(f"\nfrozen Postgres, store_timeout {STORE_TIMEOUT}s: token endpoint 503 in {took:.3f}s")


async def admin_call(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[Reply, float]:
    started = time.monotonic()
    try:
        async with asyncio.timeout(HANG), session.request(method, url, **kwargs) as resp:
            reply = Reply(resp.status, dict(resp.headers), await resp.read())
    except TimeoutError:
        raise AssertionError(f"{method} {url}: no answer within {HANG}s") from None
    return reply, time.monotonic() - started


@pytest.mark.slow
async def test_frozen_postgres_the_admin_api_is_503_within_its_deadline(tmp_path: Path) -> None:
    async with private_stores(tmp_path) as stores:
        root = json.loads(await cli(stores.env, "users", "create", "root", "--admin"))
        env = {**stores.env, "CREDGATE_ADMIN_STORE_TIMEOUT": str(ADMIN_STORE_TIMEOUT)}
        # unsafe=True: the jar otherwise ignores cookies from an IP address such as 127.0.0.1
        async with running_admin(env, tmp_path) as admin, aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            api = admin.url + "/api/v1"
            login, _ = await admin_call(session, "POST", api + "/session",
                                        json={"username": "root", "password": root["password"]})
            assert login.status == 200, login.body
            csrf = {"X-CSRF-Token": login.json()["csrf_token"]}
            assert (await admin_call(session, "GET", api + "/credentials"))[0].status == 200
            # the web UI too: signed in through its form before the freeze
            form_page, _ = await admin_call(session, "GET", admin.url + "/sign-in")
            token = re.search(rb'name="csrf_token" value="([^"]+)"', form_page.body)
            assert token is not None
            signed_in, _ = await admin_call(session, "POST", admin.url + "/sign-in", allow_redirects=False, data={
                "username": "root", "password": root["password"], "csrf_token": token.group(1).decode()})
            assert signed_in.status == 303, signed_in.body
            took: dict[str, float] = {}
            with frozen(stores.postgres):
                for name, method, path, kwargs in (
                        ("list", "GET", "/credentials", {}),
                        ("create", "POST", "/credentials", {"json": {"kind": "token"}, "headers": csrf})):
                    reply, took[name] = await admin_call(session, method, api + path, **kwargs)
                    assert reply.status == 503, (name, reply.status, reply.body)
                    assert reply.headers["Content-Type"].startswith("application/json")
                    assert reply.json()["error"] == "unavailable"
                    assert int(reply.headers["Retry-After"]) >= 1
                    assert took[name] < ADMIN_STORE_TIMEOUT + SLACK, f"{name} took {took[name]:.2f}s"
                page, took["page"] = await admin_call(session, "GET", admin.url + "/credentials")
                assert page.status == 503 and page.headers["Content-Type"].startswith("text/html")
                assert b"did not answer in time" in page.body and int(page.headers["Retry-After"]) >= 1
                assert took["page"] < ADMIN_STORE_TIMEOUT + SLACK, f"the page took {took['page']:.2f}s"
        print(f"\nfrozen Postgres, admin.store_timeout {ADMIN_STORE_TIMEOUT}s: admin API 503 in "
              + ", ".join(f"{name} {seconds:.3f}s" for name, seconds in took.items()))
