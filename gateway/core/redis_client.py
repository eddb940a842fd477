"""The one place a Redis URL becomes a client: a plain redis://, rediss:// or unix:// URL, or Redis Sentinel.

A Sentinel URL names the Sentinels and the monitored service; the client asks them where the master is
before each new connection, and follows it after a failover:

    redis+sentinel://[[user]:password@]host1[:26379],host2[:26379],.../service_name[/db][?sentinel_auth=true]

The user and password are for the Redis servers; the Sentinels are asked without them unless
`sentinel_auth=true` (Sentinels configured with the same `requirepass`, as most charts do). Nothing here puts
a password in a message, a repr or a log line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from gateway.core.redaction import redact_url

SENTINEL_SCHEME = "redis+sentinel"
PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_PORT = 26379  # Sentinel's registered port, when a host names none
_SERVICE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FLAGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class SentinelTarget:
    """What a redis+sentinel:// URL names. The password never shows in its repr."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_auth: bool = False


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The parts of a redis+sentinel:// URL; ValueError saying what is wrong (without the password)."""
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"{shown!r} is not a {SENTINEL_SCHEME}:// URL")
    hostlist = parts.netloc.rpartition("@")[2]
    sentinels = tuple(_host_port(spec, shown) for spec in hostlist.split(",")) if hostlist else ()
    if not sentinels:
        raise ValueError(f"{shown!r} names no Sentinel; write {SENTINEL_SCHEME}://host1:26379,host2:26379/service")
    path = [unquote(segment) for segment in parts.path.strip("/").split("/")] if parts.path.strip("/") else []
    if not path or len(path) > 2 or not _SERVICE_NAME.fullmatch(path[0]):
        raise ValueError(f"{shown!r}: the path is the monitored service name, then optionally the db number "
                         f"(/{{service}}[/{{db}}], the name as in `sentinel monitor <name> ...`)")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"{shown!r}: the database after the service name must be a number")
    sentinel_auth = False
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key != "sentinel_auth" or value.lower() not in _FLAGS:
            raise ValueError(f"{shown!r}: unknown option {key!r}; the only one is sentinel_auth=true|false")
        sentinel_auth = _FLAGS[value.lower()]
    return SentinelTarget(
        sentinels=sentinels,
        service=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        sentinel_auth=sentinel_auth,
    )


def _host_port(spec: str, shown: str) -> tuple[str, int]:
    """(host, port) of one `host[:port]` or `[v6]:port` entry of a Sentinel list."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]/]+)(?::(\d+))?", spec)
    if match is None:
        raise ValueError(f"{shown!r}: {spec!r} is not host[:port]")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or SENTINEL_PORT)
    if not 0 < port < 65536:
        raise ValueError(f"{shown!r}: port {port} of {host!r} is out of range")
    return host, port


def url_problem(url: str) -> str | None:
    """Why `url` cannot be used as the Redis URL (a message without its password), or None when it can."""
    scheme = urlsplit(url).scheme
    if scheme == SENTINEL_SCHEME:
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            return str(exc)
        return None
    if scheme not in PLAIN_SCHEMES:
        return (f"{redact_url(url)!r} is not a redis://, rediss://, unix:// or {SENTINEL_SCHEME}:// URL "
                "(leave it empty to run without Redis)")
    return None


class _SentinelBlockingPool(SentinelConnectionPool, BlockingConnectionPool):
    """Connections to whichever server the Sentinels call master now, bounded as the plain URL's pool is: a
    burst waits (up to the timeout) for one of `max_connections` instead of failing."""


class _SentinelMasterClient(aioredis.Redis):
    """The master's client; closing it closes the connections to the Sentinels too (no socket left open)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            await pool.sentinel_manager.aclose()


def redis_client(url: str, *, max_connections: int, timeout: float) -> aioredis.Redis:
    """A client for `url` whose pool holds at most `max_connections`; `timeout` bounds the wait for a free
    connection, each connect and each call. ValueError (naming redis_url, not the password) for a bad URL."""
    problem = url_problem(url)
    if problem is not None:
        raise ValueError(f"redis_url: {problem}")
    limits: dict[str, Any] = {
        "max_connections": max_connections, "timeout": timeout, "socket_timeout": timeout,
        "socket_connect_timeout": timeout, "health_check_interval": 0,
    }
    if urlsplit(url).scheme != SENTINEL_SCHEME:
        return aioredis.Redis.from_pool(BlockingConnectionPool.from_url(url, **limits))
    target = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if target.sentinel_auth:
        sentinel_kwargs.update(username=target.username, password=target.password)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client: aioredis.Redis = sentinel.master_for(
        target.service, redis_class=_SentinelMasterClient, connection_pool_class=_SentinelBlockingPool,
        db=target.db, username=target.username, password=target.password, **limits)
    return client
