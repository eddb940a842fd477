"""The request id rule both services follow: which client-sent X-Request-Id values are kept, how a new one is made."""

from __future__ import annotations

import os
import secrets
from typing import Final

# Enough for hex, UUIDs and dotted or colon-separated trace ids; nothing that could end a header line or need
# escaping in a log line.
_ALLOWED: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
_MAX_LENGTH: Final = 128


def valid_request_id(value: bytes) -> bool:
    """True for 1-128 characters of [A-Za-z0-9._:-]: a client-sent id that is passed on as it is."""
    return 0 < len(value) <= _MAX_LENGTH and not value.translate(None, _ALLOWED)


# Fresh ids are cut from a block of OS randomness read once per _IDS_PER_READ ids: one getrandom() call per
# request was a measurable part of a cached request's cost. A forked child starts with a block of its own.
_IDS_PER_READ: Final = 128
_block = b""
_next = 0


def _forget_block() -> None:
    global _block, _next
    _block, _next = b"", 0


os.register_at_fork(after_in_child=_forget_block)


def new_request_id() -> bytes:
    """A fresh request id: 32 hex characters from the OS random source."""
    global _block, _next
    start = _next
    if start >= len(_block):
        _block = secrets.token_bytes(16 * _IDS_PER_READ).hex().encode("ascii")
        start = 0
    _next = start + 32
    return _block[start : start + 32]


def request_id_text(sent: str) -> str:
    """The request id for a header value read as text (aiohttp): `sent` when valid, else a new one."""
    if sent.isascii() and valid_request_id(sent.encode("ascii")):
        return sent
    return new_request_id().decode("ascii")
