"""Embedded Postgres and Redis as child processes, and the demo upstream's HTTP and WebSocket echo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from admin.devenv.demo_upstream import start_demo_upstream
from admin.devenv.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _is_running(pid: int) -> bool:
    """True if /proc shows PID as a live process (a zombie has exited and counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _children_of(parent: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == str(parent):
                children.append(int(entry))
    return children


def _wait_all_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if _is_running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


async def _select_one(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        value: int = await connection.fetchval("SELECT 1")
        return value
    finally:
        await connection.close()


async def test_postgres_survives_kill_and_restart_and_stops_without_leftovers(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    with server:
        assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        assert repr(server) == f"EmbeddedPostgres(data_dir={str(tmp_path / 'pg')!r}, port={server.port})"
        assert await _select_one(server.url) == 1
        odd_url = server.create_database('credgate "odd" db')
        assert server.create_database('credgate "odd" db') == odd_url  # already there: no error
        assert await _select_one(odd_url) == 1

        connection = await asyncpg.connect(server.url)
        first_pid, port = server.pid, server.port
        assert first_pid is not None
        server.kill()
        assert not _is_running(first_pid)
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await connection.fetchval("SELECT 1")
        connection.terminate()

        server.restart()
        postmaster = server.pid
        assert postmaster is not None and postmaster != first_pid
        assert server.port == port
        assert await _select_one(odd_url) == 1  # same data after crash recovery
        backends = _children_of(postmaster)
        assert backends  # checkpointer, walwriter...
    assert server.pid is None
    assert _wait_all_gone([postmaster, *backends]) == []


def test_postgres_refuses_a_data_dir_in_use_and_recovers_a_stale_pid_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    with EmbeddedPostgres(data_dir) as running:
        with pytest.raises(EmbeddedServerError, match=f"PID {running.pid}"):
            EmbeddedPostgres(data_dir).start()
        assert running.pid is not None and _is_running(running.pid)

    # A pid file naming a live process that is not Postgres (the PID was reused) is stale too.
    (data_dir / "postmaster.pid").write_text(f"{os.getpid()}\n{data_dir}\n")
    with EmbeddedPostgres(data_dir) as recovered:
        assert recovered.pid is not None

    broken = EmbeddedPostgres(data_dir, settings={"shared_buffers": "plenty"})
    with pytest.raises(EmbeddedServerError, match="shared_buffers"):
        broken.start()
    assert broken.pid is None


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
            assert first_pid is not None and not _is_running(first_pid)
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
    assert pid is not None and not _is_running(pid)
    assert (tmp_path / "redis" / "redis.log").stat().st_size > 0  # output went to the log, not the terminal


def test_a_failed_start_reports_the_server_log(tmp_path: Path) -> None:
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        server = EmbeddedRedis(tmp_path / "redis", port=occupant.getsockname()[1])
        with pytest.raises(EmbeddedServerError, match=r"(?s)exited with code .*Address already in use"):
            server.start()
    assert server.pid is None


def test_servers_die_with_a_crashed_parent(tmp_path: Path) -> None:
    parent_script = textwrap.dedent(
        f"""
        import json, sys, time
        from pathlib import Path
        from admin.devenv.embedded import EmbeddedPostgres, EmbeddedRedis
        pg = EmbeddedPostgres(Path({str(tmp_path / "pg")!r}))
        pg.start()
        rd = EmbeddedRedis(Path({str(tmp_path / "redis")!r}))
        rd.start()
        print(json.dumps([pg.pid, rd.pid]), flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        server_pids: list[int] = json.loads(parent.stdout.readline())
        assert all(_is_running(pid) for pid in server_pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    assert _wait_all_gone(server_pids) == []


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
