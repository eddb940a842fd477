"""HTTP/1.1 on the wire, as the data plane and the header policy share it: status lines, token characters,
which headers describe one hop, and how much a transport may buffer."""

from __future__ import annotations

import http
from typing import Final

# (standard reason phrase, whole status line) per status, so the common case formats nothing.
STATUS_LINES: Final[dict[int, tuple[bytes, bytes]]] = {
    s.value: (s.phrase.encode(), b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode())) for s in http.HTTPStatus
}

# RFC 9110 §5.6.2 token characters: valid header names, and Forwarded values that need no quotes.
TCHAR: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# Headers that describe one connection, never forwarded in either direction (RFC 9110 §7.6.1: Connection
# itself and what it names, TE, Transfer-Encoding, Upgrade). The data plane frames and upgrades each hop
# itself, re-adding Transfer-Encoding or Upgrade where it needs them.
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


def status_line(status: int, reason: bytes = b"") -> bytes:
    """`HTTP/1.1 <code> <reason>` with CRLF; the standard phrase when the reason is empty or standard."""
    default = STATUS_LINES.get(status)
    if default is not None and (not reason or reason == default[0]):
        return default[1]
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


# Transport write buffers (client and upstream alike): writing pauses the other side above the high mark
# and resumes it below the low one; body bytes held before an upstream is attached are bounded the same way.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
