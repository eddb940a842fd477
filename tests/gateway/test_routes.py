"""Tests for gateway.routes: route matching on normalised paths, upstream paths, lenient upstreams' view."""

from __future__ import annotations

import unicodedata
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core.route_config import Route, Upstream
from gateway.core.targets import normalize_target
from gateway.routes import RouteTable, upstream_path
from tests.core.test_targets import TARGET_PIECES

UPSTREAM = Upstream(scheme="http", host="127.0.0.1", port=9000)

BYPASS_TABLE = RouteTable([
    Route("/", UPSTREAM, auth_required=True),
    Route("/public", UPSTREAM, auth_required=False),
    Route("/admin", UPSTREAM, groups=frozenset({"admins"})),
])


@pytest.mark.parametrize(
    ("target", "expected_prefix"),
    [
        (b"/public/x", "/public"),
        (b"/public/../admin", "/admin"),
        (b"/public/%2e%2e/admin", "/admin"),
        (b"/public/%2e%2e/%61dmin/users", "/admin"),
        (b"//admin", "/admin"),
        (b"http://example.com/public/../admin", "/admin"),
        (b"/%61dmin", "/admin"),
        (b"/publicx/../admin", "/admin"),
        (b"/ADMIN", "/"),
        (b"/publicadmin", "/"),
    ],
)
def test_normalised_paths_reach_the_route_they_name(target: bytes, expected_prefix: str) -> None:
    normal = normalize_target(target)
    assert normal is not None
    route = BYPASS_TABLE.match(normal[0])
    assert route is not None
    assert route.prefix == expected_prefix


def test_route_table_longest_prefix_on_segment_boundaries() -> None:
    table = RouteTable([
        Route("/", UPSTREAM, name="root"),
        Route("/api", UPSTREAM),
        Route("/api/v1/admin", UPSTREAM),
        Route("/api/v2/", UPSTREAM),
    ])
    cases = {
        b"/": "root",
        b"/x": "root",
        b"/apix": "root",
        b"/api": "/api",
        b"/api/": "/api",
        b"/api/x/y": "/api",
        b"/api/v1": "/api",
        b"/api/v1/adminx": "/api",
        b"/api/v1/admin": "/api/v1/admin",
        b"/api/v1/admin/": "/api/v1/admin",
        b"/api/v1/admin/users/1/with/a/long/tail": "/api/v1/admin",
        b"/api/v2": "/api/v2/",
        b"/api/v2/z": "/api/v2/",
    }
    for path, name in cases.items():
        route = table.match(path)
        assert route is not None and route.name == name, path


def test_route_table_without_root_and_empty() -> None:
    table = RouteTable([Route("/api", UPSTREAM)])
    assert table.match(b"/") is None
    assert table.match(b"/apix/y") is None
    assert table.match(b"/other/long/path/beyond/every/prefix") is None
    assert table.match(b"/api/x") is table.routes[0]
    assert RouteTable([]).match(b"/api") is None


def test_route_table_rejects_duplicate_prefixes() -> None:
    with pytest.raises(ValueError, match="twice"):
        RouteTable([Route("/api", UPSTREAM), Route("/api/", UPSTREAM)])


@pytest.mark.parametrize(
    ("prefix", "strip", "base", "path", "query", "expected"),
    [
        ("/api", False, "", b"/api/x", b"", b"/api/x"),
        ("/api", False, "/base", b"/api/x", b"?q=1", b"/base/api/x?q=1"),
        ("/api", True, "", b"/api/x", b"?q=1", b"/x?q=1"),
        ("/api", True, "", b"/api", b"", b"/"),
        ("/api", True, "", b"/api", b"?q", b"/?q"),
        ("/api", True, "", b"/api/", b"", b"/"),
        ("/api", True, "/base", b"/api", b"", b"/base"),
        ("/api", True, "/base", b"/api/", b"", b"/base/"),
        ("/api", True, "/b/c", b"/api/x/y", b"?z", b"/b/c/x/y?z"),
        ("/api/", True, "", b"/api/x", b"", b"/x"),
        ("/", True, "", b"/x", b"", b"/x"),
        ("/", True, "/base", b"/", b"", b"/base/"),
        ("/", False, "/base", b"/x", b"", b"/base/x"),
    ],
)
def test_upstream_path(
    prefix: str, strip: bool, base: str, path: bytes, query: bytes, expected: bytes
) -> None:
    upstream = Upstream(scheme="http", host="svc", port=80, base_path=base)
    route = Route(prefix, upstream, strip_prefix=strip)
    assert upstream_path(route, path, query) == expected


def _lenient_upstream_view(path: bytes) -> str:
    """How a careless upstream might read a path: decode twice, cut at ? or #, NFKC, \\ as /, no ;params."""
    text = unquote_to_bytes(unquote_to_bytes(path)).decode("utf-8", "replace")
    text = text.split("?")[0].split("#")[0]
    text = unicodedata.normalize("NFKC", text).replace("\\", "/")
    kept: list[str] = []
    for segment in text.split("/"):
        segment = segment.split(";")[0]
        if segment == "..":
            if kept:
                kept.pop()
        elif segment not in ("", "."):
            kept.append(segment)
    return "/" + "/".join(kept)


@settings(max_examples=600, deadline=None)
@given(st.lists(TARGET_PIECES, max_size=12).map(lambda pieces: b"/" + b"".join(pieces)))
@example(b"/public/%2e%2e/admin")
@example(b"/public/..;/admin")
@example(b"/admin%3f")
@example(b"/admin%23x")
@example(b"/admin%3bx")
@example(b"/public%5c..%5cadmin")
@example(b"/public/%252e%252e/admin")
@example(b"/public/%ef%bc%8e%ef%bc%8e/admin")
def test_lenient_upstreams_see_the_route_the_gateway_matched(target: bytes) -> None:
    result = normalize_target(target)
    if result is None:
        return
    gateway_route = BYPASS_TABLE.match(result[0])
    upstream_view = _lenient_upstream_view(result[0]).encode("utf-8")
    assert BYPASS_TABLE.match(upstream_view) is gateway_route
