"""The gateway end to end: a real gateway process, real Postgres and Redis, a real upstream."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from tests.support import GatewayProcess, Upstream, cli, running_gateway, write_config


@pytest.fixture
async def gateway(env: dict[str, str], upstream: Upstream, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    config = write_config(
        tmp_path / "gw.toml",
        [
            {"prefix": "/", "upstream": upstream.url},
            {"prefix": "/finance", "upstream": upstream.url, "groups": ["finance"]},
            {"prefix": "/public", "upstream": upstream.url, "auth": "none"},
            {"prefix": "/strip", "upstream": upstream.url + "/base", "strip_prefix": True},
        ],
    )
    async with running_gateway(env, config, tmp_path) as gw:
        yield gw


@pytest.fixture
async def creds(env: dict[str, str]) -> dict[str, Any]:
    await cli(env, "groups", "create", "finance")
    await cli(env, "users", "create", "svc", "--service", "--group", "finance")
    await cli(env, "users", "create", "bob")
    token = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "token", "--name", "t1"))
    key = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "key"))
    bob = json.loads(await cli(env, "credentials", "create", "--owner", "bob", "--kind", "token"))
    return {"token": token, "key": key, "bob": bob}


async def get(gw: GatewayProcess, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.get(gw.url + path, headers=headers or {}) as resp:
        body = await resp.read()
        try:
            data = json.loads(body)
        except ValueError:
            data = body
        return resp.status, resp.headers.copy(), data


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_bearer_injects_identity_and_strips_credential(gateway: GatewayProcess, creds: dict[str, Any]) -> None:
    token = creds["token"]
    status, headers, body = await get(
        gateway,
        "/hello?x=1",
        {**bearer(token["token"]), "X-Auth-User": "mallory", "x_auth_groups": "admin", "X.Auth.User-Id": "0"},
    )
    assert status == 200, body
    seen = {k.lower(): v for k, v in body["headers"].items()}
    assert seen["x-auth-user"] == "svc" and seen["x-auth-groups"] == "finance"
    assert seen["x-auth-credential-id"] == token["id"] and seen["x-auth-credential-name"] == "t1"
    assert seen["x-auth-method"] == "bearer"
    assert "authorization" not in seen and "x_auth_groups" not in seen and "x.auth.user-id" not in seen
    assert body["path"] == "/hello?x=1"
    assert headers["X-Request-Id"] == seen["x-request-id"]
    assert "Credgate-Credential-Expires" not in headers  # 90 days: outside the 14-day window


async def test_key_pair_and_basic(gateway: GatewayProcess, creds: dict[str, Any]) -> None:
    key = creds["key"]
    status, _, body = await get(gateway, "/k", {"accessKey": key["client_id"], "secretKey": key["secret"]})
    assert status == 200 and body["headers"]["X-Auth-Method"] == "headers"
    assert "accessKey" not in body["headers"] and "secretKey" not in body["headers"]
    basic = base64.b64encode(f"{key['client_id']}:{key['secret']}".encode()).decode()
    status, _, body = await get(gateway, "/k", {"Authorization": f"basic {basic}"})
    assert status == 200 and body["headers"]["X-Auth-Method"] == "basic"
    wrong = base64.b64encode(f"{key['client_id']}:{key['secret'][:-1]}x".encode()).decode()
    status, headers, _ = await get(gateway, "/k", {"Authorization": f"Basic {wrong}"})
    challenges = headers.getall("WWW-Authenticate")
    assert status == 401 and challenges[0].startswith("Bearer ") and challenges[1].startswith("Basic ")


async def test_refusals_follow_rfc6750(gateway: GatewayProcess, creds: dict[str, Any]) -> None:
    status, headers, body = await get(gateway, "/x")
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="credgate"'
    assert set(body) == {"error", "error_description"}
    token = creds["token"]["token"]
    # unknown id, wrong secret (valid checksum impossible to forge: use another credential's id), malformed
    responses = []
    for presented in ("cgt_" + "A" * 44, token[:-1] + ("A" if token[-1] != "A" else "B")):
        responses.append(await get(gateway, "/x", bearer(presented)))
    for status, headers, body in responses:
        assert status == 401
        assert headers["WWW-Authenticate"].startswith('Bearer realm="credgate", error="invalid_token"')
        assert body == responses[0][2]
    status, _, body = await get(
        gateway, "/x", {**bearer(token), "accessKey": creds["key"]["client_id"], "secretKey": creds["key"]["secret"]}
    )
    assert status == 400 and body["error"] == "invalid_request"
    status, _, body = await get(gateway, "/x", {"accessKey": creds["key"]["client_id"]})
    assert status == 400 and body["error"] == "invalid_request"
    status, _, body = await get(gateway, "/nothing/../finance/x", bearer(creds["bob"]["token"]))
    assert status == 403 and body["error"] == "insufficient_scope"
    status, _, _ = await get(gateway, "/finance/x", bearer(token))
    assert status == 200
    status, _, body = await get(gateway, "/x?access_token=" + token)
    assert status == 401


async def test_public_route_strips_identity(gateway: GatewayProcess) -> None:
    status, _, body = await get(gateway, "/public/x", {"X-Auth-User": "root"})
    assert status == 200
    assert not any(k.lower().startswith("x-auth") for k in body["headers"])


async def test_strip_prefix_and_bad_paths(gateway: GatewayProcess, creds: dict[str, Any]) -> None:
    status, _, body = await get(gateway, "/strip/a/b", bearer(creds["token"]["token"]))
    assert status == 200 and body["path"] == "/base/a/b"
    for bad in ("/public/..;/finance", "/public/%2e%2e/finance", "/public%2ffinance"):
        async with aiohttp.ClientSession() as session, session.get(yarl.URL(gateway.url + bad, encoded=True)) as resp:
            assert resp.status in (400, 401), bad


async def test_health_and_ready(gateway: GatewayProcess) -> None:
    assert (await get(gateway, "/_credgate/health"))[0] == 200
    for _ in range(50):
        status, _, _ = await get(gateway, "/_credgate/ready")
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200


async def test_revocation_reaches_the_gateway(
    gateway: GatewayProcess, creds: dict[str, Any], env: dict[str, str]
) -> None:
    token = creds["token"]
    assert (await get(gateway, "/x", bearer(token["token"])))[0] == 200
    await cli(env, "credentials", "revoke", token["id"])
    for _ in range(100):
        status, _, _ = await get(gateway, "/x", bearer(token["token"]))
        if status == 401:
            break
        await asyncio.sleep(0.01)
    assert status == 401


async def test_expiry_warning_header(
    env: dict[str, str], upstream: Upstream, tmp_path: Path, creds: dict[str, Any]
) -> None:
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}])
    soon = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "token", "--expires-in", "3"))
    async with running_gateway(env, config, tmp_path) as gw:
        status, headers, _ = await get(gw, "/x", bearer(soon["token"]))
        assert status == 200 and headers["Credgate-Credential-Expires"].startswith(soon["expires_at"][:16])
        status, headers, _ = await get(gw, "/x", bearer(creds["token"]["token"]))
        assert status == 200 and "Credgate-Credential-Expires" not in headers
