"""The upstream side of the data plane: one keep-alive connection to an upstream, serving one exchange at a time
(no upstream pipelining) and relaying its response to the client connection it serves.

The response head is filtered as it is parsed (gateway.http.framing has the rules); a response relays as it
arrives, with flow control both ways. A reused connection that fails before any response byte, with no body
byte sent (and an idempotent method if the request has a body), is reported as retryable: the client side
tries once more on a fresh connection. read_timeout runs from the end of the request body to the response
head, then between response reads; WebSocket tunnels have no read timeout. The response parser can't be told
that a request was HEAD, so it is stopped after the head.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, cast

import httptools

from gateway.http.deadlines import Deadlines
from gateway.http.exchange import Exchange, Forward
from gateway.http.framing import (
    CRLF,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    BadResponse,
)
from gateway.http.response import Downstream, ResponseRelay

logger = logging.getLogger(__name__)


class Home(Protocol):
    """What an upstream connection needs from its pool (gateway.http.pool)."""

    loop: asyncio.AbstractEventLoop
    deadlines: Deadlines
    max_head_bytes: int
    live: set[UpstreamConnection]

    def release(self, conn: UpstreamConnection) -> None: ...
    def forget(self, conn: UpstreamConnection) -> None: ...


class UpstreamConnection(ResponseRelay, asyncio.Protocol):
    """One keep-alive connection to an upstream; serves one exchange at a time and relays its response."""

    __slots__ = (
        "_body_sent", "_chunk_request", "_deadline", "_deadlines", "_loop", "_read_paused", "_received",
        "_request_done", "_reused", "_started", "_tunnel", "_write_paused", "closed", "deadline_slot", "idle_since",
        "key", "pool", "transport",
    )  # fmt: skip

    def __init__(self, pool: Home, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self._loop = pool.loop
        self._deadlines = pool.deadlines
        self.deadline_slot = 0
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.idle_since = 0  # the pool's sweep count when this connection went idle
        self.closed = False
        self._tunnel = False
        self._read_paused = self._write_paused = False
        self._deadline = 0.0  # loop time; 0 while nothing is awaited from the upstream
        self._out: list[bytes] = []
        self._client: Downstream | None = None
        self._ex: Exchange | None = None
        self._fwd: Forward | None = None
        self._reused = self._head_only = self._websocket = self._chunk_request = self._request_done = False
        self._final = self._started = self._complete = self._keep_alive = self._rechunk = self._eof_body = False
        self._status = self._bytes_out = self._body_sent = self._received = 0
        self.on_message_begin()

    # -- used by the client connection ----------------------------------------------------------------------

    def begin(self, client: Downstream, ex: Exchange, fwd: Forward, reused: bool) -> None:
        """Send the request head (and the body bytes held so far) for `ex` on this connection."""
        self._client = client
        self._ex = ex
        self._fwd = fwd
        self._reused = reused
        self._head_only = ex.method == b"HEAD"
        self._websocket = self._chunk_request = self._request_done = False
        self._final = self._started = self._complete = False
        self._bytes_out = self._body_sent = self._received = 0
        transport = self.transport
        if transport is None or self.closed:
            self._fail("reset")  # went away while idle: a reused connection is retried on a fresh one
            return
        head = fwd.head
        if head[-1:] != b"\n":  # (cheaper than endswith) tolerate a head without the final line's CRLF
            head += CRLF
        if ex.upgrade:
            # The bytes after an upgrade request are not HTTP: they wait for a 101, and go nowhere without one.
            self._websocket = fwd.websocket
            if fwd.websocket and head.lower().find(b"\r\nupgrade:") < 0:
                head += b"Connection: Upgrade\r\nUpgrade: %s\r\n" % ex.upgrade_value
            transport.write(head + CRLF)
            self.end_body()
            return
        if ex.chunked:
            self._chunk_request = True
            transport.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
        elif ex.content_length is not None:
            transport.write(head + b"Content-Length: %d\r\n\r\n" % ex.content_length)
        else:
            transport.write(head + CRLF)
        if ex.has_body:
            pending = ex.take_held()
            if pending:
                for chunk in pending:
                    self.send_body(chunk)
        if ex.body_done:
            self.end_body()

    def send_body(self, data: bytes) -> None:
        """Relay request body bytes (already de-chunked by the client parser), re-framed if needed."""
        transport = self.transport
        if transport is None or self.closed:
            return
        if self._chunk_request:
            transport.writelines((b"%x\r\n" % len(data), data, CRLF))
        else:
            transport.write(data)
        self._body_sent += len(data)

    def end_body(self) -> None:
        """The client's request body is complete: terminate it and start waiting for the response."""
        if self._request_done or self.closed:
            return
        self._request_done = True
        if self._chunk_request and self.transport is not None:
            self.transport.write(LAST_CHUNK)
        if not self._read_paused and self._fwd is not None:
            self._arm(self._fwd.read_timeout)

    def send_raw(self, data: bytes) -> None:
        """Tunnel bytes from the client (after a 101)."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_for_client(self) -> None:
        """The client's write buffer is full: stop reading the upstream until it drains."""
        if not self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_for_client(self) -> None:
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
            if self._deadline and self._fwd is not None:
                self._arm(self._fwd.read_timeout)

    @property
    def started(self) -> bool:
        """Whether the final response head has reached the client (the status can't change any more)."""
        return self._started

    @property
    def status_sent(self) -> int:
        """The status relayed to the client, 0 while none has been."""
        return self._status if self._started else 0

    @property
    def bytes_out(self) -> int:
        """Body (or tunnel) bytes relayed to the client so far."""
        return self._bytes_out

    def abort(self, graceful: bool = False) -> None:
        """Detach from the exchange and close (flushing first if `graceful`); never reused."""
        self._client = None
        self._ex = None
        self.close(abort=not graceful)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._deadline = 0.0
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    # -- asyncio.Protocol -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.pool.live.add(self)

    def data_received(self, data: bytes) -> None:
        if self._tunnel:
            self._bytes_out += len(data)
            if self._client is not None:
                self._client.transport.write(data)
            return
        if self._ex is None:
            self.close(abort=True)  # bytes on an idle connection: garbage or a desync, never reuse it
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._open_tunnel(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as error:
            if not self._parser_stopped(error, data):
                return
        out = self._out
        if out:
            client = self._client
            if client is not None:
                if len(out) == 1:
                    client.transport.write(out[0])
                else:
                    client.transport.writelines(out)
                if self._final:
                    self._started = True
            out.clear()
        if self._complete:
            self._finish()
        else:
            self._response_continues()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        closed_by_us = self.closed
        self.closed = True
        self._deadline = 0.0
        self.pool.forget(self)
        client = self._client
        if client is None:
            return
        if self._tunnel:
            self._client = None
            client.tunnel_closed(self._bytes_out)
        elif self._final and self._eof_body and exc is None and not closed_by_us:
            # EOF is how a close-delimited body ends.
            if self._rechunk:
                client.transport.write(LAST_CHUNK)
            self._keep_alive = False
            self._finish()
        else:
            self._fail("reset")

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._client is not None:
            self._client.upstream_write_paused()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._client is not None:
            self._client.upstream_write_resumed()

    # -- internals ---------------------------------------------------------------------------------------------

    def _parser_stopped(self, error: httptools.HttpParserError, data: bytes) -> bool:
        """llhttp stopped: on purpose once the response was complete (True), or on a bad response (False)."""
        if not self._complete:
            cause = error.__context__
            if cause is not None and not isinstance(cause, BadResponse):
                logger.error("upstream response callback failed", exc_info=cause)
            self._fail("bad_response")
            return False
        # HEAD answered, or bytes after the response: a fresh parser for the next use.
        self._parser = httptools.HttpResponseParser(self)
        if not (self._head_only and data.endswith(b"\r\n\r\n")):
            self._keep_alive = False  # whatever followed the response is not ours to parse
        return True

    def _response_continues(self) -> None:
        """The response goes on in later reads: push the read deadline, bound an unfinished head."""
        if self._deadline and self._fwd is not None:
            self._deadline = self._loop.time() + self._fwd.read_timeout
        if not self._final and self._received > self.pool.max_head_bytes:
            self._fail("bad_response")

    def _finish(self) -> None:
        client = self._client
        ex = self._ex
        self._client = None
        self._ex = None
        self._deadline = 0.0
        if self._write_paused or self._read_paused:
            self._release_flow(client)
        if self._keep_alive and self._request_done and not self._eof_body:
            self.pool.release(self)
        else:
            self.close()
        if client is not None and ex is not None:
            client.upstream_response_done(ex, self._status, self._bytes_out)

    def _fail(self, error: str) -> None:
        client = self._client
        ex = self._ex
        status = self.status_sent
        self._out.clear()
        retryable = (
            error == "reset"
            and self._reused
            and not self._received
            and not self._body_sent
            and ex is not None
            and (not ex.has_body or ex.method in IDEMPOTENT_METHODS)
        )
        self._client = None
        self._ex = None
        self.close(abort=True)
        if client is not None and ex is not None:
            client.upstream_failed(ex, error, status, self._bytes_out, retryable)

    def _release_flow(self, client: Downstream | None) -> None:
        """Undo flow-control pauses before the connection serves someone else."""
        if self._write_paused and client is not None:
            client.upstream_write_resumed()  # give the client back its reading
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    def _open_tunnel(self, tail: bytes) -> None:
        client = self._client
        ex = self._ex
        self._parser = httptools.HttpResponseParser(self)  # never used again; drops llhttp's paused state
        if client is None or ex is None or self._status != 101:
            self._fail("bad_response")
            return
        self._deadline = 0.0  # tunnels have no read timeout: WebSocket peers ping on their own
        self._tunnel = True
        self._started = True
        client.transport.writelines(self._out)
        self._out.clear()
        client.tunnel_opened(ex, self)
        if tail:
            self._bytes_out += len(tail)
            client.transport.write(tail)

    def _arm(self, seconds: float) -> None:
        when = self._loop.time() + seconds
        self._deadline = when
        self._deadlines.arm(self, when)

    def on_deadline(self, now: float) -> float:
        deadline = self._deadline
        if not deadline or self._read_paused or self.closed:
            return 0.0  # resume_for_client arms it again
        if now < deadline:
            return deadline
        self._fail("timeout")
        return 0.0
