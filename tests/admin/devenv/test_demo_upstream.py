"""The demo upstream behind `credgate up`: the HTTP echo and the WebSocket echo."""

from __future__ import annotations

import time

import aiohttp

from admin.devenv.demo_upstream import start_demo_upstream


async def test_demo_upstream_echoes_request_headers_and_body() -> None:
    upstream = await start_demo_upstream("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"{upstream.url}/some/path%2Fx?b=2&a=1",
                data=b"0123456789",
                headers=[("X-Auth-User", "alice"), ("X-Auth-Groups", "ops"), ("X-Auth-Groups", "dev")],
            )
            async with response:
                assert response.status == 200
                echoed = await response.json()
    finally:
        await upstream.stop()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/some/path%2Fx"
    assert echoed["query"] == "b=2&a=1"
    assert echoed["body_bytes"] == 10
    assert echoed["headers"]["X-Auth-User"] == "alice"
    assert echoed["headers"]["X-Auth-Groups"] == "ops, dev"


async def test_demo_upstream_websocket_echo() -> None:
    upstream = await start_demo_upstream("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{upstream.url}/ws") as websocket:
                await websocket.send_str("ping")
                assert await websocket.receive_str(timeout=5) == "ping"
                await websocket.send_bytes(b"\x00\x01")
                assert await websocket.receive_bytes(timeout=5) == b"\x00\x01"
            async with session.get(f"{upstream.url}/ws") as plain:  # no upgrade: the JSON echo
                assert (await plain.json())["path"] == "/ws"
            # A client still connected at shutdown is closed by the server, not waited for.
            lingering = await session.ws_connect(f"{upstream.url}/ws")
            started = time.monotonic()
            await upstream.stop()
            assert time.monotonic() - started < 2
            await lingering.close()
    finally:
        await upstream.stop()
