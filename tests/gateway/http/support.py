"""Shared by the socket-level data plane tests: event loops to run on, the handler under test, the data plane on
a free port, and an aiohttp origin. The raw client and the scripted origin are in `support_raw`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import uvloop
from aiohttp import WSMsgType, web

from gateway.core.settings import Limits
from gateway.http.exchange import Exchange, Forward, Outcome, Respond
from gateway.http.framing import HOP_BY_HOP
from gateway.http.server import ProxyServer, start_server

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
TEST_LIMITS = Limits(head_timeout=2.0, idle_timeout=5.0, body_timeout=5.0, upstream_idle=5.0)
# Small limits and short timeouts, for the framing and limit tests.
SMALL_LIMITS = Limits(
    max_header_bytes=2048,
    max_headers=20,
    max_request_line=1024,
    max_body_bytes=1000,
    head_timeout=0.3,
    idle_timeout=5.0,
    body_timeout=0.3,
)

Run = Callable[[Coroutine[Any, Any, None]], None]


@contextlib.contextmanager
def loop_runner(loop_name: str) -> Iterator[Run]:
    """Runs scenarios on a fresh event loop of the named kind (production uses uvloop)."""
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:

        def run_scenario(scenario: Coroutine[Any, Any, None]) -> None:
            runner.run(asyncio.wait_for(scenario, 20))

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


HANDLERS = [ForwardingHandler, AsyncForwardingHandler]


async def reported(handler: ForwardingHandler, tries: int = 100) -> None:
    """Waits (up to tries x 20 ms) until the handler has been told how an exchange ended."""
    for _ in range(tries):
        if handler.outcomes:
            return
        await asyncio.sleep(0.02)


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


# -- an aiohttp origin --------------------------------------------------------------------------------------------


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
