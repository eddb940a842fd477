"""The data plane: client connections parsed with httptools, decided by a handler, relayed to upstreams.

It knows HTTP/1.1 framing, connections, streaming, limits and timeouts, and nothing about authentication,
routes or header policy: `Handler.handle` decides what to do with each `Exchange`. Decisions taken here
where the RFCs leave room (the README has the operator-facing version):

- Request framing is strict (RFC 9112 6, 11.2): Content-Length with Transfer-Encoding, repeated or invalid
  Content-Length, any Transfer-Encoding other than exactly one `chunked` (and any on HTTP/1.0), obs-fold,
  whitespace before the colon, control characters in values and bare LF are refused with 400 and the
  connection is closed; llhttp rejects most of these itself, `on_header` adds the rest. `Host` must appear
  once on HTTP/1.1 (at most once on 1.0). HTTP/0.9 gets 400, HTTP/2.0+ 505, CONNECT 501, an upgrade request
  that declares a body 400, an `Expect` other than 100-continue 417.
- `Exchange.headers` carries every request header except the framing ones (Content-Length,
  Transfer-Encoding, Expect): the data plane owns framing and sends `100 Continue` itself once the handler
  has chosen Forward. Request trailers are dropped. The request line limit applies to the request-target.
- Pipelining: requests are answered strictly in order. httptools parses a whole read at once, so requests
  that arrive in the same read as the one in flight are parsed and queued (at most 64, bodies held) but not
  handed to the handler until the responses before them are complete; reading pauses meanwhile.
- A Respond to a request whose body is not fully read closes the connection after the answer (the body is
  not drained). A synchronous Respond waits for the end of the current read first, so a small body that came
  with its head keeps the connection alive.
- Limits: max_headers counts header fields as they arrive; max_header_bytes counts the target, names and
  values; with max_request_line it also bounds the bytes read per incomplete head, since httptools
  buffers a header value internally. body_timeout also aborts a client that stops reading its response.
- Responses: HTTP/1.1 status line, hop-by-hop headers (gateway.wire) and those the upstream names in
  Connection removed; Content-Length passed through (even when Connection names it), otherwise chunked to
  HTTP/1.1 clients and close-delimited to HTTP/1.0 clients; 103 relayed to HTTP/1.1 clients, other 1xx
  dropped; an upstream Transfer-Encoding other than `chunked` is a 502 (it can't be re-framed safely). The
  response parser can't be told that a request was HEAD, so it is stopped after the head (gateway.upstream).
- Upstreams: one request at a time per pooled connection (no upstream pipelining); a reused connection
  that fails before any response byte, with no body byte sent (and an idempotent method if the request has
  a body), is retried once on a fresh connection. read_timeout runs from the end of the request body to
  the response head, then between response reads; WebSocket tunnels have no read timeout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Coroutine
from typing import Any, cast

import httptools

from gateway.core.settings import Limits
from gateway.exchange import Consume, Exchange, Forward, Handler, Outcome, Respond, UpstreamLink
from gateway.upstream import UpstreamConnection, UpstreamPool
from gateway.wire import WRITE_HIGH_WATER, WRITE_LOW_WATER, status_line

logger = logging.getLogger(__name__)
perf_counter = time.perf_counter
_new_outcome = object.__new__

# Only request header names of these lengths matter to framing (host, expect, upgrade, connection,
# content-length, transfer-encoding): other names are never lower-cased.
_WATCHED_LENGTHS = frozenset({4, 6, 7, 10, 14, 17})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_PIPELINED = 64
_NO_BODY_STATUSES = frozenset({204, 304})

# Why the client transport is paused (a bit each; reading resumes when none is left).
_PAUSE_PIPELINE = 1  # a later request arrived while one is in flight
_PAUSE_DECIDING = 2  # the handler's decision is pending
_PAUSE_HOLD = 4  # body bytes held before an upstream is attached exceed the high-water mark
_PAUSE_UPSTREAM = 8  # the upstream's write buffer is full
_PAUSE_STOPPED = 16  # no more requests will be read on this connection

# Which read-side deadline is running.
_NO_DEADLINE, _HEAD, _IDLE, _BODY = 0, 1, 2, 3
# Whether the parser is still fed.
_READING, _DISCARD, _TUNNEL = 0, 1, 2

_UPSTREAM_ERRORS = {
    "connect": (502, "bad_gateway", "upstream connection failed"),
    "timeout": (504, "gateway_timeout", "upstream did not respond in time"),
    "reset": (502, "bad_gateway", "upstream closed the connection"),
    "bad_response": (502, "bad_gateway", "upstream sent an invalid response"),
}


class _Reject(Exception):
    """Raised inside a parser callback: answer with this error (or fail the exchange) and close."""

    def __init__(self, status: int, error: str, description: str, outcome: str = "bad_request") -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.outcome = outcome


class _StopParsing(Exception):
    """Raised inside a parser callback when nothing more will be read on the connection."""


def _bad_request(description: str) -> _Reject:
    return _Reject(400, "bad_request", description)


class _ServerState:
    """What every connection of one server shares."""

    __slots__ = ("closing", "connections", "drained", "handler", "limits", "loop", "pool", "tasks")

    def __init__(self, handler: Handler, limits: Limits, loop: asyncio.AbstractEventLoop) -> None:
        self.handler = handler
        self.limits = limits
        self.loop = loop
        self.pool = UpstreamPool(loop, limits)
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self.drained: asyncio.Event | None = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def forget(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self.drained is not None:
            self.drained.set()


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, runs them through the handler in order, relays responses."""

    __slots__ = (
        "_active", "_answer_later", "_body_timeout", "_client_ip", "_client_port", "_closed", "_conn_header",
        "_deadline", "_deadline_kind", "_deferred", "_feeding", "_handler", "_head_bytes", "_head_cap", "_hosts",
        "_in_body", "_limits", "_loop", "_max_body", "_max_header_bytes", "_max_headers", "_max_request_line",
        "_parser", "_parsing", "_paused", "_pool", "_queue", "_state", "_stop", "_timer", "_timer_when", "_tunnel",
        "_upgrade_ex", "_write_deadline", "_write_paused", "transport",
    )  # fmt: skip

    transport: asyncio.Transport  # set in connection_made, before any other call

    def __init__(self, state: _ServerState) -> None:
        limits = state.limits
        self._state = state
        self._handler = state.handler
        self._limits = limits
        self._loop = state.loop
        self._pool = state.pool
        self._max_headers = limits.max_headers
        self._max_header_bytes = limits.max_header_bytes
        self._max_request_line = limits.max_request_line
        self._max_body = limits.max_body_bytes
        self._body_timeout = limits.body_timeout
        # A head can't be longer than its line plus its headers. Checked per read, it bounds what httptools
        # buffers inside a single endless header before calling us.
        self._head_cap = limits.max_request_line + limits.max_header_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._client_ip = ""
        self._client_port = 0
        self._parsing: Exchange | None = None  # the request the parser is filling
        self._active: Exchange | None = None  # the request being answered
        self._queue: deque[Exchange] | None = None  # parsed requests waiting for the active one
        self._deferred: _Reject | None = None  # error for a pipelined request, sent after those before it
        self._upgrade_ex: Exchange | None = None
        self._tunnel: UpstreamConnection | None = None
        self._answer_later: tuple[Exchange, Respond] | None = None  # see _respond
        self._feeding = False
        self._stop = _READING
        self._closed = self._in_body = self._conn_header = self._write_paused = False
        self._paused = self._head_bytes = self._hosts = 0
        self._deadline_kind = _NO_DEADLINE
        self._deadline = self._write_deadline = self._timer_when = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._client_ip, self._client_port = peer[0], peer[1]
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self._state.connections.add(self)
        if self._state.closing:
            self._close()
            return
        self._arm(_HEAD, self._limits.head_timeout)

    def data_received(self, data: bytes) -> None:
        if self._stop:
            self._after_stop(data)
            return
        if not self._in_body:
            self._head_bytes += len(data)
        self._feeding = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._feeding = False
            self._upgraded(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as error:
            self._feeding = False
            self._parse_failed(error)
            return
        self._feeding = False
        if self._answer_later is not None:
            self._send_answer_later()  # the body did not end in this read: answer, and close
        if self._parsing is not None and not self._in_body and not self._stop:
            self._head_pending()

    def eof_received(self) -> bool | None:
        ex = self._active
        if ex is None or self._tunnel is not None:
            return None  # close
        # Half-close after a request is legal: answer it, then close. A body cut short can't be answered.
        self._stop = _DISCARD
        if ex.has_body and not ex.body_done:
            self._fail_active(_Reject(400, "bad_request", "request body incomplete", "client_abort"))
            return None
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._stop = _DISCARD
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._state.forget(self)
        self._queue = None
        ex = self._active
        self._active = None
        tunnel = self._tunnel
        self._tunnel = None
        if ex is None:
            if tunnel is not None:
                tunnel.abort()
            return
        if ex._task is not None:
            ex._task.cancel()
            ex._task = None
        if tunnel is not None:
            ex._sent = tunnel.bytes_out  # a tunnel ends when either side closes: not an error
            tunnel.abort(graceful=True)
        else:
            self._drop_upstream(ex)
            ex._error = "client_abort"
        self._report(ex)

    def pause_writing(self) -> None:
        self._write_paused = True
        up = self._serving_upstream()
        if up is not None:
            up.pause_for_client()
        self._write_deadline = self._loop.time() + self._body_timeout
        self._schedule(self._write_deadline)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._write_deadline = 0.0
        up = self._serving_upstream()
        if up is not None:
            up.resume_for_client()

    # -- httptools callbacks (no on_message_begin: the first on_url starts a request, one call less) ---------

    def on_url(self, url: bytes) -> None:
        ex = self._parsing
        if ex is not None:  # the target came in pieces
            url = ex.target + url
            if len(url) > self._max_request_line:
                raise _Reject(414, "uri_too_long", "request target too long")
            ex.target = url
            return
        if self._stop or self._active is not None or len(url) > self._max_request_line:
            self._unusual_begin(url)
        self._parsing = Exchange(self._client_ip, self._client_port, url)
        self._hosts = 0
        self._conn_header = False

    def _unusual_begin(self, url: bytes) -> None:
        """A request starts while another is in flight (pipelining), or must not start at all."""
        if self._stop:
            raise _StopParsing
        if len(url) > self._max_request_line:
            raise _Reject(414, "uri_too_long", "request target too long")
        if self._queue is None:
            self._queue = deque()
        elif len(self._queue) >= _MAX_PIPELINED:
            self._stop = _DISCARD
            raise _StopParsing
        self._pause(_PAUSE_PIPELINE)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self._parsing
        assert ex is not None
        headers = ex.headers
        if len(headers) >= self._max_headers:  # bytes are bounded per read and checked at the end of the head
            raise _Reject(431, "request_header_fields_too_large", "too many request header fields")
        if len(name) in _WATCHED_LENGTHS:
            lname = name.lower()
            if lname == b"host":
                self._hosts += 1
            elif self._framing_header(ex, lname, value):
                return
        headers.append((name, value))

    def _framing_header(self, ex: Exchange, lname: bytes, value: bytes) -> bool:
        """Record a header the data plane cares about; True when it is framing (kept from the handler)."""
        if lname == b"connection":
            self._conn_header = True
        elif lname == b"content-length":
            ex.content_length = int(value)  # llhttp has checked the digits and refused duplicates
            return True
        elif lname == b"transfer-encoding":
            if ex.chunked or value.strip().lower() != b"chunked":
                raise _bad_request("unsupported Transfer-Encoding")
            ex.chunked = True
            return True
        elif lname == b"expect":
            if value.strip().lower() != b"100-continue":
                raise _Reject(417, "expectation_failed", "unsupported expectation")
            ex.expect_continue = True
            return True
        elif lname == b"upgrade":
            ex.upgrade_value = value
        return False

    def on_headers_complete(self) -> None:
        ex = self._parsing
        assert ex is not None
        parser = self._parser
        self._in_body = True
        if self._head_bytes > self._max_header_bytes:
            self._check_head_size(ex)
        self._head_bytes = 0
        keep_alive = parser.should_keep_alive()
        if self._conn_header or not keep_alive:
            # Without a Connection header llhttp keeps HTTP/1.1 (only) alive, so the version string (slow
            # to get) is needed only here.
            self._version(ex, parser.get_http_version())
        ex.keep_alive = keep_alive
        ex.method = method = parser.get_method()
        ex.started = perf_counter()
        if self._hosts != 1 or ex.content_length is not None or ex.chunked or ex.upgrade_value or method == b"CONNECT":
            self._check_head(ex, parser.should_upgrade())
        if self._active is None:
            self._active = ex
            if ex.has_body:
                self._arm(_BODY, self._body_timeout)
            else:
                self._deadline_kind = _NO_DEADLINE
            self._start(ex)
        else:
            assert self._queue is not None
            self._queue.append(ex)

    def _check_head_size(self, ex: Exchange) -> None:
        size = len(ex.target) + sum(len(name) + len(value) + 4 for name, value in ex.headers)
        if size > self._max_header_bytes:
            raise _Reject(431, "request_header_fields_too_large", "request header fields too large")

    @staticmethod
    def _version(ex: Exchange, version: str) -> None:
        if version == "1.0":
            ex.http_minor = 0
        elif version == "0.9":
            raise _bad_request("HTTP/0.9 is not supported")
        elif version != "1.1":
            raise _Reject(505, "http_version_not_supported", "HTTP version not supported")

    def _check_head(self, ex: Exchange, upgrade: bool) -> None:
        hosts = self._hosts
        if hosts > 1 or (hosts == 0 and ex.http_minor):
            raise _bad_request("missing or repeated Host header")
        if ex.chunked:
            if not ex.http_minor:
                raise _bad_request("Transfer-Encoding on HTTP/1.0")
            ex.has_body = True
        elif ex.content_length:
            ex.has_body = True
            if self._max_body and ex.content_length > self._max_body:
                raise _Reject(413, "content_too_large", "request body too large", "body_too_large")
        if upgrade:
            if ex.method == b"CONNECT":
                raise _Reject(501, "not_implemented", "CONNECT is not supported")
            if ex.has_body:
                raise _bad_request("upgrade request with a body")
            ex.upgrade = True

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        assert ex is not None
        received = ex._received + len(body)
        ex._received = received
        if self._max_body and received > self._max_body:
            raise _Reject(413, "content_too_large", "request body too large", "body_too_large")
        if ex._consume is not None and received > ex._consume.limit:
            raise _Reject(413, "content_too_large", "request body too large", "body_too_large")
        if self._deadline_kind == _BODY:
            self._deadline = self._loop.time() + self._body_timeout
        up = ex._upstream
        if up is not None:
            up.send_body(body)
        elif not ex._response_done:
            self._hold(ex, body)

    def on_message_complete(self) -> None:
        ex = self._parsing
        assert ex is not None
        self._parsing = None
        self._in_body = False
        ex.body_done = True
        if ex.upgrade:
            self._upgrade_ex = ex
        elif not ex.keep_alive:
            self._stop = _DISCARD
        if ex is self._active:
            if self._deadline_kind == _BODY:
                self._deadline_kind = _NO_DEADLINE
            up = ex._upstream
            if up is not None:
                up.end_body()
            elif ex._consume is not None:
                self._consumed(ex)
            elif self._answer_later is not None:
                self._send_answer_later()  # the whole body came in the read that got the answer
            elif ex._response_done:
                self._exchange_complete(ex)

    # -- deciding ----------------------------------------------------------------------------------------------

    def _start(self, ex: Exchange) -> None:
        ex._handled = True
        try:
            decision = self._handler.handle(ex)
        except Exception:
            logger.exception("handler.handle failed")
            self._error_reply(ex, 500, "internal_error", "internal error", "handler_error")
            return
        if type(decision) is Forward:
            self._forward(ex, decision)
        elif type(decision) is Respond:
            self._respond(ex, decision)
        elif type(decision) is Consume:
            self._consume(ex, decision)
        else:
            self._pause(_PAUSE_DECIDING)
            ex._task = self._state.spawn(self._decide_later(ex, decision))

    async def _decide_later(self, ex: Exchange, pending: Awaitable[Respond | Forward | Consume]) -> None:
        try:
            decision: object = await pending
        except Exception:
            logger.exception("handler.handle failed")
            decision = None
        ex._task = None
        if ex is not self._active or self._closed:
            return
        self._resume(_PAUSE_DECIDING)
        if isinstance(decision, Forward):
            ex._fwd_started = perf_counter()  # upstream time starts after a slow decision, not at the head
            self._forward(ex, decision)
        elif isinstance(decision, Respond):
            self._respond(ex, decision)
        elif isinstance(decision, Consume):
            self._consume(ex, decision)
        else:
            self._error_reply(ex, 500, "internal_error", "internal error", "handler_error")

    def _consume(self, ex: Exchange, consume: Consume) -> None:
        """Collect the body here (held like an undecided body), then answer with the callback's response."""
        if (ex.content_length is not None and ex.content_length > consume.limit) or ex._received > consume.limit:
            self._error_reply(ex, 413, "content_too_large", "request body too large", "body_too_large")
            return
        ex._consume = consume
        if ex.expect_continue and ex.http_minor and not ex.body_done and not ex._received:
            self.transport.write(_CONTINUE)
        if ex.body_done or not ex.has_body:
            self._consumed(ex)

    def _consumed(self, ex: Exchange) -> None:
        consume = ex._consume
        assert consume is not None
        ex._consume = None
        body = b"".join(ex.take_pending() or ())
        try:
            result = consume.callback(body)
        except Exception:
            logger.exception("own endpoint failed")
            self._error_reply(ex, 500, "internal_error", "internal error", "handler_error")
            return
        if isinstance(result, Respond):
            self._respond(ex, result)
        else:
            self._pause(_PAUSE_DECIDING)
            ex._task = self._state.spawn(self._decide_later(ex, result))

    def _forward(self, ex: Exchange, fwd: Forward) -> None:
        ex._forward = fwd
        if ex.expect_continue and ex.http_minor and not ex.body_done and not ex._received:
            self.transport.write(_CONTINUE)  # only now: a refused client never sends its body
        idle = self._pool.idle.get((fwd.host, fwd.port))  # most recently used last
        if not idle:
            ex._task = self._state.spawn(self._connect(ex, fwd))
            return
        ex._upstream = conn = idle.pop()
        if self._write_paused:
            conn.pause_for_client()
        conn.begin(self, ex, fwd, True)
        if self._paused & _PAUSE_HOLD:
            self._resume(_PAUSE_HOLD)

    async def _connect(self, ex: Exchange, fwd: Forward) -> None:
        try:
            conn = await self._pool.connect(fwd.host, fwd.port, fwd.connect_timeout)
        except TimeoutError:
            ex._task = None
            self.upstream_failed(ex, "timeout", 0, 0, False)
            return
        except OSError as error:
            ex._task = None
            logger.info("upstream %s:%d connect failed: %s", fwd.host, fwd.port, error)
            self.upstream_failed(ex, "connect", 0, 0, False)
            return
        ex._task = None
        if ex is not self._active or self._closed:
            self._pool.release(conn)  # fresh and unused
            return
        ex._upstream = conn
        if self._write_paused:
            conn.pause_for_client()
        conn.begin(self, ex, fwd, False)
        self._resume(_PAUSE_HOLD)

    def _hold(self, ex: Exchange, data: bytes) -> None:
        if ex._pending is None:
            ex._pending = [data]
        else:
            ex._pending.append(data)
        ex._pending_bytes += len(data)
        if ex._pending_bytes > WRITE_HIGH_WATER:
            self._pause(_PAUSE_HOLD)

    # -- answering ---------------------------------------------------------------------------------------------

    def _respond(self, ex: Exchange, resp: Respond) -> None:
        if self._feeding and ex.has_body and not ex.body_done and not (resp.close or ex._close):
            # Decided on the head: the rest of a small body may be in this very read. Answer when the read is
            # parsed, keeping the connection if the body was complete by then.
            self._answer_later = (ex, resp)
            ex._response_done = True  # body bytes are dropped from now on
            return
        close = (
            resp.close
            or ex._close
            or not ex.keep_alive
            or ex.upgrade
            or (ex.has_body and not ex.body_done)  # don't drain a body nobody wants
            or self._last_response()
        )
        ex._close = close
        ex._status = resp.status
        ex._sent = self._write_response(resp, close, ex.http_minor, ex.method == b"HEAD")
        ex._response_done = True
        if ex.body_done or close:
            self._exchange_complete(ex)
        # else: a request without body whose message-complete callback is about to run

    def _send_answer_later(self) -> None:
        assert self._answer_later is not None
        ex, resp = self._answer_later
        self._answer_later = None
        ex._response_done = False
        if ex is self._active:
            self._respond(ex, resp)

    def _write_response(self, resp: Respond, close: bool, http_minor: int, head_only: bool) -> int:
        status = resp.status
        parts = [status_line(status)]
        for name, value in resp.headers:
            parts += (name, b": ", value, b"\r\n")
        body = resp.body
        no_body = head_only or status in _NO_BODY_STATUSES or status < 200
        if status not in _NO_BODY_STATUSES:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        if close:
            parts.append(b"Connection: close\r\n")
        elif not http_minor:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if not no_body:
            parts.append(body)
        self.transport.write(b"".join(parts))
        return 0 if no_body else len(body)

    def _error_response(self, status: int, error: str, description: str) -> Respond:
        try:
            return self._handler.error_response(status, error, description)
        except Exception:
            logger.exception("handler.error_response failed")
            return Respond(status, [(b"Content-Type", b"application/json")], b'{"error":"%s"}' % error.encode())

    def _error_reply(self, ex: Exchange, status: int, error: str, description: str, outcome_error: str) -> None:
        ex._error = outcome_error
        self._respond(ex, self._error_response(status, error, description))

    def _send_error(self, rej: _Reject) -> None:
        if not self._closed:
            self._write_response(self._error_response(rej.status, rej.error, rej.description), True, 1, False)
            try:
                self._handler.rejected(self._client_ip, rej.status, rej.error)
            except Exception:
                logger.exception("handler.rejected failed")

    def _exchange_complete(self, ex: Exchange) -> None:
        self._active = None
        if ex._handled:  # _report, inlined for the common path
            ex._handled = False
            outcome = _new_outcome(Outcome)  # no Python-level __init__ frame per request
            outcome.status = ex._status
            outcome.bytes_sent = ex._sent
            outcome.upstream_seconds = None if ex._forward is None else perf_counter() - (ex._fwd_started or ex.started)
            outcome.error = ex._error
            try:
                self._handler.done(ex, outcome)
            except Exception:
                logger.exception("handler.done failed")
        if ex._close or self._state.closing:
            self._close()
        elif self._queue or self._deferred is not None or self._stop:
            self._activate_next()
        elif self._parsing is None:  # the common case: idle keep-alive
            if self._paused & _PAUSE_PIPELINE:
                self._resume(_PAUSE_PIPELINE)
            when = self._loop.time() + self._limits.idle_timeout  # _arm, inlined
            self._deadline_kind = _IDLE
            self._deadline = when
            if self._timer is None or self._timer_when > when:
                self._schedule(when)
        else:
            self._resume(_PAUSE_PIPELINE)
            self._arm(_HEAD, self._limits.head_timeout)

    def _activate_next(self) -> None:
        queue = self._queue
        if queue:
            ex = queue.popleft()
            if not queue:
                self._resume(_PAUSE_PIPELINE)
            self._active = ex
            if ex.has_body and not ex.body_done:
                self._arm(_BODY, self._body_timeout)
            self._start(ex)
        elif self._deferred is not None:
            self._send_error(self._deferred)
            self._close()
        else:
            self._close()  # no more requests will be read

    def _report(self, ex: Exchange) -> None:
        if not ex._handled:
            return  # never reached handle(), or reported already
        ex._handled = False
        upstream_seconds = None
        if ex._forward is not None:
            upstream_seconds = perf_counter() - (ex._fwd_started or ex.started)
        outcome = Outcome(ex._status, ex._sent, upstream_seconds, ex._error)
        try:
            self._handler.done(ex, outcome)
        except Exception:
            logger.exception("handler.done failed")

    # -- called by the upstream connection (gateway.upstream.Downstream) ---------------------------------------

    def response_connection_header(self, ex: Exchange, close_delimited: bool) -> bytes:
        if (
            close_delimited
            or ex._close
            or not ex.keep_alive
            or ex.upgrade
            or not ex.body_done
            or ((self._stop or self._state.closing) and self._last_response())
        ):
            ex._close = True
            return b"Connection: close\r\n"
        return b"" if ex.http_minor else b"Connection: keep-alive\r\n"

    def _last_response(self) -> bool:
        """Nothing will follow the response being written (server shutdown, client half-close...)."""
        return self._state.closing or (self._stop == _DISCARD and not self._queue and self._deferred is None)

    def upstream_response_done(self, ex: Exchange, status: int, bytes_sent: int) -> None:
        if ex is not self._active:
            return
        ex._upstream = None
        ex._status = status
        ex._sent = bytes_sent
        ex._response_done = True
        if not ex.body_done:
            ex._close = True  # the upstream answered early; the rest of the body is not worth reading
        self._exchange_complete(ex)

    def upstream_failed(self, ex: Exchange, error: str, status: int, bytes_sent: int, retryable: bool) -> None:
        """The upstream failed; `status` is 0 when no response head reached the client yet."""
        if ex is not self._active or self._closed:
            return
        ex._upstream = None
        if retryable and not ex._retried and ex._forward is not None:
            ex._retried = True  # a stale pooled connection: one more try on a fresh one
            ex._task = self._state.spawn(self._connect(ex, ex._forward))
            return
        if status:
            ex._status, ex._sent, ex._error = status, bytes_sent, error
            self._abort_active(ex)
            return
        code, name, description = _UPSTREAM_ERRORS.get(error, _UPSTREAM_ERRORS["bad_response"])
        self._error_reply(ex, code, name, description, error)

    def upstream_write_paused(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def upstream_write_resumed(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    def tunnel_opened(self, ex: Exchange, conn: UpstreamConnection) -> None:
        if ex is not self._active or self._closed:
            conn.abort()
            return
        self._tunnel = conn
        ex._status = 101
        self._deadline_kind = _NO_DEADLINE
        pending = ex.take_pending()
        if pending:
            for chunk in pending:
                conn.send_raw(chunk)
        self._resume(_PAUSE_HOLD)

    def tunnel_closed(self, bytes_sent: int) -> None:
        ex = self._active
        self._tunnel = None
        if ex is not None:
            ex._upstream = None
            ex._sent = bytes_sent
            self._active = None
            self._report(ex)
        self._close()

    # -- failure paths -----------------------------------------------------------------------------------------

    def _parse_failed(self, error: httptools.HttpParserError) -> None:
        if self._stop:
            return  # bytes after the last request we will read (Connection: close, or closing)
        cause = error.__context__
        if isinstance(cause, _Reject):
            rej = cause
        elif cause is not None and not isinstance(cause, _StopParsing):
            logger.error("request callback failed", exc_info=cause)
            rej = _Reject(500, "internal_error", "internal error", "internal_error")
        else:
            rej = _bad_request(f"malformed request: {error}")
        self._stop = _DISCARD
        ex = self._parsing
        self._parsing = None
        if ex is not None and ex is self._active:
            self._fail_active(rej)
        elif self._active is not None:
            self._deferred = rej  # answered after the requests in front of it
            self._pause(_PAUSE_STOPPED)
        else:
            self._send_error(rej)
            self._close()

    def _fail_active(self, rej: _Reject) -> None:
        """The active request can't go on (body too large, malformed or late): answer if still possible."""
        ex = self._active
        assert ex is not None
        self._stop = _DISCARD
        if ex._task is not None:
            ex._task.cancel()
            ex._task = None
        started = ex._upstream is not None and ex._upstream.started
        self._drop_upstream(ex)
        if self._answer_later is not None:
            self._send_answer_later()  # the handler's answer stands (and closes: the body is unread)
            return
        ex._error = rej.outcome
        if ex._response_done:
            self._active = None
            self._report(ex)
            self._close()
        elif started:
            self._abort_active(ex)
        else:
            ex._close = True
            self._respond(ex, self._error_response(rej.status, rej.error, rej.description))

    def _drop_upstream(self, ex: Exchange) -> None:
        """Abort the exchange's upstream connection (never reused), keeping what it relayed."""
        up = ex._upstream
        if up is None:
            return
        ex._upstream = None
        if up.status_sent:
            ex._status, ex._sent = up.status_sent, up.bytes_out
        up.abort()

    def _abort_active(self, ex: Exchange) -> None:
        """The response has started and can't be completed: reset the client so it sees the truncation."""
        self._active = None
        self._stop = _DISCARD
        self._closed = True
        self.transport.abort()
        self._report(ex)

    def _upgraded(self, tail: bytes) -> None:
        self._stop = _TUNNEL
        ex = self._upgrade_ex
        if ex is None or ex._response_done:
            self._stop = _DISCARD
        elif tail:
            self._hold(ex, tail)

    def _after_stop(self, data: bytes) -> None:
        if self._stop == _TUNNEL:
            if self._tunnel is not None:
                self._tunnel.send_raw(data)
                return
            ex = self._upgrade_ex
            if ex is not None and not ex._response_done:
                self._hold(ex, data)  # early tunnel bytes, sent after the 101
                return
        self._pause(_PAUSE_STOPPED)

    def _head_pending(self) -> None:
        """A request head is incomplete after this read: bound its size and time."""
        if self._head_bytes > self._head_cap:
            self._stop = _DISCARD
            rej = _Reject(431, "request_header_fields_too_large", "request head too large")
            if self._active is not None:
                self._deferred = rej
                self._pause(_PAUSE_STOPPED)
            else:
                self._send_error(rej)
                self._close()
        elif self._active is None and self._deadline_kind != _HEAD:
            self._arm(_HEAD, self._limits.head_timeout)

    def _serving_upstream(self) -> UpstreamLink | None:
        if self._tunnel is not None:
            return self._tunnel
        ex = self._active
        return ex._upstream if ex is not None else None

    # -- reading, deadlines, closing ---------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and not self._closed:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        paused = self._paused
        if paused & reason:
            paused &= ~reason
            self._paused = paused
            if not paused and not self._closed:
                self.transport.resume_reading()

    def _arm(self, kind: int, seconds: float) -> None:
        when = self._loop.time() + seconds
        self._deadline_kind = kind
        self._deadline = when
        timer = self._timer
        if timer is None or self._timer_when > when:
            self._schedule(when)
        # else the timer fires early, finds the later deadline and re-arms: no reschedule per request

    def _schedule(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_when <= when:
                return
            timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._loop.time()
        next_when = 0.0
        if self._deadline_kind:
            if now >= self._deadline:
                self._deadline_expired()
                return
            next_when = self._deadline
        if self._write_deadline:
            if now >= self._write_deadline:
                self._write_stalled()
                return
            if not next_when or self._write_deadline < next_when:
                next_when = self._write_deadline
        if next_when:
            self._schedule(next_when)

    def _deadline_expired(self) -> None:
        kind = self._deadline_kind
        self._deadline_kind = _NO_DEADLINE
        if kind == _BODY and self._active is not None:
            self._fail_active(_Reject(408, "request_timeout", "request body not received in time", "client_timeout"))
        elif kind == _HEAD and self._parsing is not None and self._active is None:
            self._send_error(_Reject(408, "request_timeout", "request head not received in time"))
            self._close()
        else:
            self._close()  # keep-alive idle, or a connection that never sent a request line

    def _write_stalled(self) -> None:
        ex = self._active
        if ex is None:
            self._closed = True
            self.transport.abort()
            return
        self._drop_upstream(ex)
        ex._error = "client_timeout"
        self._abort_active(ex)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop = _DISCARD
        self.transport.close()

    def shutdown(self) -> None:
        """Server shutdown: close now if idle, else after the response in flight (which says Connection: close)."""
        if self._active is None and self._tunnel is None:
            self._close()

    def abort(self) -> None:
        self._closed = True
        self.transport.abort()


class ProxyServer:
    """A listening data plane; `shutdown` drains it."""

    def __init__(self, server: asyncio.AbstractServer, state: _ServerState) -> None:
        self._server = server
        self._state = state
        self._port: int = self.sockets[0].getsockname()[1]

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (empty once shut down)."""
        return tuple(getattr(self._server, "sockets", ()) or ())

    @property
    def port(self) -> int:
        """The port of the first listening socket (kept after shutdown)."""
        return self._port

    async def shutdown(self, timeout: float) -> None:  # noqa: ASYNC109  (the grace period, not a cancel scope)
        """Stop accepting, let exchanges in flight finish for up to `timeout` seconds, then force-close."""
        state = self._state
        self._server.close()
        state.closing = True
        state.drained = asyncio.Event()
        for conn in list(state.connections):
            conn.shutdown()
        if state.connections:
            try:
                async with asyncio.timeout(timeout):
                    await state.drained.wait()
            except TimeoutError:
                logger.warning("shutdown: forcing %d connections closed", len(state.connections))
        for conn in list(state.connections):
            conn.abort()
        state.pool.close()
        for task in list(state.tasks):
            task.cancel()
        if state.tasks:
            await asyncio.gather(*state.tasks, return_exceptions=True)
        await self._server.wait_closed()
        for _ in range(100):  # connection_lost of the transports closed above runs on later loop iterations
            if not state.connections and not state.pool.live:
                break
            await asyncio.sleep(0.001)


async def start_server(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: Limits,
    reuse_port: bool = False,
    sock: socket.socket | None = None,
    backlog: int = 2048,
) -> ProxyServer:
    """Listen on host:port (or `sock`) and serve the data plane with `handler`."""
    loop = asyncio.get_running_loop()
    state = _ServerState(handler, limits, loop)

    def factory() -> ClientConnection:
        return ClientConnection(state)

    if sock is not None:
        server = await loop.create_server(factory, sock=sock, backlog=backlog)
    else:
        server = await loop.create_server(factory, host, port, reuse_port=reuse_port or None, backlog=backlog)
    return ProxyServer(server, state)
