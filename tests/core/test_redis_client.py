"""Redis URLs: the redis+sentinel:// form parsed in one place, refused with the key named and no password
shown, and clients that work against a real Redis and real Sentinels."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio.connection import BlockingConnectionPool

from gateway.core.redis_client import SentinelTarget, parse_sentinel_url, redis_client, url_problem
from gateway.core.settings import SettingsError, load_settings
from tests.deploy.stores import SENTINEL_SERVICE, redis_sentinels

BASE_ENV = {"CREDGATE_SECRET_KEY": "k" * 40, "CREDGATE_DATABASE_URL": "postgresql://u@127.0.0.1:5432/db"}
PASSWORD = "s3cr3t-Zq9"


@pytest.mark.parametrize(("url", "expected"), [
    ("redis+sentinel://10.0.0.1/mymaster", SentinelTarget((("10.0.0.1", 26379),), "mymaster")),
    ("redis+sentinel://a:26380,b,c:26381/cache/3",
     SentinelTarget((("a", 26380), ("b", 26379), ("c", 26381)), "cache", db=3)),
    ("redis+sentinel://[::1]:26379,[fe80::1]/svc.main_1-a", SentinelTarget((("::1", 26379), ("fe80::1", 26379)),
                                                                           "svc.main_1-a")),
    (f"redis+sentinel://:{PASSWORD}@s1,s2/m?sentinel_auth=true",
     SentinelTarget((("s1", 26379), ("s2", 26379)), "m", password=PASSWORD, sentinel_auth=True)),
    (f"redis+sentinel://app:{PASSWORD}@s1/m/2?sentinel_auth=no",
     SentinelTarget((("s1", 26379),), "m", db=2, username="app", password=PASSWORD)),
], ids=["one-host", "ports-and-db", "ipv6", "password-sentinel-auth", "user-password"])
def test_sentinel_url_parts(url: str, expected: SentinelTarget) -> None:
    assert parse_sentinel_url(url) == expected
    assert url_problem(url) is None
    assert PASSWORD not in repr(parse_sentinel_url(url))


@pytest.mark.parametrize(("url", "says"), [
    (f"redis+sentinel://:{PASSWORD}@/mymaster", "names no Sentinel"),
    (f"redis+sentinel://:{PASSWORD}@s1:26379", "service name"),
    (f"redis+sentinel://:{PASSWORD}@s1/a/b/c", "service name"),
    (f"redis+sentinel://:{PASSWORD}@s1/m/zero", "must be a number"),
    (f"redis+sentinel://:{PASSWORD}@s1:99999/m", "out of range"),
    (f"redis+sentinel://:{PASSWORD}@s1:port/m", "is not host[:port]"),
    (f"redis+sentinel://:{PASSWORD}@s1/m?master=x", "unknown option 'master'"),
    (f"redis+sentinel://:{PASSWORD}@s1/m?sentinel_auth=maybe", "sentinel_auth=true|false"),
    (f"http://:{PASSWORD}@s1/0", "is not a redis://, rediss://, unix:// or redis+sentinel:// URL"),
])
def test_bad_urls_are_refused_naming_the_key_never_the_password(url: str, says: str) -> None:
    problem = url_problem(url)
    assert problem is not None and says in problem, problem
    assert PASSWORD not in problem
    with pytest.raises(SettingsError) as info:
        load_settings(None, env=dict(BASE_ENV, CREDGATE_REDIS_URL=url))
    assert any(p.startswith("redis_url: ") and says in p for p in info.value.problems), info.value.problems
    assert PASSWORD not in str(info.value)
    with pytest.raises(ValueError, match=r"^redis_url: ") as raised:
        redis_client(url, max_connections=2, timeout=0.5)
    assert PASSWORD not in str(raised.value)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://h/0", "unix:///run/redis.sock",
                                 "redis+sentinel://s1,s2,s3/credgate"])
def test_settings_accept_every_supported_form(url: str) -> None:
    settings = load_settings(None, env=dict(BASE_ENV, CREDGATE_REDIS_URL=url))
    assert settings.redis_url.reveal() == url


async def test_plain_url_client_is_bounded(redis_url: str) -> None:
    client = redis_client(redis_url, max_connections=3, timeout=0.5)
    try:
        pool = client.connection_pool
        assert isinstance(pool, BlockingConnectionPool) and pool.max_connections == 3
        assert await client.ping()
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_sentinel_client_talks_to_the_master(tmp_path: Path) -> None:
    async with redis_sentinels(count=1) as rs:
        client = redis_client(rs.url, max_connections=3, timeout=0.5)
        try:
            pool = client.connection_pool
            assert isinstance(pool, BlockingConnectionPool) and pool.max_connections == 3
            await client.set("credgate:probe", b"1")
            assert await client.get("credgate:probe") == b"1"
            info = await client.info("server")
            assert int(info["tcp_port"]) == rs.primary.port  # the master, not the replica
            assert SENTINEL_SERVICE in repr(pool)
        finally:
            await client.aclose()  # the Sentinels' connections too: an unclosed one would fail the test
