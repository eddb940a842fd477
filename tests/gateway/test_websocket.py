"""WebSocket through the gateway: echoed after authentication with identity headers and no credential;
refused before any 101 without one; `Upgrade: h2c` refused outright. Refusals never reach the upstream."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp

from gateway.core.formats import generate_token
from tests.support import Upstream, running_gateway, write_config
from tests.support_faults import RawResponse, bearer, create_token, raw_exchange, scripted_upstream

WEBSOCKET_UPGRADE = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                     ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]
H2C_UPGRADE = [("Upgrade", "h2c"), ("Connection", "Upgrade, HTTP2-Settings"),
               ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")]


def upgrade_request(path: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: gateway", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def json_error(reply: RawResponse) -> str:
    assert reply.header("Content-Type") == "application/json"
    body: dict[str, Any] = reply.json()
    assert set(body) == {"error", "error_description"}
    return str(body["error"])


async def test_websocket_echo_with_a_credential(env: dict[str, str], upstream: Upstream, tmp_path: Path) -> None:
    token = await create_token(env, "svc")
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}])
    async with running_gateway(env, config, tmp_path) as gw, aiohttp.ClientSession() as session:
        spoofed = {**bearer(token["token"]), "X-Auth-User": "mallory", "X_Auth_Groups": "admin"}
        async with session.ws_connect(gw.url + "/ws", headers=spoofed) as ws:
            first = await ws.receive_json(timeout=5)
            seen = {k.lower(): v for k, v in first["headers"].items()}
            assert seen["x-auth-user"] == "svc"
            assert seen["x-auth-credential-id"] == token["id"]
            assert seen["x-auth-method"] == "bearer"
            assert "authorization" not in seen and "x_auth_groups" not in seen
            assert seen["upgrade"].lower() == "websocket"

            await ws.send_str("hello through the gateway")
            assert await ws.receive_str(timeout=5) == "hello through the gateway"
            payload = os.urandom(1024 * 1024)  # larger than any socket buffer: the splice must stream
            await ws.send_bytes(payload)
            assert await ws.receive_bytes(timeout=5) == payload
            for i in range(100):
                await ws.send_str(json.dumps({"i": i}))
            assert [json.loads(await ws.receive_str(timeout=5))["i"] for _ in range(100)] == list(range(100))
            await ws.close()
        assert ws.close_code == aiohttp.WSCloseCode.OK


async def test_websocket_refused_before_any_101(env: dict[str, str], tmp_path: Path) -> None:
    token = await create_token(env, "svc")
    wrong = generate_token(token["id"])  # well formed, right id, wrong secret: refused after argon2
    async with scripted_upstream(None) as tripwire:
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": tripwire.url}])
        async with running_gateway(env, config, tmp_path) as gw:
            for headers in (WEBSOCKET_UPGRADE, [*WEBSOCKET_UPGRADE, ("Authorization", f"Bearer {wrong}")]):
                reply = await raw_exchange(gw.port, upgrade_request("/ws", headers) + b"\x81\x05early")
                assert reply.status == 401, reply  # the first (and only) response: no 101 before it
                assert (reply.header("WWW-Authenticate") or "").startswith('Bearer realm="credgate"')
                assert json_error(reply) in ("unauthorized", "invalid_token")
                assert reply.header("Upgrade") is None
                assert reply.closed  # the bytes after an upgrade request are not HTTP: never parsed
        assert tripwire.connections == 0 and not tripwire.received


async def test_h2c_upgrade_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    token = await create_token(env, "svc")
    async with scripted_upstream(None) as tripwire:
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": tripwire.url},
                                                     {"prefix": "/public", "upstream": tripwire.url, "auth": "none"}])
        async with running_gateway(env, config, tmp_path) as gw:
            for path, headers in (("/x", [*H2C_UPGRADE, ("Authorization", f"Bearer {token['token']}")]),
                                  ("/public/x", H2C_UPGRADE)):
                reply = await raw_exchange(gw.port, upgrade_request(path, headers))
                assert reply.status == 400, (path, reply)
                assert json_error(reply) == "invalid_request"
                assert reply.header("Upgrade") is None
        assert tripwire.connections == 0 and not tripwire.received
