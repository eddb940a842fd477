"""OAuth2 client credentials end to end: a real gateway process, Postgres, Redis, an upstream, and authlib."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import warnings
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import authlib.deprecate  # noqa: F401  (its warning filter must be installed before ours, below)
import pytest

with warnings.catch_warnings():
    # authlib prefers the httpx2 package and warns when it finds httpx, which is what is installed here
    # (authlib.deprecate, imported first, installs its own "always" filter that this one must follow)
    warnings.filterwarnings("ignore", "The httpx module is deprecated")
    from authlib.integrations.httpx_client import AsyncOAuth2Client
from admin import lifecycle
from gateway.auth import Authenticator
from gateway.core import hashing, store
from gateway.core.formats import client_id_for, generate_key_secret, new_public_id
from gateway.core.settings import Settings
from gateway.denylist import TokenDenylist
from gateway.grants import AccessTokenVerifier, Grant
from gateway.headers import make_policy
from gateway.http.exchange import Exchange, Note, Respond
from gateway.lookup import CredentialLookup
from gateway.memory import MemoryCache
from gateway.oauth import (
    FORM_LIMIT,
    METADATA_PATH,
    OAuthEndpoints,
    OAuthError,
    client_from_request,
    parse_form,
    parse_scope,
)
from gateway.redis_tier import RedisTier
from gateway.throttle import FailureThrottle
from gateway.tokens import SigningKeys
from tests.conftest import TEST_SECRET_KEY
from tests.support import GatewayProcess, Upstream, cli, running_gateway, write_config

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def gateway_config(upstream: Upstream, path: Path, extra: str = "") -> Path:
    return write_config(path, [
        {"prefix": "/", "upstream": upstream.url},
        {"prefix": "/finance", "upstream": upstream.url, "groups": ["finance"]},
        {"prefix": "/ops", "upstream": upstream.url, "groups": ["ops"]},
    ], extra=extra)


@pytest.fixture
def config(upstream: Upstream, tmp_path: Path) -> Path:
    return gateway_config(upstream, tmp_path / "gw.toml")


@pytest.fixture
async def gateway(env: dict[str, str], config: Path, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    async with running_gateway(env, config, tmp_path) as gw:
        yield gw


@pytest.fixture
async def creds(env: dict[str, str]) -> dict[str, Any]:
    await cli(env, "groups", "create", "finance")
    await cli(env, "groups", "create", "ops")
    await cli(env, "users", "create", "svc", "--service", "--group", "finance", "--group", "ops")
    await cli(env, "users", "create", "other", "--service", "--group", "finance")
    key = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "key", "--name", "ci"))
    other = json.loads(await cli(env, "credentials", "create", "--owner", "other", "--kind", "key"))
    token = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "token"))
    return {"key": key, "other": other, "token": token}


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(gw: GatewayProcess, method: str, path: str, headers: Mapping[str, str] | None = None,
               body: bytes | str | None = None) -> tuple[int, Any, Any]:
    data = body.encode() if isinstance(body, str) else body
    async with aiohttp.ClientSession() as session, session.request(
            method, gw.url + path, headers=dict(headers or {}), data=data) as resp:
        raw = await resp.read()
        try:
            parsed = json.loads(raw) if raw else raw
        except ValueError:
            parsed = raw
        return resp.status, resp.headers.copy(), parsed


async def fetch_token(gw: GatewayProcess, key: Mapping[str, str], scope: str | None = None) -> dict[str, Any]:
    body = "grant_type=client_credentials" + (f"&scope={scope}" if scope else "")
    status, _, answer = await call(gw, "POST", "/oauth/token", {**FORM, **basic(key["client_id"], key["secret"])},
                                   body)
    assert status == 200, answer
    return dict(answer)


async def every_worker(gw: GatewayProcess, token: str, status: int, workers: int, deadline: float) -> float:
    """Poll with fresh connections (SO_REUSEPORT spreads them) until `workers` distinct workers answered
    `status` for this token; the seconds it took."""
    started = time.monotonic()
    answered: set[str] = set()
    while time.monotonic() - started < deadline:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            results = await asyncio.gather(*(s.get(gw.url + "/x", headers=bearer(token)) for _ in range(16)))
            for resp in results:
                if resp.status == status:
                    answered.add(resp.headers.get("X-Credgate-Worker", "?"))
                resp.release()
        if len(answered) >= workers:
            return time.monotonic() - started
    raise AssertionError(f"only workers {sorted(answered)} answered {status} within {deadline}s")


def assert_no_store(headers: Any) -> None:
    assert headers["Cache-Control"] == "no-store" and headers["Pragma"] == "no-cache"


# --- the full flow, driven by authlib ----------------------------------------------------------------------------


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_authlib_client_credentials_flow(gateway: GatewayProcess, upstream: Upstream, creds: dict[str, Any],
                                               auth_method: str) -> None:
    key = creds["key"]
    async with AsyncOAuth2Client(key["client_id"], key["secret"], token_endpoint_auth_method=auth_method,
                                 scope="finance") as client:
        token = await client.fetch_token(gateway.url + "/oauth/token", grant_type="client_credentials")
        assert token["token_type"] == "Bearer" and token["expires_in"] == 3600 and token["scope"] == "finance"
        assert "refresh_token" not in token and token["access_token"].startswith("cga_")
        resp = await client.get(gateway.url + "/finance/report", headers={"X-Auth-Scope": "ops"})
        assert resp.status_code == 200
        seen = {k.lower(): v for k, v in resp.json()["headers"].items()}
        assert seen["x-auth-user"] == "svc" and seen["x-auth-groups"] == "finance"
        assert seen["x-auth-scope"] == "finance" and seen["x-auth-method"] == "oauth"
        assert seen["x-auth-credential-id"] == key["id"] and seen["x-auth-credential-name"] == "ci"
        assert "authorization" not in seen
        resp = await client.get(gateway.url + "/ops/report")  # the owner is in ops, the token is not
        assert resp.status_code == 403 and resp.json()["error"] == "insufficient_scope"

        introspected = (await client.introspect_token(gateway.url + "/oauth/introspect",
                                                      token=token["access_token"])).json()
        assert introspected["active"] is True and introspected["scope"] == "finance"
        assert introspected["client_id"] == key["client_id"] and introspected["username"] == "svc"
        assert introspected["token_type"] == "Bearer" and introspected["iss"] == gateway.url
        assert introspected["exp"] - introspected["iat"] == 3600
        revoked = await client.revoke_token(gateway.url + "/oauth/revoke", token=token["access_token"])
        assert revoked.status_code == 200
        resp = await client.get(gateway.url + "/finance/report")
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="credgate", error="invalid_token"')
        introspected = (await client.introspect_token(gateway.url + "/oauth/introspect",
                                                      token=token["access_token"])).json()
        assert introspected == {"active": False}
    assert upstream.seen and all(b"cga_" not in value for r in upstream.seen for _, value in r["headers"])


async def test_token_response(gateway: GatewayProcess, creds: dict[str, Any]) -> None:
    key = creds["key"]
    status, headers, answer = await call(gateway, "POST", "/oauth/token", FORM,
                                         f"grant_type=client_credentials&client_id={key['client_id']}"
                                         f"&client_secret={key['secret']}&scope=")  # empty scope: as omitted
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert_no_store(headers)
    assert set(answer) == {"access_token", "token_type", "expires_in", "scope"}
    assert answer["scope"] == "finance ops" and answer["token_type"] == "Bearer"
    status, _, echoed = await call(gateway, "GET", "/x", bearer(answer["access_token"]))
    assert status == 200 and echoed["headers"]["X-Auth-Groups"] == "finance,ops"
    assert echoed["headers"]["X-Auth-Scope"] == "finance ops"
    # RFC 6749 §2.3.1: the Basic user name and password are form-urlencoded first (a no-op for our alphabet)
    encoded = {k: v.replace("_", "%5F") for k, v in key.items() if k in ("client_id", "secret")}
    answer = await fetch_token(gateway, encoded)
    assert answer["access_token"].startswith("cga_")


WRONG_SECRET = generate_key_secret()  # well-formed, so it costs an argon2 verification to refuse


def error_cases(key: Mapping[str, str], other: Mapping[str, str], token: str) -> list[tuple[str, str, dict[str, str],
                                                                                        str, int, str]]:
    good = basic(key["client_id"], key["secret"])
    post = f"client_id={key['client_id']}&client_secret={key['secret']}"
    grant = "grant_type=client_credentials"
    return [
        ("GET", "GET", good, "", 400, "invalid_request"),
        ("json body", "POST", {**good, "Content-Type": "application/json"}, '{"grant_type":"client_credentials"}',
         400, "invalid_request"),
        ("no grant_type", "POST", {**FORM, **good}, "scope=finance", 400, "invalid_request"),
        ("repeated grant_type", "POST", {**FORM, **good}, f"{grant}&{grant}", 400, "invalid_request"),
        ("repeated scope", "POST", {**FORM, **good}, f"{grant}&scope=ops&scope=ops", 400, "invalid_request"),
        ("malformed form", "POST", {**FORM, **good}, f"{grant}&scope", 400, "invalid_request"),
        ("basic and post", "POST", {**FORM, **good}, f"{grant}&{post}", 400, "invalid_request"),
        ("other grant", "POST", {**FORM, **good}, "grant_type=password", 400, "unsupported_grant_type"),
        ("scope beyond groups", "POST", {**FORM, **good}, f"{grant}&scope=finance+admin", 400, "invalid_scope"),
        ("wrong secret, basic", "POST", {**FORM, **basic(key["client_id"], WRONG_SECRET)}, grant, 401,
         "invalid_client"),
        ("wrong secret, post", "POST", FORM, f"{grant}&client_id={key['client_id']}&client_secret={WRONG_SECRET}",
         401, "invalid_client"),
        ("another client's secret", "POST", {**FORM, **basic(key["client_id"], other["secret"])}, grant, 401,
         "invalid_client"),
        ("unknown client", "POST", {**FORM, **basic("cgk_" + "A" * 18, key["secret"])}, grant, 401,
         "invalid_client"),
        ("malformed basic", "POST", {**FORM, "Authorization": "Basic !!!"}, grant, 401, "invalid_client"),
        ("no client auth", "POST", FORM, grant, 401, "invalid_client"),
        ("client_id only", "POST", FORM, f"{grant}&client_id={key['client_id']}", 401, "invalid_client"),
        ("bearer credential", "POST", {**FORM, **bearer(token)}, grant, 401, "invalid_client"),
    ]


async def test_token_endpoint_errors(gateway: GatewayProcess, creds: dict[str, Any]) -> None:
    for name, method, headers, body, status, error in error_cases(creds["key"], creds["other"],
                                                                   creds["token"]["token"]):
        got, answer_headers, answer = await call(gateway, method, "/oauth/token", headers, body)
        assert (got, answer.get("error") if isinstance(answer, dict) else answer) == (status, error), name
        assert set(answer) == {"error", "error_description"}, name
        assert_no_store(answer_headers)
        assert answer_headers["Content-Type"].startswith("application/json"), name
        challenges = answer_headers.getall("WWW-Authenticate", [])
        assert challenges == (['Basic realm="credgate", charset="UTF-8"'] if status == 401 else []), name
        if method == "GET":
            assert answer_headers["Allow"] == "POST"
    got, _, _ = await call(gateway, "POST", "/oauth/token", FORM, "grant_type=client_credentials&x=" +
                           "a" * FORM_LIMIT)
    assert got == 413


async def test_expired_or_suspended_client(gateway: GatewayProcess, creds: dict[str, Any], database_url: str,
                                           env: dict[str, str]) -> None:
    import asyncpg

    key = creds["key"]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE credentials SET expires_at = now() - interval '1 minute' WHERE public_id = $1",
                           key["id"])
        await asyncio.sleep(0.3)  # the NOTIFY evicts the cached record
        status, headers, answer = await call(gateway, "POST", "/oauth/token", {**FORM, **basic(key["client_id"],
                                             key["secret"])}, "grant_type=client_credentials")
        assert status == 401 and answer["error"] == "invalid_client" and "expired" in answer["error_description"]
        assert headers["WWW-Authenticate"].startswith("Basic ")
    finally:
        await conn.close()
    other = creds["other"]
    await cli(env, "users", "disable", "other")
    status, _, answer = await call(gateway, "POST", "/oauth/token", {**FORM, **basic(other["client_id"],
                                   other["secret"])}, "grant_type=client_credentials")
    assert status == 401 and "suspended" in answer["error_description"]


async def test_token_endpoint_shares_the_failure_throttle(env: dict[str, str], upstream: Upstream, tmp_path: Path,
                                                         creds: dict[str, Any]) -> None:
    config = gateway_config(upstream, tmp_path / "throttled.toml",
                            "[throttle]\nmax_failures = 3\nper_address_max_failures = 1000\n")
    key = creds["key"]
    async with running_gateway(env, config, tmp_path) as gw:
        statuses = []
        for _ in range(5):
            status, headers, answer = await call(gw, "POST", "/oauth/token",
                                                 {**FORM, **basic(key["client_id"], WRONG_SECRET)},
                                                 "grant_type=client_credentials")
            statuses.append(status)
        assert statuses[:3] == [401] * 3 and statuses[3:] == [429, 429]
        assert int(headers["Retry-After"]) >= 1 and answer["error"] == "too_many_requests"
        # the proxy path counts against the same client id
        status, _, _ = await call(gw, "GET", "/x", {"accessKey": key["client_id"], "secretKey": key["secret"]})
        assert status == 429


# --- lifetimes and revocation -----------------------------------------------------------------------------------


async def test_short_lived_token_expires(env: dict[str, str], config: Path, tmp_path: Path,
                                         creds: dict[str, Any]) -> None:
    async with running_gateway(env, config, tmp_path, extra_env={"CREDGATE_OAUTH_ACCESS_TOKEN_TTL": "2"}) as gw:
        answer = await fetch_token(gw, creds["key"])
        assert answer["expires_in"] == 2
        assert (await call(gw, "GET", "/x", bearer(answer["access_token"])))[0] == 200
        await asyncio.sleep(2.1)
        status, headers, body = await call(gw, "GET", "/x", bearer(answer["access_token"]))
        assert status == 401 and body == {"error": "invalid_token", "error_description": "the access token has expired"}
        assert headers["WWW-Authenticate"] == ('Bearer realm="credgate", error="invalid_token", '
                                               'error_description="the access token has expired"')
        _, _, introspected = await call(gw, "POST", "/oauth/introspect", {**FORM, **basic(
            creds["key"]["client_id"], creds["key"]["secret"])}, "token=" + answer["access_token"])
        assert introspected == {"active": False}


@pytest.mark.slow
async def test_revoking_the_credential_rejects_its_tokens_on_every_worker(
        env: dict[str, str], config: Path, tmp_path: Path, creds: dict[str, Any]) -> None:
    async with running_gateway(env, config, tmp_path, workers=2,
                               extra_env={"CREDGATE_DEBUG_WORKER_HEADER": "1"}) as gw:
        tokens = [(await fetch_token(gw, creds["key"]))["access_token"] for _ in range(2)]
        for token in tokens:
            await every_worker(gw, token, 200, 2, 20)
        await cli(env, "credentials", "revoke", creds["key"]["id"])
        lag = await every_worker(gw, tokens[0], 401, 2, 1.0)
        await every_worker(gw, tokens[1], 401, 2, 1.0)
        print(f"\ncredential revocation reached the tokens on both workers in {lag * 1000:.0f} ms")


async def test_rotating_the_secret_rejects_outstanding_tokens(gateway: GatewayProcess, creds: dict[str, Any],
                                                              env: dict[str, str]) -> None:
    key = creds["key"]
    old_token = (await fetch_token(gateway, key))["access_token"]
    assert (await call(gateway, "GET", "/x", bearer(old_token)))[0] == 200
    rotated = json.loads(await cli(env, "credentials", "rotate", key["id"], "--grace", "60"))
    for _ in range(100):
        if (await call(gateway, "GET", "/x", bearer(old_token)))[0] == 401:
            break
        await asyncio.sleep(0.01)
    assert (await call(gateway, "GET", "/x", bearer(old_token)))[0] == 401
    # within the grace period the old secret still gets tokens, but none outliving the grace
    grace = await fetch_token(gateway, key)
    assert 55 <= grace["expires_in"] <= 60
    fresh = await fetch_token(gateway, {"client_id": key["client_id"], "secret": rotated["secret"]})
    assert fresh["expires_in"] == 3600
    for token in (grace["access_token"], fresh["access_token"]):
        assert (await call(gateway, "GET", "/x", bearer(token)))[0] == 200


@pytest.mark.slow
async def test_revoking_one_token_leaves_the_others(env: dict[str, str], config: Path, tmp_path: Path,
                                                    creds: dict[str, Any]) -> None:
    key, other = creds["key"], creds["other"]
    client = {**FORM, **basic(key["client_id"], key["secret"])}
    async with running_gateway(env, config, tmp_path, workers=2,
                               extra_env={"CREDGATE_DEBUG_WORKER_HEADER": "1"}) as gw:
        first, second = [(await fetch_token(gw, key))["access_token"] for _ in range(2)]
        others = (await fetch_token(gw, other))["access_token"]
        for token in (first, second):
            await every_worker(gw, token, 200, 2, 20)

        # another client can neither revoke nor introspect this client's token
        other_client = {**FORM, **basic(other["client_id"], other["secret"])}
        status, _, body = await call(gw, "POST", "/oauth/revoke", other_client, "token=" + first)
        assert status == 200 and body == b""
        assert (await call(gw, "POST", "/oauth/introspect", other_client, "token=" + first))[2] == {"active": False}
        await every_worker(gw, first, 200, 2, 5)

        status, headers, body = await call(gw, "POST", "/oauth/revoke", client,
                                           f"token={first}&token_type_hint=access_token")
        assert status == 200 and body == b""
        assert_no_store(headers)
        lag = await every_worker(gw, first, 401, 2, 1.0)
        await every_worker(gw, second, 200, 2, 5)
        await every_worker(gw, others, 200, 2, 5)
        print(f"\nsingle-token revocation reached both workers in {lag * 1000:.0f} ms")

        # RFC 7009 §2.2: an unknown or already revoked token is not an error
        for unknown in ("cga_" + "A" * 140, "nonsense", first):
            status, _, body = await call(gw, "POST", "/oauth/revoke", client, "token=" + unknown)
            assert status == 200 and body == b"", unknown
        status, _, body = await call(gw, "POST", "/oauth/revoke", client, "token=" + creds["token"]["token"])
        assert status == 400 and body["error"] == "unsupported_token_type"
        status, _, body = await call(gw, "POST", "/oauth/revoke", client, "")
        assert status == 400 and body["error"] == "invalid_request"
        status, headers, body = await call(gw, "POST", "/oauth/revoke", FORM, "token=" + second)
        assert status == 401 and body["error"] == "invalid_client" and headers["WWW-Authenticate"].startswith("Basic")
        await every_worker(gw, second, 200, 2, 5)


async def test_introspection(gateway: GatewayProcess, creds: dict[str, Any]) -> None:
    key = creds["key"]
    client = {**FORM, **basic(key["client_id"], key["secret"])}
    token = (await fetch_token(gateway, key, scope="ops"))["access_token"]
    status, headers, answer = await call(gateway, "POST", "/oauth/introspect", client, "token=" + token)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert_no_store(headers)
    assert answer["active"] is True and answer["scope"] == "ops" and answer["sub"] == key["client_id"]
    assert len(answer["jti"]) == 32 and answer["exp"] > time.time()
    for inactive in ("cga_" + "A" * 140, token[:-3], creds["token"]["token"]):
        status, _, answer = await call(gateway, "POST", "/oauth/introspect", client, "token=" + inactive)
        assert (status, answer) == (200, {"active": False}), inactive
    status, _, answer = await call(gateway, "POST", "/oauth/introspect", client, "token_type_hint=access_token")
    assert status == 400 and answer["error"] == "invalid_request"
    status, headers, answer = await call(gateway, "POST", "/oauth/introspect", FORM, "token=" + token)
    assert status == 401 and answer["error"] == "invalid_client"


# --- discovery and signing keys ---------------------------------------------------------------------------------


async def test_discovery_document(gateway: GatewayProcess) -> None:
    status, headers, doc = await call(gateway, "GET", METADATA_PATH)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    base = gateway.url
    assert doc == {
        "issuer": base,
        "token_endpoint": base + "/oauth/token",
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "revocation_endpoint": base + "/oauth/revoke",
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "introspection_endpoint": base + "/oauth/introspect",
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
    }
    status, headers, _ = await call(gateway, "POST", METADATA_PATH, FORM, "")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


async def test_signing_key_rotation(env: dict[str, str], config: Path, tmp_path: Path,
                                    creds: dict[str, Any]) -> None:
    key = creds["key"]
    async with running_gateway(env, config, tmp_path) as gw:
        old = (await fetch_token(gw, key))["access_token"]
    rotated = {"CREDGATE_OAUTH_SIGNING_KEY_ID": "k2", "CREDGATE_OAUTH_PREVIOUS_SIGNING_KEYS": f"k1:{TEST_SECRET_KEY}",
               "CREDGATE_OAUTH_ISSUER": "https://auth.example.com/"}
    async with running_gateway(env, config, tmp_path, extra_env=rotated) as gw:
        assert (await call(gw, "GET", "/x", bearer(old)))[0] == 200  # signed with k1: still verifies
        new = (await fetch_token(gw, key))["access_token"]
        assert (await call(gw, "GET", "/x", bearer(new)))[0] == 200
        _, _, doc = await call(gw, "GET", METADATA_PATH)
        assert doc["issuer"] == "https://auth.example.com"
        assert doc["token_endpoint"] == "https://auth.example.com/oauth/token"
    async with running_gateway(env, config, tmp_path, extra_env={"CREDGATE_OAUTH_SIGNING_KEY_ID": "k2"}) as gw:
        status, _, body = await call(gw, "GET", "/x", bearer(old))  # k1 removed: no longer verifies
        assert status == 401 and body["error"] == "invalid_token"
        assert (await call(gw, "GET", "/x", bearer(new)))[0] == 200


# --- the pure parts, directly -----------------------------------------------------------------------------------


def test_form_and_client_parsing() -> None:
    assert parse_form(b"grant_type=client_credentials&scope=") == {"grant_type": "client_credentials"}
    assert parse_form(b"scope=a+b%20c") == {"scope": "a b c"}
    for bad in (b"a=1&a=2", b"a", b"a=%ff", "scope=é".encode(), b"&".join([b"a%d=1" % i for i in range(40)])):
        with pytest.raises(OAuthError) as err:
            parse_form(bad)
        assert err.value.error == "invalid_request", bad
    assert parse_scope(None) is None and parse_scope("a  b") == frozenset({"a", "b"})
    with pytest.raises(OAuthError):
        parse_scope('a "b"')
    client_id, secret = client_id_for(new_public_id()), generate_key_secret()
    auth = (b"Basic " + base64.b64encode(f"{client_id}:{secret}".encode()),)
    found = client_from_request(auth, {})
    assert found.basic and found.method == "client_secret_basic" and found.presented.kind == "key"
    assert client_from_request(auth, {"client_id": client_id}).basic
    found = client_from_request((), {"client_id": client_id, "client_secret": secret})
    assert not found.basic and found.method == "client_secret_post"
    for authorization, form, error in [
        (auth * 2, {}, "invalid_request"),
        (auth, {"client_secret": secret}, "invalid_request"),
        (auth, {"client_id": client_id_for(new_public_id())}, "invalid_request"),
        ((b"Basic " + base64.b64encode(b"nocolon"),), {}, "invalid_client"),
        ((b"Basic " + base64.b64encode(b"\xff:\xfe"),), {}, "invalid_client"),
        ((), {"client_id": client_id}, "invalid_client"),
        ((), {"client_id": client_id, "client_secret": secret[:-1] + ("y" if secret.endswith("x") else "x")},
         "invalid_client"),
    ]:
        with pytest.raises(OAuthError) as err:
            client_from_request(authorization, form)
        assert err.value.error == error, (authorization, form)


# --- the body-level endpoint functions in process (what the data plane calls once it has read the form) ----------


async def test_endpoints_in_process(settings: Settings, pool: Any) -> None:
    actor = store.Actor("cli:test")
    hash_secret = lifecycle.secret_hasher(settings.argon2)
    await lifecycle.create_group(pool, actor, "finance")
    await lifecycle.create_principal(pool, actor, hash_secret, "svc", service=True, groups=["finance"])
    key = (await lifecycle.create_credential(pool, actor, hash_secret, settings.policy, owner="svc",
                                             kind="key")).reveal()
    redis_tier = RedisTier(settings.redis_url.reveal(), 60, 1)
    argon2 = hashing.Argon2Pool(hashing.make_hasher(hashing.Argon2Params(memory_kib=1024, time_cost=1)),
                                concurrency=1, queue_limit=8)
    try:
        lookup = CredentialLookup(settings.cache, pool, MemoryCache(100), redis_tier)
        auth = Authenticator(settings.secret_key_bytes, lookup, argon2, FailureThrottle(settings.throttle, redis_tier))
        denylist = TokenDenylist(pool, 60)
        assert await denylist.load()
        keys = SigningKeys.from_settings(settings)
        verifier = AccessTokenVerifier(keys, lookup, denylist)
        policy = make_policy(["X-Auth-User-Id", "X-Auth-User", "X-Auth-Groups", "X-Auth-Credential-Id",
                              "X-Auth-Credential-Name", "X-Auth-Method", "X-Auth-Scope"])
        endpoints = OAuthEndpoints(settings, policy, auth, keys, verifier, denylist)
        own: dict[bytes, Any] = {}
        endpoints.register(own)
        assert set(own) == {b"/oauth/token", b"/oauth/revoke", b"/oauth/introspect", METADATA_PATH.encode()}

        def exchange(method: bytes = b"POST") -> Exchange:
            ex = Exchange("127.0.0.1", 40000, b"/oauth/token")
            ex.method = method
            ex.headers = [(b"Host", b"gw.example:8080"), (b"Content-Type", b"application/x-www-form-urlencoded"),
                          (b"Authorization", basic(key["client_id"], key["secret"])["Authorization"].encode())]
            ex.note = Note(b"/oauth/token", b"rid-1")
            return ex

        refused = endpoints.token(exchange(b"GET"))
        assert isinstance(refused, Respond) and refused.status == 400
        answer = await endpoints._token_with_body(exchange(), b"grant_type=client_credentials")
        assert answer.status == 200 and (b"Pragma", b"no-cache") in answer.headers
        issued = json.loads(answer.body)
        assert issued["scope"] == "finance" and issued["expires_in"] == settings.oauth.access_token_ttl
        grant = verifier.verify(issued["access_token"])
        assert isinstance(grant, Grant) and grant.outcome == "ok"  # memory already knows the credential: no I/O
        body = ("token=" + issued["access_token"]).encode()
        introspected = json.loads((await endpoints._introspect_with_body(exchange(), body)).body)
        assert introspected["active"] and introspected["iss"] == "http://gw.example:8080"
        assert (await endpoints._revoke_with_body(exchange(), body)).status == 200
        assert await pool.fetchval("SELECT count(*) FROM oauth_revoked_tokens") == 1
        assert verifier.verify(issued["access_token"]).outcome == "invalid"  # type: ignore[union-attr]
        assert (await endpoints._introspect_with_body(exchange(), body)).body == b'{"active":false}'
        metadata = endpoints.metadata(exchange(b"GET"))
        assert json.loads(metadata.body)["token_endpoint"] == "http://gw.example:8080/oauth/token"
    finally:
        argon2.close()
        await redis_tier.close()
