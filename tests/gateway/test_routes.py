"""Tests for gateway.routes: target normalisation, bypass strings, route matching and upstream paths."""

from __future__ import annotations

import unicodedata
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import routes
from gateway.routes import Route, RouteTable, Upstream, normalize_target, parse_upstream, upstream_path

UPSTREAM = Upstream(scheme="http", host="127.0.0.1", port=9000)

# (request target, expected normalised path, or None for 400). The query is checked separately.
PATH_CASES: list[tuple[bytes, bytes | None]] = [
    # plain targets pass through untouched
    (b"/", b"/"),
    (b"/api", b"/api"),
    (b"/api/", b"/api/"),
    (b"/api/v1/users/123", b"/api/v1/users/123"),
    (b"/a-b_c~d.e/f!$&'()*+,=:@", b"/a-b_c~d.e/f!$&'()*+,=:@"),
    (b"/.well-known/openid-configuration", b"/.well-known/openid-configuration"),
    (b"/x/.hidden", b"/x/.hidden"),
    (b"/a..b/c.", b"/a..b/c."),
    (b"/ADMIN", b"/ADMIN"),  # case-sensitive, as RFC 3986 says paths are
    # request-target forms (RFC 9112 §3.2)
    (b"http://example.com/admin", b"/admin"),
    (b"HTTP://example.com:8080/a/../b", b"/b"),
    (b"https://example.com", b"/"),
    (b"http://example.com?x=1", b"/"),
    (b"http://user:pw@example.com/admin", None),
    (b"http:///admin", None),
    (b"ftp://example.com/x", None),
    (b"*", None),
    (b"example.com:443", None),
    (b"admin", None),
    (b"", None),
    # fragments, raw bytes outside visible ASCII, backslash, path parameters
    (b"/admin#x", None),
    (b"/public#/../admin", None),
    (b"/a b", None),
    (b"/a\tb", None),
    (b"/a\x00b", None),
    (b"/a\x7fb", None),
    (b"/caf\xc3\xa9", None),
    (b"/public\\..\\admin", None),
    (b"/admin\\", None),
    (b"/public/..;/admin", None),
    (b"/admin;jsessionid=1", None),
    (b"/public;/../admin", None),
    # percent-encoding: unreserved characters decoded, hex uppercased, dangerous escapes refused
    (b"/%61dmin", b"/admin"),
    (b"/%41%42%7e%2D%5f", b"/AB~-_"),
    (b"/a%20b", b"/a%20b"),
    (b"/a%3ab%40c", b"/a%3Ab%40c"),
    (b"/caf%c3%a9", b"/caf%C3%A9"),
    (b"/%e6%97%a5%e6%9c%ac", b"/%E6%97%A5%E6%9C%AC"),
    (b"/admin%2f", None),
    (b"/%2fadmin", None),
    (b"/%2Fadmin", None),
    (b"/public%5c..%5cadmin", None),
    (b"/public/%252e%252e/admin", None),
    (b"/%25", None),
    (b"/public%3b/admin", None),
    (b"/admin%3F/x", None),
    (b"/admin%23", None),
    (b"/a%00", None),
    (b"/a%0d%0aX-Injected:%201", None),
    (b"/a%7f", None),
    (b"/a%", None),
    (b"/a%4", None),
    (b"/a%zz", None),
    (b"/a%%41", None),
    (b"/a%u002e", None),
    (b"/a%-1", None),
    # non-UTF-8 and look-alike escapes that lenient or Unicode-normalising servers read as . or /
    (b"/public/%c0%ae%c0%ae/admin", None),
    (b"/public%c0%afadmin", None),
    (b"/a%e9", None),
    (b"/public/%ef%bc%8e%ef%bc%8e/admin", None),
    (b"/public%ef%bc%8fadmin", None),
    (b"/public/%e2%80%a5/admin", None),
    (b"/public/%e2%80%a4%e2%80%a4/admin", None),
    # slashes merged, dot segments removed (RFC 3986 §5.2.4), climbing above the root refused
    (b"//admin", b"/admin"),
    (b"///admin//x///", b"/admin/x/"),
    (b"//", b"/"),
    (b"/./", b"/"),
    (b"/.", b"/"),
    (b"/a/./b", b"/a/b"),
    (b"/a/b/../c", b"/a/c"),
    (b"/a/b/..", b"/a/"),
    (b"/a/b/.", b"/a/b/"),
    (b"/a/b/../", b"/a/"),
    (b"/a/..", b"/"),
    (b"/public/../admin", b"/admin"),
    (b"/public/./../admin/", b"/admin/"),
    (b"/public/%2e%2e/admin", b"/admin"),
    (b"/public/%2E%2e/admin", b"/admin"),
    (b"/public/.%2e/admin", b"/admin"),
    (b"/public/%2e/admin", b"/public/admin"),
    (b"/public//../admin", b"/admin"),
    (b"/..", None),
    (b"/../admin", None),
    (b"/a/../..", None),
    (b"/a/%2e%2e/%2e%2e/etc/passwd", None),
    # segments that Windows trims into "." or ".."
    (b"/public/.../admin", None),
    (b"/public/..%20/admin", None),
    (b"/public/.%20/admin", None),
    (b"/public/%2e%2e%2e/admin", None),
]


@pytest.mark.parametrize(("target", "expected"), PATH_CASES, ids=[repr(case[0]) for case in PATH_CASES])
def test_normalize_target_path(target: bytes, expected: bytes | None) -> None:
    result = normalize_target(target)
    if expected is None:
        assert result is None
    else:
        assert result is not None
        assert result[0] == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/a?x=1&y=%2F..;\\", (b"/a", b"?x=1&y=%2F..;\\")),  # the query is passed through unchanged
        (b"/a?", (b"/a", b"?")),
        (b"/a?%zz%", (b"/a", b"?%zz%")),
        (b"/a?b?c", (b"/a", b"?b?c")),
        (b"/a/../b?x/../y", (b"/b", b"?x/../y")),
        (b"/%61?%61", (b"/a", b"?%61")),
        (b"/a?x#frag", None),
        (b"/a?x y", None),
        (b"/a?x\xff", None),
        (b"/a?x\x00", None),
    ],
)
def test_normalize_target_query(target: bytes, expected: tuple[bytes, bytes] | None) -> None:
    assert normalize_target(target) == expected


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


# Pieces from which hypothesis builds targets: every delimiter, escape and look-alike the rules treat.
TARGET_PIECES = st.sampled_from([
    b"/", b"//", b".", b"..", b"...", b"a", b"A", b"admin", b"public", b"-", b"~", b"_", b":", b"@", b"+",
    b"%2e", b"%2E", b"%2f", b"%2F", b"%25", b"%5c", b"%3b", b"%3f", b"%23", b"%61", b"%41", b"%7e", b"%20",
    b"%00", b"%0a", b"%", b"%4", b"%zz", b"%c3%a9", b"%C0%AE", b"%ef%bc%8f", b"%e2%80%a4", b"%e6%97%a5",
    b";", b"\\", b"?", b"#", b"&", b"=", b" ", b"\x00", b"\x7f", b"\xff", b"http://h", b"*",
])
TARGETS = st.one_of(
    st.lists(TARGET_PIECES, max_size=12).map(b"".join),
    st.lists(TARGET_PIECES, max_size=12).map(lambda pieces: b"/" + b"".join(pieces)),
    st.binary(max_size=40),
    st.binary(max_size=40).map(lambda raw: b"/" + raw),
)


@settings(max_examples=600, deadline=None)
@given(TARGETS)
@example(b"/public/%2e%2e/admin")
@example(b"/a/b/../..//c/./")
def test_normalize_target_properties(target: bytes) -> None:
    result = normalize_target(target)  # never raises
    assert result == routes._normalize_steps(target)  # the shortcut agrees with the full rules
    if result is None:
        return
    path, query = result
    assert path.startswith(b"/")
    for forbidden in (b"//", b"/./", b"/../", b";", b"\\", b"#", b"%2F", b"%2f", b"%25", b"%5C", b"%3B"):
        assert forbidden not in path
    assert not path.endswith((b"/.", b"/.."))
    assert all(0x21 <= byte <= 0x7E for byte in path + query)
    assert query == b"" or query.startswith(b"?")
    assert normalize_target(path + query) == result  # idempotent


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
