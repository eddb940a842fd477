"""Upstream half of the data plane: keep-alive connection pool and the response relay back to the client."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, cast

import httptools

from gateway.core.settings import Limits
from gateway.exchange import Exchange, Forward
from gateway.wire import HOP_BY_HOP, STATUS_LINES, WRITE_HIGH_WATER, WRITE_LOW_WATER, status_line

logger = logging.getLogger(__name__)

# Response headers in HOP_BY_HOP are never relayed to the client; `Upgrade` and `Connection` are re-added by
# us on a 101 only. Only header names of these lengths can be hop-by-hop or Content-Length: lower-case
# nothing else.
_WATCHED_LENGTHS = frozenset(len(name) for name in (*HOP_BY_HOP, b"content-length"))
# Connection values that name no other header to drop (the common case, checked without splitting).
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
# Names a Connection option may not remove: the plain options, and Content-Length, which frames the body we relay.
_PROTECTED = _CONNECTION_OPTIONS | {b"content-length"}
# A stale pooled connection may only be retried for methods that are safe to send twice.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_LAST_CHUNK = b"0\r\n\r\n"
_CRLF = b"\r\n"
# Idle pooled connections are swept this many times per `upstream_idle`: they close after 0.75x-1x of it.
_SWEEPS_PER_LIFETIME = 4
# Idle connections kept per upstream; more are closed as they go idle.
_MAX_IDLE_PER_UPSTREAM = 256


class Downstream(Protocol):
    """What an upstream connection needs from the client connection it serves (gateway.proxy)."""

    transport: asyncio.Transport

    def response_connection_header(self, ex: Exchange, close_delimited: bool) -> bytes: ...
    def upstream_response_done(self, ex: Exchange, status: int, bytes_sent: int) -> None: ...
    def upstream_failed(self, ex: Exchange, error: str, status: int, bytes_sent: int, retryable: bool) -> None: ...
    def upstream_write_paused(self) -> None: ...
    def upstream_write_resumed(self) -> None: ...
    def tunnel_opened(self, ex: Exchange, conn: UpstreamConnection) -> None: ...
    def tunnel_closed(self, bytes_sent: int) -> None: ...


class _BadResponse(Exception):
    """Raised inside a parser callback: the upstream response cannot be relayed safely."""


class _StopParsing(Exception):
    """Raised inside a parser callback to stop llhttp once the response is over (HEAD, bytes after it)."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an upstream; serves one exchange at a time and relays its response."""

    __slots__ = (
        "_body_sent", "_bytes_out", "_chunk_request", "_client", "_complete", "_deadline", "_eof_body", "_ex",
        "_final", "_fwd", "_head_only", "_keep_alive", "_length_at", "_loop", "_out", "_parser", "_parts",
        "_rare", "_read_paused", "_reason", "_received", "_rechunk", "_request_done", "_reused", "_started",
        "_status", "_timer", "_timer_when", "_tunnel", "_websocket", "_write_paused", "closed", "idle_since",
        "key", "pool", "transport",
    )  # fmt: skip

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.idle_since = 0  # the pool's sweep count when this connection went idle
        self.closed = False
        self._tunnel = False
        self._read_paused = self._write_paused = False
        self._deadline = self._timer_when = 0.0
        self._timer: asyncio.TimerHandle | None = None
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
            head += _CRLF
        if ex.upgrade:
            # The bytes after an upgrade request are not HTTP: they wait for a 101, and go nowhere without one.
            self._websocket = fwd.websocket
            if fwd.websocket and head.lower().find(b"\r\nupgrade:") < 0:
                head += b"Connection: Upgrade\r\nUpgrade: %s\r\n" % ex.upgrade_value
            transport.write(head + _CRLF)
            self.end_body()
            return
        if ex.chunked:
            self._chunk_request = True
            transport.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
        elif ex.content_length is not None:
            transport.write(head + b"Content-Length: %d\r\n\r\n" % ex.content_length)
        else:
            transport.write(head + _CRLF)
        if ex.has_body:
            pending = ex.take_pending()
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
            transport.writelines((b"%x\r\n" % len(data), data, _CRLF))
        else:
            transport.write(data)
        self._body_sent += len(data)

    def end_body(self) -> None:
        """The client's request body is complete: terminate it and start waiting for the response."""
        if self._request_done or self.closed:
            return
        self._request_done = True
        if self._chunk_request and self.transport is not None:
            self.transport.write(_LAST_CHUNK)
        if not self._read_paused and self._fwd is not None:
            when = self._loop.time() + self._fwd.read_timeout
            self._deadline = when
            if self._timer is None or self._timer_when > when:
                self._arm(self._fwd.read_timeout)
            # else the timer fires early, finds the later deadline and re-arms: no reschedule per request

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
                client.transport.write(_LAST_CHUNK)
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

    # -- httptools callbacks -----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _StopParsing  # more bytes after a complete response: nothing we asked for
        self._parts: list[bytes] = [b""]  # slot 0: the status line, known when the head is complete
        self._reason = b""
        self._rare: list[tuple[bytes, bytes]] | None = None  # hop-by-hop headers that need a second look
        self._length_at = 0  # where Content-Length sits in _parts (never 0: that is the status line)

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        parts = self._parts
        if len(name) in _WATCHED_LENGTHS:
            lname = name.lower()
            if lname == b"content-length":  # (== before set lookups: hashing a fresh bytes object costs more)
                self._length_at = len(parts)
            elif lname == b"connection" and value.lower() in _CONNECTION_OPTIONS:
                return  # names no other header: the common case
            elif lname in HOP_BY_HOP:
                if self._rare is None:
                    self._rare = []
                self._rare.append((lname, value))
                return
        parts += (name, b": ", value, _CRLF)

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200 or status > 599:
            self._unusual_status(status)
            return
        ex = self._ex
        client = self._client
        fwd = self._fwd
        assert ex is not None and client is not None and fwd is not None
        self._final = True
        self._status = status
        self._keep_alive = parser.should_keep_alive() and not self._websocket
        self._rechunk = self._eof_body = False
        chunked = self._rare is not None and self._hop_by_hop_headers()
        framing = b""
        close_delimited = False
        if not self._length_at or self._head_only or status == 204 or status == 304:
            framing, close_delimited = self._body_framing(status, ex.http_minor, chunked)
        parts = self._parts
        reason = self._reason
        default = STATUS_LINES.get(status)  # status_line, inlined
        if default is not None and (not reason or reason == default[0]):
            parts[0] = default[1]
        else:
            parts[0] = status_line(status, reason)
        parts += (framing, client.response_connection_header(ex, close_delimited), fwd.response_headers, _CRLF)
        self._out.append(b"".join(parts))
        if self._head_only:
            self._complete = True
            raise _StopParsing  # llhttp can't be told that a response answers HEAD; stop it here

    def _hop_by_hop_headers(self) -> bool:
        """Act on the hop-by-hop headers of the head: drop what Connection names, check Transfer-Encoding.
        True when the body is chunked."""
        assert self._rare is not None
        codings = [value for lname, value in self._rare if lname == b"transfer-encoding"]
        if len(codings) > 1 or (codings and codings[0].strip().lower() != b"chunked"):
            raise _BadResponse("unsupported transfer-encoding")  # other codings can't be re-framed safely
        listed = {
            token.strip().lower()
            for lname, value in self._rare
            if lname == b"connection"
            for token in value.split(b",")
        } - _PROTECTED
        if listed:
            parts = self._parts
            kept = [parts[0]]
            self._length_at = 0
            for i in range(1, len(parts), 4):
                lname = parts[i].lower()
                if lname not in listed:
                    if lname == b"content-length":
                        self._length_at = len(kept)
                    kept += parts[i : i + 4]
            self._parts = kept
        return bool(codings)

    def _body_framing(self, status: int, http_minor: int, chunked: bool) -> tuple[bytes, bool]:
        """Framing for the client when the upstream's Content-Length can't simply pass through; and whether the
        client's body will be close-delimited."""
        if self._head_only or status == 304:
            return b"", False  # no body; a Content-Length describes the GET response, so it stays
        if status == 204:
            if self._length_at:
                del self._parts[self._length_at : self._length_at + 4]
            return b"", False
        if not chunked:
            self._eof_body = True  # the upstream body ends at its EOF
            self._keep_alive = False
        if http_minor:
            self._rechunk = True
            return b"Transfer-Encoding: chunked\r\n", False
        return b"", True

    def _unusual_status(self, status: int) -> None:
        if status > 599 or status < 100:
            raise _BadResponse("status out of range")
        if status == 101:
            self._switching_protocols()
            return
        # 103 Early Hints helps HTTP/1.1 clients; 100 is ours to send, other 1xx are dropped.
        ex = self._ex
        if status == 103 and ex is not None and ex.http_minor:
            if self._rare is not None:
                self._hop_by_hop_headers()
            parts = self._parts
            parts[0] = status_line(status, self._reason)
            parts.append(_CRLF)
            self._out.append(b"".join(parts))

    def _switching_protocols(self) -> None:
        upgrade = [value for lname, value in self._rare or () if lname == b"upgrade"]
        if not self._websocket or len(upgrade) != 1:
            raise _BadResponse("unexpected 101")
        self._hop_by_hop_headers()
        self._final = True
        self._status = 101
        parts = self._parts
        parts[0] = status_line(101, self._reason)
        extra = self._fwd.response_headers if self._fwd is not None else b""
        parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade[0], _CRLF, extra, _CRLF)
        self._out.append(b"".join(parts))

    def on_body(self, body: bytes) -> None:
        if self._rechunk:
            self._out += (b"%x\r\n" % len(body), body, _CRLF)
        else:
            self._out.append(body)
        self._bytes_out += len(body)

    def on_message_complete(self) -> None:
        if not self._final or self._status == 101:
            return  # the end of a 1xx; or of a 101, after which HttpParserUpgrade hands over the tunnel
        if self._rechunk:
            self._out.append(_LAST_CHUNK)
        self._complete = True

    # -- internals ---------------------------------------------------------------------------------------------

    def _parser_stopped(self, error: httptools.HttpParserError, data: bytes) -> bool:
        """llhttp stopped: on purpose once the response was complete (True), or on a bad response (False)."""
        if not self._complete:
            cause = error.__context__
            if cause is not None and not isinstance(cause, _BadResponse):
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
            pool = self.pool
            idle = pool.idle.get(self.key)
            if idle is not None and len(idle) < pool.max_idle and pool.sweeping:  # release(), inlined
                self.idle_since = pool.sweeps
                idle.append(self)
            else:
                pool.release(self)
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
        timer = self._timer
        if timer is not None:
            if self._timer_when <= when:
                return  # it fires early, finds the later deadline and re-arms: no reschedule per request
            timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if not deadline or self._read_paused or self.closed:
            return
        if self._loop.time() < deadline:
            self._timer_when = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._fail("timeout")


class UpstreamPool:
    """Idle keep-alive connections per (host, port), most recently used first, closed after `upstream_idle`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self.loop = loop
        self.limits = limits
        self.max_head_bytes = limits.max_header_bytes + limits.max_request_line
        self.max_idle = _MAX_IDLE_PER_UPSTREAM
        # Idle connections per (host, port), oldest first: take from the end (most recently used).
        self.idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self.live: set[UpstreamConnection] = set()
        self.sweeps = 0  # counts sweeps, so going idle costs no clock read
        self.sweeping = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def connect(self, host: str, port: int, connect_timeout: float) -> UpstreamConnection:
        """Open a new connection (OSError / TimeoutError on failure)."""
        key = (host, port)
        async with asyncio.timeout(connect_timeout):
            _, conn = await self.loop.create_connection(lambda: UpstreamConnection(self, key), host, port)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Take back a connection whose last response completed cleanly."""
        if self._closed or conn.closed:
            conn.close()
            return
        idle = self.idle.get(conn.key)
        if idle is None:
            idle = self.idle[conn.key] = []
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.sweeps
        idle.append(conn)
        if self._sweeper is None:
            self.sweeping = True
            self._sweeper = self.loop.call_later(self.limits.upstream_idle / _SWEEPS_PER_LIFETIME, self._sweep)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection went away (the upstream closed it, or we did)."""
        self.live.discard(conn)
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        """Close every connection, idle or busy (shutdown)."""
        self._closed = True
        self.sweeping = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.idle.clear()
        for conn in list(self.live):
            conn.close(abort=True)

    def _sweep(self) -> None:
        self._sweeper = None
        self.sweeping = False
        self.sweeps += 1
        oldest_kept = self.sweeps - _SWEEPS_PER_LIFETIME
        remaining = 0
        for key, idle in list(self.idle.items()):
            expired = 0
            while expired < len(idle) and idle[expired].idle_since <= oldest_kept:
                expired += 1
            for conn in idle[:expired]:
                conn.close()
            del idle[:expired]
            if idle:
                remaining += len(idle)
            else:
                del self.idle[key]
        if remaining and not self._closed:
            self.sweeping = True
            self._sweeper = self.loop.call_later(self.limits.upstream_idle / _SWEEPS_PER_LIFETIME, self._sweep)
