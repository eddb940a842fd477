"""The request reader (gateway.http.reader) on a real httptools parser, without sockets: a small fake connection
records what the reader tells it. Refusals are raised inside parser callbacks (httptools reports them as the
context of an HttpParserError), and llhttp refuses most malformed framing itself: the client connection answers
the first with the refusal's status, the second with 400 (test_wire_framing.py checks that end to end)."""

from __future__ import annotations

import httptools
import pytest

from gateway.core.settings import Limits
from gateway.http.exchange import Exchange
from gateway.http.framing import Refusal
from gateway.http.reader import RequestReader

LIMITS = Limits(max_header_bytes=2048, max_headers=20, max_request_line=1024, max_body_bytes=1000)
H = b"Host: test\r\n"
GET = b"GET / HTTP/1.1\r\n" + H
POST = b"POST / HTTP/1.1\r\n" + H
CHUNKED = b"Transfer-Encoding: chunked\r\n"
LLHTTP = "llhttp"  # refused by the parser itself: answered 400 by the connection


class FakeConnection:
    """The reader's `Serving`: records every call; like the real one, the first complete head becomes active."""

    def __init__(self) -> None:
        self.stop = 0
        self.active: Exchange | None = None
        self.calls: list[tuple[str, bytes]] = []
        self.heads: list[Exchange] = []  # every complete head, in order

    def begins_while_busy(self, url: bytes) -> None:
        self.calls.append(("busy", url))

    def head_complete(self, ex: Exchange) -> None:
        self.calls.append(("head", ex.target))
        self.heads.append(ex)
        if self.active is None:
            self.active = ex

    def body_received(self, ex: Exchange, body: bytes) -> None:
        self.calls.append(("body", body))

    def message_complete(self, ex: Exchange) -> None:
        self.calls.append(("complete", ex.target))


class Reading:
    """A reader fed as the client connection feeds it: the bytes of each read count towards the head's size."""

    def __init__(self, limits: Limits = LIMITS) -> None:
        self.conn = FakeConnection()
        self.reader = RequestReader(self.conn, limits)
        self.reader.client_ip, self.reader.client_port = "192.0.2.7", 4321

    def feed(self, *reads: bytes) -> None:
        for data in reads:
            if not self.reader.in_body:
                self.reader.head_bytes += len(data)
            self.reader.parser.feed_data(data)

    @property
    def heads(self) -> list[Exchange]:
        return self.conn.heads

    def refused(self, *reads: bytes) -> tuple[int, str]:
        """The status and error the connection would answer."""
        with pytest.raises(httptools.HttpParserError) as caught:
            self.feed(*reads)
        cause = caught.value.__context__
        if cause is None:
            return 400, LLHTTP
        assert isinstance(cause, Refusal), cause
        return cause.status, cause.error


def many_headers(count: int) -> bytes:
    return b"".join(b"X-%d: v\r\n" % i for i in range(count))


# (id, reads, status, error): `error` is the refusal's, or LLHTTP when the parser refuses by itself.
REFUSED = [
    ("obs-fold-space", [GET + b"X-A: b\r\n c\r\n\r\n"], 400, LLHTTP),
    ("obs-fold-tab", [GET + b"X-A: b\r\n\tc\r\n\r\n"], 400, LLHTTP),
    ("space-before-colon", [GET + b"X-A : b\r\n\r\n"], 400, LLHTTP),
    ("space-before-colon-te", [POST + b"Transfer-Encoding : chunked\r\n\r\n"], 400, LLHTTP),
    ("cl-and-te", [POST + b"Content-Length: 3\r\n" + CHUNKED + b"\r\n"], 400, LLHTTP),
    ("te-and-cl", [POST + CHUNKED + b"Content-Length: 3\r\n\r\n"], 400, LLHTTP),
    ("cl-repeated-equal", [POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc"], 400, LLHTTP),
    ("cl-repeated-differ", [POST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"], 400, LLHTTP),
    ("cl-not-digits", [POST + b"Content-Length: 3a\r\n\r\nabc"], 400, LLHTTP),
    ("bare-lf-request-line", [b"GET / HTTP/1.1\nHost: test\n\n"], 400, LLHTTP),
    ("bare-lf-after-header", [GET + b"X-A: b\nX-B: c\r\n\r\n"], 400, LLHTTP),
    ("te-repeated", [POST + CHUNKED + CHUNKED + b"\r\n"], 400, LLHTTP),
    ("te-gzip", [POST + b"Transfer-Encoding: gzip\r\n\r\n"], 400, "bad_request"),
    ("te-on-http10", [b"POST / HTTP/1.0\r\n" + H + CHUNKED + b"\r\n"], 400, "bad_request"),
    ("host-missing", [b"GET / HTTP/1.1\r\n\r\n"], 400, "bad_request"),
    ("host-repeated", [GET + H + b"\r\n"], 400, "bad_request"),
    ("http09", [b"GET /\r\n\r\n"], 400, "bad_request"),
    ("http20", [b"GET / HTTP/2.0\r\n" + H + b"\r\n"], 505, "http_version_not_supported"),
    ("expect-unknown", [GET + b"Expect: something\r\n\r\n"], 417, "expectation_failed"),
    ("connect", [b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"], 501, "not_implemented"),
    ("upgrade-with-body", [POST + b"Connection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc"], 400,
     "bad_request"),
    ("too-many-headers", [GET + many_headers(20) + b"\r\n"], 431, "request_header_fields_too_large"),
    ("target-too-long", [b"GET /" + b"a" * 1024 + b" HTTP/1.1\r\n" + H + b"\r\n"], 414, "uri_too_long"),
    ("target-too-long-in-pieces", [b"GET /" + b"a" * 600, b"b" * 600 + b" HTTP/1.1\r\n" + H + b"\r\n"], 414,
     "uri_too_long"),
    ("header-bytes-over", [GET + b"X-Big: " + b"v" * 2030 + b"\r\n\r\n"], 431, "request_header_fields_too_large"),
    ("header-bytes-over-across-reads", [GET + b"X-A: " + b"a" * 1000 + b"\r\n", b"X-B: " + b"b" * 1030 + b"\r\n\r\n"],
     431, "request_header_fields_too_large"),
    ("body-over-max-declared", [POST + b"Content-Length: 1001\r\n\r\n"], 413, "content_too_large"),
    ("body-over-max-chunked", [POST + CHUNKED + b"\r\n3e8\r\n" + b"x" * 1000 + b"\r\n", b"1\r\nx\r\n"], 413,
     "content_too_large"),
]  # fmt: skip


@pytest.mark.parametrize(("reads", "status", "error"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused(reads: list[bytes], status: int, error: str) -> None:
    reading = Reading()
    assert reading.refused(*reads) == (status, error)
    assert ("complete", b"/") not in reading.conn.calls


def test_limits_are_inclusive() -> None:
    reading = Reading()
    target = b"/" + b"a" * 1023
    # Host plus 19: max_headers (20) fields. Content-Length is not among Exchange.headers (framing is the data
    # plane's), and only counts when it arrives after the limit is reached.
    reading.feed(b"POST " + target + b" HTTP/1.1\r\nContent-Length: 1000\r\n" + H + many_headers(19) + b"\r\n")
    reading.feed(b"x" * 1000)
    (ex,) = reading.heads
    assert (ex.target, len(ex.headers), ex.content_length, ex.received) == (target, 20, 1000, 1000)
    assert reading.conn.calls[-1] == ("complete", target)


def test_header_bytes_exactly_at_the_limit() -> None:
    # Counted: the target (1), each name and value with ': ' and CRLF: Host (4 + 4 + 4) and X-Big.
    value = b"v" * (2048 - 1 - 12 - 5 - 4)
    reading = Reading()
    reading.feed(GET + b"X-Big: " + value + b"\r\n\r\n")
    assert reading.conn.calls == [("head", b"/"), ("complete", b"/")]
    assert Reading().refused(GET + b"X-Big: " + value + b"v\r\n\r\n") == (431, "request_header_fields_too_large")


def test_a_request_with_a_body_becomes_an_exchange() -> None:
    reading = Reading()
    reading.feed(
        b"PUT /things?x=1 HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
        b"X-Custom: a\r\nConnection: keep-alive\r\n\r\nhel",
        b"lo",
    )
    (ex,) = reading.heads
    assert (ex.method, ex.target, ex.http_minor, ex.keep_alive) == (b"PUT", b"/things?x=1", 1, True)
    assert (ex.client_ip, ex.client_port) == ("192.0.2.7", 4321)
    # The framing headers are the data plane's: the handler never sees them.
    assert ex.headers == [(b"Host", b"test"), (b"X-Custom", b"a"), (b"Connection", b"keep-alive")]
    assert (ex.content_length, ex.has_body, ex.expect_continue, ex.chunked) == (5, True, True, False)
    assert (ex.received, ex.body_done) == (5, True)
    assert reading.conn.calls == [
        ("head", b"/things?x=1"),
        ("body", b"hel"),
        ("body", b"lo"),
        ("complete", b"/things?x=1"),
    ]
    assert reading.reader.parsing is None and not reading.reader.in_body


def test_a_chunked_request() -> None:
    reading = Reading()
    reading.feed(POST + CHUNKED + b"\r\n5;ext=1\r\nhello\r\n", b"6\r\n world\r\n0\r\n\r\n")
    (ex,) = reading.heads
    assert (ex.chunked, ex.has_body, ex.content_length, ex.received) == (True, True, None, 11)
    bodies = [data for call, data in reading.conn.calls if call == "body"]
    assert b"".join(bodies) == b"hello world"


@pytest.mark.parametrize(
    ("request_line", "extra", "minor", "keep_alive"),
    [
        (b"GET / HTTP/1.1", b"", 1, True),
        (b"GET / HTTP/1.1", b"Connection: close\r\n", 1, False),
        (b"GET / HTTP/1.0", b"", 0, False),
        (b"GET / HTTP/1.0", b"Connection: keep-alive\r\n", 0, True),
    ],
)
def test_version_and_keep_alive(request_line: bytes, extra: bytes, minor: int, keep_alive: bool) -> None:
    reading = Reading()
    reading.feed(request_line + b"\r\n" + H + extra + b"\r\n")
    (ex,) = reading.heads
    assert (ex.http_minor, ex.keep_alive) == (minor, keep_alive)


def test_an_upgrade_request() -> None:
    reading = Reading()
    with pytest.raises(httptools.HttpParserUpgrade):  # the connection takes over the bytes after the head
        reading.feed(GET + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    (ex,) = reading.heads
    assert (ex.upgrade, ex.upgrade_value, ex.has_body) == (True, b"websocket", False)
    assert reading.conn.calls == [("head", b"/"), ("complete", b"/")]


def test_a_request_behind_the_active_one_is_announced_as_busy() -> None:
    reading = Reading()
    reading.feed(GET + b"\r\n" + b"GET /second HTTP/1.1\r\n" + H + b"\r\n")
    assert reading.conn.calls == [
        ("head", b"/"),
        ("complete", b"/"),
        ("busy", b"/second"),
        ("head", b"/second"),
        ("complete", b"/second"),
    ]


def test_request_trailers_are_dropped() -> None:
    reading = Reading()
    reading.feed(POST + CHUNKED + b"\r\n3\r\nabc\r\n0\r\nX-Injected: 1\r\nHost: other\r\n\r\n")
    (ex,) = reading.heads
    assert ex.headers == [(b"Host", b"test")]
