"""The structured access log: one JSON line per request, buffered and written a few times a second.

Only what is safe goes in: never a secret, token, Authorization value, query string or cookie.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import IO, Any

_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


class AccessLog:
    def __init__(self, target: str) -> None:
        self.enabled = target != "off"
        self._owned: IO[bytes] | None = None
        if not self.enabled:
            self.out: IO[bytes] | None = None
        elif target == "stdout":
            self.out = sys.stdout.buffer
        else:
            self._owned = self.out = open(target, "ab")  # noqa: SIM115 - closed in close()
        self.lines: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.lines.append(_encode(record).encode() + b"\n")
            if len(self.lines) >= 512:
                self.flush()

    def flush(self) -> None:
        if self.lines and self.out is not None:
            data = b"".join(self.lines)
            self.lines.clear()
            with contextlib.suppress(OSError, ValueError):
                self.out.write(data)
                self.out.flush()

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.flush()
        if self._owned is not None:
            self._owned.close()


def rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"
