"""HTTP/1.1 framing, pure: which request heads are acceptable, how a response head is written and which
response headers go on. No sockets and no state beyond the arguments: the connections (gateway.http.client,
gateway.http.upstream) call these, and tests/gateway/http/test_framing.py checks every case without a socket.

Decisions where the RFCs leave room (the README has the operator-facing version):

- Request framing is strict (RFC 9112 6, 11.2): Content-Length with Transfer-Encoding, repeated or invalid
  Content-Length, any Transfer-Encoding other than exactly one `chunked` (and any on HTTP/1.0), obs-fold,
  whitespace before the colon, control characters in values and bare LF are refused with 400 and the
  connection is closed; llhttp rejects most of these itself, `framing_header` and `check_head` the rest.
  `Host` must appear once on HTTP/1.1 (at most once on 1.0). HTTP/0.9 gets 400, HTTP/2.0+ 505, CONNECT 501,
  an upgrade request that declares a body 400, an `Expect` other than 100-continue 417.
- Responses: HTTP/1.1 status line; hop-by-hop headers and those the upstream names in Connection removed;
  Content-Length passed through (even when Connection names it), otherwise chunked to HTTP/1.1 clients and
  close-delimited to HTTP/1.0 clients; an upstream Transfer-Encoding other than `chunked` can't be re-framed
  safely and is refused.
"""

from __future__ import annotations

import http
from typing import Final

from gateway.http.exchange import Exchange, Respond

# (standard reason phrase, whole status line) per status, so the common case formats nothing.
STATUS_LINES: Final[dict[int, tuple[bytes, bytes]]] = {
    s.value: (s.phrase.encode(), b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode())) for s in http.HTTPStatus
}

# RFC 9110 §5.6.2 token characters: valid header names, and Forwarded values that need no quotes.
TCHAR: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# Headers that describe one connection, never forwarded in either direction (RFC 9110 §7.6.1: Connection
# itself and what it names, TE, Transfer-Encoding, Upgrade). The data plane frames and upgrades each hop
# itself, re-adding Transfer-Encoding or Upgrade where it needs them. The one set for the whole product: the
# request header policy (gateway.headers) drops the same names.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        # RFC 2068's persistent connections; RFC 9110 §7.6.1 still names it for removal.
        b"keep-alive",
        # Never standardised, sent by old clients in place of Connection (RFC 9112 Appendix C.2.2).
        b"proxy-connection",
        # Announces trailer fields, which the data plane drops (RFC 2616 §13.5.1 listed it as hop-by-hop).
        b"trailer",
        # For the next proxy only, never the origin or the client (RFC 9110 §11.7); a Proxy-Authorization may
        # carry a credential for some other proxy.
        b"proxy-authenticate",
        b"proxy-authorization",
        # RFC 9110 §7.6.1 reserves "Close" as a field name so that it can be a Connection option.
        b"close",
        # Connection-specific setting of the h2c upgrade (RFC 7540 §3.2.1).
        b"http2-settings",
    }
)

# Transport write buffers (client and upstream alike): writing pauses the other side above the high mark
# and resumes it below the low one; body bytes held before an upstream is attached are bounded the same way.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024

CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_BODY_STATUSES: Final = frozenset({204, 304})
# A stale pooled connection may only be retried for methods that are safe to send twice.
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Only request header names of these lengths matter to framing (host, expect, upgrade, connection,
# content-length, transfer-encoding): the request parser lower-cases no other name.
REQUEST_WATCHED_LENGTHS: Final = frozenset({4, 6, 7, 10, 14, 17})
# Only response header names of these lengths can be hop-by-hop or Content-Length.
RESPONSE_WATCHED_LENGTHS: Final = frozenset(len(name) for name in (*HOP_BY_HOP, b"content-length"))
# Connection values that name no other header to drop (the common case, checked without splitting).
CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})
# Names a Connection option may not remove: the plain options, and Content-Length, which frames the body.
_PROTECTED: Final = CONNECTION_OPTIONS | {b"content-length"}


class Refusal(Exception):
    """A request that can't be served as framed: answer `status` with this error (or fail the exchange) and
    close. Raised inside parser callbacks; `outcome` is the exchange's `Outcome.error`."""

    def __init__(self, status: int, error: str, description: str, outcome: str = "bad_request") -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.outcome = outcome


class StopParsing(Exception):
    """Raised inside a parser callback when nothing more will be parsed: the request parser after the last
    request a connection reads, the response parser once the response is over (HEAD, bytes after it)."""


class BadResponse(Exception):
    """An upstream response that can't be relayed safely."""


def bad_request(description: str) -> Refusal:
    return Refusal(400, "bad_request", description)


def too_large() -> Refusal:
    return Refusal(413, "content_too_large", "request body too large", "body_too_large")


def status_line(status: int, reason: bytes = b"") -> bytes:
    """`HTTP/1.1 <code> <reason>` with CRLF; the standard phrase when the reason is empty or standard."""
    default = STATUS_LINES.get(status)
    if default is not None and (not reason or reason == default[0]):
        return default[1]
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


# -- requests ------------------------------------------------------------------------------------------------


def framing_header(ex: Exchange, lname: bytes, value: bytes) -> bool:
    """Record a request header the data plane interprets (`lname` lower-cased); True when it frames the
    message and so is kept from the handler (Content-Length, Transfer-Encoding, Expect)."""
    if lname == b"content-length":
        ex.content_length = int(value)  # llhttp has checked the digits and refused duplicates
        return True
    if lname == b"transfer-encoding":
        if ex.chunked or value.strip().lower() != b"chunked":
            raise bad_request("unsupported Transfer-Encoding")
        ex.chunked = True
        return True
    if lname == b"expect":
        if value.strip().lower() != b"100-continue":
            raise Refusal(417, "expectation_failed", "unsupported expectation")
        ex.expect_continue = True
        return True
    if lname == b"upgrade":
        ex.upgrade_value = value
    return False


def http_minor(version: str) -> int:
    """The minor version of an HTTP/1.x request; anything else is refused."""
    if version == "1.1":
        return 1
    if version == "1.0":
        return 0
    if version == "0.9":
        raise bad_request("HTTP/0.9 is not supported")
    raise Refusal(505, "http_version_not_supported", "HTTP version not supported")


def check_head(ex: Exchange, hosts: int, upgrade: bool, max_body: int) -> None:
    """The checks a head needs once complete, when it is not the plain case (one Host, no body, no upgrade):
    sets `has_body` and `upgrade`."""
    if hosts > 1 or (hosts == 0 and ex.http_minor):
        raise bad_request("missing or repeated Host header")
    if ex.chunked:
        if not ex.http_minor:
            raise bad_request("Transfer-Encoding on HTTP/1.0")
        ex.has_body = True
    elif ex.content_length:
        ex.has_body = True
        if max_body and ex.content_length > max_body:
            raise too_large()
    if upgrade:
        if ex.method == b"CONNECT":
            raise Refusal(501, "not_implemented", "CONNECT is not supported")
        if ex.has_body:
            raise bad_request("upgrade request with a body")
        ex.upgrade = True


def head_size(ex: Exchange) -> int:
    """What `max_header_bytes` counts: the target, and each header's name and value (with ': ' and CRLF)."""
    return len(ex.target) + sum(len(name) + len(value) + 4 for name, value in ex.headers)


# -- responses -------------------------------------------------------------------------------------------------


def render_response(resp: Respond, close: bool, minor: int, head_only: bool) -> tuple[bytes, int]:
    """The bytes of a response the gateway answers itself, and the body bytes among them."""
    status = resp.status
    parts = [status_line(status)]
    for name, value in resp.headers:
        parts += (name, b": ", value, CRLF)
    no_body = head_only or status in NO_BODY_STATUSES or status < 200
    if status not in NO_BODY_STATUSES and status >= 200:  # RFC 9110 8.6: never on 1xx and 204
        parts.append(b"Content-Length: %d\r\n" % len(resp.body))
    if close:
        parts.append(b"Connection: close\r\n")
    elif not minor:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(CRLF)
    if no_body:
        return b"".join(parts), 0
    parts.append(resp.body)
    return b"".join(parts), len(resp.body)


def drop_connection_listed(parts: list[bytes], rare: list[tuple[bytes, bytes]]) -> tuple[list[bytes], bool]:
    """Act on a response head's hop-by-hop headers (`rare`, lower-cased names, already left out of `parts`):
    drop the headers Connection names from `parts` (status line first, then name, ': ', value, CRLF per
    header) and check Transfer-Encoding. Returns the kept parts and whether the body is chunked."""
    codings = [value for lname, value in rare if lname == b"transfer-encoding"]
    if len(codings) > 1 or (codings and codings[0].strip().lower() != b"chunked"):
        raise BadResponse("unsupported transfer-encoding")
    listed = {
        token.strip().lower() for lname, value in rare if lname == b"connection" for token in value.split(b",")
    } - _PROTECTED
    if listed:
        kept = [parts[0]]
        for i in range(1, len(parts), 4):
            if parts[i].lower() not in listed:
                kept += parts[i : i + 4]
        parts = kept
    return parts, bool(codings)


def content_length_at(parts: list[bytes]) -> int:
    """Where the Content-Length name sits in a head's parts (0: none)."""
    for i in range(1, len(parts), 4):
        if len(parts[i]) == 14 and parts[i].lower() == b"content-length":
            return i
    return 0

