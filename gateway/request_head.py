"""The request head the gateway sends upstream: request line, Host, the scanned request headers that may go on,
the forwarding chain (X-Forwarded-*, Forwarded, Via), the request id and the identity block."""

from __future__ import annotations

from typing import Final

from gateway.headers import HeaderPolicy, ScannedHeaders
from gateway.http.framing import TCHAR

_WEBSOCKET_LINES: Final = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
# Host values repeat; quoting each once saves work on every request. Cleared when full, so a client sending
# endless distinct values costs memory only up to the bound.
_FORWARDED_CACHE_SIZE: Final = 256
_forwarded_value_cache: dict[bytes, bytes] = {}


def upstream_request_head(
    policy: HeaderPolicy,
    scanned: ScannedHeaders,
    *,
    method: bytes,
    path: bytes,
    client_ip: str,
    proto: bytes,
    identity_block: bytes,
    request_id: bytes,
    host_override: bytes | None,
    websocket: bool,
) -> bytes:
    """Build the upstream request line and headers, each line ending in CRLF, without the blank line.

    No framing header is included: the data plane adds Content-Length or Transfer-Encoding. `request_id`,
    `host_override` and `identity_block` must be well-formed (they come from the gateway, not the client).
    """
    host = scanned.host if host_override is None else host_override
    if host is None:
        raise ValueError("no Host for the upstream request: pass host_override when the client sent none")
    trusted, address, node = policy.peer(client_ip)
    parts = [method, b" ", path, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    if scanned.forward:
        parts += (b"\r\n".join(map(b": ".join, scanned.forward)), b"\r\n")
    if trusted:
        _append_extended_chain(parts, scanned, address, node, proto)
    else:
        # Anything the client claimed about earlier hops is ignored: this hop's view only.
        original_host = scanned.host
        parts += (b"X-Forwarded-For: ", address, b"\r\nX-Forwarded-Proto: ", proto, b"\r\n")
        if original_host:
            parts += (
                b"X-Forwarded-Host: ",
                original_host,
                b"\r\nForwarded: for=",
                node,
                b";proto=",
                proto,
                b";host=",
                _forwarded_value(original_host),
                b"\r\n",
            )
        else:
            parts += (b"Forwarded: for=", node, b";proto=", proto, b"\r\n")
    if scanned.via:
        parts += (b"Via: ", b", ".join(scanned.via), b", ", policy.via, b"\r\n")
    else:
        parts.append(policy.via_line)
    parts += (b"X-Request-Id: ", request_id, b"\r\n", identity_block)
    if websocket:
        parts.append(_WEBSOCKET_LINES)
    return b"".join(parts)


def _append_extended_chain(
    parts: list[bytes], scanned: ScannedHeaders, address: bytes, node: bytes, proto: bytes
) -> None:
    """Forwarding headers behind a trusted proxy: its chains are extended, its scheme and host believed."""
    original_host = scanned.host
    element = b"for=" + node + b";proto=" + proto
    if original_host:
        element += b";host=" + _forwarded_value(original_host)
    parts += (
        b"X-Forwarded-For: ",
        b", ".join((*scanned.x_forwarded_for, address)),
        b"\r\nX-Forwarded-Proto: ",
        b", ".join(scanned.x_forwarded_proto) or proto,
        b"\r\n",
    )
    for name, value in scanned.trusted_only:
        parts += (name, b": ", value, b"\r\n")
    forwarded_host = b", ".join(scanned.x_forwarded_host) or original_host
    if forwarded_host:
        parts += (b"X-Forwarded-Host: ", forwarded_host, b"\r\n")
    parts += (b"Forwarded: ", b", ".join((*scanned.forwarded, element)), b"\r\n")


def _forwarded_value(value: bytes) -> bytes:
    """A Forwarded parameter value: a token as is, anything else as a quoted-string (RFC 7239 §4)."""
    rendered = _forwarded_value_cache.get(value)
    if rendered is None:
        if value.translate(None, TCHAR):
            rendered = b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        else:
            rendered = value
        if len(_forwarded_value_cache) >= _FORWARDED_CACHE_SIZE:
            _forwarded_value_cache.clear()
        _forwarded_value_cache[value] = rendered
    return rendered
