"""The HTTP/1.1 rules of gateway.http.framing, without sockets: request framing headers, versions, the checks on a
complete head, responses the gateway writes itself, and the filtering of an upstream's response head. The same
rules end to end: test_wire_framing.py; through the request parser: test_reader.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway.http.exchange import Exchange, Respond
from gateway.http.framing import (
    HOP_BY_HOP,
    BadResponse,
    Refusal,
    check_head,
    content_length_at,
    drop_connection_listed,
    framing_header,
    head_size,
    http_minor,
    render_response,
    status_line,
)

H = list[tuple[bytes, bytes]]
# The Exchange fields framing_header may set.
FRAMING_FIELDS = ("content_length", "chunked", "expect_continue", "upgrade_value")


def exchange(target: bytes = b"/", *, method: bytes = b"GET", minor: int = 1) -> Exchange:
    ex = Exchange("192.0.2.1", 5000, target)
    ex.method = method
    ex.http_minor = minor
    return ex


def refusal(call: Callable[[], object]) -> tuple[int, str, str]:
    with pytest.raises(Refusal) as caught:
        call()
    return caught.value.status, caught.value.error, caught.value.outcome


def framing_fields(ex: Exchange) -> dict[str, object]:
    return {name: getattr(ex, name) for name in FRAMING_FIELDS}


# -- requests: framing headers ----------------------------------------------------------------------------------

# (id, lower-cased name, value, whether it is kept from the handler, the Exchange fields it sets)
FRAMING_HEADERS = [
    ("content-length", b"content-length", b"42", True, {"content_length": 42}),
    ("content-length-zero", b"content-length", b"0", True, {"content_length": 0}),
    ("chunked", b"transfer-encoding", b"chunked", True, {"chunked": True}),
    ("chunked-any-case-padded", b"transfer-encoding", b" Chunked ", True, {"chunked": True}),
    ("expect-100-continue", b"expect", b"100-continue", True, {"expect_continue": True}),
    ("expect-any-case", b"expect", b"100-Continue", True, {"expect_continue": True}),
    ("upgrade-recorded-and-kept", b"upgrade", b"websocket", False, {"upgrade_value": b"websocket"}),
    ("host-not-framing", b"host", b"example.com", False, {}),
    ("connection-not-framing", b"connection", b"close", False, {}),
    ("other-header", b"x-anything", b"chunked", False, {}),
]


@pytest.mark.parametrize(
    ("lname", "value", "framing", "fields"), [c[1:] for c in FRAMING_HEADERS], ids=[c[0] for c in FRAMING_HEADERS]
)
def test_framing_header_records_what_frames_the_request(
    lname: bytes, value: bytes, framing: bool, fields: dict[str, object]
) -> None:
    ex = exchange()
    expected = {**framing_fields(ex), **fields}
    assert framing_header(ex, lname, value) is framing
    assert framing_fields(ex) == expected


# (id, headers in order, status, error): each refused at the header that breaks the rule.
REFUSED_FRAMING_HEADERS = [
    ("te-repeated", [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], 400, "bad_request"),
    ("te-gzip", [(b"transfer-encoding", b"gzip")], 400, "bad_request"),
    ("te-gzip-chunked", [(b"transfer-encoding", b"gzip, chunked")], 400, "bad_request"),
    ("te-chunked-gzip", [(b"transfer-encoding", b"chunked, gzip")], 400, "bad_request"),
    ("te-chunked-then-gzip", [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"gzip")], 400, "bad_request"),
    ("te-identity", [(b"transfer-encoding", b"identity")], 400, "bad_request"),
    ("te-empty", [(b"transfer-encoding", b"")], 400, "bad_request"),
    ("expect-other", [(b"expect", b"something")], 417, "expectation_failed"),
    ("expect-continue-and-more", [(b"expect", b"100-continue, x")], 417, "expectation_failed"),
]


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [c[1:] for c in REFUSED_FRAMING_HEADERS],
    ids=[c[0] for c in REFUSED_FRAMING_HEADERS],
)
def test_framing_header_refuses(headers: H, status: int, error: str) -> None:
    ex = exchange()
    *accepted, (lname, value) = headers
    for earlier in accepted:
        framing_header(ex, *earlier)
    assert refusal(lambda: framing_header(ex, lname, value)) == (status, error, "bad_request")


# -- requests: versions and complete heads --------------------------------------------------------------------


@pytest.mark.parametrize(("version", "minor"), [("1.1", 1), ("1.0", 0)])
def test_http_minor_of_http1(version: str, minor: int) -> None:
    assert http_minor(version) == minor


@pytest.mark.parametrize(
    ("version", "status", "error"),
    [
        ("0.9", 400, "bad_request"),
        ("2.0", 505, "http_version_not_supported"),
        ("3.0", 505, "http_version_not_supported"),
    ],
)
def test_http_minor_refuses_other_versions(version: str, status: int, error: str) -> None:
    assert refusal(lambda: http_minor(version)) == (status, error, "bad_request")


# (id, HTTP minor, method, Host headers, Content-Length, chunked, upgrade, max body, has_body, upgrade after)
ACCEPTED_HEADS = [
    ("one-host", 1, b"GET", 1, None, False, False, 1000, False, False),
    ("http10-without-host", 0, b"GET", 0, None, False, False, 1000, False, False),
    ("http10-one-host", 0, b"GET", 1, None, False, False, 1000, False, False),
    ("content-length-zero", 1, b"POST", 1, 0, False, False, 1000, False, False),
    ("content-length", 1, b"POST", 1, 5, False, False, 1000, True, False),
    ("content-length-at-max", 1, b"POST", 1, 1000, False, False, 1000, True, False),
    ("no-max-body", 1, b"POST", 1, 10**12, False, False, 0, True, False),
    ("chunked", 1, b"POST", 1, None, True, False, 1000, True, False),
    ("upgrade", 1, b"GET", 1, None, False, True, 1000, False, True),
    ("upgrade-content-length-zero", 1, b"GET", 1, 0, False, True, 1000, False, True),
]


@pytest.mark.parametrize(
    ("minor", "method", "hosts", "length", "chunked", "upgrade", "max_body", "has_body", "upgraded"),
    [c[1:] for c in ACCEPTED_HEADS],
    ids=[c[0] for c in ACCEPTED_HEADS],
)
def test_check_head_accepts(
    minor: int,
    method: bytes,
    hosts: int,
    length: int | None,
    chunked: bool,
    upgrade: bool,
    max_body: int,
    has_body: bool,
    upgraded: bool,
) -> None:
    ex = exchange(method=method, minor=minor)
    ex.content_length, ex.chunked = length, chunked
    check_head(ex, hosts, upgrade, max_body)
    assert (ex.has_body, ex.upgrade) == (has_body, upgraded)


# (id, HTTP minor, method, Host headers, Content-Length, chunked, upgrade, max body, status, error, outcome)
REFUSED_HEADS = [
    ("host-missing", 1, b"GET", 0, None, False, False, 1000, 400, "bad_request", "bad_request"),
    ("host-repeated", 1, b"GET", 2, None, False, False, 1000, 400, "bad_request", "bad_request"),
    ("host-repeated-http10", 0, b"GET", 2, None, False, False, 1000, 400, "bad_request", "bad_request"),
    ("chunked-on-http10", 0, b"POST", 1, None, True, False, 1000, 400, "bad_request", "bad_request"),
    ("body-over-max", 1, b"POST", 1, 1001, False, False, 1000, 413, "content_too_large", "body_too_large"),
    ("connect", 1, b"CONNECT", 1, None, False, True, 1000, 501, "not_implemented", "bad_request"),
    ("upgrade-with-length", 1, b"GET", 1, 3, False, True, 1000, 400, "bad_request", "bad_request"),
    ("upgrade-chunked", 1, b"GET", 1, None, True, True, 1000, 400, "bad_request", "bad_request"),
]


@pytest.mark.parametrize(
    ("minor", "method", "hosts", "length", "chunked", "upgrade", "max_body", "status", "error", "outcome"),
    [c[1:] for c in REFUSED_HEADS],
    ids=[c[0] for c in REFUSED_HEADS],
)
def test_check_head_refuses(
    minor: int,
    method: bytes,
    hosts: int,
    length: int | None,
    chunked: bool,
    upgrade: bool,
    max_body: int,
    status: int,
    error: str,
    outcome: str,
) -> None:
    ex = exchange(method=method, minor=minor)
    ex.content_length, ex.chunked = length, chunked
    assert refusal(lambda: check_head(ex, hosts, upgrade, max_body)) == (status, error, outcome)
    assert not ex.upgrade


@pytest.mark.parametrize(
    ("target", "headers", "size"),
    [
        (b"/", [], 1),
        (b"/abc?q=1", [(b"Host", b"t")], 8 + (4 + 1 + 4)),
        (b"/", [(b"Host", b"example.com"), (b"X-Long", b"v" * 100)], 1 + (4 + 11 + 4) + (6 + 100 + 4)),
    ],
)
def test_head_size_counts_target_names_values_and_separators(target: bytes, headers: H, size: int) -> None:
    ex = exchange(target)
    ex.headers = headers
    assert head_size(ex) == size


# -- responses written here ------------------------------------------------------------------------------------

JSON = [(b"Content-Type", b"application/json")]
# (id, response, close, HTTP minor of the request, HEAD, the bytes written, body bytes among them)
RENDERED = [
    ("ok", Respond(200, JSON, b"{}"), False, 1, False,
     b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", 2),
    ("custom-status", Respond(299, [], b"x"), False, 1, False, b"HTTP/1.1 299 \r\nContent-Length: 1\r\n\r\nx", 1),
    ("empty-body", Respond(401, [(b"WWW-Authenticate", b"Bearer")], b""), False, 1, False,
     b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Length: 0\r\n\r\n", 0),
    ("close", Respond(400, [], b"no"), True, 1, False,
     b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno", 2),
    ("http10-keep-alive", Respond(200, [], b"ok"), False, 0, False,
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok", 2),
    ("http10-close", Respond(200, [], b"ok"), True, 0, False,
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", 2),
    ("head", Respond(200, JSON, b"{}"), False, 1, True,
     b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n", 0),
    ("204", Respond(204, [], b"ignored"), False, 1, False, b"HTTP/1.1 204 No Content\r\n\r\n", 0),
    ("304", Respond(304, [(b"ETag", b'"v1"')], b"ignored"), False, 1, False,
     b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n', 0),
    ("304-head-close", Respond(304, [], b""), True, 1, True,
     b"HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n", 0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("resp", "close", "minor", "head_only", "data", "body_bytes"),
    [c[1:] for c in RENDERED],
    ids=[c[0] for c in RENDERED],
)
def test_render_response(resp: Respond, close: bool, minor: int, head_only: bool, data: bytes, body_bytes: int) -> None:
    assert render_response(resp, close, minor, head_only) == (data, body_bytes)


@pytest.mark.parametrize("status", [100, 103])
def test_render_response_1xx_has_no_body(status: int) -> None:
    data, body_bytes = render_response(Respond(status, [], b"never sent"), False, 1, False)
    assert data.startswith(status_line(status)) and data.endswith(b"\r\n\r\n")
    assert b"never sent" not in data and body_bytes == 0


def test_render_response_1xx_has_no_content_length() -> None:
    data, _ = render_response(Respond(103, [(b"Link", b"</a.css>; rel=preload")], b""), False, 1, False)
    assert b"content-length" not in data.lower()


@pytest.mark.parametrize(
    ("status", "reason", "line"),
    [
        (200, b"", b"HTTP/1.1 200 OK\r\n"),
        (200, b"OK", b"HTTP/1.1 200 OK\r\n"),
        (200, b"Fine Thanks", b"HTTP/1.1 200 Fine Thanks\r\n"),
        (404, b"", b"HTTP/1.1 404 Not Found\r\n"),
        (418, b"", b"HTTP/1.1 418 I'm a Teapot\r\n"),
        (599, b"", b"HTTP/1.1 599 \r\n"),  # no standard phrase: an empty one (the space stays, RFC 9112 4)
        (599, b"Custom", b"HTTP/1.1 599 Custom\r\n"),
    ],
)
def test_status_line(status: int, reason: bytes, line: bytes) -> None:
    assert status_line(status, reason) == line


# -- upstream response heads -----------------------------------------------------------------------------------


def head(*headers: tuple[bytes, bytes]) -> list[bytes]:
    """A head's parts as the response relay builds them: status line, then name, ': ', value, CRLF per header."""
    parts = [b"HTTP/1.1 200 OK\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    return parts


CL = (b"Content-Length", b"5")
KEPT = (b"X-Kept", b"yes")
# (id, kept headers, hop-by-hop headers (lower-cased names), headers left, whether the body is chunked)
FILTERED = [
    ("nothing-named", [CL, KEPT], [(b"connection", b"keep-alive")], [CL, KEPT], False),
    ("plain-options", [CL, KEPT], [(b"connection", b"close, keep-alive, Upgrade")], [CL, KEPT], False),
    ("named-any-case", [(b"X-Secret", b"1"), KEPT, (b"x-secret", b"2"), (b"X-SECRET", b"3")],
     [(b"connection", b"keep-alive, x-Secret")], [KEPT], False),
    ("several-named", [(b"X-A", b"1"), (b"X-B", b"2"), KEPT],
     [(b"connection", b"X-A"), (b"connection", b" x-b ,close")], [KEPT], False),
    ("content-length-never", [CL, (b"X-Gone", b"1")], [(b"connection", b"Content-Length, X-Gone")], [CL], False),
    ("chunked", [KEPT], [(b"transfer-encoding", b"chunked")], [KEPT], True),
    ("chunked-any-case-padded", [KEPT], [(b"transfer-encoding", b" Chunked ")], [KEPT], True),
    ("chunked-and-named", [(b"X-A", b"1"), KEPT], [(b"transfer-encoding", b"chunked"), (b"connection", b"X-A")],
     [KEPT], True),
    ("other-hop-by-hop-only", [KEPT], [(b"keep-alive", b"timeout=5"), (b"upgrade", b"h2c")], [KEPT], False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("headers", "rare", "left", "chunked"), [c[1:] for c in FILTERED], ids=[c[0] for c in FILTERED]
)
def test_drop_connection_listed(headers: H, rare: H, left: H, chunked: bool) -> None:
    assert drop_connection_listed(head(*headers), rare) == (head(*left), chunked)


@pytest.mark.parametrize(
    "codings",
    [[b"gzip"], [b"chunked", b"chunked"], [b"gzip", b"chunked"], [b"gzip, chunked"], [b"chunked, gzip"], [b""]],
    ids=["gzip", "chunked-twice", "gzip-then-chunked", "gzip-chunked", "chunked-gzip", "empty"],
)
def test_drop_connection_listed_refuses_other_transfer_codings(codings: list[bytes]) -> None:
    with pytest.raises(BadResponse):
        drop_connection_listed(head(KEPT), [(b"transfer-encoding", coding) for coding in codings])


@pytest.mark.parametrize(
    ("headers", "at"),
    [
        ([], 0),
        ([KEPT], 0),
        ([CL, KEPT], 1),
        ([KEPT, (b"X-B", b"2"), CL], 9),
        ([KEPT, (b"content-length", b"5")], 5),
        ([(b"X-Note", b"Content-Length"), (b"Content-Lengths", b"5")], 0),  # a value, a longer name
    ],
)
def test_content_length_at(headers: H, at: int) -> None:
    assert content_length_at(head(*headers)) == at


def test_hop_by_hop_has_the_rfc_9110_names_lower_cased() -> None:
    assert {b"connection", b"te", b"transfer-encoding", b"upgrade", b"keep-alive", b"proxy-connection"} <= HOP_BY_HOP
    assert all(name == name.lower() for name in HOP_BY_HOP)
    assert b"content-length" not in HOP_BY_HOP
