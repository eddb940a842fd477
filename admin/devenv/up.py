"""`credgate up`: the whole product on one machine, for `make run`.

Starts an embedded Postgres and Redis under the data directory (unless CREDGATE_DATABASE_URL /
CREDGATE_REDIS_URL point elsewhere), migrates, bootstraps a demo admin, service account and token, and
runs the demo upstream, the gateway and the admin service until Ctrl-C, which stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from admin import lifecycle
from admin.devenv.child_server import EmbeddedServerError, stop_all
from admin.devenv.demo_upstream import start_demo_upstream
from admin.devenv.postgres_server import EmbeddedPostgres
from admin.devenv.redis_server import EmbeddedRedis
from gateway.core import admin_sql, database, formats, store
from gateway.core.redaction import redact_url
from gateway.core.settings import Settings, SettingsError, load_settings, parse_listen

DEMO_SERVICE = "demo-service"
DEMO_ADMIN = "admin"
DEMO_GROUP = "finance"


def _say(message: str) -> None:
    print(message, flush=True)


def _raw_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}  # load_settings reports it properly


def _ensure_secret_key(raw: dict[str, Any]) -> None:
    """The demo keeps a generated server key in the data directory (0600), made on first start."""
    key_file = raw.get("secret_key_file")
    if raw.get("secret_key") or os.environ.get("CREDGATE_SECRET_KEY") or not isinstance(key_file, str) or not key_file:
        return
    path = Path(key_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48) + "\n")


def run_up(args: argparse.Namespace) -> int:
    raw = _raw_config(args.config)
    data_dir = Path(args.data_dir or os.environ.get("CREDGATE_DATA_DIR") or raw.get("data_dir") or ".credgate")
    data_dir.mkdir(parents=True, exist_ok=True)
    _ensure_secret_key(raw)
    try:
        try:
            if not os.environ.get("CREDGATE_DATABASE_URL"):
                url = str(raw.get("database_url") or "postgresql://postgres@127.0.0.1:54329/credgate")
                parts = urlsplit(url)
                pg = EmbeddedPostgres(data_dir / "postgres", port=parts.port or 54329)
                pg.start()
                pg.create_database(parts.path.lstrip("/") or "credgate")
                os.environ["CREDGATE_DATABASE_URL"] = url
                _say(f"embedded Postgres running on 127.0.0.1:{pg.port} (data in {data_dir / 'postgres'})")
            if not os.environ.get("CREDGATE_REDIS_URL"):
                url = str(raw.get("redis_url") or "redis://127.0.0.1:63799/0")
                rd = EmbeddedRedis(data_dir / "redis", port=urlsplit(url).port or 63799)
                rd.start()
                os.environ["CREDGATE_REDIS_URL"] = url
                _say(f"embedded Redis running on 127.0.0.1:{rd.port}")
        except EmbeddedServerError as exc:
            print(f"credgate up: {exc}", file=sys.stderr)
            return 1
        try:
            settings = load_settings(args.config)
        except SettingsError as exc:
            print(exc.report(), file=sys.stderr)
            return 2
        return asyncio.run(_run(settings, args.config))
    except KeyboardInterrupt:
        return 0
    finally:
        # Every embedded server started above, newest first.
        stop_all()
        _say("credgate up: stopped")


async def _bootstrap(settings: Settings, data_dir: Path) -> tuple[str, str]:
    """Migrate; make sure the demo admin, group, service account and token exist. Returns (password, token)."""

    pool = await database.create_pool(settings.database_url.reveal(), min_size=1, max_size=2,
                                       statement_cache_size=settings.database_statement_cache_size)
    hash_secret = lifecycle.secret_hasher(settings.argon2)
    actor = lifecycle.cli_actor()
    try:
        async with pool.acquire() as conn:
            applied = await store.migrate(conn)
            if applied:
                _say(f"migrated: {', '.join(applied)}")
            have_admin = await conn.fetchrow(admin_sql.PRINCIPAL_BY_NAME, DEMO_ADMIN)
            have_group = await conn.fetchrow(admin_sql.GROUP_BY_NAME, DEMO_GROUP)
            have_service = await conn.fetchrow(admin_sql.PRINCIPAL_BY_NAME, DEMO_SERVICE)
        if have_group is None:
            await lifecycle.create_group(pool, actor, DEMO_GROUP, "demo permission group")
        if have_admin is None:
            await lifecycle.create_principal(pool, actor, hash_secret, DEMO_ADMIN, admin=True, generate=True)
        # The demo prints a working login every time: a fresh admin password per `credgate up`.
        password = await lifecycle.reset_password(pool, actor, hash_secret, DEMO_ADMIN)
        if have_service is None:
            await lifecycle.create_principal(pool, actor, hash_secret, DEMO_SERVICE, service=True, groups=[DEMO_GROUP])
        token = await _demo_token(pool, actor, hash_secret, settings, data_dir)
    finally:
        await pool.close()
    return password, token


async def _demo_token(
    pool: Any, actor: store.Actor, hash_secret: lifecycle.HashSecret, settings: Settings, data_dir: Path
) -> str:
    """Reuse the demo token kept in the data directory while it is still valid, else issue a new one."""
    token_file = data_dir / "demo-token"
    with contextlib.suppress(OSError):
        token = token_file.read_text().strip()
        parsed = formats.parse_token(token)
        if parsed is not None:
            async with pool.acquire() as conn:
                row = await conn.fetchrow(store.CREDENTIAL_BY_PUBLIC_ID, parsed.public_id)
            if row is not None and store.credential_status(row, lifecycle.now_utc()) == "valid":
                return token
    issued = await lifecycle.create_credential(
        pool, actor, hash_secret, settings.policy, owner=DEMO_SERVICE, kind="token", name="make run demo"
    )
    assert issued.token is not None
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(issued.token + "\n")
    return issued.token


async def _run(settings: Settings, config: str | None) -> int:
    data_dir = Path(settings.data_dir)
    try:
        password, token = await _bootstrap(settings, data_dir)
    except (OSError, asyncpg.PostgresError) as exc:
        print(
            f"credgate up: cannot prepare the database at {redact_url(settings.database_url.reveal())}: {exc}",
            file=sys.stderr,
        )
        return 1
    upstream_port = _demo_upstream_port(settings)
    upstream = await start_demo_upstream("127.0.0.1", upstream_port)
    base = [sys.executable, "-m", "admin"] + (["--config", config] if config else [])
    children = [
        await asyncio.create_subprocess_exec(*base, service, stdin=asyncio.subprocess.DEVNULL)
        for service in ("gateway", "admin")
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gw_host, gw_port = parse_listen(settings.gateway.listen)
    adm_host, adm_port = parse_listen(settings.admin.listen)
    for host, port in ((gw_host, gw_port), (adm_host, adm_port)):
        await _wait_listening(host, port, children)
    cfg = f" --config {config}" if config else ""
    _say(f"""
credgate is up.
  gateway      http://{gw_host}:{gw_port}   (metrics http://{settings.gateway.metrics_listen}/metrics)
  admin UI     http://{adm_host}:{adm_port}/   sign in as: {DEMO_ADMIN} / {password}
  admin API    http://{adm_host}:{adm_port}/api/v1
  upstream     http://127.0.0.1:{upstream.port}   (echoes the request headers)

Try it (the demo token belongs to service account {DEMO_SERVICE}, group {DEMO_GROUP}):
  curl -s http://{gw_host}:{gw_port}/hello -H 'Authorization: Bearer {token}'
  curl -s http://{gw_host}:{gw_port}/hello              # 401 without a credential
Manage credentials:  .venv/bin/credgate{cfg} credentials list
Press Ctrl-C to stop everything.
""")
    waiters = [asyncio.ensure_future(stop.wait())] + [asyncio.ensure_future(c.wait()) for c in children]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    failed = [c for c in children if c.returncode not in (None, 0)]
    if failed:
        print("credgate up: a service exited unexpectedly (see its messages above); stopping", file=sys.stderr)
    for child in children:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            await asyncio.wait_for(child.wait(), settings.gateway.shutdown_timeout + 10)
        except TimeoutError:
            child.kill()
            await child.wait()
    for waiter in waiters:
        waiter.cancel()
    await upstream.stop()
    return 1 if failed else 0


async def _wait_listening(host: str, port: int, children: list[Any], within: float = 30.0) -> None:
    """Wait until a service accepts connections (or one of the children has died)."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline and all(c.returncode is None for c in children):
        try:
            _reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return


def _demo_upstream_port(settings: Settings) -> int:
    for route in settings.routes:
        if route.upstream.host in ("127.0.0.1", "localhost"):
            return route.upstream.port
    return 9000
