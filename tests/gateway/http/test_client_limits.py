"""Client-side timeouts and limits over real sockets: idle keep-alive, a head or body that arrives too slowly, a
client that sends nothing, an endless header, and limits that are inclusive."""

from __future__ import annotations

import asyncio
import time

from gateway.core.settings import Limits
from tests.gateway.http.support import SMALL_LIMITS, ForwardingHandler, Proxy, Run
from tests.gateway.http.support_raw import OK_REPLY, RawClient, RawUpstream, get, post

H = b"Host: test\r\n"


def test_idle_keep_alive_connection_is_closed_silently(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            limits = Limits(idle_timeout=0.2)
            async with Proxy(ForwardingHandler(up.port), limits) as proxy, RawClient(proxy.port) as client:
                await client.send(get(b"/"))
                assert (await client.response()).body == b"ok"
                started = time.monotonic()
                assert await client.at_eof()
                assert 0.1 < time.monotonic() - started < 3

    run(scenario())


def test_head_arriving_too_slowly_gets_408(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            async with Proxy(ForwardingHandler(up.port), SMALL_LIMITS) as proxy, RawClient(proxy.port) as client:
                started = time.monotonic()
                await client.send(b"GET /slowloris HTTP/1.1\r\nHost: test\r\n")
                for _ in range(3):  # trickling header lines don't extend the deadline
                    await asyncio.sleep(0.1)
                    await client.send(b"X-Drip: 1\r\n")
                response = await client.response()
                assert response.status == 408 and response.header(b"Connection") == b"close"
                assert 0.25 < time.monotonic() - started < 3
                assert await client.at_eof()
            assert up.received == []

    run(scenario())


def test_connection_that_sends_nothing_is_closed_silently(run: Run) -> None:
    async def scenario() -> None:
        async with (
            RawUpstream(OK_REPLY) as up,
            Proxy(ForwardingHandler(up.port), SMALL_LIMITS) as proxy,
            RawClient(proxy.port) as client,
        ):
            assert client.reader is not None
            assert await asyncio.wait_for(client.reader.read(), 3) == b""

    run(scenario())


def test_body_arriving_too_slowly_is_refused(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(None) as up:
            handler = ForwardingHandler(up.port)
            async with Proxy(handler, SMALL_LIMITS) as proxy, RawClient(proxy.port) as client:
                await client.send(b"PUT / HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nabc")
                response = await client.response()
                assert response.status == 408
                assert await client.at_eof()
            assert [o.error for o in handler.outcomes] == ["client_timeout"]

    run(scenario())


def test_endless_header_across_reads_is_cut_off(run: Run) -> None:
    """httptools buffers one header value internally; the per-read bound stops it growing without limit."""

    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            async with Proxy(ForwardingHandler(up.port), SMALL_LIMITS) as proxy, RawClient(proxy.port) as client:
                await client.send(b"GET / HTTP/1.1\r\nHost: test\r\nX-Endless: ")
                for _ in range(4):  # past max_request_line + max_header_bytes (3072) in the 4th read
                    await asyncio.sleep(0.02)
                    await client.send(b"v" * 1000)
                response = await client.response()
                assert response.status == 431
            assert up.received == []

    run(scenario())


def test_limits_are_inclusive(run: Run) -> None:
    """Exactly at the limits is fine."""

    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            async with Proxy(ForwardingHandler(up.port), SMALL_LIMITS) as proxy, RawClient(proxy.port) as client:
                await client.send(post(b"/", b"x" * 1000))
                assert (await client.response()).status == 200
                await client.send(b"GET /" + b"a" * 1023 + b" HTTP/1.1\r\n" + H + b"\r\n")
                assert (await client.response()).status == 200
                extra = b"".join(b"X-%d: v\r\n" % i for i in range(19))
                await client.send(b"GET / HTTP/1.1\r\n" + H + extra + b"\r\n")
                assert (await client.response()).status == 200
            assert len(up.received) == 1 and up.received[0].count(b"\r\nHost: test\r\n") == 3

    run(scenario())
