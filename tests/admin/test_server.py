"""`credgate admin` as a real process: it serves, exposes metrics, stops on SIGTERM, and never shows or logs
a secret, a password or a hash after the one response that issues it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.support import cli, free_port


@dataclass
class AdminProcess:
    process: asyncio.subprocess.Process
    url: str
    metrics_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def running_admin(env: dict[str, str], tmp: Path) -> AsyncIterator[AdminProcess]:
    port, metrics_port = free_port(), free_port()
    log_path = tmp / "admin.log"
    run_env = {**env, "CREDGATE_ADMIN_METRICS_LISTEN": f"127.0.0.1:{metrics_port}", "CREDGATE_LOG_LEVEL": "DEBUG",
               "PYTHONUNBUFFERED": "1"}
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "admin", "admin", "--listen", f"127.0.0.1:{port}", env=run_env,
            stdout=log_fd, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
    finally:
        os.close(log_fd)
    admin = AdminProcess(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", log_path)
    try:
        deadline = time.monotonic() + 30
        while "credgate admin listening on" not in admin.log():
            assert process.returncode is None, admin.log()
            assert time.monotonic() < deadline, admin.log()
            await asyncio.sleep(0.05)
        yield admin
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def exchange(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, str]:
    async with session.request(method, url, **kwargs) as resp:
        return resp.status, await resp.text()


async def test_secrets_appear_once_and_never_in_responses_or_logs(env: dict[str, str], tmp_path: Path,
                                                                   database_url: str) -> None:
    root = json.loads(await cli(env, "users", "create", "root", "--admin"))
    shown_once: list[str] = [root["password"]]
    later: list[str] = []  # every response body after the issuing ones
    # unsafe=True: the jar otherwise ignores cookies from an IP address such as 127.0.0.1
    jar = aiohttp.CookieJar(unsafe=True)
    async with running_admin(env, tmp_path) as admin, aiohttp.ClientSession(cookie_jar=jar) as session:
        api = admin.url + "/api/v1"
        status, text = await exchange(session, "POST", api + "/session",
                                      json={"username": "root", "password": root["password"]})
        assert status == 200
        csrf = {"X-CSRF-Token": json.loads(text)["csrf_token"]}
        ids = []
        for kind in ("token", "key"):
            status, text = await exchange(session, "POST", api + "/credentials", json={"kind": kind}, headers=csrf)
            assert status == 201
            created = json.loads(text)
            ids.append(created["id"])
            shown_once.append(created.get("token") or created["secret"])
            for key in (f"k-{kind}", f"k-{kind}"):  # the retry replays the same secret
                status, text = await exchange(session, "POST", f"{api}/credentials/{created['id']}/rotate",
                                              json={"grace_seconds": 30}, headers={**csrf, "Idempotency-Key": key})
                assert status == 200
                rotated = json.loads(text)
                shown_once.append(rotated.get("token") or rotated["secret"])
        status, text = await exchange(session, "POST", api + "/users/root/password", headers=csrf)
        assert status == 409  # not your own: that would log you out mid-test
        for path in ["/credentials", *(f"/credentials/{i}" for i in ids), *(f"/credentials/{i}/usage" for i in ids),
                     "/audit?limit=500", "/users", "/session"]:
            status, text = await exchange(session, "GET", api + path)
            assert status == 200, (path, text)
            later.append(text)
        status, metrics = await exchange(session, "GET", admin.metrics_url)
        assert status == 200
        assert 'credgate_admin_requests_total{method="POST",route="/api/v1/credentials",status="201"} 2.0' in metrics
        assert 'credgate_admin_credentials{status="valid"}' in metrics
        assert 'credgate_admin_credentials_expiring{within_days="7"}' in metrics
    assert admin.process.returncode == 0, admin.log()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT secret_hash, previous_secret_hash FROM credentials")
        hashes = [h for row in rows for h in row if h] + [await conn.fetchval(
            "SELECT password_hash FROM principals WHERE name = 'root'")]
    finally:
        await conn.close()
    log = admin.log()
    assert '"path":"/api/v1/credentials"' in log  # the access log is there, and it is what we grep
    for secret in shown_once + hashes:
        assert secret not in log
        assert all(secret not in text for text in later)
        assert secret.split("$")[-1] not in log  # not even the raw hash digest


async def test_refuses_to_start_on_an_unmigrated_database(env: dict[str, str], empty_database_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "admin", "admin", "--listen", f"127.0.0.1:{free_port()}",
        env={**env, "CREDGATE_DATABASE_URL": empty_database_url, "CREDGATE_ADMIN_METRICS_LISTEN": ""},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert b"credgate migrate" in err


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999"])
async def test_a_bad_listen_address_is_exit_2(env: dict[str, str], listen: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "admin", "admin", "--listen", listen, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2 and b"HOST:PORT" in err
