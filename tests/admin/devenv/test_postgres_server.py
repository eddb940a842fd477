"""The embedded Postgres: URLs and databases, crash and restart on the same data, stale and live pid files."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg
import pytest

from admin.devenv.child_server import EmbeddedServerError
from admin.devenv.postgres_server import EmbeddedPostgres
from tests.admin.devenv.procfs import children_of, is_running, wait_all_gone


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
        assert not is_running(first_pid)
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await connection.fetchval("SELECT 1")
        connection.terminate()

        server.restart()
        postmaster = server.pid
        assert postmaster is not None and postmaster != first_pid
        assert server.port == port
        assert await _select_one(odd_url) == 1  # same data after crash recovery
        backends = children_of(postmaster)
        assert backends  # checkpointer, walwriter...
    assert server.pid is None
    assert wait_all_gone([postmaster, *backends]) == []


def test_postgres_refuses_a_data_dir_in_use_and_recovers_a_stale_pid_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    with EmbeddedPostgres(data_dir) as running:
        with pytest.raises(EmbeddedServerError, match=f"PID {running.pid}"):
            EmbeddedPostgres(data_dir).start()
        assert running.pid is not None and is_running(running.pid)

    # A pid file naming a live process that is not Postgres (the PID was reused) is stale too.
    (data_dir / "postmaster.pid").write_text(f"{os.getpid()}\n{data_dir}\n")
    with EmbeddedPostgres(data_dir) as recovered:
        assert recovered.pid is not None

    broken = EmbeddedPostgres(data_dir, settings={"shared_buffers": "plenty"})
    with pytest.raises(EmbeddedServerError, match="shared_buffers"):
        broken.start()
    assert broken.pid is None

