"""The client side of the data plane (gateway.http.client, answers, reader) over real sockets, on asyncio and
uvloop: keep-alive, pipelining, decisions that come later than the head, Connection: close and half-close,
Expect: 100-continue, answering before the body and clients that go away."""

from __future__ import annotations

import asyncio

import pytest

from tests.gateway.http.support import (
    HANDLERS,
    AioUpstream,
    AsyncForwardingHandler,
    ForwardingHandler,
    GatedHandler,
    Proxy,
    Run,
    reported,
)
from tests.gateway.http.support_raw import OK_REPLY, RawClient, RawUpstream, get, post


@pytest.mark.parametrize("handler_class", HANDLERS)
def test_keep_alive_reuses_one_upstream_connection(run: Run, handler_class: type[ForwardingHandler]) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up:
            handler = handler_class(up.port)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                for i in range(3):
                    await client.send(get(b"/hello"))
                    response = await client.response()
                    assert (response.status, response.body) == (200, b"hello")
                    assert response.header(b"X-Request-Id") == b"test-%d" % (i + 1)
                    assert response.header(b"Connection") is None
                for body in (b"first body", b"x" * 100_000):
                    await client.send(post(b"/echo", body))
                    response = await client.response()
                    assert (response.status, response.body) == (200, body)
            assert len(up.peers) == 1
            assert [o.status for o in handler.outcomes] == [200] * 5
            assert [o.bytes_sent for o in handler.outcomes] == [5, 5, 5, 10, 100_000]
            assert all(o.error is None and o.upstream_seconds is not None for o in handler.outcomes)

    run(scenario())


def test_pipelined_requests_are_answered_in_order(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy, RawClient(proxy.port) as client:
            await client.send(get(b"/slow?delay=0.1") + get(b"/hello") + post(b"/echo", b"third"))
            bodies = [(await client.response()).body for _ in range(3)]
            assert bodies == [b"slow", b"hello", b"third"]
            assert [r.path for r in up.requests] == ["/slow", "/hello", "/echo"]
            await client.send(get(b"/hello"))
            assert (await client.response()).body == b"hello"

    run(scenario())


def test_body_is_held_until_the_decision(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            handler = GatedHandler(up.port)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                await client.send(b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
                await asyncio.sleep(0.1)
                assert up.received == []  # nothing goes upstream before the handler decides
                handler.gate.set()
                await client.send(b"world")
                assert (await client.response()).body == b"ok"
            assert up.requests[0].endswith(b"\r\nContent-Length: 10\r\n\r\nhelloworld")

    run(scenario())


def test_pipeline_mixing_answers_and_forwards(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up:
            handler = AsyncForwardingHandler(up.port)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                denied = post(b"/echo", b"secret", b"X-Deny: 1")
                await client.send(get(b"/hello") + denied + post(b"/echo", b"public") + get(b"/slow?delay=0.05"))
                statuses = [(r.status, r.body) for r in [await client.response() for _ in range(4)]]
                assert statuses == [
                    (200, b"hello"),
                    (401, b'{"error":"invalid_token"}'),
                    (200, b"public"),
                    (200, b"slow"),
                ]
            assert [o.status for o in handler.outcomes] == [200, 401, 200, 200]

    run(scenario())


def test_connection_close_and_half_close(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy:
            async with RawClient(proxy.port) as client:
                await client.send(get(b"/hello", b"Connection: close") + get(b"/never"))
                response = await client.response()
                assert response.body == b"hello" and response.header(b"Connection") == b"close"
                assert await client.at_eof()
            async with RawClient(proxy.port) as client:
                assert client.writer is not None
                await client.send(get(b"/slow?delay=0.1"))
                client.writer.write_eof()  # a client may half-close once its request is out
                response = await client.response()
                assert response.body == b"slow" and response.header(b"Connection") == b"close"
                assert await client.at_eof()
            assert [r.path for r in up.requests] == ["/hello", "/slow"]

    run(scenario())


# -- Expect: 100-continue -----------------------------------------------------------------------------------------


def test_expect_continue_refused_before_the_body(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up, Proxy(ForwardingHandler(up.port)) as proxy:
            async with RawClient(proxy.port) as client:
                head = b"PUT /x HTTP/1.1\r\nHost: t\r\nX-Deny: 1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
                await client.send(head)
                response = await client.response()
                assert response.status == 401 and response.header(b"Connection") == b"close"
                assert await client.at_eof()
            assert up.requests == []

    run(scenario())


def test_expect_continue_accepted_then_body_forwarded(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy, RawClient(proxy.port) as client:
            await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            interim = await client.response()
            assert interim.status == 100
            await client.send(b"hello")
            response = await client.response()
            assert (response.status, response.body) == (200, b"hello")
            assert response.header(b"X-Saw-Expect") == b""  # stripped: the upstream never answers 100 itself

    run(scenario())


# -- a response without the request body, aborts ------------------------------------------------------------------


def test_respond_to_a_request_with_an_unread_body_closes(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up, Proxy(ForwardingHandler(up.port)) as proxy:
            async with RawClient(proxy.port) as client:
                await client.send(
                    b"POST / HTTP/1.1\r\nHost: t\r\nX-Deny: 1\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10
                )
                response = await client.response()
                assert response.status == 401 and response.header(b"Connection") == b"close"
                assert await client.at_eof()
            async with RawClient(proxy.port) as client:  # a fully read body keeps the connection
                await client.send(post(b"/", b"abc", b"X-Deny: 1") + get(b"/"))
                assert (await client.response()).status == 401
                assert (await client.response()).body == b"ok"
            assert len(up.requests) == 1

    run(scenario())


def test_client_abort_mid_response_drops_the_upstream_connection(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up:
            handler = ForwardingHandler(up.port)
            async with Proxy(handler) as proxy:
                async with RawClient(proxy.port) as client:
                    await client.send(get(b"/stream"))
                    assert (await client.response(head_only=True)).status == 200
                await reported(handler)
                assert [(o.status, o.error) for o in handler.outcomes] == [(200, "client_abort")]
                async with RawClient(proxy.port) as client:
                    await client.send(get(b"/hello"))
                    assert (await client.response()).body == b"hello"
            assert len(up.peers) == 2  # the aborted stream's connection was not reused

    run(scenario())
