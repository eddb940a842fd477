"""The request side of a client connection: httptools callbacks turn bytes into Exchanges, enforcing the limits
and the framing rules (gateway.http.framing) as the head arrives; the connection (gateway.http.client) is told
when a head is complete, body bytes arrive and a message ends.

Limits: max_headers counts header fields as they arrive; max_header_bytes counts the target, names and
values; with max_request_line it also bounds the bytes read per incomplete head (`head_cap`, checked by the
connection after each read), since httptools buffers a header value internally. The request line limit
applies to the request-target. Request trailers are dropped. No on_message_begin: the first on_url starts a
request, one callback less per request.
"""

from __future__ import annotations

import time
from typing import Protocol

import httptools

from gateway.core.settings import Limits
from gateway.http.exchange import Exchange
from gateway.http.framing import (
    REQUEST_WATCHED_LENGTHS,
    Refusal,
    check_head,
    framing_header,
    head_size,
    http_minor,
    too_large,
)

perf_counter = time.perf_counter


class Serving(Protocol):
    """What the reader needs from the connection it parses for (gateway.http.client)."""

    stop: int  # non-zero once no more requests will be read
    active: Exchange | None  # the request being answered

    def begins_while_busy(self, url: bytes) -> None: ...
    def head_complete(self, ex: Exchange) -> None: ...
    def body_received(self, ex: Exchange, body: bytes) -> None: ...
    def message_complete(self, ex: Exchange) -> None: ...


class RequestReader:
    """Parses one connection's requests; `parsing` is the exchange being filled."""

    __slots__ = (
        "_conn", "_conn_header", "_hosts", "_max_body", "_max_header_bytes", "_max_headers", "_max_request_line",
        "_trailers", "client_ip", "client_port", "head_bytes", "head_cap", "in_body", "parser", "parsing",
    )  # fmt: skip

    def __init__(self, conn: Serving, limits: Limits) -> None:
        self._conn = conn
        self._max_headers = limits.max_headers
        self._max_header_bytes = limits.max_header_bytes
        self._max_request_line = limits.max_request_line
        self._max_body = limits.max_body_bytes
        # A head can't be longer than its line plus its headers. Checked per read, it bounds what httptools
        # buffers inside a single endless header before calling us.
        self.head_cap = limits.max_request_line + limits.max_header_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self.client_port = 0
        self.parsing: Exchange | None = None
        self.in_body = False  # between the end of a head and the end of its message
        self.head_bytes = 0  # bytes read since the last head began (bounded by head_cap)
        self._hosts = 0
        self._trailers = 0
        self._conn_header = False

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        if ex is not None:  # the target came in pieces
            url = ex.target + url
            if len(url) > self._max_request_line:
                raise Refusal(414, "uri_too_long", "request target too long")
            ex.target = url
            return
        conn = self._conn
        if conn.stop or conn.active is not None or len(url) > self._max_request_line:
            if len(url) > self._max_request_line and not conn.stop:
                raise Refusal(414, "uri_too_long", "request target too long")
            conn.begins_while_busy(url)
        self.parsing = Exchange(self.client_ip, self.client_port, url)
        self._hosts = self._trailers = 0
        self._conn_header = False

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        headers = ex.headers
        if self.in_body:  # a trailer of a chunked body: dropped, but counted against the same limit
            self._trailers += 1
            if self._trailers > self._max_headers:
                raise Refusal(431, "request_header_fields_too_large", "too many request trailer fields")
            return
        if len(headers) >= self._max_headers:  # bytes are bounded per read and checked at the end of the head
            raise Refusal(431, "request_header_fields_too_large", "too many request header fields")
        if len(name) in REQUEST_WATCHED_LENGTHS:
            lname = name.lower()
            if lname == b"host":
                self._hosts += 1
            elif lname == b"connection":
                self._conn_header = True
            elif framing_header(ex, lname, value):
                return
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        parser = self.parser
        self.in_body = True
        if self.head_bytes > self._max_header_bytes and head_size(ex) > self._max_header_bytes:
            raise Refusal(431, "request_header_fields_too_large", "request header fields too large")
        self.head_bytes = 0
        keep_alive = parser.should_keep_alive()
        if self._conn_header or not keep_alive:
            # Without a Connection header llhttp keeps HTTP/1.1 (only) alive, so the version string (slow
            # to get) is needed only here.
            ex.http_minor = http_minor(parser.get_http_version())
        ex.keep_alive = keep_alive
        ex.method = method = parser.get_method()
        ex.started = perf_counter()
        if self._hosts != 1 or ex.content_length is not None or ex.chunked or ex.upgrade_value or method == b"CONNECT":
            check_head(ex, self._hosts, parser.should_upgrade(), self._max_body)
        self._conn.head_complete(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        received = ex.received + len(body)
        ex.received = received
        if (self._max_body and received > self._max_body) or (ex.consume is not None and received > ex.consume.limit):
            raise too_large()
        self._conn.body_received(ex, body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self.parsing = None
        self.in_body = False
        ex.body_done = True
        self._conn.message_complete(ex)
