"""The upstream side of the data plane (gateway.http.upstream, pool) over real sockets: the request relayed
(re-chunked), connect failures and timeouts, an upstream that never answers, clients that go away mid-request,
stale pooled connections retried once, an upstream reset mid-response."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import pytest

from tests.gateway.http.support import ForwardingHandler, Proxy, Run, reported
from tests.gateway.http.support_raw import OK_REPLY, RawClient, RawUpstream, closed_by_peer, get


def test_chunked_request_is_rechunked_upstream(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up, Proxy(ForwardingHandler(up.port)) as proxy:
            async with RawClient(proxy.port) as client:
                head = b"POST /up HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
                await client.send(head + b"5;ext=1\r\nhello\r\n")
                await asyncio.sleep(0.05)
                await client.send(b"6\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n")
                assert (await client.response()).body == b"ok"
            sent = up.requests[0]
            head, _, body = sent.partition(b"\r\n\r\n")
            assert b"\r\nTransfer-Encoding: chunked" in head and b"Content-Length" not in head
            assert body.endswith(b"0\r\n\r\n") and b"X-Trailer" not in body
            assert body.replace(b"5\r\nhello\r\n", b"").replace(b"6\r\n world\r\n", b"") == b"0\r\n\r\n"

    run(scenario())


def test_upstream_refused_is_502(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as closed:
            port = closed.port
        handler = ForwardingHandler(port)
        async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
            await client.send(get(b"/"))
            response = await client.response()
            assert response.status == 502 and json.loads(response.body)["error"] == "bad_gateway"
            await client.send(get(b"/"))  # the client connection survives
            assert (await client.response()).status == 502
        assert [(o.status, o.error) for o in handler.outcomes] == [(502, "connect")] * 2

    run(scenario())


def test_upstream_connect_timeout_is_504(run: Run) -> None:
    async def scenario() -> None:
        # A listener whose accept queue is full: the kernel drops further SYNs, so connecting hangs.
        listener = socket.socket()
        fillers = [socket.socket() for _ in range(4)]
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            for filler in fillers:
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            await asyncio.sleep(0.1)
            handler = ForwardingHandler(port, connect_timeout=0.3)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                await client.send(get(b"/"))
                response = await client.response()
                assert response.status == 504 and json.loads(response.body)["error"] == "gateway_timeout"
            assert [o.error for o in handler.outcomes] == ["timeout"]
        finally:
            for sock in [*fillers, listener]:
                sock.close()

    run(scenario())


def test_upstream_that_never_answers_is_504(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(None) as up:
            handler = ForwardingHandler(up.port, read_timeout=0.3)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                started = time.monotonic()
                await client.send(get(b"/"))
                response = await client.response()
                assert response.status == 504 and json.loads(response.body)["error"] == "gateway_timeout"
                assert 0.25 < time.monotonic() - started < 3
            assert handler.outcomes[0].error == "timeout"

    run(scenario())


def test_client_abort_mid_request_drops_the_upstream_connection(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(None) as up:
            handler = ForwardingHandler(up.port)
            async with Proxy(handler) as proxy:
                async with RawClient(proxy.port) as client:
                    await client.send(b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\npartial")
                    for _ in range(100):
                        if up.received and b"partial" in up.received[0]:
                            break
                        await asyncio.sleep(0.02)
                await reported(handler)
                assert [(o.status, o.error) for o in handler.outcomes] == [(400, "client_abort")]  # after its FIN
                assert await closed_by_peer(up)

    run(scenario())


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(run: Run) -> None:
    async def scenario() -> None:
        # Every connection answers its first request, then closes on the next one without a byte.
        async with RawUpstream(lambda index, request: OK_REPLY if index == 0 else b"CLOSE") as up:
            handler = ForwardingHandler(up.port)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                for _ in range(3):
                    await client.send(get(b"/"))
                    assert (await client.response()).body == b"ok"
            assert len(up.received) == 3
            assert [o.error for o in handler.outcomes] == [None] * 3

    run(scenario())


def test_upstream_reset_mid_response_aborts_the_client(run: Run) -> None:
    async def scenario() -> None:
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
        async with RawUpstream(reply, close_after_reply=True) as up:
            handler = ForwardingHandler(up.port)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                await client.send(get(b"/"))
                response = await client.response(head_only=True)
                assert response.status == 200
                assert client.reader is not None
                with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
                    await asyncio.wait_for(client.reader.readexactly(100), 5)
            assert [(o.status, o.bytes_sent, o.error) for o in handler.outcomes] == [(200, 7, "reset")]

    run(scenario())
