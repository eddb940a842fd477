"""Request smuggling, malformed framing and limits over real sockets: the data plane answers, closes, and
forwards nothing. The same rules without sockets: test_framing.py and test_reader.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.gateway.http.support import SMALL_LIMITS, ForwardingHandler, Proxy, Run
from tests.gateway.http.support_raw import OK_REPLY, RawClient, RawUpstream, get

H = b"Host: test\r\n"
GET = b"GET / HTTP/1.1\r\n" + H
POST = b"POST / HTTP/1.1\r\n" + H
CHUNKED = b"Transfer-Encoding: chunked\r\n"


# (id, raw request, status the data plane must answer). llhttp refuses most of these itself; the rest are
# refused by the request reader (gateway.http.reader, with the rules of gateway.http.framing). All are refused
# before the handler sees them.
REFUSED_HEADS = [
    ("cl-and-te", POST + b"Content-Length: 4\r\n" + CHUNKED + b"\r\n0\r\n\r\n", 400),
    ("te-and-cl", POST + CHUNKED + b"Content-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("cl-repeated-equal", POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("cl-repeated-differ", POST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("cl-list", POST + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("cl-plus-sign", POST + b"Content-Length: +3\r\n\r\nabc", 400),
    ("cl-negative", POST + b"Content-Length: -3\r\n\r\nabc", 400),
    ("cl-hex", POST + b"Content-Length: 0x3\r\n\r\nabc", 400),
    ("cl-not-digits", POST + b"Content-Length: three\r\n\r\nabc", 400),
    ("cl-empty", POST + b"Content-Length: \r\n\r\nabc", 400),
    ("cl-overflow", POST + b"Content-Length: 99999999999999999999999\r\n\r\nabc", 400),
    ("te-gzip-chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-chunked-gzip", POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    ("te-xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-identity", POST + b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n", 400),
    ("te-repeated", POST + CHUNKED + CHUNKED + b"\r\n0\r\n\r\n", 400),
    ("te-gzip-then-chunked", POST + b"Transfer-Encoding: gzip\r\n" + CHUNKED + b"\r\n0\r\n\r\n", 400),
    ("te-on-http10", b"POST / HTTP/1.0\r\n" + H + CHUNKED + b"\r\n0\r\n\r\n", 400),
    ("obs-fold-space", GET + b"X-A: b\r\n c\r\n\r\n", 400),
    ("obs-fold-tab", GET + b"X-A: b\r\n\tc\r\n\r\n", 400),
    ("space-before-colon", GET + b"X-A : b\r\n\r\n", 400),
    ("space-before-colon-te", POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("space-in-name", GET + b"X A: b\r\n\r\n", 400),
    ("leading-space-line", b"GET / HTTP/1.1\r\n Host: test\r\n\r\n", 400),
    ("nul-in-value", GET + b"X-A: b\x00c\r\n\r\n", 400),
    ("cr-in-value", GET + b"X-A: b\rc\r\n\r\n", 400),
    ("ctl-in-value", GET + b"X-A: b\x01c\r\n\r\n", 400),
    ("del-in-value", GET + b"X-A: b\x7fc\r\n\r\n", 400),
    ("bare-lf-headers", b"GET / HTTP/1.1\nHost: test\n\n", 400),
    ("bare-lf-in-value", GET + b"X-A: b\nX-B: c\r\n\r\n", 400),
    ("bare-lf-end", GET + b"\n", 400),
    ("empty-header-name", GET + b": b\r\n\r\n", 400),
    ("host-missing", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    ("host-repeated", GET + H + b"\r\n", 400),
    ("host-repeated-http10", b"GET / HTTP/1.0\r\n" + H + H + b"\r\n", 400),
    ("http09", b"GET /\r\n\r\n", 400),
    ("http12", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400),
    ("http20", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("lowercase-version", b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("ctl-in-target", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("connect", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
    ("upgrade-with-body", POST + b"Connection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("expect-unknown", GET + b"Expect: something\r\n\r\n", 417),
    ("request-line-too-long", b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("too-many-headers", GET + b"".join(b"X-%d: v\r\n" % i for i in range(25)) + b"\r\n", 431),
    ("header-block-too-large", GET + b"X-Big: " + b"v" * 2100 + b"\r\n\r\n", 431),
    ("body-too-large-cl", POST + b"Content-Length: 1001\r\n\r\n" + b"x" * 1001, 413),
]


# The head is fine (the handler decides on it); the body framing is not. Still nothing reaches the upstream here,
# since no pooled connection exists yet when the body fails.
REFUSED_BODIES = [
    ("chunk-size-garbage", POST + CHUNKED + b"\r\nzz\r\nabc\r\n0\r\n\r\n", 400, "bad_request"),
    ("chunk-size-overflow", POST + CHUNKED + b"\r\nfffffffffffffffff\r\n", 400, "bad_request"),
    ("chunk-bare-lf", POST + CHUNKED + b"\r\n3\nabc\n0\n\n", 400, "bad_request"),
    ("chunk-missing-crlf", POST + CHUNKED + b"\r\n3\r\nabcX\r\n0\r\n\r\n", 400, "bad_request"),
    ("body-too-large-chunked", POST + CHUNKED + b"\r\n3e9\r\n" + b"x" * 1001, 413, "body_too_large"),
]


async def _refused(request_bytes: bytes, status: int, handler: ForwardingHandler, up: RawUpstream) -> None:
    async with Proxy(handler, SMALL_LIMITS) as proxy, RawClient(proxy.port) as client:
        await client.send(request_bytes)
        response = await client.response()
        assert response.status == status
        assert response.header(b"Connection") == b"close"
        assert json.loads(response.body)["error"]
        assert await client.at_eof()
    assert up.requests == []  # not a byte reached the upstream


@pytest.mark.parametrize(("request_bytes", "status"), [c[1:] for c in REFUSED_HEADS], ids=[c[0] for c in REFUSED_HEADS])
def test_refused_head_never_reaches_handler_or_upstream(run: Run, request_bytes: bytes, status: int) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            handler = ForwardingHandler(up.port)
            await _refused(request_bytes, status, handler, up)
            assert handler.seen == [] and handler.outcomes == []

    run(scenario())


@pytest.mark.parametrize(
    ("request_bytes", "status", "error"), [c[1:] for c in REFUSED_BODIES], ids=[c[0] for c in REFUSED_BODIES]
)
def test_refused_body_is_answered_and_reported(run: Run, request_bytes: bytes, status: int, error: str) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            handler = ForwardingHandler(up.port)
            await _refused(request_bytes, status, handler, up)
            assert [(o.status, o.error) for o in handler.outcomes] == [(status, error)]

    run(scenario())


def test_smuggling_after_a_valid_pipelined_request(run: Run) -> None:
    """The valid request is answered; the smuggled one behind it gets 400, in order, and never travels."""

    async def scenario() -> None:
        smuggled = b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        async with RawUpstream(OK_REPLY) as up:
            async with Proxy(ForwardingHandler(up.port), SMALL_LIMITS) as proxy, RawClient(proxy.port) as client:
                await client.send(get(b"/first") + smuggled + get(b"/never"))
                first = await client.response()
                assert (first.status, first.body) == (200, b"ok")
                refused = await client.response()
                assert refused.status == 400 and refused.header(b"Connection") == b"close"
                assert await client.at_eof()
            assert len(up.requests) == 1 and up.requests[0].startswith(b"GET /first ")

    run(scenario())


def test_chunked_body_over_the_limit_after_forwarding_started(run: Run) -> None:
    """The head was fine and went upstream; the body grows past the limit: 413, upstream connection dropped."""

    async def scenario() -> None:
        async with RawUpstream(None) as up:
            handler = ForwardingHandler(up.port)
            async with Proxy(handler, SMALL_LIMITS) as proxy, RawClient(proxy.port) as client:
                await client.send(
                    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n200\r\n" + b"x" * 512
                )
                await asyncio.sleep(0.1)
                await client.send(b"\r\n300\r\n" + b"y" * 768 + b"\r\n0\r\n\r\n")
                response = await client.response()
                assert response.status == 413 and response.header(b"Connection") == b"close"
                assert await client.at_eof()
            assert len(up.received) == 1 and b"x" * 512 in up.received[0]
            assert [(o.status, o.error) for o in handler.outcomes] == [(413, "body_too_large")]
            assert up.transports[0].is_closing()

    run(scenario())
