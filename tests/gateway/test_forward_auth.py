"""The forward-auth listener asked directly, as each proxy asks it, and the signed identity an upstream checks.

The proxies themselves (nginx, Caddy, Envoy, Traefik) in front of a recording upstream: tests/forward_auth.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from gateway.forward_auth import ForwardAuth
from gateway.identity import generate
from tests.support import GatewayProcess, Upstream, cli, free_port, running_gateway, write_config

IDENTITY = ("X-Auth-User-Id", "X-Auth-User", "X-Auth-Groups", "X-Auth-Credential-Id", "X-Auth-Method")


@dataclass
class Deployment:
    gateway: GatewayProcess
    forward_auth: str
    token: str
    finance_token: str
    key: dict[str, str]


@pytest.fixture
async def deployed(env: dict[str, str], upstream: Upstream, tmp_path: Path) -> AsyncIterator[Deployment]:
    generate(tmp_path / "identity.pem")
    config = write_config(tmp_path / "gw.toml", [
        {"prefix": "/", "upstream": upstream.url, "name": "api", "identity_assertion": True},
        {"prefix": "/finance", "upstream": upstream.url, "groups": ["finance"], "name": "finance"},
        {"prefix": "/public", "upstream": upstream.url, "auth": "none", "name": "public"},
    ], extra=f'[identity]\nkey_files = ["{tmp_path / "identity.pem"}"]\nissuer = "https://gw.test"\n')
    await cli(env, "groups", "create", "finance")
    await cli(env, "users", "create", "svc", "--service")
    await cli(env, "users", "create", "fin", "--service", "--group", "finance")
    token = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "token"))["token"]
    finance = json.loads(await cli(env, "credentials", "create", "--owner", "fin", "--kind", "token"))["token"]
    key = json.loads(await cli(env, "credentials", "create", "--owner", "svc", "--kind", "key"))
    port = free_port()
    extra = {"CREDGATE_FORWARD_AUTH_LISTEN": f"127.0.0.1:{port}"}
    async with running_gateway(env, config, tmp_path, extra_env=extra) as gw:
        yield Deployment(gw, f"http://127.0.0.1:{port}", token, finance, key)


async def ask(url: str, method: str = "GET", headers: dict[str, str] | None = None,
              local: str | None = None) -> tuple[int, dict[str, str], bytes]:
    connector = aiohttp.TCPConnector(local_addr=(local, 0)) if local else None
    async with aiohttp.ClientSession(connector=connector) as session, \
            session.request(method, url, headers=headers or {}, allow_redirects=False) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def nginx(uri: str, method: str = "GET") -> dict[str, str]:
    return {"X-Original-URI": uri, "X-Original-Method": method}


def forwarded(uri: str, method: str = "GET") -> dict[str, str]:
    return {"X-Forwarded-Uri": uri, "X-Forwarded-Method": method, "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "api.example"}


async def test_each_proxy_style_gets_200_with_identity_and_no_credential(deployed: Deployment) -> None:
    bearer = {"Authorization": f"Bearer {deployed.token}"}
    for url, headers in (
        (deployed.forward_auth + "/nginx", {**bearer, **nginx("/orders?x=1")}),
        (deployed.forward_auth + "/traefik", {**bearer, **forwarded("/orders")}),
        (deployed.forward_auth + "/caddy", {**bearer, **forwarded("/orders")}),
        (deployed.forward_auth + "/envoy/orders?x=1", bearer),
    ):
        status, got, body = await ask(url, headers=headers)
        assert status == 200 and body == b"", url
        assert got["X-Auth-User"] == "svc" and got["X-Auth-Method"] == "bearer", url
        assert all(name in got for name in IDENTITY), url
        assert deployed.token not in json.dumps(got) and "Authorization" not in got
        assert got["Credgate-Identity"].count(".") == 2  # the route asks for the signed identity
    pair = {"accessKey": deployed.key["client_id"], "secretKey": deployed.key["secret"]}
    status, got, _ = await ask(deployed.forward_auth + "/nginx", headers={**pair, **nginx("/x")})
    assert status == 200 and got["X-Auth-Method"] == "headers" and deployed.key["secret"] not in json.dumps(got)


REFUSALS: list[tuple[dict[str, str], int, str | None]] = [
    (nginx("/x"), 401, None),  # no credential
    ({"Authorization": "Bearer cgt_wrong", **nginx("/x")}, 401, "invalid_token"),
    (nginx("/x") | {"X-Original-URI": "relative"}, 400, "invalid_request"),
    ({"X-Original-Method": "GET"}, 400, "invalid_request"),  # no original URI: never allowed
    ({"X-Original-URI": "/public/x"}, 400, "invalid_request"),  # no original method
    (nginx("/public/%2e%2e/finance/x"), 401, None),  # decoded and resolved: /finance/x, its rules apply
    (nginx("/public/..%2ffinance"), 400, "invalid_request"),  # an encoded slash is ambiguous: never matched
    (nginx("/nowhere/../finance/x"), 401, None),  # normalised into a protected route: its rules apply
]


async def test_refusals(deployed: Deployment) -> None:
    for headers, status, error in REFUSALS:
        got_status, got, body = await ask(deployed.forward_auth + "/nginx", headers=headers)
        assert got_status == status, (headers, body)
        assert not any(name in got for name in IDENTITY)
        if error:
            assert json.loads(body)["error"] == error
        if status == 401:
            assert got["WWW-Authenticate"].startswith('Bearer realm="credgate"')


async def test_groups_public_routes_and_repeated_headers(deployed: Deployment) -> None:
    bearer = {"Authorization": f"Bearer {deployed.token}"}
    status, got, body = await ask(deployed.forward_auth + "/nginx", headers={**bearer, **nginx("/finance/x")})
    assert status == 403 and json.loads(body)["error"] == "insufficient_scope"
    finance = {"Authorization": f"Bearer {deployed.finance_token}"}
    status, got, _ = await ask(deployed.forward_auth + "/caddy", headers={**finance, **forwarded("/finance/x")})
    assert status == 200 and got["X-Auth-Groups"] == "finance"
    status, got, _ = await ask(deployed.forward_auth + "/traefik", headers=forwarded("/public/page"))
    assert status == 200 and not any(name in got for name in IDENTITY)
    spoofed = {**forwarded("/public/page"), "X-Auth-User": "mallory"}  # never echoed back
    status, got, _ = await ask(deployed.forward_auth + "/traefik", headers=spoofed)
    assert status == 200 and "X-Auth-User" not in got


async def test_untrusted_peers_and_unknown_endpoints(deployed: Deployment) -> None:
    bearer = {"Authorization": f"Bearer {deployed.token}"}
    status, got, body = await ask(deployed.forward_auth + "/nginx", headers={**bearer, **nginx("/x")},
                                  local="127.0.0.2")
    assert status == 403 and json.loads(body)["error"] == "forbidden" and "X-Auth-User" not in got
    status, _, _ = await ask(deployed.forward_auth + "/haproxy", headers=bearer)
    assert status == 404
    status, _, _ = await ask(deployed.gateway.url + "/nginx", headers={**bearer, **nginx("/x")})
    assert status == 200  # the public listener forwards /nginx as a path like any other, never decides


async def test_an_upstream_verifies_the_signed_identity_with_pyjwt_and_the_jwks(deployed: Deployment) -> None:
    """What the README shows an upstream doing: fetch the JWKS, verify the header, read the claims."""
    status, _, body = await ask(deployed.gateway.url + "/.well-known/jwks.json")
    assert status == 200 and json.loads(body)["keys"][0]["alg"] == "EdDSA"
    status, _, echoed = await ask(deployed.gateway.url + "/orders", headers={
        "Authorization": f"Bearer {deployed.token}", "Credgate-Identity": "forged", "credgate_identity": "x"})
    assert status == 200
    seen: dict[str, Any] = {k.lower(): v for k, v in json.loads(echoed)["headers"].items()}
    assert "credgate_identity" not in seen and seen["credgate-identity"] != "forged"

    jwks = jwt.PyJWKClient(deployed.gateway.url + "/.well-known/jwks.json")
    token = seen["credgate-identity"]
    claims = jwt.decode(token, jwks.get_signing_key_from_jwt(token).key, algorithms=["EdDSA"],
                        audience="api", issuer="https://gw.test")
    assert claims["name"] == "svc" and claims["amr"] == ["bearer"] and claims["groups"] == []
    status, _, echoed = await ask(deployed.gateway.url + "/public/x", headers={"Credgate-Identity": "forged"})
    assert "credgate-identity" not in {k.lower() for k in json.loads(echoed)["headers"]}


def test_trusted_peers_are_judged_like_the_gateways_proxies() -> None:
    decider = object.__new__(ForwardAuth)  # only the peer check: no request path needed
    decider.configure_peers(["127.0.0.1/32", "::1/128"])
    assert decider.is_trusted("127.0.0.1") and decider.is_trusted("::1")
    assert decider.is_trusted("::ffff:127.0.0.1")  # how a dual-stack listener reports an IPv4 peer
    assert not decider.is_trusted("127.0.0.2") and not decider.is_trusted("unix-socket")
