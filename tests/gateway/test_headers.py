"""Tests for gateway.headers and gateway.request_head: what reaches the upstream and what the gateway sets; and
the request id rule (gateway.core.request_id). What responses keep is tested on the data plane
(tests/gateway/http/test_response.py)."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.request_id import new_request_id, request_id_text, valid_request_id
from gateway.headers import HeaderPolicy, identity_block, is_websocket_upgrade, make_policy, scan_request_headers
from gateway.request_head import upstream_request_head

IDENTITY_NAMES = ("X-Auth-User-Id", "X-Auth-User", "X-Auth-Groups", "X-Auth-Credential-Id",
                  "X-Auth-Credential-Name", "X-Auth-Method", "X-Auth-Scope")
TRUSTED = ("10.0.0.0/8", "fd00::/8")
POLICY = make_policy(IDENTITY_NAMES, trusted_proxies=TRUSTED)
KEEPING_POLICY = make_policy(IDENTITY_NAMES, trusted_proxies=TRUSTED, keep_credentials=True)
IDENTITY = identity_block(POLICY, {"X-Auth-User": "alice", "X-Auth-Groups": ["ops", "dev"],
                                   "X-Auth-Method": "token"})
UNTRUSTED_IP = "203.0.113.7"
TRUSTED_IP = "10.1.2.3"
# Headers the gateway always sets exactly once on every upstream request.
GATEWAY_SET = (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"via", b"x-request-id")
NEVER_UPSTREAM = (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
                  b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"content-length", b"expect",
                  b"authorization", b"accesskey", b"secretkey", b"http2-settings", b"x-original-url")
H = list[tuple[bytes, bytes]]


def build_head(
    headers: H,
    *,
    policy: HeaderPolicy = POLICY,
    client_ip: str = UNTRUSTED_IP,
    identity: bytes = IDENTITY,
    host_override: bytes | None = b"upstream:9000",
    websocket: bool = False,
) -> bytes:
    scanned = scan_request_headers(policy, headers)
    return upstream_request_head(
        policy, scanned, method=b"GET", path=b"/x?y=1", client_ip=client_ip, proto=b"https",
        identity_block=identity, request_id=b"rid-1", host_override=host_override, websocket=websocket,
    )


def parse_head(head: bytes) -> tuple[bytes, H]:
    """Split a head into its request line and header pairs, checking the wire format on the way."""
    assert head.endswith(b"\r\n") and b"\r\n\r\n" not in head
    request_line, *lines = head[:-2].split(b"\r\n")
    pairs: H = []
    for line in lines:
        name, separator, value = line.partition(b": ")
        assert separator and name and b"\n" not in line and b"\r" not in line, line
        pairs.append((name, value))
    return request_line, pairs


def values_of(pairs: H, name: bytes) -> list[bytes]:
    return [value for key, value in pairs if key.lower() == name]


@dataclass
class Case:
    id: str
    headers: H
    expect: dict[bytes, list[bytes]] = field(default_factory=dict)  # lowercase name -> all values, in order
    absent: tuple[bytes, ...] = ()  # lowercase names (any spelling) that must not appear
    policy: HeaderPolicy = POLICY
    client_ip: str = UNTRUSTED_IP
    identity: bytes = IDENTITY
    host_override: bytes | None = b"upstream:9000"
    websocket: bool = False


CASES = [
    Case("end-to-end headers pass in order with their spelling",
         [(b"Host", b"example.com"), (b"uSer-AgEnt", b"curl/8"), (b"Accept", b"*/*"), (b"Cookie", b"a=1"),
          (b"Accept", b"text/html")],
         expect={b"host": [b"upstream:9000"], b"accept": [b"*/*", b"text/html"], b"cookie": [b"a=1"],
                 b"user-agent": [b"curl/8"]}),
    Case("injected identity present exactly once, every spoofed spelling gone",
         [(b"Host", b"example.com"), (b"X-Auth-User", b"mallory"), (b"x-auth-user", b"m2"),
          (b"X_Auth_User", b"m3"), (b"X.Auth.User", b"m4"), (b"X-AUTH-USER", b"m5"), (b"x_AUTH.user", b"m6"),
          (b"X-Auth-Groups", b"admins"), (b"X-Auth-User-Id", b"1"), (b"X-Auth-Scope", b"all")],
         expect={b"x-auth-user": [b"alice"], b"x-auth-groups": [b"dev,ops"], b"x-auth-method": [b"token"],
                 b"x-auth-user-id": [], b"x-auth-scope": []},
         absent=(b"x_auth_user", b"x.auth.user", b"x_auth.user")),
    Case("every look-alike a CGI backend folds into HTTP_X_AUTH_USER is stripped too",
         [(b"Host", b"example.com"), (b"X~Auth~User", b"m1"), (b"X+Auth+User", b"m2"), (b"X!Auth#User", b"m3"),
          (b"X$Auth%User", b"m4"), (b"X&Auth'User", b"m5"), (b"X*Auth^User", b"m6"), (b"X`Auth|User", b"m7"),
          (b"X_Auth~Groups", b"admins"), (b"X~Forwarded~For", b"10.0.0.1"), (b"X~Keep", b"1")],
         expect={b"x-auth-user": [b"alice"], b"x-auth-groups": [b"dev,ops"], b"x~keep": [b"1"]},
         absent=(b"x~auth~user", b"x+auth+user", b"x!auth#user", b"x$auth%user", b"x&auth'user",
                 b"x*auth^user", b"x`auth|user", b"x_auth~groups", b"x~forwarded~for")),
    Case("no identity block (auth none route): spoofed identity still stripped",
         [(b"Host", b"example.com"), (b"X-Auth-User", b"mallory"), (b"X_Auth_Groups", b"admins")],
         identity=b"", absent=(b"x-auth-user", b"x_auth_groups", b"x-auth-groups")),
    Case("credentials stripped",
         [(b"Host", b"example.com"), (b"Authorization", b"Bearer abc"), (b"accessKey", b"AK"),
          (b"SECRETKEY", b"SK"), (b"access_key", b"x"), (b"X-Keep", b"1")],
         expect={b"x-keep": [b"1"]}, absent=(b"authorization", b"accesskey", b"secretkey")),
    Case("credentials kept when keep_credentials",
         [(b"Host", b"example.com"), (b"Authorization", b"Bearer abc"), (b"accessKey", b"AK"),
          (b"secretKey", b"SK"), (b"Connection", b"Authorization, accessKey, X-Gone"), (b"X-Gone", b"1")],
         policy=KEEPING_POLICY, absent=(b"x-gone",),
         expect={b"authorization": [b"Bearer abc"], b"accesskey": [b"AK"], b"secretkey": [b"SK"]}),
    Case("hop-by-hop, framing and path-override headers gone",
         [(b"Host", b"example.com"), (b"Connection", b"keep-alive, close"), (b"Keep-Alive", b"timeout=5"),
          (b"Proxy-Connection", b"keep-alive"), (b"TE", b"trailers"), (b"Trailer", b"X-Sum"),
          (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3"), (b"Upgrade", b"h2c"),
          (b"HTTP2-Settings", b"AAA"), (b"Proxy-Authorization", b"Basic eA=="), (b"Proxy-Authenticate", b"x"),
          (b"Expect", b"100-continue"), (b"Close", b"1"), (b"X-Original-URL", b"/admin"),
          (b"X-Rewrite-URL", b"/admin"), (b"Transfer_Encoding", b"chunked"), (b"Content-Type", b"text/plain")],
         expect={b"content-type": [b"text/plain"]},
         absent=(b"close", b"x-rewrite-url", b"transfer_encoding")),
    Case("Connection removes what it names, never what the gateway sets",
         [(b"Host", b"example.com"), (b"Connection", b"X-Foo, X-Auth-User, Host, X-Forwarded-For"),
          (b"Connection", b"x_bar, Via, X-Request-Id, Forwarded, X-Forwarded-Proto, Authorization"),
          (b"X-Foo", b"1"), (b"x-bar", b"2"), (b"X-Baz", b"3"), (b"X-Auth-User", b"mallory")],
         expect={b"x-baz": [b"3"], b"x-auth-user": [b"alice"], b"host": [b"upstream:9000"],
                 b"x-forwarded-for": [UNTRUSTED_IP.encode()], b"via": [b"1.1 credgate"],
                 b"x-request-id": [b"rid-1"], b"x-forwarded-host": [b"example.com"]},
         absent=(b"x-foo", b"x-bar")),
    Case("untrusted peer: forwarding headers replaced by this hop's view",
         [(b"Host", b"example.com"), (b"X-Forwarded-For", b"1.2.3.4"), (b"X-Forwarded-Proto", b"http"),
          (b"X-Forwarded-Host", b"evil.example"), (b"Forwarded", b"for=1.2.3.4;proto=http"),
          (b"X_Forwarded_For", b"5.6.7.8"), (b"X-Real-IP", b"1.2.3.4"), (b"True-Client-IP", b"1.2.3.4")],
         expect={b"x-forwarded-for": [b"203.0.113.7"], b"x-forwarded-proto": [b"https"],
                 b"x-forwarded-host": [b"example.com"],
                 b"forwarded": [b"for=203.0.113.7;proto=https;host=example.com"]},
         absent=(b"x_forwarded_for", b"x-real-ip", b"true-client-ip")),
    Case("trusted proxy: chains extended, its claims believed",
         [(b"Host", b"example.com:8443"), (b"X-Forwarded-For", b"1.2.3.4, 5.6.7.8"),
          (b"X-Forwarded-For", b"9.9.9.9"), (b"X-Forwarded-Proto", b"https"),
          (b"X-Forwarded-Host", b"public.example"), (b"Forwarded", b"for=1.2.3.4;proto=https"),
          (b"X-Real-IP", b"1.2.3.4"), (b"X_Real_IP", b"6.6.6.6"), (b"X_Forwarded_For", b"6.6.6.6")],
         client_ip=TRUSTED_IP,
         expect={b"x-forwarded-for": [b"1.2.3.4, 5.6.7.8, 9.9.9.9, 10.1.2.3"],
                 b"x-forwarded-proto": [b"https"], b"x-forwarded-host": [b"public.example"],
                 b"forwarded": [b'for=1.2.3.4;proto=https, for=10.1.2.3;proto=https;host="example.com:8443"'],
                 b"x-real-ip": [b"1.2.3.4"]},
         absent=(b"x_forwarded_for", b"x_real_ip")),
    Case("Connection can remove a trusted proxy's X-Real-IP: the gateway does not set it",
         [(b"Host", b"example.com"), (b"Connection", b"X-Real-IP"), (b"X-Real-IP", b"1.2.3.4"),
          (b"X-Forwarded-Port", b"443")],
         client_ip=TRUSTED_IP, expect={b"x-forwarded-port": [b"443"]}, absent=(b"x-real-ip",)),
    Case("trusted proxy that sent nothing: this hop's view",
         [(b"Host", b"example.com")], client_ip=TRUSTED_IP,
         expect={b"x-forwarded-for": [b"10.1.2.3"], b"x-forwarded-proto": [b"https"],
                 b"x-forwarded-host": [b"example.com"],
                 b"forwarded": [b"for=10.1.2.3;proto=https;host=example.com"]}),
    Case("IPv6 client: bracketed and quoted in Forwarded",
         [(b"Host", b"[2001:db8::2]:8080")], client_ip="2001:db8::1",
         expect={b"x-forwarded-for": [b"2001:db8::1"],
                 b"forwarded": [b'for="[2001:db8::1]";proto=https;host="[2001:db8::2]:8080"']}),
    Case("IPv4-mapped address of a trusted proxy on a dual-stack listener",
         [(b"Host", b"example.com"), (b"X-Forwarded-For", b"1.2.3.4")], client_ip="::ffff:10.0.0.5",
         expect={b"x-forwarded-for": [b"1.2.3.4, 10.0.0.5"]}),
    Case("trusted IPv6 proxy",
         [(b"Host", b"example.com"), (b"X-Forwarded-For", b"1.2.3.4")], client_ip="fd00::7",
         expect={b"x-forwarded-for": [b"1.2.3.4, fd00::7"]}),
    Case("peer that is not an IP address",
         [(b"Host", b"example.com"), (b"X-Forwarded-For", b"1.2.3.4")], client_ip="",
         expect={b"x-forwarded-for": [b"unknown"], b"forwarded": [b"for=unknown;proto=https;host=example.com"]}),
    Case("Via appended to the client's",
         [(b"Host", b"example.com"), (b"Via", b"1.0 fred"), (b"via", b"1.1 p.example")],
         expect={b"via": [b"1.0 fred, 1.1 p.example, 1.1 credgate"]}),
    Case("request id replaced by the one the data plane chose",
         [(b"Host", b"example.com"), (b"X-Request-Id", b"client-id"), (b"x_request_id", b"x")],
         expect={b"x-request-id": [b"rid-1"]}, absent=(b"x_request_id",)),
    Case("preserve_host: the client's Host goes upstream",
         [(b"Host", b"example.com")], host_override=None,
         expect={b"host": [b"example.com"], b"x-forwarded-host": [b"example.com"]}),
    Case("Forwarded host that needs quoting and escaping",
         [(b"Host", b'a"b\\c')],
         expect={b"forwarded": [b'for=203.0.113.7;proto=https;host="a\\"b\\\\c"']}),
    Case("websocket upgrade keeps exactly one Upgrade and Connection",
         [(b"Host", b"example.com"), (b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket"),
          (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"Sec-WebSocket-Version", b"13")],
         websocket=True,
         expect={b"upgrade": [b"websocket"], b"connection": [b"Upgrade"],
                 b"sec-websocket-key": [b"dGhlIHNhbXBsZSBub25jZQ=="], b"sec-websocket-version": [b"13"]}),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_upstream_request_head(case: Case) -> None:
    head = build_head(case.headers, policy=case.policy, client_ip=case.client_ip, identity=case.identity,
                      host_override=case.host_override, websocket=case.websocket)
    request_line, pairs = parse_head(head)
    assert request_line == b"GET /x?y=1 HTTP/1.1"
    assert pairs[0][0] == b"Host"  # Host first, as RFC 9112 §3.2 recommends
    for name in GATEWAY_SET:
        assert len(values_of(pairs, name)) == 1, name
    for name, expected in case.expect.items():
        assert values_of(pairs, name) == expected, name
    for name in case.absent:
        assert values_of(pairs, name) == [], name
    never = [name for name in NEVER_UPSTREAM if name not in case.expect]
    assert [key for key, _ in pairs if key.lower() in never] == []
    # Identity lines are exactly the block, whatever the client sent.
    identity_lines = [(key, value) for key, value in pairs
                      if re.sub(rb"[^a-z0-9]", b"-", key.lower()).startswith(b"x-auth-")]
    assert b"".join(key + b": " + value + b"\r\n" for key, value in identity_lines) == case.identity


def test_head_layout_and_identity_block_position() -> None:
    head = build_head([(b"Host", b"example.com"), (b"Accept", b"*/*")])
    assert head.startswith(b"GET /x?y=1 HTTP/1.1\r\nHost: upstream:9000\r\nAccept: */*\r\n")
    assert head.endswith(b"X-Request-Id: rid-1\r\n" + IDENTITY)


def test_head_requires_a_host() -> None:
    with pytest.raises(ValueError, match="Host"):
        build_head([], host_override=None)
    _, pairs = parse_head(build_head([]))
    assert values_of(pairs, b"host") == [b"upstream:9000"]
    assert values_of(pairs, b"x-forwarded-host") == []
    assert values_of(pairs, b"forwarded") == [b"for=203.0.113.7;proto=https"]


def test_scan_records_what_the_data_plane_needs() -> None:
    scanned = scan_request_headers(POLICY, [
        (b"Host", b"a.example"), (b"host", b"b.example"), (b"Connection", b"Keep-Alive, UPGRADE"),
        (b"Upgrade", b"websocket"), (b"Upgrade", b"h2c"), (b"Content-Length", b"5"), (b"TE", b"trailers"),
        (b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked"), (b"Expect", b"100-continue"),
        (b"X-Request-Id", b"first"), (b"X-Request-Id", b"second"), (b"Authorization", b"Basic a"),
        (b"authorization", b"Bearer b"), (b"ACCESSKEY", b"ak"), (b"secretkey", b"sk"),
        (b"Secret_Key", b"not secretKey: '_' reads as '-'"), (b"X-Forwarded-For", b"1.1.1.1"),
    ])
    assert (scanned.host, scanned.host_count) == (b"a.example", 2)
    assert scanned.connection_tokens == {b"keep-alive", b"upgrade"}
    assert scanned.upgrade == b"websocket, h2c"
    assert (scanned.content_length, scanned.te, scanned.expect) == (b"5", b"trailers", b"100-continue")
    assert scanned.transfer_encoding == b"gzip, chunked"
    assert scanned.request_id == b"first"
    assert scanned.authorization == (b"Basic a", b"Bearer b")
    assert (scanned.access_key, scanned.secret_key) == ((b"ak",), (b"sk",))
    assert scanned.x_forwarded_for == (b"1.1.1.1",)
    assert scanned.forward == [(b"Secret_Key", b"not secretKey: '_' reads as '-'")]


def test_scan_of_a_plain_request() -> None:
    headers = [(b"Host", b"a"), (b"Accept", b"*/*")]
    scanned = scan_request_headers(POLICY, headers)
    assert scanned.forward == [(b"Accept", b"*/*")]
    assert scanned.forward[0] is headers[1]  # forwarded pairs are the parser's own objects
    assert (scanned.authorization, scanned.connection_tokens, scanned.upgrade) == ((), frozenset(), None)
    assert (scanned.request_id, scanned.content_length, scanned.transfer_encoding) == (None, None, None)


def test_custom_credential_header_names() -> None:
    policy = make_policy(IDENTITY_NAMES, access_key_header="X-Api-Key", secret_key_header="x_api_secret")
    scanned = scan_request_headers(policy, [
        (b"x-api-key", b"ak"), (b"X_Api_Key", b"look-alike"), (b"X_API_SECRET", b"sk"), (b"x-api-secret", b"no"),
        (b"accessKey", b"default name is no longer special"),
    ])
    assert scanned.access_key == (b"ak",)
    assert scanned.secret_key == (b"sk",)
    assert scanned.forward == [(b"accessKey", b"default name is no longer special")]


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        (b"GET", [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], True),
        (b"GET", [(b"Connection", b"keep-alive, upgrade"), (b"Upgrade", b"WebSocket")], True),
        (b"GET", [(b"Connection", b"Upgrade"), (b"Upgrade", b"h2c, websocket")], True),
        (b"POST", [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], False),
        (b"GET", [(b"Upgrade", b"websocket")], False),
        (b"GET", [(b"Connection", b"Upgrade"), (b"Upgrade", b"h2c")], False),
        (b"GET", [(b"Connection", b"Upgrade")], False),
    ],
)
def test_is_websocket_upgrade(method: bytes, headers: H, expected: bool) -> None:
    assert is_websocket_upgrade(scan_request_headers(POLICY, headers), method) is expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"identity_headers": ["X-Forwarded-For"]}, "clashes"),
        ({"identity_headers": ["x_request_id"]}, "clashes"),
        ({"identity_headers": ["Authorization"]}, "clashes"),
        ({"identity_headers": ["X-Auth-User", "x.auth.user"]}, "clashes"),
        ({"identity_headers": ["accesskey"]}, "clashes"),
        ({"identity_headers": ["Keep-Alive"]}, "clashes"),
        ({"identity_headers": ["X-Real-IP"]}, "clashes"),
        ({"identity_headers": ["X Auth"]}, "not a valid HTTP field name"),
        ({"identity_headers": [""]}, "not a valid HTTP field name"),
        ({"identity_headers": ["X-Auth:User"]}, "not a valid HTTP field name"),
        ({"identity_headers": [], "access_key_header": "Host"}, "clashes"),
        ({"identity_headers": [], "access_key_header": "key", "secret_key_header": "KEY"}, "clashes"),
        ({"identity_headers": [], "trusted_proxies": ["not-a-network"]}, "does not appear to be"),
        ({"identity_headers": [], "via": "1.1 a\r\nX-Evil: 1"}, "printable ASCII"),
        ({"identity_headers": [], "via": ""}, "printable ASCII"),
    ],
)
def test_make_policy_rejects_bad_configuration(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_policy(**kwargs)


def test_make_policy_accepts_str_bytes_and_networks() -> None:
    policy = make_policy([b"X-User", "X-Groups"], trusted_proxies=[ipaddress.ip_network("192.0.2.0/24"), "::1"],
                         via="1.1 edge", access_key_header=b"K", secret_key_header="S")
    assert policy.identity_headers == (b"X-User", b"X-Groups")
    assert policy.trusted_proxies == (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("::1/128"))
    assert (policy.via, policy.access_key_header, policy.secret_key_header) == (b"1.1 edge", b"K", b"S")
    assert policy == make_policy(["X-User", "X-Groups"], trusted_proxies=["192.0.2.0/24", "::1"],
                                 via="1.1 edge", access_key_header="K", secret_key_header="S")
    assert "kinds" not in repr(policy)


def test_caches_stay_bounded() -> None:
    policy = make_policy(["X-User"], trusted_proxies=["10.0.0.0/8"])
    for index in range(5000):
        assert policy.peer(f"10.0.{index // 256}.{index % 256}")[0]
        scan_request_headers(policy, [(f"X-Random-{index}".encode(), b"1")])
    assert policy.peer("192.0.2.1") == (False, b"192.0.2.1", b"192.0.2.1")
    assert len(policy._peers) <= 4096
    assert len(policy._spellings) <= 1024
    assert scan_request_headers(policy, [(b"x_user", b"spoof"), (b"X-Other", b"1")]).forward == [(b"X-Other", b"1")]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"X-Auth-User": "alice"}, b"X-Auth-User: alice\r\n"),
        ({"x-auth-scope": "read", "X-AUTH-USER-ID": "42"}, b"X-Auth-User-Id: 42\r\nX-Auth-Scope: read\r\n"),
        ({"X-Auth-User": None, "X-Auth-Method": "basic"}, b"X-Auth-Method: basic\r\n"),
        ({"X-Auth-Scope": ""}, b"X-Auth-Scope: \r\n"),
        ({"X-Auth-User": "alice\r\nX-Auth-Groups: admins"}, b"X-Auth-User: aliceX-Auth-Groups: admins\r\n"),
        ({"X-Auth-User": " al\x00i\tce\x7f "}, b"X-Auth-User: alice\r\n"),
        ({"X-Auth-User": "José"}, "X-Auth-User: José\r\n".encode()),
        ({"X-Auth-Groups": frozenset({"ops", "dev", "a,b", "", "fin\nance"})}, b"X-Auth-Groups: dev,finance,ops\r\n"),
        ({"X-Auth-Groups": []}, b"X-Auth-Groups: \r\n"),
        ({}, b""),
    ],
)
def test_identity_block(values: dict[str, str | list[str] | frozenset[str] | None], expected: bytes) -> None:
    assert identity_block(POLICY, values) == expected


def test_identity_block_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="X-Not-Configured"):
        identity_block(POLICY, {"X-Auth-User": "alice", "X-Not-Configured": "x"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"a", True),
        (b"0123456789abcdef0123456789abcdef", True),
        (b"Root-1-67891233-abcdef012345678912345678", True),
        (b"Root=1", False),
        (b"svc.region:req_42-x", True),
        (b"x" * 128, True),
        (b"x" * 129, False),
        (b"", False),
        (b"a b", False),
        (b"a\r\nX-Evil: 1", False),
        (b"a/b", False),
        (b"a;b", False),
        (b"caf\xc3\xa9", False),
    ],
)
def test_valid_request_id(value: bytes, expected: bool) -> None:
    assert valid_request_id(value) is expected


def test_new_request_id() -> None:
    ids = {new_request_id() for _ in range(1000)}  # more than one block of OS randomness
    assert len(ids) == 1000
    for request_id in ids:
        assert len(request_id) == 32 and valid_request_id(request_id)
        int(request_id, 16)


def test_a_forked_child_makes_request_ids_of_its_own() -> None:
    """Ids are cut from a block read ahead: a child forked with the parent's block must not repeat them."""
    new_request_id()  # the parent holds a block
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write_end, new_request_id())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 64)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child_id) == 32 and child_id != new_request_id()


@pytest.mark.parametrize("sent", ["trace-123", "svc.region:req_42-x", "x" * 128])
def test_request_id_text_keeps_a_valid_id(sent: str) -> None:
    assert request_id_text(sent) == sent


@pytest.mark.parametrize("sent", ["", "bad id\u00e9", "caf\u00e9", "x" * 129, "a/b", "a\r\nX-Evil: 1"])
def test_request_id_text_replaces_an_invalid_one(sent: str) -> None:
    made = request_id_text(sent)
    assert made != sent and len(made) == 32
    int(made, 16)


# Header names hypothesis draws from: the ones the policy treats specially, their look-alikes, others.
HEADER_NAMES = st.sampled_from([
    b"Host", b"Connection", b"Upgrade", b"Authorization", b"accessKey", b"SECRETKEY", b"access_key",
    b"X-Auth-User", b"x_auth_user", b"X.Auth.Groups", b"X-AUTH-SCOPE", b"X-Forwarded-For", b"x_forwarded_for",
    b"X-Forwarded-Proto", b"X-Forwarded-Host", b"Forwarded", b"Via", b"X-Request-Id", b"Keep-Alive", b"TE",
    b"Transfer-Encoding", b"Content-Length", b"Expect", b"Proxy-Authorization", b"X-Real-IP", b"X-Foo",
    b"x-foo", b"Accept", b"Cookie",
])
HEADER_VALUES = st.sampled_from([b"1", b"x-foo", b"X-Auth-User, Host", b"keep-alive", b"a, b", b"10.0.0.1"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=15), st.sampled_from([UNTRUSTED_IP, TRUSTED_IP]),
       st.booleans())
def test_upstream_head_invariants(headers: H, client_ip: str, websocket: bool) -> None:
    head = build_head(headers, client_ip=client_ip, websocket=websocket)
    _, pairs = parse_head(head)
    for name in GATEWAY_SET:
        assert len(values_of(pairs, name)) == 1
    canonical = [key.lower().replace(b"_", b"-").replace(b".", b"-") for key, _ in pairs]
    assert [name for name in canonical if name.startswith(b"x-auth-")] == [b"x-auth-user", b"x-auth-groups",
                                                                           b"x-auth-method"]
    for name in (b"authorization", b"accesskey", b"secretkey", b"keep-alive", b"te",
                 b"transfer-encoding", b"content-length", b"expect", b"proxy-authorization"):
        assert name not in canonical
    assert canonical.count(b"upgrade") == canonical.count(b"connection") == (1 if websocket else 0)
    assert canonical.count(b"x-forwarded-for") == 1
    if client_ip == UNTRUSTED_IP:
        assert b"x-real-ip" not in canonical
        assert values_of(pairs, b"x-forwarded-for") == [UNTRUSTED_IP.encode()]
