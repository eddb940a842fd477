"""A credgate deployment on hosts of the test's own (tests.deploy.netns): Postgres, Redis, the admin service,
gateway replicas and a recording upstream, each in its namespace, and the clients the tests use."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from admin.devenv.postgres_server import POSTGRES_SYSTEM_USER, EmbeddedPostgres, postgres_bin_dir
from admin.devenv.processes import child_environment
from admin.devenv.redis_server import redis_server_path
from gateway.core import store
from tests.conftest import credgate_env
from tests.deploy.netns import Host, HostProcess, Network, accepts, network, wait_until
from tests.support import cli, metric, server_dir, write_config

# --- a credgate deployment on those hosts ---------------------------------------------------------------------

# Ports inside the namespaces: each host has its own port space, so fixed numbers never collide, and none is the
# machine's own 5432 or 6379.
POSTGRES_PORT = 5433
REDIS_PORT = 6380
GATEWAY_PORT = 8080
METRICS_PORT = 9100
ADMIN_PORT = 8081


def start_postgres(host: Host, data: Path) -> str:
    """A Postgres listening on the host's address only; returns its URL. EmbeddedPostgres runs initdb (as its
    unprivileged system user, with the permissions that takes) on 127.0.0.1 once; then the same cluster is
    started inside the namespace."""
    cluster = data / "pg"
    embedded = EmbeddedPostgres(cluster)
    embedded.start()
    embedded.stop()
    with open(cluster / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {host.network.cidr} trust\n")
    account = POSTGRES_SYSTEM_USER if os.geteuid() == 0 else str(os.geteuid())
    host.spawn([
        "setpriv", f"--reuid={account}", f"--regid={account}", "--clear-groups", "--",
        str(postgres_bin_dir() / "postgres"), "-D", str(cluster), "-p", str(POSTGRES_PORT), "-k", "",
        "-c", f"listen_addresses={host.address}", "-c", "fsync=off", "-c", "synchronous_commit=off",
        "-c", "full_page_writes=off", "-c", "max_connections=200",
    ], data / "postgres.log", child_environment())
    wait_until(lambda: accepts(host.address, POSTGRES_PORT), 30, f"postgres on {host.address}")
    return f"postgresql://postgres@{host.address}:{POSTGRES_PORT}/postgres"


def start_redis(host: Host, data: Path) -> str:
    host.spawn([
        str(redis_server_path()), "--bind", host.address, "--port", str(REDIS_PORT), "--save", "",
        "--appendonly", "no", "--protected-mode", "no", "--dir", str(data), "--daemonize", "no",
    ], data / "redis.log", child_environment())
    wait_until(lambda: accepts(host.address, REDIS_PORT), 30, f"redis on {host.address}")
    return f"redis://{host.address}:{REDIS_PORT}/0"


def gateway_env(env: Mapping[str, str], host: Host) -> dict[str, str]:
    return {**env, "CREDGATE_GATEWAY_METRICS_LISTEN": f"{host.address}:{METRICS_PORT}", "PYTHONUNBUFFERED": "1",
            "CREDGATE_GATEWAY_ACCESS_LOG": "off", "CREDGATE_DEBUG_WORKER_HEADER": "1",
            # Usage is flushed often so that the sums are readable within the test.
            "CREDGATE_GATEWAY_USAGE_FLUSH_SECONDS": "0.5"}


@dataclass
class Replica:
    """One `credgate gateway` on a host of its own, restartable on the same address."""

    host: Host
    env: dict[str, str]
    config: Path
    log_dir: Path
    process: HostProcess | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host.address}:{GATEWAY_PORT}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host.address}:{METRICS_PORT}/metrics"

    def start(self, timeout: float = 30) -> Replica:
        self.starts += 1
        log_path = self.log_dir / f"gateway-{self.host.name}-{self.starts}.log"
        self.process = self.host.spawn([
            sys.executable, "-m", "admin", "gateway", "--config", str(self.config),
            "--listen", f"{self.host.address}:{GATEWAY_PORT}", "--workers", "1",
        ], log_path, self.env)
        process = self.process
        wait_until(lambda: "listening on" in process.log() or not process.running(), timeout,
                   f"gateway on {self.host.name}:\n{process.log()}")
        assert process.running(), f"gateway on {self.host.name} exited:\n{process.log()}"
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    def log_tail(self, lines: int = 60) -> str:
        """The end of the running gateway's log, for a failure message."""
        return "\n".join(self.process.log().splitlines()[-lines:]) if self.process is not None else ""


def start_admin(host: Host, env: Mapping[str, str], log_dir: Path) -> str:
    """`credgate admin` on the host's address; returns the API's base URL."""
    process = host.spawn([sys.executable, "-m", "admin", "admin", "--listen", f"{host.address}:{ADMIN_PORT}"],
                         log_dir / "admin.log",
                         {**env, "CREDGATE_ADMIN_METRICS_LISTEN": "", "CREDGATE_ADMIN_ACCESS_LOG": "off",
                          "PYTHONUNBUFFERED": "1"})
    wait_until(lambda: "listening on" in process.log() or not process.running(), 30, f"admin:\n{process.log()}")
    assert process.running(), f"admin exited:\n{process.log()}"
    return f"http://{host.address}:{ADMIN_PORT}/api/v1"


@dataclass
class RecordingUpstream:
    """A real aiohttp upstream on a namespace host: records the credential id of every request it received."""

    url: str
    runner: web.AppRunner
    credentials: list[str] = field(default_factory=list)


async def start_upstream(host: Host) -> RecordingUpstream:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Auth-Credential-Id", "-"))
        return web.json_response({"credential": seen[-1]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listener = host.listener()
    await web.SockSite(runner, listener).start()
    return RecordingUpstream(f"http://{host.address}:{listener.getsockname()[1]}", runner, seen)


@dataclass
class AdminApi:
    """The admin JSON API as a script uses it: an administrator's bearer token, no session."""

    url: str
    session: aiohttp.ClientSession
    token: str

    async def call(self, method: str, path: str, expect: int, body: Any = None) -> Any:
        async with self.session.request(method, self.url + path, json=body,
                                        headers={"Authorization": f"Bearer {self.token}"}) as resp:
            text = await resp.text()
            assert resp.status == expect, (method, path, resp.status, text)
            return json.loads(text) if text else None

    async def create_token(self, owner: str) -> dict[str, Any]:
        created: dict[str, Any] = await self.call("POST", "/credentials", 201, {"kind": "token", "owner": owner})
        return created

    async def revoke(self, credential_id: str) -> None:
        await self.call("DELETE", f"/credentials/{credential_id}", 204)

    async def total_requests(self, credential_id: str) -> int:
        usage = await self.call("GET", f"/credentials/{credential_id}/usage", 200)
        return int(usage["total_requests"])


async def admin_api(url: str, env: Mapping[str, str], session: aiohttp.ClientSession) -> AdminApi:
    """An administrator (made with the CLI, from the root namespace) and its token; then a service account."""
    await cli(dict(env), "users", "create", "root", "--admin")
    root = json.loads(await cli(dict(env), "credentials", "create", "--owner", "root", "--kind", "token"))
    api = AdminApi(url, session, root["token"])
    await api.call("POST", "/users", 201, {"name": "svc", "kind": "service"})
    return api


async def scrape_metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url) as resp:
        assert resp.status == 200
        return metric(await resp.text(), name) or 0.0


# Polling and outage tests send many failures from one address (the test's): never let the throttle answer.
NO_THROTTLE = "[throttle]\nmax_failures = 100000\nper_address_max_failures = 100000\nper_id_max_failures = 100000\n"


@dataclass
class Deployment:
    """Postgres, Redis and the admin service on host `store`, a recording upstream on host `edge`, and gateway
    replicas on hosts of their own; the test process reaches all of them from the root namespace."""

    net: Network
    data: Path
    env: dict[str, str]  # a credgate process's environment in the root namespace (the CLI)
    database_url: str
    redis_url: str
    upstream: RecordingUpstream
    api: AdminApi
    session: aiohttp.ClientSession
    replicas: dict[str, Replica] = field(default_factory=dict)

    async def start_replicas(self, names: Sequence[str],
                             store_urls: Mapping[str, tuple[str, str]] | None = None) -> list[Replica]:
        """Start gateways on these hosts at once; `store_urls` gives a replica other (database, Redis) URLs."""
        config = write_config(self.data / "gateway.toml", [{"prefix": "/", "upstream": self.upstream.url}],
                              extra=NO_THROTTLE)
        started = []
        for name in names:
            host = self.net.hosts[name]
            database_url, redis_url = (store_urls or {}).get(name, (self.database_url, self.redis_url))
            env = gateway_env({**self.env, "CREDGATE_DATABASE_URL": database_url, "CREDGATE_REDIS_URL": redis_url},
                              host)
            started.append(Replica(host, env, config, self.data))
        await asyncio.gather(*(asyncio.to_thread(replica.start) for replica in started))
        for replica in started:
            self.replicas[replica.host.name] = replica
            await self.listening(replica)
        return started

    async def listening(self, replica: Replica, within: float = 15) -> None:
        """Wait for the replica's LISTEN connection: a verification racing its connection is not cached."""
        deadline = time.monotonic() + within
        while await scrape_metric(self.session, replica.metrics_url, "credgate_listen_connected") != 1:
            assert time.monotonic() < deadline, (replica.host.name, replica.process and replica.process.log())
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def deployment(replica_hosts: Sequence[str], prefix: str) -> AsyncIterator[Deployment]:
    """Hosts `store`, `edge` and one per replica (not started: see Deployment.start_replicas)."""
    with server_dir(prefix) as data, network(["store", "edge", *replica_hosts]) as net:
        store_host = net.hosts["store"]
        database_url = await asyncio.to_thread(start_postgres, store_host, data)
        redis_url = await asyncio.to_thread(start_redis, store_host, data)
        conn = await asyncpg.connect(database_url)
        try:
            await store.migrate(conn)
        finally:
            await conn.close()
        env = credgate_env(database_url, redis_url, data)
        upstream = await start_upstream(net.hosts["edge"])
        try:
            admin_url = await asyncio.to_thread(start_admin, store_host, env, data)
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
                api = await admin_api(admin_url, env, session)
                yield Deployment(net, data, env, database_url, redis_url, upstream, api, session)
        finally:
            await upstream.runner.cleanup()
