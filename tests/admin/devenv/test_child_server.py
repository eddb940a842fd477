"""What both embedded servers share: a failed start reports the server's log, and no server outlives us."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from admin.devenv.child_server import EmbeddedServerError
from admin.devenv.redis_server import EmbeddedRedis
from tests.admin.devenv.procfs import is_running, wait_all_gone

REPO_ROOT = Path(__file__).resolve().parents[3]


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
        from admin.devenv.postgres_server import EmbeddedPostgres
        from admin.devenv.redis_server import EmbeddedRedis
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
        assert all(is_running(pid) for pid in server_pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    assert wait_all_gone(server_pids) == []
