"""One request between the data plane and its handler: the `Exchange` the parser fills, the `Note` the handler
keeps on it, the decisions the handler returns (Respond, Forward, Consume), the `Outcome` it is told, and the
`Handler` protocol itself. Every part of the data plane (gateway.http) and the request path (gateway.app)
import these; this module imports nothing of the product."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, final


class Note:
    """What the handler records about a request for `done()`: the access log's and the metrics' attribution."""

    __slots__ = (
        "creator",
        "credential",
        "credential_id",
        "method",
        "outcome",
        "owner",
        "path",
        "query",
        "reason",
        "request_id",
        "route",
    )

    def __init__(self, path: bytes, request_id: bytes, query: bytes = b"") -> None:
        self.path = path
        self.query = query
        self.request_id = request_id
        self.route = "-"
        self.outcome = "none"
        self.method = ""
        self.reason = ""
        self.credential = ""
        self.credential_id = 0
        self.owner = ""
        self.creator = ""


class UpstreamLink(Protocol):
    """The upstream connection relaying an exchange, as the client side drives it (gateway.http.upstream)."""

    @property
    def started(self) -> bool:
        """Whether the final response head has reached the client."""

    @property
    def status_sent(self) -> int:
        """The status relayed to the client, 0 while none has been."""

    @property
    def bytes_out(self) -> int:
        """Body (or tunnel) bytes relayed to the client so far."""

    def send_body(self, data: bytes) -> None: ...
    def send_raw(self, data: bytes) -> None: ...
    def end_body(self) -> None: ...
    def pause_for_client(self) -> None: ...
    def resume_for_client(self) -> None: ...
    def abort(self, graceful: bool = False) -> None: ...


class Exchange:
    """One request: filled by the request parser, read (and annotated via `note`) by the handler, driven by the
    client connection. Every field is public: the parser, the connection and the upstream side share them."""

    __slots__ = (
        "answered", "body_done", "bytes_sent", "chunked", "client_ip", "client_port", "close_after", "consume",
        "content_length", "error", "expect_continue", "forward", "forward_started", "handled", "has_body",
        "headers", "held", "held_bytes", "http_minor", "keep_alive", "method", "note", "received", "retried",
        "started", "status", "target", "task", "upgrade", "upgrade_value", "upstream",
    )  # fmt: skip

    def __init__(self, client_ip: str, client_port: int, target: bytes) -> None:
        # What the parser fills (and the handler reads).
        self.method = b""
        self.target = target
        self.http_minor = 1
        self.headers: list[tuple[bytes, bytes]] = []
        self.client_ip = client_ip
        self.client_port = client_port
        self.started = 0.0  # perf_counter() when the head was complete
        self.keep_alive = True
        self.has_body = self.chunked = self.upgrade = self.expect_continue = False
        self.content_length: int | None = None
        self.upgrade_value = b""
        self.note: Note | None = None  # the handler's
        # How far the exchange got (the data plane's).
        self.body_done = False  # the whole request body has been read
        self.received = 0  # request body bytes read
        self.handled = False  # handle() was called and done() not yet
        self.answered = False  # the response is written (or being relayed to its end): body bytes are dropped
        self.close_after = False  # close the connection once this exchange is complete
        self.retried = False  # a stale pooled connection was replaced once already
        self.status = 0  # status sent to the client
        self.bytes_sent = 0  # body bytes sent to the client
        self.error: str | None = None  # Outcome.error
        self.held: list[bytes] | None = None  # body (or tunnel) bytes read while no upstream is attached
        self.held_bytes = 0
        self.task: asyncio.Task[None] | None = None  # a pending decision or upstream connect
        self.upstream: UpstreamLink | None = None  # the connection relaying this exchange
        self.forward: Forward | None = None
        self.forward_started = 0.0  # perf_counter() of a decision that came later than the head
        self.consume: Consume | None = None

    def take_held(self) -> list[bytes] | None:
        """Body (or tunnel) bytes held while no upstream was attached; empties the hold."""
        held = self.held
        self.held = None
        self.held_bytes = 0
        return held

    def __repr__(self) -> str:
        return f"<Exchange {self.method!r} {self.target[:80]!r} from {self.client_ip}>"


# The decisions are final: the data plane tells them apart by exact type, the cheapest test per request.
@final
@dataclass(slots=True)
class Respond:
    """Answer the client directly."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    close: bool = False


@final
@dataclass(slots=True)
class Forward:
    """Relay the request to host:port. `head` is the request line and header lines, each ending CRLF, without
    the blank line, without framing headers (the data plane adds Content-Length or Transfer-Encoding) and
    without hop-by-hop headers; for `websocket` the `Upgrade`/`Connection: Upgrade` pair is added if absent."""

    host: str
    port: int
    head: bytes
    response_headers: bytes = b""  # extra header lines (each ending CRLF) added to the client's response
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    websocket: bool = False


@final
@dataclass(slots=True)
class Consume:
    """Answer here after reading the whole request body (at most `limit` bytes, else 413): the gateway's own
    form endpoints (OAuth2). `callback` gets the body and returns the response."""

    limit: int
    callback: Callable[[bytes], Respond | Awaitable[Respond]]


class Outcome:
    """How an exchange ended, reported once to `Handler.done`."""

    __slots__ = ("bytes_sent", "error", "status", "upstream_seconds")

    def __init__(self, status: int, bytes_sent: int, upstream_seconds: float | None, error: str | None) -> None:
        self.status = status  # status sent to the client, 0 if none was
        self.bytes_sent = bytes_sent  # body bytes sent to the client
        self.upstream_seconds = upstream_seconds  # forward decision to last response byte
        # None, or one of: connect, timeout, reset, bad_response (upstream side);
        # client_abort, client_timeout, body_too_large, bad_request (client side); handler_error, internal_error.
        self.error = error

    def __repr__(self) -> str:
        return f"Outcome(status={self.status}, bytes_sent={self.bytes_sent}, error={self.error!r})"


class Handler(Protocol):
    """The decision maker the data plane calls (gateway.app)."""

    def handle(self, ex: Exchange) -> Respond | Forward | Consume | Awaitable[Respond | Forward | Consume]: ...

    def done(self, ex: Exchange, outcome: Outcome) -> None:
        """Called exactly once for every exchange that reached handle()."""

    def rejected(self, client_ip: str, status: int, error: str) -> None:
        """A request refused before it reached handle() (malformed framing, limits, timeouts): for the log."""

    def error_response(self, status: int, error: str, description: str) -> Respond:
        """Body builder for the errors the data plane produces itself (400/408/413/414/431/502/504...)."""
