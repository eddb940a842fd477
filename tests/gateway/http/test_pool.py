"""The keep-alive pool (gateway.http.pool): which idle connection `acquire` hands out, what `release` keeps, and
the idle sweep, driven by a real Deadlines timer on a real event loop with fake connections (no sockets); then
pooled connections expiring over real sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

from gateway.core.settings import Limits
from gateway.http.deadlines import Deadlines
from gateway.http.pool import UpstreamPool
from gateway.http.upstream import UpstreamConnection
from tests.gateway.http.support import ForwardingHandler, Proxy, Run
from tests.gateway.http.support_raw import OK_REPLY, RawClient, RawUpstream, closed_by_peer, get

KEY = ("127.0.0.1", 8000)
OTHER = ("127.0.0.1", 8001)
IDLE = 0.4  # upstream_idle in the sweep tests: idle connections close after 0.75x-1x of it
RESOLUTION = 0.01


class FakeConnection:
    """What the pool needs of a connection: its key, whether it is closed, its idle mark, close()."""

    def __init__(self, key: tuple[str, int] = KEY) -> None:
        self.key = key
        self.closed = False
        self.idle_since = 0
        self.closes: list[bool] = []  # the abort flag of every close() call
        self.closed_at = 0.0

    def close(self, abort: bool = False) -> None:
        self.closes.append(abort)
        if not self.closed:
            self.closed = True
            self.closed_at = time.monotonic()


def as_conn(conn: FakeConnection) -> UpstreamConnection:
    return cast(UpstreamConnection, conn)


def new_pool(idle: float = IDLE) -> tuple[UpstreamPool, Deadlines]:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop, RESOLUTION)
    return UpstreamPool(loop, Limits(upstream_idle=idle), deadlines), deadlines


async def until(condition: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


async def test_acquire_hands_out_the_most_recently_used_connection_of_its_key() -> None:
    pool, deadlines = new_pool()
    first, second, elsewhere = FakeConnection(), FakeConnection(), FakeConnection(OTHER)
    for conn in (first, second, elsewhere):
        pool.release(as_conn(conn))
    assert pool.acquire(KEY) is as_conn(second)
    assert pool.acquire(KEY) is as_conn(first)
    assert pool.acquire(KEY) is None
    assert pool.acquire(OTHER) is as_conn(elsewhere)
    assert pool.acquire(("127.0.0.1", 9)) is None
    assert not any(conn.closes for conn in (first, second, elsewhere))
    deadlines.close()


async def test_release_closes_a_closed_connection_and_those_over_the_idle_limit() -> None:
    pool, deadlines = new_pool()
    pool.max_idle = 2
    gone_before_first = FakeConnection()
    gone_before_first.closed = True
    pool.release(as_conn(gone_before_first))  # no idle list for its key yet
    kept = [FakeConnection(), FakeConnection()]
    for conn in kept:
        pool.release(as_conn(conn))
    over, gone = FakeConnection(), FakeConnection()
    gone.closed = True
    pool.release(as_conn(over))
    pool.release(as_conn(gone))
    elsewhere = FakeConnection(OTHER)
    pool.release(as_conn(elsewhere))  # the limit is per upstream
    assert gone_before_first.closes == [False] and over.closes == [False] and gone.closes == [False]
    assert not kept[0].closes and not kept[1].closes and not elsewhere.closes
    assert [pool.acquire(KEY), pool.acquire(KEY), pool.acquire(KEY)] == [as_conn(kept[1]), as_conn(kept[0]), None]
    deadlines.close()


async def test_forget_drops_an_idle_connection() -> None:
    pool, deadlines = new_pool()
    stays, goes = FakeConnection(), FakeConnection()
    pool.release(as_conn(stays))
    pool.release(as_conn(goes))
    pool.forget(as_conn(goes))
    pool.forget(as_conn(FakeConnection(OTHER)))  # never pooled: nothing happens
    assert pool.acquire(KEY) is as_conn(stays)
    assert pool.acquire(KEY) is None
    deadlines.close()


async def test_close_aborts_live_connections_and_refuses_later_releases() -> None:
    pool, deadlines = new_pool()
    idle, busy = FakeConnection(), FakeConnection()
    pool.live.add(as_conn(busy))
    pool.release(as_conn(idle))
    pool.close()
    assert busy.closes == [True]
    assert pool.acquire(KEY) is None
    late = FakeConnection(OTHER)
    pool.release(as_conn(late))  # an exchange that completed during shutdown
    assert late.closes == [False]
    assert pool.acquire(OTHER) is None
    deadlines.close()


async def test_idle_connections_close_after_three_quarters_to_all_of_upstream_idle() -> None:
    pool, deadlines = new_pool()
    first, later = FakeConnection(), FakeConnection()
    released = time.monotonic()
    pool.release(as_conn(first))
    await asyncio.sleep(IDLE * 0.4)  # between the first and second sweep
    later_released = time.monotonic()
    pool.release(as_conn(later))
    await until(lambda: first.closed)
    assert not later.closed  # went idle later, closes later
    await until(lambda: later.closed)
    for conn, since in ((first, released), (later, later_released)):
        assert conn.closes == [False]
        lived = conn.closed_at - since
        assert IDLE * 0.75 <= lived < IDLE + 0.3, lived  # never early; late by a few slots and the loop's lag
    assert pool.acquire(KEY) is None
    # Nothing idle: the pool is not swept any more, nothing is filed.
    sweeps = pool.sweeps
    await asyncio.sleep(IDLE / 2)
    assert pool.sweeps == sweeps and len(deadlines) == 0
    deadlines.close()


async def test_a_reused_connection_starts_a_new_idle_period_and_sweeping_restarts() -> None:
    pool, deadlines = new_pool()
    conn = FakeConnection()
    pool.release(as_conn(conn))
    await asyncio.sleep(IDLE * 0.6)
    assert pool.acquire(KEY) is as_conn(conn)  # serves an exchange...
    reused = time.monotonic()
    pool.release(as_conn(conn))  # ...and goes idle again
    await until(lambda: conn.closed)
    assert conn.closed_at - reused >= IDLE * 0.75
    sweeps = pool.sweeps
    fresh = FakeConnection()
    released = time.monotonic()
    pool.release(as_conn(fresh))  # the pool is swept again
    await until(lambda: fresh.closed)
    assert pool.sweeps > sweeps and fresh.closed_at - released >= IDLE * 0.75
    deadlines.close()


def test_pooled_connections_expire(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            limits = Limits(upstream_idle=0.2)
            async with Proxy(ForwardingHandler(up.port), limits) as proxy, RawClient(proxy.port) as client:
                await client.send(get(b"/"))
                assert (await client.response()).body == b"ok"
                await asyncio.sleep(0.5)
                assert up.transports[0].is_closing() or await closed_by_peer(up)
                await client.send(get(b"/"))
                assert (await client.response()).body == b"ok"
            assert len(up.received) == 2

    run(scenario())
