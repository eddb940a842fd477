"""How a client connection answers the exchange in flight: the handler's decision (now or later), a response
written here, a body consumed for the gateway's own endpoints, a forward to an upstream connection from the
pool, and what that upstream connection reports back. `ClientConnection` (gateway.http.client) is this plus
reading, order, deadlines and closing; the two halves share the connection's fields declared here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Final

from gateway.core.settings import Limits
from gateway.http.exchange import Consume, Exchange, Forward, Handler, Outcome, Respond, UpstreamLink
from gateway.http.framing import CONTINUE, WRITE_HIGH_WATER, Refusal, render_response, too_large
from gateway.http.pool import UpstreamPool
from gateway.http.server_state import ServerState
from gateway.http.upstream import UpstreamConnection

logger = logging.getLogger(__name__)
perf_counter = time.perf_counter
_new_outcome = object.__new__

# Why the client transport is paused (a bit each; reading resumes when none is left).
PAUSE_PIPELINE: Final = 1  # a later request arrived while one is in flight
PAUSE_DECIDING: Final = 2  # the handler's decision is pending
PAUSE_HOLD: Final = 4  # body bytes held before an upstream is attached exceed the high-water mark
PAUSE_UPSTREAM: Final = 8  # the upstream's write buffer is full
PAUSE_STOPPED: Final = 16  # no more requests will be read on this connection

# Whether the request parser is still fed (`stop`).
READING: Final = 0
DISCARD: Final = 1  # no: whatever arrives is dropped
TUNNEL: Final = 2  # no: what arrives goes to the upstream after a 101

_UPSTREAM_ERRORS: Final = {
    "connect": (502, "bad_gateway", "upstream connection failed"),
    "timeout": (504, "gateway_timeout", "upstream did not respond in time"),
    "reset": (502, "bad_gateway", "upstream closed the connection"),
    "bad_response": (502, "bad_gateway", "upstream sent an invalid response"),
}


class Answers:
    """The answering half of a client connection."""

    __slots__ = (
        "active", "answer_later", "client_ip", "closed", "deferred", "feeding", "handler", "limits", "loop", "pool",
        "state", "stop", "transport", "tunnel", "writes_paused",
    )  # fmt: skip

    transport: asyncio.Transport  # set in connection_made, before any other call
    state: ServerState
    handler: Handler
    limits: Limits
    loop: asyncio.AbstractEventLoop
    pool: UpstreamPool
    active: Exchange | None
    deferred: Refusal | None
    tunnel: UpstreamLink | None
    answer_later: tuple[Exchange, Respond] | None  # see respond
    stop: int
    closed: bool
    client_ip: str
    feeding: bool  # a read is being parsed right now (parser callbacks are on the stack)
    writes_paused: bool  # the client's write buffer is over its high-water mark

    # -- provided by the connection (gateway.http.client) ------------------------------------------------------

    def exchange_complete(self, ex: Exchange) -> None:
        raise NotImplementedError

    def last_response(self) -> bool:
        raise NotImplementedError

    def abort_active(self, ex: Exchange) -> None:
        raise NotImplementedError

    def pause(self, reason: int) -> None:
        raise NotImplementedError

    def resume(self, reason: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- deciding ----------------------------------------------------------------------------------------------

    def start(self, ex: Exchange) -> None:
        ex.handled = True
        try:
            decision = self.handler.handle(ex)
        except Exception:
            logger.exception("handler.handle failed")
            self.error_reply(ex, 500, "internal_error", "internal error", "handler_error")
            return
        if type(decision) is Forward:
            self.forward(ex, decision)
        elif type(decision) is Respond:
            self.respond(ex, decision)
        elif type(decision) is Consume:
            self._consume(ex, decision)
        else:
            self.pause(PAUSE_DECIDING)
            ex.task = self.state.spawn(self._decide_later(ex, decision))

    async def _decide_later(self, ex: Exchange, pending: Awaitable[Respond | Forward | Consume]) -> None:
        try:
            decision: object = await pending
        except Exception:
            logger.exception("handler.handle failed")
            decision = None
        ex.task = None
        if ex is not self.active or self.closed:
            return
        self.resume(PAUSE_DECIDING)
        if isinstance(decision, Forward):
            ex.forward_started = perf_counter()  # upstream time starts after a slow decision, not at the head
            self.forward(ex, decision)
        elif isinstance(decision, Respond):
            self.respond(ex, decision)
        elif isinstance(decision, Consume):
            self._consume(ex, decision)
        else:
            self.error_reply(ex, 500, "internal_error", "internal error", "handler_error")

    def _consume(self, ex: Exchange, consume: Consume) -> None:
        """Collect the body here (held like an undecided body), then answer with the callback's response."""
        if (ex.content_length is not None and ex.content_length > consume.limit) or ex.received > consume.limit:
            refusal = too_large()
            self.error_reply(ex, refusal.status, refusal.error, refusal.description, refusal.outcome)
            return
        ex.consume = consume
        if ex.expect_continue and ex.http_minor and not ex.body_done and not ex.received:
            self.transport.write(CONTINUE)
        if ex.body_done or not ex.has_body:
            self.consumed(ex)

    def consumed(self, ex: Exchange) -> None:
        consume = ex.consume
        assert consume is not None
        ex.consume = None
        body = b"".join(ex.take_held() or ())
        try:
            result = consume.callback(body)
        except Exception:
            logger.exception("own endpoint failed")
            self.error_reply(ex, 500, "internal_error", "internal error", "handler_error")
            return
        if isinstance(result, Respond):
            self.respond(ex, result)
        else:
            self.pause(PAUSE_DECIDING)
            ex.task = self.state.spawn(self._decide_later(ex, result))

    # -- forwarding --------------------------------------------------------------------------------------------

    def forward(self, ex: Exchange, fwd: Forward) -> None:
        ex.forward = fwd
        if ex.expect_continue and ex.http_minor and not ex.body_done and not ex.received:
            self.transport.write(CONTINUE)  # only now: a refused client never sends its body
        conn = self.pool.acquire((fwd.host, fwd.port))
        if conn is None:
            ex.task = self.state.spawn(self._connect(ex, fwd))
            return
        self._attach(ex, fwd, conn, True)

    async def _connect(self, ex: Exchange, fwd: Forward) -> None:
        try:
            conn = await self.pool.connect((fwd.host, fwd.port), fwd.connect_timeout)
        except TimeoutError:
            ex.task = None
            self.upstream_failed(ex, "timeout", 0, 0, False)
            return
        except OSError as error:
            ex.task = None
            logger.info("upstream %s:%d connect failed: %s", fwd.host, fwd.port, error)
            self.upstream_failed(ex, "connect", 0, 0, False)
            return
        ex.task = None
        if ex is not self.active or self.closed:
            self.pool.release(conn)  # fresh and unused
            return
        self._attach(ex, fwd, conn, False)

    def _attach(self, ex: Exchange, fwd: Forward, conn: UpstreamConnection, reused: bool) -> None:
        ex.upstream = conn
        if self.writes_paused:
            conn.pause_for_client()
        conn.begin(self, ex, fwd, reused)  # type: ignore[arg-type]  # the connection is the Downstream
        self.resume(PAUSE_HOLD)

    def hold(self, ex: Exchange, data: bytes) -> None:
        if ex.held is None:
            ex.held = [data]
        else:
            ex.held.append(data)
        ex.held_bytes += len(data)
        if ex.held_bytes > WRITE_HIGH_WATER:
            self.pause(PAUSE_HOLD)

    # -- answering here ----------------------------------------------------------------------------------------

    def respond(self, ex: Exchange, resp: Respond) -> None:
        if self.feeding and ex.has_body and not ex.body_done and not (resp.close or ex.close_after):
            # Decided on the head: the rest of a small body may be in this very read. Answer when the read is
            # parsed, keeping the connection if the body was complete by then.
            self.answer_later = (ex, resp)
            ex.answered = True  # body bytes are dropped from now on
            return
        close = (
            resp.close
            or ex.close_after
            or not ex.keep_alive
            or ex.upgrade
            or (ex.has_body and not ex.body_done)  # don't drain a body nobody wants
            or self.last_response()
        )
        ex.close_after = close
        ex.status = resp.status
        data, ex.bytes_sent = render_response(resp, close, ex.http_minor, ex.method == b"HEAD")
        self.transport.write(data)
        ex.answered = True
        if ex.body_done or close:
            self.exchange_complete(ex)
        # else: a request without body whose message-complete callback is about to run

    def send_answer_later(self) -> None:
        assert self.answer_later is not None
        ex, resp = self.answer_later
        self.answer_later = None
        ex.answered = False
        if ex is self.active:
            self.respond(ex, resp)

    def error_response(self, status: int, error: str, description: str) -> Respond:
        try:
            return self.handler.error_response(status, error, description)
        except Exception:
            logger.exception("handler.error_response failed")
            return Respond(status, [(b"Content-Type", b"application/json")], b'{"error":"%s"}' % error.encode())

    def error_reply(self, ex: Exchange, status: int, error: str, description: str, outcome_error: str) -> None:
        ex.error = outcome_error
        self.respond(ex, self.error_response(status, error, description))

    def send_error(self, refusal: Refusal) -> None:
        """Answer a request that never reached the handler, and tell the handler (for the log)."""
        if not self.closed:
            data, _ = render_response(self.error_response(refusal.status, refusal.error, refusal.description),
                                      True, 1, False)
            self.transport.write(data)
            try:
                self.handler.rejected(self.client_ip, refusal.status, refusal.error)
            except Exception:
                logger.exception("handler.rejected failed")

    def report(self, ex: Exchange) -> None:
        """Tell the handler how the exchange ended, once."""
        if not ex.handled:
            return  # never reached handle(), or reported already
        ex.handled = False
        outcome = _new_outcome(Outcome)  # no Python-level __init__ frame per request
        outcome.status = ex.status
        outcome.bytes_sent = ex.bytes_sent
        outcome.upstream_seconds = None if ex.forward is None else perf_counter() - (ex.forward_started or ex.started)
        outcome.error = ex.error
        try:
            self.handler.done(ex, outcome)
        except Exception:
            logger.exception("handler.done failed")

    def fail_active(self, refusal: Refusal) -> None:
        """The active request can't go on (body too large, malformed or late): answer if still possible."""
        ex = self.active
        assert ex is not None
        self.stop = DISCARD
        if ex.task is not None:
            ex.task.cancel()
            ex.task = None
        started = ex.upstream is not None and ex.upstream.started
        self.drop_upstream(ex)
        if self.answer_later is not None:
            self.send_answer_later()  # the handler's answer stands (and closes: the body is unread)
            return
        ex.error = refusal.outcome
        if ex.answered:
            self.active = None
            self.report(ex)
            self.close()
        elif started:
            self.abort_active(ex)
        else:
            ex.close_after = True
            self.respond(ex, self.error_response(refusal.status, refusal.error, refusal.description))

    def drop_upstream(self, ex: Exchange) -> None:
        """Abort the exchange's upstream connection (never reused), keeping what it relayed."""
        up = ex.upstream
        if up is None:
            return
        ex.upstream = None
        if up.status_sent:
            ex.status, ex.bytes_sent = up.status_sent, up.bytes_out
        up.abort()

    # -- told by the upstream connection (gateway.http.upstream.Downstream) ------------------------------------

    def response_connection_header(self, ex: Exchange, close_delimited: bool) -> bytes:
        if (
            close_delimited
            or ex.close_after
            or not ex.keep_alive
            or ex.upgrade
            or not ex.body_done
            or ((self.stop or self.state.closing) and self.last_response())
        ):
            ex.close_after = True
            return b"Connection: close\r\n"
        return b"" if ex.http_minor else b"Connection: keep-alive\r\n"

    def upstream_response_done(self, ex: Exchange, status: int, bytes_sent: int) -> None:
        if ex is not self.active:
            return
        ex.upstream = None
        ex.status = status
        ex.bytes_sent = bytes_sent
        ex.answered = True
        if not ex.body_done:
            ex.close_after = True  # the upstream answered early; the rest of the body is not worth reading
        self.exchange_complete(ex)

    def upstream_failed(self, ex: Exchange, error: str, status: int, bytes_sent: int, retryable: bool) -> None:
        """The upstream failed; `status` is 0 when no response head reached the client yet."""
        if ex is not self.active or self.closed:
            return
        ex.upstream = None
        if retryable and not ex.retried and ex.forward is not None:
            ex.retried = True  # a stale pooled connection: one more try on a fresh one
            ex.task = self.state.spawn(self._connect(ex, ex.forward))
            return
        if status:
            ex.status, ex.bytes_sent, ex.error = status, bytes_sent, error
            self.abort_active(ex)
            return
        code, name, description = _UPSTREAM_ERRORS.get(error, _UPSTREAM_ERRORS["bad_response"])
        self.error_reply(ex, code, name, description, error)

    def upstream_write_paused(self) -> None:
        self.pause(PAUSE_UPSTREAM)

    def upstream_write_resumed(self) -> None:
        self.resume(PAUSE_UPSTREAM)
