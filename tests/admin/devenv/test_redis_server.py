"""The embedded Redis: URL, crash and restart on the same port, no persistence, output in its log."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from admin.devenv.redis_server import EmbeddedRedis
from tests.admin.devenv.procfs import is_running


async def test_redis_kill_restart_and_stop(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert repr(server) == f"EmbeddedRedis(data_dir={str(tmp_path / 'redis')!r}, port={server.port})"
        client = aioredis.from_url(server.url)
        try:
            await client.set("greeting", "hello")
            assert await client.get("greeting") == b"hello"
            first_pid, port = server.pid, server.port
            server.kill()
            assert first_pid is not None and not is_running(first_pid)
            with pytest.raises(redis.exceptions.ConnectionError):
                await client.get("greeting")
            server.restart()
            restarted_pid = server.pid
            assert server.port == port
            assert restarted_pid is not None and restarted_pid != first_pid
            assert await client.get("greeting") is None  # no persistence, by design
            await client.set("greeting", "again")
            assert await client.get("greeting") == b"again"
        finally:
            await client.aclose()
        pid = server.pid
    finally:
        server.stop()
    assert server.pid is None
    assert pid is not None and not is_running(pid)
    assert (tmp_path / "redis" / "redis.log").stat().st_size > 0  # output went to the log, not the terminal
