"""A scripted origin that records every byte (`RawUpstream`) and a strict client that frames responses exactly as
RFC 9112 says (`RawClient`), for the socket-level data plane tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

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


async def closed_by_peer(up: RawUpstream) -> bool:
    """Whether the data plane closed its (first) connection to the scripted origin within a second."""
    for _ in range(50):
        if up.transports[0].is_closing():
            return True
        await asyncio.sleep(0.02)
    return False


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
