"""A real webhook receiver for the tests (aiohttp on 127.0.0.1, port 0): it verifies signatures as the README
documents, can fail, hang or slow down on purpose, and records what it accepted by Credgate-Webhook-Id."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def verify(secret: str, signature_header: str, body: bytes, tolerance: int = 300) -> bool:
    """The README's receiver recipe, verbatim: recompute, compare in constant time, refuse stale timestamps."""
    fields = dict(item.split("=", 1) for item in signature_header.split(","))
    timestamp = fields.get("t", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))


@dataclass
class Receiver:
    secret: str
    fail_first: int = 0  # answer 500 to the first N attempts of each event
    always_fail: bool = False
    hang_first: bool = False  # never answer the very first request
    delay: float = 0.0
    url: str = ""
    attempts: Counter[str] = field(default_factory=Counter)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: int = 0
    first_seen: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    def accepted_ids(self) -> list[str]:
        return [event["id"] for event in self.accepted]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event_id = request.headers["Credgate-Webhook-Id"]
        if not verify(self.secret, request.headers.get("Credgate-Signature", ""), body):
            self.bad_signatures += 1
            return web.Response(status=400)
        self.attempts[event_id] += 1
        if self.hang_first and not self.first_seen.is_set():
            self.first_seen.set()
            await asyncio.sleep(60)
        self.in_flight[event_id] += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight[event_id])
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight[event_id] -= 1
        if self.always_fail or self.attempts[event_id] <= self.fail_first:
            return web.Response(status=500, text="not now")
        event = json.loads(body)
        assert event["id"] == event_id and request.content_type == "application/json"
        self.accepted.append(event)
        return web.Response(status=204)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
