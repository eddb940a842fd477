"""Data plane tests (gateway.proxy, gateway.upstream, gateway.exchange) over real sockets, each run on asyncio and
on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import pytest
import uvloop
from aiohttp import ClientSession, WSMsgType, web

from gateway.core.settings import Limits
from gateway.http.exchange import Exchange, Forward, Outcome, Respond
from gateway.http.framing import HOP_BY_HOP
from gateway.http.server import ProxyServer, start_server

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
TEST_LIMITS = Limits(head_timeout=2.0, idle_timeout=5.0, body_timeout=5.0, upstream_idle=5.0)

Run = Callable[[Coroutine[Any, Any, None]], None]


@contextlib.contextmanager
def loop_runner(loop_name: str) -> Iterator[Run]:
    """Runs scenarios on a fresh event loop of the named kind (production uses uvloop)."""
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:

        def run_scenario(scenario: Coroutine[Any, Any, None]) -> None:
            runner.run(asyncio.wait_for(scenario, 20))

        yield run_scenario


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    with loop_runner(request.param) as run_scenario:
        yield run_scenario


# -- the handler under test: forwards everything, refuses X-Deny ------------------------------------------------


def request_head(ex: Exchange) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\n" % (ex.method, ex.target)]
    lines += [b"%s: %s\r\n" % (name, value) for name, value in ex.headers if name.lower() not in HOP_BY_HOP]
    return b"".join(lines)


class ForwardingHandler:
    """Forwards every request to one upstream; answers 401 when the request carries X-Deny."""

    def __init__(self, port: int, *, read_timeout: float = 5.0, connect_timeout: float = 2.0) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.seen: list[Exchange] = []
        self.outcomes: list[Outcome] = []
        self.refused: list[tuple[str, int, str]] = []

    def decide(self, ex: Exchange) -> Respond | Forward:
        self.seen.append(ex)
        if any(name.lower() == b"x-deny" for name, _ in ex.headers):
            body = b'{"error":"invalid_token"}'
            return Respond(
                401, [(b"WWW-Authenticate", b'Bearer realm="test"'), (b"Content-Type", b"application/json")], body
            )
        return Forward(
            self.host,
            self.port,
            request_head(ex),
            response_headers=b"X-Request-Id: test-%d\r\n" % len(self.seen),
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            websocket=ex.upgrade,
        )

    def handle(self, ex: Exchange) -> Respond | Forward | Awaitable[Respond | Forward]:
        return self.decide(ex)

    def done(self, ex: Exchange, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def rejected(self, client_ip: str, status: int, error: str) -> None:
        self.refused.append((client_ip, status, error))

    def error_response(self, status: int, error: str, description: str) -> Respond:
        body = json.dumps({"error": error, "error_description": description}).encode()
        return Respond(status, [(b"Content-Type", b"application/json")], body)


class AsyncForwardingHandler(ForwardingHandler):
    """The same decisions, taken after an await (as on a credential cache miss)."""

    def handle(self, ex: Exchange) -> Respond | Forward | Awaitable[Respond | Forward]:
        return self._later(ex)

    async def _later(self, ex: Exchange) -> Respond | Forward:
        await asyncio.sleep(0)
        return self.decide(ex)


HANDLERS = [ForwardingHandler, AsyncForwardingHandler]


class Proxy:
    """The data plane on 127.0.0.1:0, shut down (and checked for leftovers) on exit."""

    def __init__(self, handler: ForwardingHandler, limits: Limits = TEST_LIMITS) -> None:
        self.handler = handler
        self.limits = limits
        self.server: ProxyServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    async def __aenter__(self) -> Proxy:
        self.server = await start_server(self.handler, "127.0.0.1", 0, limits=self.limits)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await self.server.shutdown(1.0)
        state = self.server.state
        assert not state.connections and not state.tasks and not state.pool.live  # nothing left behind


# -- upstreams ----------------------------------------------------------------------------------------------------


class AioUpstream:
    """An aiohttp origin on 127.0.0.1:0 that remembers which client ports (connections) it served."""

    def __init__(self) -> None:
        self.peers: set[int] = set()
        self.requests: list[web.Request] = []
        app = web.Application()
        app.router.add_route("*", "/hello", self.hello)
        app.router.add_post("/echo", self.echo)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/status/{code}", self.status)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/stream", self.stream)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/ws-refused", self.refuse)
        self.runner = web.AppRunner(app)
        self.port = 0

    def _seen(self, request: web.Request) -> None:
        self.requests.append(request)
        transport = request.transport
        if transport is not None:
            self.peers.add(transport.get_extra_info("peername")[1])

    async def hello(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(text="hello")

    async def echo(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=await request.read(), headers={"X-Saw-Expect": request.headers.get("Expect", "")})

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in (b"alpha-", b"beta-", b"gamma"):
            await response.write(piece)
        await response.write_eof()
        return response

    async def status(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(status=int(request.match_info["code"]), headers={"ETag": '"v1"'})

    async def slow(self, request: web.Request) -> web.Response:
        self._seen(request)
        await asyncio.sleep(float(request.query.get("delay", "0.2")))
        return web.Response(text="slow")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        response = web.StreamResponse(headers={"Content-Length": str(1024 * 1024 * 50)})
        await response.prepare(request)
        for _ in range(50):
            await response.write(b"x" * 1024 * 1024)
            await asyncio.sleep(0.01)
        return response

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self._seen(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    async def refuse(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(status=404, text="no websocket here")

    async def __aenter__(self) -> AioUpstream:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


Reply = Callable[[int, bytes], bytes | None]


class _RawUpstreamConnection(asyncio.Protocol):
    def __init__(self, owner: RawUpstream) -> None:
        self.owner = owner
        self.index = len(owner.received)
        self.buffer = b""
        self.answered = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.owner.received.append(b"")
        self.owner.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        self.owner.received[self.index] += data
        self.buffer += data
        while self.transport is not None:
            request = _complete_request(self.buffer)
            if request is None:
                return
            self.buffer = self.buffer[len(request) :]
            reply = self.owner.reply(self.answered, request)
            self.answered += 1
            if reply is None:
                continue  # hang: never answer
            if reply == b"CLOSE":
                self.transport.close()
                return
            self.transport.write(reply)
            if self.owner.close_after_reply:
                self.transport.close()


def _complete_request(buffer: bytes) -> bytes | None:
    """One complete request at the start of `buffer` (Content-Length or chunked framing), or None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[: end + 4]
    lower = head.lower()
    if b"\r\ntransfer-encoding: chunked" in lower:
        last = buffer.find(b"\r\n0\r\n\r\n", end)
        if last < 0:
            return None if not buffer[end + 4 :].startswith(b"0\r\n\r\n") else buffer[: end + 9]
        return buffer[: last + 7]
    marker = lower.find(b"\r\ncontent-length:")
    if marker >= 0:
        length = int(lower[marker + 17 : lower.find(b"\r\n", marker + 2)])
        if len(buffer) < end + 4 + length:
            return None
        return buffer[: end + 4 + length]
    return head


class RawUpstream:
    """A scripted origin: records every byte per connection and answers each request with `reply`."""

    def __init__(self, reply: bytes | Reply | None, *, close_after_reply: bool = False) -> None:
        self._reply = reply
        self.close_after_reply = close_after_reply
        self.received: list[bytes] = []
        self.transports: list[asyncio.BaseTransport] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def reply(self, index: int, request: bytes) -> bytes | None:
        if callable(self._reply):
            return self._reply(index, request)
        return self._reply

    @property
    def requests(self) -> list[bytes]:
        return [r for r in self.received if r]

    async def __aenter__(self) -> RawUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _RawUpstreamConnection(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for transport in self.transports:
            transport.close()
        await self.server.wait_closed()
        await asyncio.sleep(0)


OK_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- a strict little client ---------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    chunked: bool = False

    def header(self, name: bytes) -> bytes | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name!r} repeated"
        return values[0] if values else None

    def all(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


class RawClient:
    """Writes raw bytes, reads responses framed exactly as RFC 9112 says (and fails on anything else)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
            self.writer = None

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head_only: bool = False, within: float = 5.0) -> Response:
        return await asyncio.wait_for(self._response(head_only), within)

    async def _response(self, head_only: bool) -> Response:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        assert version == b"HTTP/1.1", lines[0]
        code, _, reason = rest.partition(b" ")
        response = Response(int(code), reason)
        for line in lines[1:]:
            name, sep, value = line.partition(b": ")
            assert sep and name and b" " not in name, line
            response.headers.append((name, value))
        if head_only or response.status in (204, 304) or response.status < 200:
            return response
        if (response.header(b"Transfer-Encoding") or b"").lower() == b"chunked":
            assert response.header(b"Content-Length") is None
            response.chunked = True
            response.body = await self._chunked_body()
        elif response.header(b"Content-Length") is not None:
            response.body = await self.reader.readexactly(int(response.header(b"Content-Length") or b"0"))
        else:
            response.body = await self.reader.read()  # close-delimited
        return response

    async def _chunked_body(self) -> bytes:
        assert self.reader is not None
        body = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                assert await self.reader.readexactly(2) == b"\r\n"
                return body
            body += await self.reader.readexactly(size)
            assert await self.reader.readexactly(2) == b"\r\n"

    async def at_eof(self, within: float = 5.0) -> bool:
        """True when the proxy closed the connection (no more bytes)."""
        assert self.reader is not None
        try:
            rest = await asyncio.wait_for(self.reader.read(), within)
        except ConnectionResetError:
            return True
        assert rest == b"", rest
        return True


def get(path: bytes, *extra: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: test\r\n%s\r\n" % (path, b"".join(h + b"\r\n" for h in extra))


def post(path: bytes, body: bytes, *extra: bytes) -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n" % (path, len(body))
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body


# -- keep-alive, pipelining, framing ------------------------------------------------------------------------------


@pytest.mark.parametrize("handler_class", HANDLERS)
def test_keep_alive_reuses_one_upstream_connection(run: Run, handler_class: type[ForwardingHandler]) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up:
            handler = handler_class(up.port)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                for i in range(3):
                    await client.send(get(b"/hello"))
                    response = await client.response()
                    assert (response.status, response.body) == (200, b"hello")
                    assert response.header(b"X-Request-Id") == b"test-%d" % (i + 1)
                    assert response.header(b"Connection") is None
                for body in (b"first body", b"x" * 100_000):
                    await client.send(post(b"/echo", body))
                    response = await client.response()
                    assert (response.status, response.body) == (200, body)
            assert len(up.peers) == 1
            assert [o.status for o in handler.outcomes] == [200] * 5
            assert [o.bytes_sent for o in handler.outcomes] == [5, 5, 5, 10, 100_000]
            assert all(o.error is None and o.upstream_seconds is not None for o in handler.outcomes)

    run(scenario())


def test_pipelined_requests_are_answered_in_order(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy, RawClient(proxy.port) as client:
            await client.send(get(b"/slow?delay=0.1") + get(b"/hello") + post(b"/echo", b"third"))
            bodies = [(await client.response()).body for _ in range(3)]
            assert bodies == [b"slow", b"hello", b"third"]
            assert [r.path for r in up.requests] == ["/slow", "/hello", "/echo"]
            await client.send(get(b"/hello"))
            assert (await client.response()).body == b"hello"

    run(scenario())


def test_chunked_request_is_rechunked_upstream(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up, Proxy(ForwardingHandler(up.port)) as proxy:
            async with RawClient(proxy.port) as client:
                head = b"POST /up HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
                await client.send(head + b"5;ext=1\r\nhello\r\n")
                await asyncio.sleep(0.05)
                await client.send(b"6\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n")
                assert (await client.response()).body == b"ok"
            sent = up.requests[0]
            head, _, body = sent.partition(b"\r\n\r\n")
            assert b"\r\nTransfer-Encoding: chunked" in head and b"Content-Length" not in head
            assert body.endswith(b"0\r\n\r\n") and b"X-Trailer" not in body
            assert body.replace(b"5\r\nhello\r\n", b"").replace(b"6\r\n world\r\n", b"") == b"0\r\n\r\n"

    run(scenario())


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


class GatedHandler(ForwardingHandler):
    """Decides only when the test opens the gate (a slow credential check)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.gate = asyncio.Event()

    def handle(self, ex: Exchange) -> Respond | Forward | Awaitable[Respond | Forward]:
        return self._after_gate(ex)

    async def _after_gate(self, ex: Exchange) -> Respond | Forward:
        await self.gate.wait()
        return self.decide(ex)


def test_body_is_held_until_the_decision(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            handler = GatedHandler(up.port)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                await client.send(b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
                await asyncio.sleep(0.1)
                assert up.received == []  # nothing goes upstream before the handler decides
                handler.gate.set()
                await client.send(b"world")
                assert (await client.response()).body == b"ok"
            assert up.requests[0].endswith(b"\r\nContent-Length: 10\r\n\r\nhelloworld")

    run(scenario())


def test_pipeline_mixing_answers_and_forwards(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up:
            handler = AsyncForwardingHandler(up.port)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                denied = post(b"/echo", b"secret", b"X-Deny: 1")
                await client.send(get(b"/hello") + denied + post(b"/echo", b"public") + get(b"/slow?delay=0.05"))
                statuses = [(r.status, r.body) for r in [await client.response() for _ in range(4)]]
                assert statuses == [
                    (200, b"hello"),
                    (401, b'{"error":"invalid_token"}'),
                    (200, b"public"),
                    (200, b"slow"),
                ]
            assert [o.status for o in handler.outcomes] == [200, 401, 200, 200]

    run(scenario())


def test_connection_close_and_half_close(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy:
            async with RawClient(proxy.port) as client:
                await client.send(get(b"/hello", b"Connection: close") + get(b"/never"))
                response = await client.response()
                assert response.body == b"hello" and response.header(b"Connection") == b"close"
                assert await client.at_eof()
            async with RawClient(proxy.port) as client:
                assert client.writer is not None
                await client.send(get(b"/slow?delay=0.1"))
                client.writer.write_eof()  # a client may half-close once its request is out
                response = await client.response()
                assert response.body == b"slow" and response.header(b"Connection") == b"close"
                assert await client.at_eof()
            assert [r.path for r in up.requests] == ["/hello", "/slow"]

    run(scenario())


# -- Expect: 100-continue -----------------------------------------------------------------------------------------


def test_expect_continue_refused_before_the_body(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up, Proxy(ForwardingHandler(up.port)) as proxy:
            async with RawClient(proxy.port) as client:
                head = b"PUT /x HTTP/1.1\r\nHost: t\r\nX-Deny: 1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
                await client.send(head)
                response = await client.response()
                assert response.status == 401 and response.header(b"Connection") == b"close"
                assert await client.at_eof()
            assert up.requests == []

    run(scenario())


def test_expect_continue_accepted_then_body_forwarded(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy, RawClient(proxy.port) as client:
            await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            interim = await client.response()
            assert interim.status == 100
            await client.send(b"hello")
            response = await client.response()
            assert (response.status, response.body) == (200, b"hello")
            assert response.header(b"X-Saw-Expect") == b""  # stripped: the upstream never answers 100 itself

    run(scenario())


# -- upstream failures --------------------------------------------------------------------------------------------


def test_upstream_refused_is_502(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as closed:
            port = closed.port
        handler = ForwardingHandler(port)
        async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
            await client.send(get(b"/"))
            response = await client.response()
            assert response.status == 502 and json.loads(response.body)["error"] == "bad_gateway"
            await client.send(get(b"/"))  # the client connection survives
            assert (await client.response()).status == 502
        assert [(o.status, o.error) for o in handler.outcomes] == [(502, "connect")] * 2

    run(scenario())


def test_upstream_connect_timeout_is_504(run: Run) -> None:
    async def scenario() -> None:
        # A listener whose accept queue is full: the kernel drops further SYNs, so connecting hangs.
        listener = socket.socket()
        fillers = [socket.socket() for _ in range(4)]
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            for filler in fillers:
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            await asyncio.sleep(0.1)
            handler = ForwardingHandler(port, connect_timeout=0.3)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                await client.send(get(b"/"))
                response = await client.response()
                assert response.status == 504 and json.loads(response.body)["error"] == "gateway_timeout"
            assert [o.error for o in handler.outcomes] == ["timeout"]
        finally:
            for sock in [*fillers, listener]:
                sock.close()

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


def test_client_abort_mid_request_drops_the_upstream_connection(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(None) as up:
            handler = ForwardingHandler(up.port)
            async with Proxy(handler) as proxy:
                async with RawClient(proxy.port) as client:
                    await client.send(b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\npartial")
                    for _ in range(100):
                        if up.received and b"partial" in up.received[0]:
                            break
                        await asyncio.sleep(0.02)
                for _ in range(100):
                    if handler.outcomes:
                        break
                    await asyncio.sleep(0.02)
                assert [(o.status, o.error) for o in handler.outcomes] == [(400, "client_abort")]  # after its FIN
                assert await _closed_by_peer(up)

    run(scenario())


def test_upstream_that_never_answers_is_504(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(None) as up:
            handler = ForwardingHandler(up.port, read_timeout=0.3)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                started = time.monotonic()
                await client.send(get(b"/"))
                response = await client.response()
                assert response.status == 504 and json.loads(response.body)["error"] == "gateway_timeout"
                assert 0.25 < time.monotonic() - started < 3
            assert handler.outcomes[0].error == "timeout"

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


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(run: Run) -> None:
    async def scenario() -> None:
        # Every connection answers its first request, then closes on the next one without a byte.
        async with RawUpstream(lambda index, request: OK_REPLY if index == 0 else b"CLOSE") as up:
            handler = ForwardingHandler(up.port)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                for _ in range(3):
                    await client.send(get(b"/"))
                    assert (await client.response()).body == b"ok"
            assert len(up.received) == 3
            assert [o.error for o in handler.outcomes] == [None] * 3

    run(scenario())


def test_upstream_reset_mid_response_aborts_the_client(run: Run) -> None:
    async def scenario() -> None:
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
        async with RawUpstream(reply, close_after_reply=True) as up:
            handler = ForwardingHandler(up.port)
            async with Proxy(handler) as proxy, RawClient(proxy.port) as client:
                await client.send(get(b"/"))
                response = await client.response(head_only=True)
                assert response.status == 200
                assert client.reader is not None
                with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
                    await asyncio.wait_for(client.reader.readexactly(100), 5)
            assert [(o.status, o.bytes_sent, o.error) for o in handler.outcomes] == [(200, 7, "reset")]

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
        (200, [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5"), (b"Set-Cookie", b"a=1")],
         [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5"), (b"Set-Cookie", b"a=1")]),
        (200, [(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), (b"Transfer-Encoding", b"chunked"),
               (b"TE", b"x"), (b"Trailer", b"X-Sum"), (b"Upgrade", b"h2c"), (b"Proxy-Authenticate", b"Basic"),
               (b"Proxy-Connection", b"close"), (b"Date", b"today")],
         [(b"Date", b"today")]),
        (200, [(b"Connection", b"X-Internal, close"), (b"X-Internal", b"secret"), (b"x-internal", b"2"),
               (b"X-Public", b"1")],
         [(b"X-Public", b"1")]),
        (200, [(b"Connection", b"Content-Length, X-Gone"), (b"Content-Length", b"5"), (b"X-Gone", b"1")],
         [(b"Content-Length", b"5")]),
        (101, [(b"Connection", b"Upgrade, X-Internal"), (b"Upgrade", b"websocket"), (b"X-Internal", b"1"),
               WEBSOCKET_ACCEPT],
         [WEBSOCKET_ACCEPT, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]),
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


def test_pooled_connections_expire(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            limits = Limits(upstream_idle=0.2)
            async with Proxy(ForwardingHandler(up.port), limits) as proxy, RawClient(proxy.port) as client:
                await client.send(get(b"/"))
                assert (await client.response()).body == b"ok"
                await asyncio.sleep(0.5)
                assert up.transports[0].is_closing() or await _closed_by_peer(up)
                await client.send(get(b"/"))
                assert (await client.response()).body == b"ok"
            assert len(up.received) == 2

    run(scenario())


async def _closed_by_peer(up: RawUpstream) -> bool:
    for _ in range(50):
        if up.transports[0].is_closing():
            return True
        await asyncio.sleep(0.02)
    return False


# -- client behaviour ---------------------------------------------------------------------------------------------


def test_respond_to_a_request_with_an_unread_body_closes(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up, Proxy(ForwardingHandler(up.port)) as proxy:
            async with RawClient(proxy.port) as client:
                await client.send(
                    b"POST / HTTP/1.1\r\nHost: t\r\nX-Deny: 1\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10
                )
                response = await client.response()
                assert response.status == 401 and response.header(b"Connection") == b"close"
                assert await client.at_eof()
            async with RawClient(proxy.port) as client:  # a fully read body keeps the connection
                await client.send(post(b"/", b"abc", b"X-Deny: 1") + get(b"/"))
                assert (await client.response()).status == 401
                assert (await client.response()).body == b"ok"
            assert len(up.requests) == 1

    run(scenario())


def test_client_abort_mid_response_drops_the_upstream_connection(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up:
            handler = ForwardingHandler(up.port)
            async with Proxy(handler) as proxy:
                async with RawClient(proxy.port) as client:
                    await client.send(get(b"/stream"))
                    assert (await client.response(head_only=True)).status == 200
                for _ in range(100):
                    if handler.outcomes:
                        break
                    await asyncio.sleep(0.02)
                assert [(o.status, o.error) for o in handler.outcomes] == [(200, "client_abort")]
                async with RawClient(proxy.port) as client:
                    await client.send(get(b"/hello"))
                    assert (await client.response()).body == b"hello"
            assert len(up.peers) == 2  # the aborted stream's connection was not reused

    run(scenario())


def test_idle_keep_alive_connection_is_closed_silently(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            limits = Limits(idle_timeout=0.2)
            async with Proxy(ForwardingHandler(up.port), limits) as proxy, RawClient(proxy.port) as client:
                await client.send(get(b"/"))
                assert (await client.response()).body == b"ok"
                started = time.monotonic()
                assert await client.at_eof()
                assert 0.1 < time.monotonic() - started < 3

    run(scenario())


# -- WebSocket ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("handler_class", HANDLERS)
def test_websocket_echo_through_the_proxy(run: Run, handler_class: type[ForwardingHandler]) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up:
            handler = handler_class(up.port)
            async with Proxy(handler) as proxy, ClientSession() as session:
                async with session.ws_connect(f"http://127.0.0.1:{proxy.port}/ws") as ws:
                    for text in ("one", "two" * 10_000):
                        await ws.send_str(text)
                        message = await ws.receive(timeout=5)
                        assert message.type == WSMsgType.TEXT and message.data == "echo:" + text
                    await ws.send_bytes(b"\x00\x01" * 50_000)
                    message = await ws.receive(timeout=5)
                    assert message.data == b"\x00\x01" * 50_000
                for _ in range(100):
                    if handler.outcomes:
                        break
                    await asyncio.sleep(0.02)
            assert [o.status for o in handler.outcomes] == [101]
            assert handler.outcomes[0].error is None

    run(scenario())


def test_websocket_bytes_sent_right_after_the_handshake_go_through(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy, RawClient(proxy.port) as client:
            mask = b"\x01\x02\x03\x04"
            frame = b"\x81\x82" + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(b"hi"))  # masked text "hi"
            await client.send(
                b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" + frame
            )
            response = await client.response(head_only=True)
            assert response.status == 101
            assert response.header(b"Upgrade") == b"websocket" and response.header(b"Connection") == b"Upgrade"
            assert response.header(b"Sec-WebSocket-Accept") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
            assert client.reader is not None
            assert await asyncio.wait_for(client.reader.readexactly(9), 5) == b"\x81\x07echo:hi"

    run(scenario())


def test_websocket_refused_by_upstream_is_relayed_and_closed(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up, Proxy(ForwardingHandler(up.port)) as proxy, RawClient(proxy.port) as client:
            await client.send(
                b"GET /ws-refused HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nearly-bytes"
            )
            response = await client.response()
            assert response.status == 404 and response.header(b"Connection") == b"close"
            assert await client.at_eof()

    run(scenario())


# -- shutdown -----------------------------------------------------------------------------------------------------


def test_shutdown_lets_a_request_in_flight_finish(run: Run) -> None:
    async def scenario() -> None:
        async with AioUpstream() as up:
            server = await start_server(ForwardingHandler(up.port), "127.0.0.1", 0, limits=TEST_LIMITS)
            async with RawClient(server.port) as client, RawClient(server.port) as idle_client:
                await client.send(get(b"/slow?delay=0.3"))
                await asyncio.sleep(0.05)
                started = time.monotonic()
                shutdown = asyncio.create_task(server.shutdown(5.0))
                response = await client.response()
                assert (response.status, response.body) == (200, b"slow")
                assert response.header(b"Connection") == b"close"
                await shutdown
                assert time.monotonic() - started < 3
                assert await idle_client.at_eof()
                with pytest.raises(OSError):
                    await asyncio.open_connection("127.0.0.1", server.port)

    run(scenario())


def test_shutdown_closes_pooled_upstream_connections(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(OK_REPLY) as up:
            server = await start_server(ForwardingHandler(up.port), "127.0.0.1", 0, limits=TEST_LIMITS)
            async with RawClient(server.port) as client:
                await client.send(get(b"/"))
                assert (await client.response()).body == b"ok"
                await server.shutdown(1.0)
                assert await client.at_eof()
            assert await _closed_by_peer(up)

    run(scenario())


def test_shutdown_forces_connections_closed_after_the_grace_period(run: Run) -> None:
    async def scenario() -> None:
        async with RawUpstream(None) as up:
            handler = ForwardingHandler(up.port, read_timeout=30)
            server = await start_server(handler, "127.0.0.1", 0, limits=TEST_LIMITS)
            async with RawClient(server.port) as client:
                await client.send(get(b"/"))
                await asyncio.sleep(0.1)
                started = time.monotonic()
                await server.shutdown(0.2)
                assert time.monotonic() - started < 3
                assert await client.at_eof()
            assert [o.error for o in handler.outcomes] == ["client_abort"]

    run(scenario())


# -- streaming memory bound (proxy in a subprocess on uvloop, its RSS measured) ----------------------------------

PROXY_PROCESS = """
import asyncio, signal, sys
import uvloop
from gateway.core.settings import Limits
from gateway.http.exchange import Forward, Respond
from gateway.http.server import start_server

class Handler:
    def handle(self, ex):
        head = b"%s %s HTTP/1.1\\r\\nHost: up\\r\\n" % (ex.method, ex.target)
        return Forward("127.0.0.1", int(sys.argv[1]), head)
    def done(self, ex, outcome):
        print("done", outcome.status, outcome.bytes_sent, outcome.error, flush=True)
    def rejected(self, client_ip, status, error):
        pass
    def error_response(self, status, error, description):
        return Respond(status, [], error.encode())

async def main():
    server = await start_server(Handler(), "127.0.0.1", 0, limits=Limits(max_body_bytes=0))
    print(server.port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.shutdown(1.0)

uvloop.run(main())
"""
TRANSFER = 200 * 1024 * 1024
CHUNK = 256 * 1024


def _memory_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise AssertionError(field_name)


class ProxyProcess:
    def __init__(self, upstream_port: int) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.process = subprocess.Popen(
            [sys.executable, "-c", PROXY_PROCESS, str(upstream_port)],
            stdout=subprocess.PIPE,
            cwd=root,
            env={**os.environ, "PYTHONPATH": root},
            text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def done_lines(self) -> list[str]:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=10)
        return [line for line in out.splitlines() if line.startswith("done")]

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.mark.slow
def test_200mb_download_streams_in_bounded_memory() -> None:
    async def scenario() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await _small_request(reader, writer):
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TRANSFER)
            block = b"d" * CHUNK
            for _ in range(TRANSFER // CHUNK):
                writer.write(block)
                await writer.drain()
            writer.close()

        upstream = await asyncio.start_server(serve, "127.0.0.1", 0)
        try:
            with ProxyProcess(upstream.sockets[0].getsockname()[1]) as proxy:
                await _warm_up(proxy.port)
                before = _memory_kib(proxy.process.pid, "VmRSS")
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=CHUNK)
                writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert b"Content-Length: %d" % TRANSFER in head
                received = 0
                while received < TRANSFER:
                    chunk = await reader.read(CHUNK)
                    assert chunk
                    received += len(chunk)
                    if received < TRANSFER // 4:
                        await asyncio.sleep(0.001)  # a slow reader first: the proxy must pause the upstream
                writer.close()
                await writer.wait_closed()
                growth_mib = (_memory_kib(proxy.process.pid, "VmHWM") - before) / 1024
                assert growth_mib < 50, growth_mib
                assert proxy.done_lines()[-1] == f"done 200 {TRANSFER} None"
        finally:
            upstream.close()
            await upstream.wait_closed()

    uvloop.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.slow
def test_200mb_upload_streams_in_bounded_memory() -> None:
    async def scenario() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await _small_request(reader, writer):
                return
            received = 0
            while received < TRANSFER:
                chunk = await reader.read(CHUNK)
                assert chunk
                received += len(chunk)
                if received < TRANSFER // 4:
                    await asyncio.sleep(0.001)  # a slow upstream first: the proxy must pause the client
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(received)), received))
            await writer.drain()
            writer.close()

        upstream = await asyncio.start_server(serve, "127.0.0.1", 0, limit=CHUNK)
        try:
            with ProxyProcess(upstream.sockets[0].getsockname()[1]) as proxy:
                await _warm_up(proxy.port)
                before = _memory_kib(proxy.process.pid, "VmRSS")
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(b"PUT /big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % TRANSFER)
                block = b"u" * CHUNK
                for _ in range(TRANSFER // CHUNK):
                    writer.write(block)
                    await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                assert await reader.readexactly(len(str(TRANSFER))) == str(TRANSFER).encode()
                writer.close()
                await writer.wait_closed()
                growth_mib = (_memory_kib(proxy.process.pid, "VmHWM") - before) / 1024
                assert growth_mib < 50, growth_mib
        finally:
            upstream.close()
            await upstream.wait_closed()

    uvloop.run(asyncio.wait_for(scenario(), 60))


async def _small_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Reads a request head; answers and closes if it is the warm-up request (True)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"GET /warm"):
        return False
    writer.write(OK_REPLY)
    await writer.drain()
    writer.close()
    return True


async def _warm_up(port: int) -> None:
    """One tiny exchange so imports and first-use allocations are in the baseline."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /warm HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    await reader.read()
    writer.close()
    await writer.wait_closed()
