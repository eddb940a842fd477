"""Tests for gateway.core.route_config: routes and upstreams as configured, and what they refuse."""

from __future__ import annotations

import pytest

from gateway.core.rate_policy import Policy
from gateway.core.route_config import Route, Upstream, build_routes, parse_upstream

UPSTREAM = Upstream(scheme="http", host="127.0.0.1", port=9000)


def test_route_defaults_and_name() -> None:
    route = Route("/api", UPSTREAM)
    assert route.name == "/api"
    assert route.auth_required and not route.strip_prefix and not route.preserve_host
    assert route.groups == frozenset()
    assert (route.connect_timeout, route.read_timeout) == (5.0, 60.0)
    assert Route("/api", UPSTREAM, name="billing").name == "billing"
    assert Route("/café", UPSTREAM).match_key == b"/caf%C3%A9"


@pytest.mark.parametrize("prefix", ["api", "", "/a//b", "/a/../b", "/a/./b", "/a;b", "/a\\b", "/a?b", "/a#b",
                                    "/%61", "/a%2Fb", "//"])
def test_route_rejects_unnormalised_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Route(prefix, UPSTREAM)


def test_route_rejects_non_positive_timeouts() -> None:
    with pytest.raises(ValueError, match="timeouts"):
        Route("/api", UPSTREAM, read_timeout=0)


@pytest.mark.parametrize(
    ("url", "host", "port", "base", "authority"),
    [
        ("http://127.0.0.1:9000", "127.0.0.1", 9000, "", b"127.0.0.1:9000"),
        ("http://127.0.0.1:9000/", "127.0.0.1", 9000, "", b"127.0.0.1:9000"),
        ("HTTP://svc", "svc", 80, "", b"svc:80"),
        ("http://my_service.internal:8080/base/v1/", "my_service.internal", 8080, "/base/v1",
         b"my_service.internal:8080"),
        ("http://[::1]:9000/x", "::1", 9000, "/x", b"[::1]:9000"),
        ("http://[2001:db8::1]", "2001:db8::1", 80, "", b"[2001:db8::1]:80"),
    ],
)
def test_parse_upstream(url: str, host: str, port: int, base: str, authority: bytes) -> None:
    upstream = parse_upstream(url)
    assert (upstream.scheme, upstream.host, upstream.port, upstream.base_path) == ("http", host, port, base)
    assert upstream.authority == authority
    assert upstream.base_path_bytes == base.encode()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:9000", "absolute URL"),
        ("https://svc", "scheme 'https'"),
        ("ftp://svc", "scheme 'ftp'"),
        ("http://", "host is empty"),
        ("http://:9000", "host is empty"),
        ("http://svc:0", "port"),
        ("http://svc:65536", "port"),
        ("http://svc:", "port"),
        ("http://svc:http", "port"),
        ("http://svc:-1", "port"),
        ("http://user:hunter2@svc", "user information"),
        ("http://svc/x?y=1", "query or fragment"),
        ("http://svc/x#y", "query or fragment"),
        ("http://svc/a b", "ASCII without spaces"),
        ("http://svc\n/x", "ASCII without spaces"),
        ("http://své", "ASCII"),
        ("http://sv c", "ASCII"),
        ("http://svc!/", "not a valid host"),
        ("http://a..b", "not a valid host"),
        ("http://::1/", "brackets"),
        ("http://[::1", "unclosed"),
        ("http://[::1]x", "after the IPv6"),
        ("http://[not-ip]:80", "IPv6"),
        ("http://svc//x", "'//'"),
        ("http://svc/a/../b", "normalised"),
        ("http://svc/a;b", "normalised"),
        ("http://svc/a%2Fb", "normalised"),
    ],
)
def test_parse_upstream_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        parse_upstream(url)
    assert "hunter2" not in str(raised.value)


def test_upstream_constructor_validates() -> None:
    with pytest.raises(ValueError, match="scheme"):
        Upstream(scheme="https", host="svc", port=443)
    with pytest.raises(ValueError, match="port"):
        Upstream(scheme="http", host="svc", port=70000)
    with pytest.raises(ValueError, match="trailing slash"):
        Upstream(scheme="http", host="svc", port=80, base_path="/x/")


def _one(extra: dict[str, object]) -> tuple[list[Route], list[str]]:
    problems: list[str] = []
    routes = build_routes([{"prefix": "/api", "upstream": "http://127.0.0.1:9000", **extra}], problems)
    return routes, problems


def test_route_rate_limit_per_credential_by_default() -> None:
    routes, problems = _one({"rate_limit": "1000/minute"})
    assert problems == []
    assert routes[0].rate_limit == Policy(1000, "minute") and routes[0].rate_limit_by == "credential"
    assert _one({})[0][0].rate_limit is None


def test_route_rate_limit_on_a_public_route_counts_addresses() -> None:
    routes, problems = _one({"auth": "none", "rate_limit": "10/second"})
    assert problems == [] and routes[0].rate_limit_by == "address"
    routes, problems = _one({"rate_limit": "10/second", "rate_limit_by": "address"})
    assert problems == [] and routes[0].rate_limit_by == "address"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"rate_limit": "10/day"}, "routes[0].rate_limit: expected N/second or N/minute or N/hour"),
        ({"rate_limit": 10}, 'routes[0].rate_limit: a string expected, e.g. rate_limit = "1000/minute"'),
        ({"rate_limit": "0/minute"}, "routes[0].rate_limit: N must be between 1"),
        ({"rate_limit_by": "user"}, 'routes[0].rate_limit_by: must be "credential" or "address"'),
        ({"auth": "none", "rate_limit_by": "credential"}, "has no credential to count; use \"address\""),
    ],
)
def test_route_rate_limit_errors_name_the_key(extra: dict[str, object], message: str) -> None:
    routes, problems = _one(extra)
    assert routes == []
    assert any(message in p for p in problems), problems
