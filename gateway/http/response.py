"""The response half of an upstream connection: httptools callbacks turn the upstream's response into the bytes
the client gets (`_out`), filtering the head as it is parsed (gateway.http.framing has the rules): hop-by-hop
headers and those Connection names dropped, the body re-framed when its length is not known (chunked to
HTTP/1.1 clients, close-delimited to HTTP/1.0 ones), 103 relayed to HTTP/1.1 clients and other 1xx dropped,
a 101 accepted only for a WebSocket forward. `UpstreamConnection` (gateway.http.upstream) is this plus the
connection: sending the request, flow control, the pool, deadlines and failures."""

from __future__ import annotations

import asyncio
from typing import Protocol

import httptools

from gateway.http.exchange import Exchange, Forward, UpstreamLink
from gateway.http.framing import (
    CONNECTION_OPTIONS,
    CRLF,
    HOP_BY_HOP,
    LAST_CHUNK,
    RESPONSE_WATCHED_LENGTHS,
    STATUS_LINES,
    BadResponse,
    StopParsing,
    content_length_at,
    drop_connection_listed,
    status_line,
)


class Downstream(Protocol):
    """What an upstream connection needs from the client connection it serves (gateway.http.client)."""

    transport: asyncio.Transport

    def response_connection_header(self, ex: Exchange, close_delimited: bool) -> bytes: ...
    def upstream_response_done(self, ex: Exchange, status: int, bytes_sent: int) -> None: ...
    def upstream_failed(self, ex: Exchange, error: str, status: int, bytes_sent: int, retryable: bool) -> None: ...
    def upstream_write_paused(self) -> None: ...
    def upstream_write_resumed(self) -> None: ...
    def tunnel_opened(self, ex: Exchange, conn: UpstreamLink) -> None: ...
    def tunnel_closed(self, bytes_sent: int) -> None: ...



class ResponseRelay:
    """Parser callbacks for the response to the exchange being served; the fields both halves share."""

    __slots__ = (
        "_bytes_out", "_client", "_complete", "_eof_body", "_ex", "_final", "_fwd", "_head_only", "_keep_alive",
        "_length_at", "_out", "_parser", "_parts", "_rare", "_reason", "_rechunk", "_status", "_websocket",
    )  # fmt: skip

    _client: Downstream | None
    _ex: Exchange | None
    _fwd: Forward | None
    _parser: httptools.HttpResponseParser
    _out: list[bytes]  # what the current read produced for the client
    _parts: list[bytes]  # the head being built: status line, then name, ": ", value, CRLF per header
    _reason: bytes
    _rare: list[tuple[bytes, bytes]] | None  # hop-by-hop headers that need a second look
    _length_at: int  # where Content-Length sits in _parts (never 0: that is the status line)
    _head_only: bool  # the request was HEAD
    _websocket: bool  # a 101 is acceptable
    _final: bool  # the final (non-1xx) head has been parsed
    _complete: bool  # the whole response has been parsed
    _keep_alive: bool
    _rechunk: bool  # the body is re-framed as chunked for the client
    _eof_body: bool  # the body ends when the upstream closes
    _status: int
    _bytes_out: int  # body bytes relayed to the client

    def on_message_begin(self) -> None:
        if self._complete:
            raise StopParsing  # more bytes after a complete response: nothing we asked for
        self._parts: list[bytes] = [b""]  # slot 0: the status line, known when the head is complete
        self._reason = b""
        self._rare: list[tuple[bytes, bytes]] | None = None  # hop-by-hop headers that need a second look
        self._length_at = 0  # where Content-Length sits in _parts (never 0: that is the status line)

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        parts = self._parts
        if len(name) in RESPONSE_WATCHED_LENGTHS:
            lname = name.lower()
            if lname == b"content-length":  # (== before set lookups: hashing a fresh bytes object costs more)
                self._length_at = len(parts)
            elif lname == b"connection" and value.lower() in CONNECTION_OPTIONS:
                return  # names no other header: the common case
            elif lname in HOP_BY_HOP:
                if self._rare is None:
                    self._rare = []
                self._rare.append((lname, value))
                return
        parts += (name, b": ", value, CRLF)

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
        parts += (framing, client.response_connection_header(ex, close_delimited), fwd.response_headers, CRLF)
        self._out.append(b"".join(parts))
        if self._head_only:
            self._complete = True
            raise StopParsing  # llhttp can't be told that a response answers HEAD; stop it here

    def _hop_by_hop_headers(self) -> bool:
        """Act on the hop-by-hop headers of the head: drop what Connection names, check Transfer-Encoding.
        True when the body is chunked."""
        assert self._rare is not None
        parts, chunked = drop_connection_listed(self._parts, self._rare)
        if parts is not self._parts:
            self._parts = parts
            self._length_at = content_length_at(parts)
        return chunked

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
            raise BadResponse("status out of range")
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
            parts.append(CRLF)
            self._out.append(b"".join(parts))

    def _switching_protocols(self) -> None:
        upgrade = [value for lname, value in self._rare or () if lname == b"upgrade"]
        if not self._websocket or len(upgrade) != 1:
            raise BadResponse("unexpected 101")
        self._hop_by_hop_headers()
        self._final = True
        self._status = 101
        parts = self._parts
        parts[0] = status_line(101, self._reason)
        extra = self._fwd.response_headers if self._fwd is not None else b""
        parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade[0], CRLF, extra, CRLF)
        self._out.append(b"".join(parts))

    def on_body(self, body: bytes) -> None:
        if self._rechunk:
            self._out += (b"%x\r\n" % len(body), body, CRLF)
        else:
            self._out.append(body)
        self._bytes_out += len(body)

    def on_message_complete(self) -> None:
        if not self._final or self._status == 101:
            return  # the end of a 1xx; or of a 101, after which HttpParserUpgrade hands over the tunnel
        if self._rechunk:
            self._out.append(LAST_CHUNK)
        self._complete = True
