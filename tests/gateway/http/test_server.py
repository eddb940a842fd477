"""Starting and draining a listening data plane (gateway.http.server): shutdown lets exchanges in flight finish,
closes pooled upstream connections, and forces the rest closed after the grace period."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.http.server import start_server
from tests.gateway.http.support import TEST_LIMITS, AioUpstream, ForwardingHandler, Run
from tests.gateway.http.support_raw import OK_REPLY, RawClient, RawUpstream, closed_by_peer, get


def test_shutdown_lets_a_request_in_flight_finish(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up:
            server = await start_server(ForwardingHandler(up.port), "127.0.0.1", 0, limits=TEST_LIMITS)
            async with RawClient(server.port) as client, RawClient(server.port) as idle_client:
                await client.send(get(b"/slow?delay=0.3"))
                await asyncio.sleep(0.05)
                started = time.monotonic()
                shutdown = asyncio.create_task(server.shutdown(5.0))
                response = await client.response()
                assert (response.status, response.body) == (200, b"slow")
                assert response.header(b"Connection") == b"close"
                await shutdown
                assert time.monotonic() - started < 3
                assert await idle_client.at_eof()
                with pytest.raises(OSError):
                    await asyncio.open_connection("127.0.0.1", server.port)

    run(scenario())


def test_shutdown_closes_pooled_upstream_connections(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            server = await start_server(ForwardingHandler(up.port), "127.0.0.1", 0, limits=TEST_LIMITS)
            async with RawClient(server.port) as client:
                await client.send(get(b"/"))
                assert (await client.response()).body == b"ok"
                await server.shutdown(1.0)
                assert await client.at_eof()
            assert await closed_by_peer(up)

    run(scenario())


def test_shutdown_forces_connections_closed_after_the_grace_period(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(None) as up:
            handler = ForwardingHandler(up.port, read_timeout=30)
            server = await start_server(handler, "127.0.0.1", 0, limits=TEST_LIMITS)
            async with RawClient(server.port) as client:
                await client.send(get(b"/"))
                await asyncio.sleep(0.1)
                started = time.monotonic()
                await server.shutdown(0.2)
                assert time.monotonic() - started < 3
                assert await client.at_eof()
            assert [o.error for o in handler.outcomes] == ["client_abort"]

    run(scenario())
