"""gateway.redis_tier against a real Redis: bursts share a bounded pool, a dead Redis degrades to no answer."""

from __future__ import annotations

import asyncio
import socket

from gateway.core.settings import Settings
from gateway.redis_tier import RedisTier


async def test_a_burst_larger_than_the_pool_waits_for_connections_instead_of_failing(settings: Settings) -> None:
    tier = RedisTier(settings.redis_url.reveal(), 60, 5)
    try:
        answers = await asyncio.gather(*(tier.get(f"id{i}") for i in range(500)))
        assert answers == [(None, False)] * 500
        assert tier.up  # no call was refused for want of a connection
    finally:
        await tier.close()


async def test_an_unreachable_redis_is_skipped_within_its_deadline() -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]  # nothing listens here
    states: list[bool] = []
    tier = RedisTier(f"redis://127.0.0.1:{port}/0", 60, 5, on_state=states.append, timeout=0.2)
    try:
        assert await asyncio.wait_for(tier.get("anything"), 2) == (None, False)
        assert not tier.up and states == [False]
        assert await tier.get("again") == (None, False)  # skipped for a second: no new attempt
    finally:
        await tier.close()
