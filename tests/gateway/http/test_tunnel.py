"""WebSocket upgrades through the data plane: the tunnel both ways, bytes right after the handshake, and an
upgrade the upstream refuses."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import ClientSession, WSMsgType

from tests.gateway.http.support import HANDLERS, AioUpstream, ForwardingHandler, Proxy, Run, reported
from tests.gateway.http.support_raw import RawClient


@pytest.mark.parametrize("handler_class", HANDLERS)
def test_websocket_echo_through_the_proxy(run: Run, handler_class: type[ForwardingHandler]) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up:
            handler = handler_class(up.port)
            async with Proxy(handler) as proxy, ClientSession() as session:
                async with session.ws_connect(f"http://127.0.0.1:{proxy.port}/ws") as ws:
                    for text in ("one", "two" * 10_000):
                        await ws.send_str(text)
                        message = await ws.receive(timeout=5)
                        assert message.type == WSMsgType.TEXT and message.data == "echo:" + text
                    await ws.send_bytes(b"\x00\x01" * 50_000)
                    message = await ws.receive(timeout=5)
                    assert message.data == b"\x00\x01" * 50_000
                await reported(handler)
            assert [o.status for o in handler.outcomes] == [101]
            assert handler.outcomes[0].error is None

    run(scenario())


def test_websocket_bytes_sent_right_after_the_handshake_go_through(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy, RawClient(proxy.port) as client:
            mask = b"\x01\x02\x03\x04"
            frame = b"\x81\x82" + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(b"hi"))  # masked text "hi"
            await client.send(
                b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" + frame
            )
            response = await client.response(head_only=True)
            assert response.status == 101
            assert response.header(b"Upgrade") == b"websocket" and response.header(b"Connection") == b"Upgrade"
            assert response.header(b"Sec-WebSocket-Accept") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
            assert client.reader is not None
            assert await asyncio.wait_for(client.reader.readexactly(9), 5) == b"\x81\x07echo:hi"

    run(scenario())


def test_websocket_refused_by_upstream_is_relayed_and_closed(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy, RawClient(proxy.port) as client:
            await client.send(
                b"GET /ws-refused HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nearly-bytes"
            )
            response = await client.response()
            assert response.status == 404 and response.header(b"Connection") == b"close"
            assert await client.at_eof()

    run(scenario())
