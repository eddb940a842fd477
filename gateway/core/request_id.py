"""The request id rule both services follow: which client-sent X-Request-Id values are kept, how a new one is made."""

from __future__ import annotations

import secrets
from typing import Final

# Enough for hex, UUIDs and dotted or colon-separated trace ids; nothing that could end a header line or need
# escaping in a log line.
_ALLOWED: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
_MAX_LENGTH: Final = 128


def valid_request_id(value: bytes) -> bool:
    """True for 1-128 characters of [A-Za-z0-9._:-]: a client-sent id that is passed on as it is."""
    return 0 < len(value) <= _MAX_LENGTH and not value.translate(None, _ALLOWED)


def new_request_id() -> bytes:
    """A fresh request id: 32 hex characters from the OS random source."""
    return secrets.token_hex(16).encode("ascii")


def request_id_text(sent: str) -> str:
    """The request id for a header value read as text (aiohttp): `sent` when valid, else a new one."""
    if sent.isascii() and valid_request_id(sent.encode("ascii")):
        return sent
    return new_request_id().decode("ascii")
