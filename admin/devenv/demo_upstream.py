"""The demo upstream `make run` puts behind the gateway: echoes requests as JSON and WebSocket messages."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import WSCloseCode, WSMsgType, web

OPEN_WEBSOCKETS = web.AppKey("open_websockets", set[web.WebSocketResponse])


async def echo_request(request: web.Request) -> web.Response:
    """Describe the request as the upstream saw it, so a user can see the identity headers the gateway set."""
    body_bytes = 0
    async for chunk in request.content.iter_any():  # counted as it streams, never held whole
        body_bytes += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "path": request.rel_url.raw_path,  # as sent, still percent-encoded
            "query": request.rel_url.raw_query_string,
            "headers": _merged_headers(request),
            "body_bytes": body_bytes,
        }
    )


async def echo_websocket(request: web.Request) -> web.StreamResponse:
    """Echo every text and binary message; a plain HTTP request to /ws gets the JSON echo instead."""
    websocket = web.WebSocketResponse()
    if not websocket.can_prepare(request).ok:
        return await echo_request(request)
    await websocket.prepare(request)
    open_websockets = request.app[OPEN_WEBSOCKETS]
    open_websockets.add(websocket)
    try:
        async for message in websocket:
            if message.type is WSMsgType.TEXT:
                await websocket.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await websocket.send_bytes(message.data)
    finally:
        open_websockets.discard(websocket)
    return websocket


def _merged_headers(request: web.Request) -> dict[str, str]:
    """Headers by the name first sent; repeated headers joined with ", " as HTTP allows."""
    merged: dict[str, str] = {}
    first_spelling: dict[str, str] = {}
    for name, value in request.headers.items():
        spelling = first_spelling.setdefault(name.lower(), name)
        merged[spelling] = f"{merged[spelling]}, {value}" if spelling in merged else value
    return merged


async def _close_websockets(app: web.Application) -> None:
    # Without this, shutdown would wait for every connected WebSocket client to hang up.
    open_websockets = app[OPEN_WEBSOCKETS]
    for websocket in list(open_websockets):
        await websocket.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def create_demo_app() -> web.Application:
    app = web.Application()
    app[OPEN_WEBSOCKETS] = set()
    app.on_shutdown.append(_close_websockets)
    app.router.add_get("/ws", echo_websocket)
    # Any method on any other path (and non-GET on /ws): the router falls through to this route.
    app.router.add_route("*", "/{tail:.*}", echo_request)
    return app


@dataclass(frozen=True)
class DemoUpstream:
    """A running demo upstream; `await stop()` closes it."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_demo_upstream(host: str = "127.0.0.1", port: int = 0) -> DemoUpstream:
    """Serve the demo app on host:port (0 picks a free port) and return the handle with the bound port."""
    runner = web.AppRunner(create_demo_app(), shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port: int = runner.addresses[0][1]
    return DemoUpstream(runner=runner, host=host, port=bound_port)


if __name__ == "__main__":  # `python -m admin.devenv.demo_upstream`: the demo upstream alone (compose, Kubernetes)
    import os

    web.run_app(create_demo_app(), host=os.environ.get("DEMO_UPSTREAM_HOST", "0.0.0.0"),
                port=int(os.environ.get("DEMO_UPSTREAM_PORT", "9000")))
