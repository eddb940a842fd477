"""One request between the data plane and its handler: the `Exchange` the parser fills, the `Note` the handler
keeps on it, the decisions the handler returns (Respond, Forward, Consume), the `Outcome` it is told, and the
`Handler` protocol itself. Both halves of the data plane (gateway.proxy, gateway.upstream) and the request
path (gateway.app) import these; this module imports none of them."""

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
    """The upstream connection relaying an exchange, as the client side drives it (gateway.upstream)."""

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
    def end_body(self) -> None: ...
    def pause_for_client(self) -> None: ...
    def resume_for_client(self) -> None: ...
    def abort(self, graceful: bool = False) -> None: ...


class Exchange:
    """One request: filled by the parser callbacks, read (and annotated via `note`) by the handler."""

    __slots__ = (
        "_close", "_consume", "_error", "_forward", "_fwd_started", "_handled", "_pending", "_pending_bytes",
        "_received", "_response_done", "_retried", "_sent", "_status", "_task", "_upstream", "body_done", "chunked",
        "client_ip", "client_port", "content_length", "expect_continue", "has_body", "headers", "http_minor",
        "keep_alive", "method", "note", "started", "target", "upgrade", "upgrade_value",
    )  # fmt: skip

    def __init__(self, client_ip: str, client_port: int, target: bytes) -> None:
        self.method = b""
        self.target = target
        self.http_minor = 1
        self.headers: list[tuple[bytes, bytes]] = []
        self.client_ip = client_ip
        self.client_port = client_port
        self.started = 0.0
        self.keep_alive = True
        self.has_body = self.chunked = self.upgrade = self.expect_continue = False
        self.content_length: int | None = None
        self.note: Note | None = None
        # Data-plane state below (upstream.py reads the public-looking ones).
        self.upgrade_value = b""
        self.body_done = False
        self._handled = self._response_done = self._close = self._retried = False
        self._status = self._sent = self._received = self._pending_bytes = 0  # status, body bytes sent to client
        self._error: str | None = None
        self._pending: list[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._upstream: UpstreamLink | None = None
        self._forward: Forward | None = None
        self._consume: Consume | None = None
        self._fwd_started = 0.0

    def take_pending(self) -> list[bytes] | None:
        """Body (or tunnel) bytes held while no upstream was attached; empties the hold."""
        pending = self._pending
        self._pending = None
        self._pending_bytes = 0
        return pending

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
