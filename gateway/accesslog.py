"""The structured access log: one JSON line per request, buffered and written a few times a second.

Only what is safe goes in: never a secret, token, Authorization value, query string or cookie (the caller
builds the record from the request's attribution, not from its headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import stat
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote  # the C implementation when available
from typing import Any

from gateway.core.tasks import background

_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode

# The access log line's fields, in order (the README's "Access log" section describes each).
FIELDS = (
    "time",
    "request_id",
    "client",
    "method",
    "route",
    "path",
    "status",
    "bytes",
    "duration_ms",
    "upstream_ms",
    "auth_method",
    "auth_outcome",
    "credential",
    "owner",
    "creator",
    "reason",
)
# One %-format for the whole line: about half the cost of building a dict and JSON-encoding it.
_LINE = (
    '{"time":"%s","request_id":%s,"client":%s,"method":%s,"route":%s,"path":%s,"status":%d,"bytes":%d,'
    '"duration_ms":%.3f,"upstream_ms":%s,"auth_method":%s,"auth_outcome":%s,"credential":%s,"owner":%s,'
    '"creator":%s,"reason":%s}\n'
)

# Flush when this many lines wait, whatever the timer says: bounds memory under load.
MAX_PENDING_LINES = 512
FLUSH_SECONDS = 0.2
# Workers share stdout. A write of at most PIPE_BUF bytes to a pipe is atomic, so chunks of whole lines
# under that size never interleave mid-line with another worker's. Regular files opened O_APPEND take
# larger chunks (each append is placed whole at the end).
PIPE_CHUNK = select.PIPE_BUF
FILE_CHUNK = 64 * 1024


def _quote_or_null(value: str) -> str:
    return _quote(value) if value else "null"


@dataclass(slots=True)
class AccessRecord:
    """One finished request, as its access log line reports it (FIELDS, in the same order; the line adds the
    time). Built once per request by the request path (gateway.app)."""

    request_id: bytes
    client: str
    method: str
    route: str
    path: bytes
    status: int
    bytes_sent: int
    seconds: float
    upstream_seconds: float | None
    auth_method: str
    auth_outcome: str
    credential: str
    owner: str
    creator: str
    reason: str


class AccessLog:
    """`target` is "stdout", "off" or a file path (appended to, created 0640)."""

    def __init__(self, target: str) -> None:
        self.enabled = target != "off"
        self._fd = -1
        self._owned = False
        if self.enabled:
            if target == "stdout":
                self._fd = sys.stdout.fileno()
            else:
                self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                self._owned = True
        self._chunk = FILE_CHUNK if self._fd >= 0 and stat.S_ISREG(os.fstat(self._fd).st_mode) else PIPE_CHUNK
        self.lines: list[bytes] = []

    def write(self, record: dict[str, Any]) -> None:
        """Any JSON object as one line (the request path uses the cheaper `request()`)."""
        if self.enabled:
            self.lines.append(_encode(record).encode("ascii") + b"\n")
            if len(self.lines) >= MAX_PENDING_LINES:
                self.flush()

    def request(self, record: AccessRecord) -> None:
        """The line for one finished request, fields as in FIELDS; an empty string is written as null."""
        self.line(record.request_id, record.client, record.method, record.route, record.path, record.status,
                  record.bytes_sent, record.seconds, record.upstream_seconds, record.auth_method, record.auth_outcome,
                  record.credential, record.owner, record.creator, record.reason)

    def line(self, request_id: bytes, client: str, method: str, route: str, path: bytes, status: int, bytes_sent: int,
             seconds: float, upstream_seconds: float | None, auth_method: str, auth_outcome: str, credential: str,
             owner: str, creator: str, reason: str) -> None:
        """`request` without the record: the request path's call, one per request (no object to build)."""
        if not self.enabled:
            return
        line = _LINE % (
            rfc3339(time.time()),
            _quote(request_id.decode("latin-1")),
            _quote(client),
            _quote(method),
            _quote(route),
            _quote(path.decode("latin-1")),
            status,
            bytes_sent,
            seconds * 1000,
            "null" if upstream_seconds is None else "%.3f" % (upstream_seconds * 1000),
            _quote(auth_method) if auth_method else "null",
            _quote(auth_outcome),
            _quote(credential) if credential else "null",
            _quote(owner) if owner else "null",
            _quote(creator) if creator else "null",
            _quote(reason) if reason else "null",
        )
        self.lines.append(line.encode("ascii"))
        if len(self.lines) >= MAX_PENDING_LINES:
            self.flush()

    def flush(self) -> None:
        if not self.lines or self._fd < 0:
            return
        lines, self.lines = self.lines, []
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if size + len(line) > self._chunk and chunk:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        # A closed stdout or a full disk loses these lines (BlockingIOError included): the access log
        # must never take the request path down.
        with contextlib.suppress(OSError):
            while view:
                view = view[os.write(self._fd, view) :]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[AccessLog]:
        """Write buffered lines every FLUSH_SECONDS for the block's duration; flush and close at its end."""
        try:
            if self.enabled:
                async with background(self._loop(), "access log"):
                    yield self
            else:
                yield self
        finally:
            await self.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.flush()

    async def close(self) -> None:
        """Write what is buffered and release the file (idempotent)."""
        self.flush()
        if self._owned:
            os.close(self._fd)
            self._owned = False
        self._fd = -1


_last_second = -1
_last_prefix = ""


def rfc3339(epoch: float) -> str:
    """UTC time with milliseconds, e.g. 2025-01-31T12:00:00.123Z; the seconds part is formatted once a second."""
    global _last_second, _last_prefix
    second = int(epoch)
    if second != _last_second:
        _last_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = second
    # the half-microsecond nudge undoes float error (x.001 stored as x.000999...); min() keeps 3 digits
    millis = min(999, int((epoch - second) * 1000 + 0.0005))
    return f"{_last_prefix}.{millis:03d}Z"
