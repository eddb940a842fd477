"""SIGTERM: the gateway stops accepting, lets the request in flight finish, flushes usage and exits 0;
a request outliving shutdown_timeout is cut off and the gateway still exits 0 on time."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tests.support import GatewayProcess, start_gateway, write_config
from tests.support_faults import bearer, children_of, create_token, eventually, is_running

pytestmark = pytest.mark.slow


@dataclass
class SlowUpstream:
    """Answers /slow after `delay` seconds (or when released), everything else at once."""

    delay: float
    runner: web.AppRunner | None = None
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/slow":
            self.arrived.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.delay)
        return web.json_response({"path": request.path, "user": request.headers.get("X-Auth-User")})


@contextlib.asynccontextmanager
async def slow_upstream(delay: float) -> AsyncIterator[SlowUpstream]:
    upstream = SlowUpstream(delay)
    app = web.Application()
    app.router.add_get("/{tail:.*}", upstream.handle)
    upstream.runner = web.AppRunner(app, access_log=None)
    await upstream.runner.setup()
    site = web.TCPSite(upstream.runner, "127.0.0.1", 0)
    await site.start()
    upstream.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield upstream
    finally:
        upstream.release.set()  # a handler still waiting answers now, so cleanup need not wait for it
        await upstream.runner.cleanup()


@contextlib.asynccontextmanager
async def gateway_process(env: dict[str, str], config: Path, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    """A gateway the test signals itself; stopped (by PID) afterwards only if it is still running."""
    gw = await asyncio.to_thread(start_gateway, env, config, tmp_path)
    try:
        yield gw
    finally:
        await asyncio.to_thread(gw.stop)


async def refuses_connections(port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return False


async def get(session: aiohttp.ClientSession, url: str, token: str) -> tuple[int, Any]:
    async with session.get(url, headers=bearer(token)) as resp:
        return resp.status, await resp.json()


def wait_exit(gw: GatewayProcess, limit: float) -> int | None:
    with contextlib.suppress(Exception):
        return gw.process.wait(limit)
    return None


async def test_sigterm_drains_the_request_in_flight_flushes_usage_and_exits_0(
        env: dict[str, str], database_url: str, tmp_path: Path) -> None:
    shutdown_timeout = 5.0
    token = await create_token(env, "svc")
    began = datetime.now(UTC)
    async with slow_upstream(delay=1.5) as upstream:
        # usage is flushed hourly here, so what reaches Postgres was written at shutdown
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}],
                              extra=f"[gateway]\nshutdown_timeout = {shutdown_timeout}\nusage_flush_seconds = 3600.0\n")
        async with gateway_process(env, config, tmp_path) as gw, aiohttp.ClientSession() as session:
            workers = children_of(gw.process.pid)
            assert await get(session, gw.url + "/fast", token["token"]) == (200, {"path": "/fast", "user": "svc"})
            in_flight = asyncio.create_task(get(session, gw.url + "/slow", token["token"]))
            await asyncio.wait_for(upstream.arrived.wait(), 5)

            signalled = time.monotonic()
            gw.process.send_signal(signal.SIGTERM)
            await eventually(lambda: refuses_connections(gw.port), 2, "new connections refused", interval=0.02)
            assert not in_flight.done()  # refused new connections while the slow one was still running

            assert await in_flight == (200, {"path": "/slow", "user": "svc"})
            code = await asyncio.to_thread(wait_exit, gw, shutdown_timeout)
            exited_after = time.monotonic() - signalled
            assert code == 0, gw.log()
            assert exited_after < shutdown_timeout
            assert await refuses_connections(gw.port)
            assert not any(is_running(pid) for pid in workers), workers
            print(f"\nSIGTERM to exit with a 1.5 s request in flight: {exited_after:.2f}s")

    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT id, last_used_at FROM credentials WHERE public_id = $1", token["id"])
        assert row is not None and row["last_used_at"] is not None and row["last_used_at"] >= began
        requests = await conn.fetchval(
            "SELECT coalesce(sum(requests), 0) FROM credential_usage WHERE credential_id = $1", row["id"])
        assert requests == 2  # /fast and /slow, flushed at shutdown
    finally:
        await conn.close()


async def test_sigterm_cuts_off_a_request_outliving_shutdown_timeout(env: dict[str, str], tmp_path: Path) -> None:
    shutdown_timeout = 1.0
    token = await create_token(env, "svc")
    async with slow_upstream(delay=30) as upstream:
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": upstream.url}],
                              extra=f"[gateway]\nshutdown_timeout = {shutdown_timeout}\n")
        async with gateway_process(env, config, tmp_path) as gw, aiohttp.ClientSession() as session:
            in_flight = asyncio.create_task(get(session, gw.url + "/slow", token["token"]))
            await asyncio.wait_for(upstream.arrived.wait(), 5)
            signalled = time.monotonic()
            gw.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(wait_exit, gw, shutdown_timeout + 4)
            exited_after = time.monotonic() - signalled
            assert code == 0, gw.log()
            assert shutdown_timeout <= exited_after < shutdown_timeout + 2
            with pytest.raises(aiohttp.ClientError):
                await in_flight  # cut off, never a made-up success
