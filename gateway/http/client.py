"""One client connection: its requests (parsed by gateway.http.reader) run through the handler strictly in
order, answered here or relayed by an upstream connection (gateway.http.upstream).

It knows connections, order, flow control and timeouts, and nothing about authentication, routes or header
policy: `Handler.handle` decides what to do with each `Exchange`. Decisions taken here where the RFCs leave
room (the README has the operator-facing version):

- `Exchange.headers` carries every request header except the framing ones (Content-Length,
  Transfer-Encoding, Expect): the data plane owns framing and sends `100 Continue` itself once the handler
  has chosen Forward.
- Pipelining: httptools parses a whole read at once, so requests that arrive in the same read as the one in
  flight are parsed and queued (at most 64, bodies held) but not handed to the handler until the responses
  before them are complete; reading pauses meanwhile.
- A Respond to a request whose body is not fully read closes the connection after the answer (the body is
  not drained). A synchronous Respond waits for the end of the current read first, so a small body that came
  with its head keeps the connection alive.
- body_timeout also aborts a client that stops reading its response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import cast

import httptools

from gateway.http.answers import (
    DISCARD,
    PAUSE_HOLD,
    PAUSE_PIPELINE,
    PAUSE_STOPPED,
    READING,
    TUNNEL,
    Answers,
)
from gateway.http.exchange import Exchange, UpstreamLink
from gateway.http.framing import (
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    Refusal,
    StopParsing,
    bad_request,
)
from gateway.http.reader import RequestReader
from gateway.http.server_state import ServerState

logger = logging.getLogger(__name__)
perf_counter = time.perf_counter

_MAX_PIPELINED = 64

# Which read-side deadline is running.
_NO_DEADLINE, _HEAD, _IDLE, _BODY = 0, 1, 2, 3


class ClientConnection(Answers, asyncio.Protocol):
    """One client connection: parses requests, runs them through the handler in order, relays responses."""

    __slots__ = (
        "_body_timeout", "_deadline", "_deadline_kind", "_deadlines", "_paused", "_queue", "_reader", "_upgrade_ex",
        "_write_deadline", "deadline_slot",
    )  # fmt: skip

    def __init__(self, state: ServerState) -> None:
        limits = state.limits
        self.state = state
        self.handler = state.handler
        self.limits = limits
        self.loop = state.loop
        self.pool = state.pool
        self._deadlines = state.deadlines
        self._body_timeout = limits.body_timeout
        self._reader = RequestReader(self, limits)
        self.active: Exchange | None = None  # the request being answered
        self._queue: deque[Exchange] | None = None  # parsed requests waiting for the active one
        self.deferred: Refusal | None = None  # error for a pipelined request, sent after those before it
        self._upgrade_ex: Exchange | None = None
        self.tunnel: UpstreamLink | None = None
        self.answer_later = None
        self.client_ip = ""
        self.feeding = False
        self.stop = READING
        self.closed = self.writes_paused = False
        self._paused = 0
        self._deadline_kind = _NO_DEADLINE
        self._deadline = self._write_deadline = 0.0
        self.deadline_slot = 0

    # -- asyncio.Protocol --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip = self._reader.client_ip = peer[0]
            self._reader.client_port = peer[1]
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.state.connections.add(self)
        if self.state.closing:
            self.close()
            return
        self._arm(_HEAD, self.limits.head_timeout)

    def data_received(self, data: bytes) -> None:
        if self.stop:
            self._after_stop(data)
            return
        reader = self._reader
        if not reader.in_body:
            reader.head_bytes += len(data)
        self.feeding = True
        try:
            reader.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.feeding = False
            self._upgraded(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as error:
            self.feeding = False
            self._parse_failed(error)
            return
        self.feeding = False
        if self.answer_later is not None:
            self.send_answer_later()  # the body did not end in this read: answer, and close
        if reader.parsing is not None and not reader.in_body and not self.stop:
            self._head_pending()

    def eof_received(self) -> bool | None:
        ex = self.active
        if ex is None or self.tunnel is not None:
            return None  # close
        # Half-close after a request is legal: answer it, then close. A body cut short can't be answered.
        self.stop = DISCARD
        if ex.has_body and not ex.body_done:
            self.fail_active(Refusal(400, "bad_request", "request body incomplete", "client_abort"))
            return None
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stop = DISCARD
        self._deadline_kind = _NO_DEADLINE
        self._write_deadline = 0.0
        self.state.forget(self)
        self._queue = None
        ex = self.active
        self.active = None
        tunnel = self.tunnel
        self.tunnel = None
        if ex is None:
            if tunnel is not None:
                tunnel.abort()
            return
        if ex.task is not None:
            ex.task.cancel()
            ex.task = None
        if tunnel is not None:
            ex.bytes_sent = tunnel.bytes_out  # a tunnel ends when either side closes: not an error
            tunnel.abort(graceful=True)
        else:
            self.drop_upstream(ex)
            ex.error = "client_abort"
        self.report(ex)

    def pause_writing(self) -> None:
        self.writes_paused = True
        up = self._serving_upstream()
        if up is not None:
            up.pause_for_client()
        self._write_deadline = when = self.loop.time() + self._body_timeout
        self._deadlines.arm(self, when)

    def resume_writing(self) -> None:
        self.writes_paused = False
        self._write_deadline = 0.0
        up = self._serving_upstream()
        if up is not None:
            up.resume_for_client()

    # -- told by the reader (gateway.http.reader.Serving) --------------------------------------------------------

    def begins_while_busy(self, url: bytes) -> None:
        """A request starts while another is in flight (pipelining), or must not start at all."""
        if self.stop:
            raise StopParsing
        if self._queue is None:
            self._queue = deque()
        elif len(self._queue) >= _MAX_PIPELINED:
            self.stop = DISCARD
            raise StopParsing
        self.pause(PAUSE_PIPELINE)

    def head_complete(self, ex: Exchange) -> None:
        if self.active is None:
            self.active = ex
            if ex.has_body:
                self._arm(_BODY, self._body_timeout)
            else:
                self._deadline_kind = _NO_DEADLINE
            self.start(ex)
        else:
            assert self._queue is not None
            self._queue.append(ex)

    def body_received(self, ex: Exchange, body: bytes) -> None:
        if self._deadline_kind == _BODY:
            self._deadline = self.loop.time() + self._body_timeout
        up = ex.upstream
        if up is not None:
            up.send_body(body)
        elif not ex.answered:
            self.hold(ex, body)

    def message_complete(self, ex: Exchange) -> None:
        if ex.upgrade:
            self._upgrade_ex = ex
        elif not ex.keep_alive:
            self.stop = DISCARD
        if ex is self.active:
            if self._deadline_kind == _BODY:
                self._deadline_kind = _NO_DEADLINE
            up = ex.upstream
            if up is not None:
                up.end_body()
            elif ex.consume is not None:
                self.consumed(ex)
            elif self.answer_later is not None:
                self.send_answer_later()  # the whole body came in the read that got the answer
            elif ex.answered:
                self.exchange_complete(ex)

    # -- the exchange in flight (gateway.http.answers calls these) -------------------------------------------------

    def exchange_complete(self, ex: Exchange) -> None:
        self.active = None
        if ex.handled:
            self.report(ex)
        if ex.close_after or self.state.closing:
            self.close()
        elif self._queue or self.deferred is not None or self.stop:
            self._activate_next()
        elif self._reader.parsing is None:  # the common case: idle keep-alive
            if self._paused & PAUSE_PIPELINE:
                self.resume(PAUSE_PIPELINE)
            self._arm(_IDLE, self.limits.idle_timeout)
        else:
            self.resume(PAUSE_PIPELINE)
            self._arm(_HEAD, self.limits.head_timeout)

    def _activate_next(self) -> None:
        queue = self._queue
        if queue:
            ex = queue.popleft()
            if not queue:
                self.resume(PAUSE_PIPELINE)
            self.active = ex
            if ex.has_body and not ex.body_done:
                self._arm(_BODY, self._body_timeout)
            self.start(ex)
        elif self.deferred is not None:
            self.send_error(self.deferred)
            self.close()
        else:
            self.close()  # no more requests will be read

    def last_response(self) -> bool:
        """Nothing will follow the response being written (server shutdown, client half-close...)."""
        return self.state.closing or (self.stop == DISCARD and not self._queue and self.deferred is None)

    def tunnel_opened(self, ex: Exchange, conn: UpstreamLink) -> None:
        if ex is not self.active or self.closed:
            conn.abort()
            return
        self.tunnel = conn
        ex.status = 101
        self._deadline_kind = _NO_DEADLINE
        held = ex.take_held()
        if held:
            for chunk in held:
                conn.send_raw(chunk)
        self.resume(PAUSE_HOLD)

    def tunnel_closed(self, bytes_sent: int) -> None:
        ex = self.active
        self.tunnel = None
        if ex is not None:
            ex.upstream = None
            ex.bytes_sent = bytes_sent
            self.active = None
            self.report(ex)
        self.close()

    # -- failure paths -----------------------------------------------------------------------------------------

    def _parse_failed(self, error: httptools.HttpParserError) -> None:
        if self.stop:
            return  # bytes after the last request we will read (Connection: close, or closing)
        cause = error.__context__
        if isinstance(cause, Refusal):
            refusal = cause
        elif cause is not None and not isinstance(cause, StopParsing):
            logger.error("request callback failed", exc_info=cause)
            refusal = Refusal(500, "internal_error", "internal error", "internal_error")
        else:
            refusal = bad_request(f"malformed request: {error}")
        self.stop = DISCARD
        ex = self._reader.parsing
        self._reader.parsing = None
        if ex is not None and ex is self.active:
            self.fail_active(refusal)
        elif self.active is not None:
            self.deferred = refusal  # answered after the requests in front of it
            self.pause(PAUSE_STOPPED)
        else:
            self.send_error(refusal)
            self.close()

    def abort_active(self, ex: Exchange) -> None:
        """The response has started and can't be completed: reset the client so it sees the truncation."""
        self.active = None
        self.stop = DISCARD
        self.closed = True
        self.transport.abort()
        self.report(ex)

    def _upgraded(self, tail: bytes) -> None:
        self.stop = TUNNEL
        ex = self._upgrade_ex
        if ex is None or ex.answered:
            self.stop = DISCARD
        elif tail:
            self.hold(ex, tail)

    def _after_stop(self, data: bytes) -> None:
        if self.stop == TUNNEL:
            if self.tunnel is not None:
                self.tunnel.send_raw(data)
                return
            ex = self._upgrade_ex
            if ex is not None and not ex.answered:
                self.hold(ex, data)  # early tunnel bytes, sent after the 101
                return
        self.pause(PAUSE_STOPPED)

    def _head_pending(self) -> None:
        """A request head is incomplete after this read: bound its size and time."""
        if self._reader.head_bytes > self._reader.head_cap:
            self.stop = DISCARD
            refusal = Refusal(431, "request_header_fields_too_large", "request head too large")
            if self.active is not None:
                self.deferred = refusal
                self.pause(PAUSE_STOPPED)
            else:
                self.send_error(refusal)
                self.close()
        elif self.active is None and self._deadline_kind != _HEAD:
            self._arm(_HEAD, self.limits.head_timeout)

    def _serving_upstream(self) -> UpstreamLink | None:
        if self.tunnel is not None:
            return self.tunnel
        ex = self.active
        return ex.upstream if ex is not None else None

    # -- reading, deadlines, closing ---------------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        if not self._paused and not self.closed:
            self.transport.pause_reading()
        self._paused |= reason

    def resume(self, reason: int) -> None:
        paused = self._paused
        if paused & reason:
            paused &= ~reason
            self._paused = paused
            if not paused and not self.closed:
                self.transport.resume_reading()

    def _arm(self, kind: int, seconds: float) -> None:
        self._deadline_kind = kind
        self._deadline = when = self.loop.time() + seconds
        self._deadlines.arm(self, when)

    def on_deadline(self, now: float) -> float:
        if self.closed:
            return 0.0
        if self._write_deadline and now >= self._write_deadline:
            self._write_stalled()
            return 0.0
        if self._deadline_kind and now >= self._deadline:
            self._deadline_expired()
            return 0.0
        read = self._deadline if self._deadline_kind else 0.0
        write = self._write_deadline
        return min(read, write) if read and write else read or write

    def _deadline_expired(self) -> None:
        kind = self._deadline_kind
        self._deadline_kind = _NO_DEADLINE
        if kind == _BODY and self.active is not None:
            self.fail_active(Refusal(408, "request_timeout", "request body not received in time", "client_timeout"))
        elif kind == _HEAD and self._reader.parsing is not None and self.active is None:
            self.send_error(Refusal(408, "request_timeout", "request head not received in time"))
            self.close()
        else:
            self.close()  # keep-alive idle, or a connection that never sent a request line

    def _write_stalled(self) -> None:
        ex = self.active
        if ex is None:
            self.closed = True
            self.transport.abort()
            return
        self.drop_upstream(ex)
        ex.error = "client_timeout"
        self.abort_active(ex)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop = DISCARD
        self.transport.close()

    def shutdown(self) -> None:
        """Server shutdown: close now if idle, else after the response in flight (which says Connection: close)."""
        if self.active is None and self.tunnel is None:
            self.close()

    def abort(self) -> None:
        self.closed = True
        self.transport.abort()
