"""Responses relayed from upstream (gateway.http.response) over real sockets: chunked, close-delimited and
HTTP/1.0 framing, bodiless responses, malformed responses, hop-by-hop filtering and 1xx."""

from __future__ import annotations

import pytest

from tests.gateway.http.support import AioUpstream, ForwardingHandler, Proxy, Run
from tests.gateway.http.support_raw import OK_REPLY, RawClient, RawUpstream, get


def test_chunked_response_relayed_chunked_and_close_delimited_to_http10(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy:
            async with RawClient(proxy.port) as client:
                await client.send(get(b"/chunked"))
                response = await client.response()
                assert response.chunked and response.body == b"alpha-beta-gamma"
                await client.send(get(b"/hello"))
                assert (await client.response()).body == b"hello"
            async with RawClient(proxy.port) as client:
                await client.send(b"GET /chunked HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
                response = await client.response()
                assert not response.chunked and response.body == b"alpha-beta-gamma"
                assert response.header(b"Connection") == b"close"
            async with RawClient(proxy.port) as client:
                await client.send(b"GET /hello HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
                response = await client.response()
                assert response.header(b"Connection") == b"keep-alive" and response.body == b"hello"
                await client.send(b"GET /hello HTTP/1.0\r\nHost: t\r\n\r\n")
                response = await client.response()
                assert response.header(b"Connection") == b"close"
                assert await client.at_eof()

    run(scenario())


def test_head_204_304_have_no_body_and_keep_the_connection(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy, RawClient(proxy.port) as client:
            await client.send(b"HEAD /hello HTTP/1.1\r\nHost: test\r\n\r\n")
            response = await client.response(head_only=True)
            assert response.status == 200 and response.header(b"Content-Length") == b"5"
            for code in (204, 304):
                await client.send(get(b"/status/%d" % code))
                response = await client.response()
                assert response.status == code and response.header(b"ETag") == b'"v1"'
                assert response.header(b"Transfer-Encoding") is None
            await client.send(get(b"/hello"))
            assert (await client.response()).body == b"hello"  # nothing left over in between
            assert len(up.peers) == 1

    run(scenario())


def test_close_delimited_upstream_body_is_rechunked(run: Run) -> None:
    async def scenario() -> None:
        reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
        async with RawUpstream(reply, close_after_reply=True) as up, Proxy(ForwardingHandler(up.port)) as proxy:
            async with RawClient(proxy.port) as client:
                for _ in range(2):
                    await client.send(get(b"/"))
                    response = await client.response()
                    assert response.chunked and response.body == b"until the end"
            assert len(up.received) == 2

    run(scenario())


def test_upstream_connection_close_is_honoured(run: Run) -> None:
    async def scenario() -> None:
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        async with RawUpstream(reply) as up, Proxy(ForwardingHandler(up.port)) as proxy:
            async with RawClient(proxy.port) as client:
                for _ in range(2):
                    await client.send(get(b"/"))
                    response = await client.response()
                    assert response.body == b"ok" and response.header(b"Connection") is None
            assert len(up.received) == 2

    run(scenario())


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nabc",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 600 Nope\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
    ids=["cl+te", "dup-cl", "bad-cl", "bad-status", "status-600", "te-gzip", "obs-fold", "unasked-101", "garbage"],
)
def test_malformed_upstream_response_is_502_and_never_reused(run: Run, reply: bytes) -> None:
    async def scenario() -> None:
        async with RawUpstream(lambda index, request: reply if b"/bad" in request else OK_REPLY) as up:
            handler = ForwardingHandler(up.port)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                await client.send(get(b"/bad"))
                assert (await client.response()).status == 502
                await client.send(get(b"/good"))
                assert (await client.response()).body == b"ok"
            assert len(up.received) == 2  # the bad connection was dropped, a new one served /good
            assert handler.outcomes[0].error == "bad_response"

    run(scenario())


def test_response_hop_by_hop_headers_are_removed(run: Run) -> None:
    async def scenario() -> None:
        reply = (
            b"HTTP/1.1 200 Fine Thanks\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\nTrailer: X-T\r\nUpgrade: h2c\r\nTE: trailers\r\nX-Kept: yes\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
        )
        async with (
            RawUpstream(reply) as up,
            Proxy(ForwardingHandler(up.port)) as proxy,
            RawClient(proxy.port) as client,
        ):
            await client.send(get(b"/"))
            response = await client.response()
            names = {name.lower() for name, _ in response.headers}
            assert names == {b"x-kept", b"x-request-id", b"transfer-encoding"}
            assert response.reason == b"Fine Thanks" and response.chunked and response.body == b"abc"

    run(scenario())


H = list[tuple[bytes, bytes]]
WEBSOCKET_ACCEPT = (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (
            200,
            [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5"), (b"Set-Cookie", b"a=1")],
            [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5"), (b"Set-Cookie", b"a=1")],
        ),
        (
            200,
            [
                (b"Connection", b"keep-alive"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Transfer-Encoding", b"chunked"),
                (b"TE", b"x"),
                (b"Trailer", b"X-Sum"),
                (b"Upgrade", b"h2c"),
                (b"Proxy-Authenticate", b"Basic"),
                (b"Proxy-Connection", b"close"),
                (b"Date", b"today"),
            ],
            [(b"Date", b"today")],
        ),
        (
            200,
            [
                (b"Connection", b"X-Internal, close"),
                (b"X-Internal", b"secret"),
                (b"x-internal", b"2"),
                (b"X-Public", b"1"),
            ],
            [(b"X-Public", b"1")],
        ),
        (
            200,
            [(b"Connection", b"Content-Length, X-Gone"), (b"Content-Length", b"5"), (b"X-Gone", b"1")],
            [(b"Content-Length", b"5")],
        ),
        (
            101,
            [
                (b"Connection", b"Upgrade, X-Internal"),
                (b"Upgrade", b"websocket"),
                (b"X-Internal", b"1"),
                WEBSOCKET_ACCEPT,
            ],
            [WEBSOCKET_ACCEPT, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
        ),
        (200, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], []),
    ],
)
def test_response_headers_filter(run: Run, status: int, headers: H, expected: H) -> None:
    """Hop-by-hop headers and those the upstream's Connection names are dropped, Content-Length (it frames the
    body) is kept; a 101 keeps its Upgrade with one `Connection: Upgrade`."""
    names = {name.lower() for name, _ in headers}
    if status == 101:
        body, request = b"", get(b"/ws", b"Connection: Upgrade", b"Upgrade: websocket")
    else:
        body = b"0\r\n\r\n" if b"transfer-encoding" in names else b"hello" if b"content-length" in names else b""
        request = get(b"/")
    reason = b"Switching Protocols" if status == 101 else b"OK"
    reply = b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (status, reason, b"".join(b"%s: %s\r\n" % pair for pair in headers), body)

    async def scenario() -> None:
        async with (
            RawUpstream(reply, close_after_reply=status != 101) as up,
            Proxy(ForwardingHandler(up.port)) as proxy,
            RawClient(proxy.port) as client,
        ):
            await client.send(request)
            response = await client.response()
            relayed = [pair for pair in response.headers if pair[0] != b"X-Request-Id"]  # set by the handler
            if response.chunked:
                relayed.remove((b"Transfer-Encoding", b"chunked"))  # the data plane's own framing
            assert (response.status, relayed) == (status, expected)

    run(scenario())


def test_informational_103_is_relayed_and_100_dropped(run: Run) -> None:
    async def scenario() -> None:
        reply = (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            + OK_REPLY
        )
        async with (
            RawUpstream(reply) as up,
            Proxy(ForwardingHandler(up.port)) as proxy,
            RawClient(proxy.port) as client,
        ):
            await client.send(get(b"/"))
            hints = await client.response()
            assert hints.status == 103 and hints.header(b"Link") == b"</style.css>; rel=preload"
            final = await client.response()
            assert (final.status, final.body) == (200, b"ok")

    run(scenario())
