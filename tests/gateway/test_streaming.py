"""Bodies stream through the full gateway (auth on) without buffering, and the limits on what a client
may send (head size, header count, body size) answer 431 and 413 end to end."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support import GatewayProcess, Upstream, running_gateway, start_upstream, write_config
from tests.support_faults import (
    RawResponse,
    bearer,
    children_of,
    create_token,
    raw_exchange,
    read_response,
    rss_kib,
    scripted_upstream,
)

MIB = 1024 * 1024
STREAM_BYTES = 200 * MIB
MAX_RSS_GROWTH_KIB = 50 * 1024


def chunks(total: int) -> Iterator[bytes]:
    """Deterministic 1 MiB chunks, each stamped with its index so that a lost or repeated chunk shows."""
    block = hashlib.sha256(b"credgate").digest() * (MIB // 32)
    for index in range(total // MIB):
        yield index.to_bytes(8, "big") + block[8:]


def expected_digest(total: int) -> str:
    digest = hashlib.blake2b()
    for chunk in chunks(total):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass
class StreamingUpstream:
    """An upstream that consumes uploads and produces downloads chunk by chunk, never holding a body."""

    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_streaming_upstream() -> StreamingUpstream:
    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.blake2b()
        size = 0
        async for data in request.content.iter_any():
            digest.update(data)
            size += len(data)
        return web.json_response({"bytes": size, "digest": digest.hexdigest(),
                                  "user": request.headers.get("X-Auth-User"),
                                  "chunked": request.headers.get("Transfer-Encoding")})

    async def download(request: web.Request) -> web.StreamResponse:
        total = int(request.query["bytes"])
        response = web.StreamResponse(headers={"X-User": request.headers.get("X-Auth-User", "")})
        if request.query.get("framing") != "chunked":
            response.content_length = total
        await response.prepare(request)
        for chunk in chunks(total):
            await response.write(chunk)  # waits while the gateway is not reading: no buffering here either
        await response.write_eof()
        return response

    app = web.Application(client_max_size=1024)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return StreamingUpstream(runner, port)


@dataclass
class RssWatch:
    """Samples the VmRSS of the gateway's workers in a thread (the event loop is busy streaming)."""

    pids: list[int]
    baseline: dict[int, int] = field(default_factory=dict)
    peak: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_kib(pid))

    def __enter__(self) -> RssWatch:
        self.baseline = {pid: rss_kib(pid) for pid in self.pids}
        self.peak = dict(self.baseline)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def growth_kib(self) -> int:
        return max(self.peak[pid] - self.baseline[pid] for pid in self.pids)


@pytest.fixture
async def streaming_upstream() -> AsyncIterator[StreamingUpstream]:
    up = await start_streaming_upstream()
    try:
        yield up
    finally:
        await up.runner.cleanup()


@pytest.fixture
async def streaming_gateway(env: dict[str, str], streaming_upstream: StreamingUpstream,
                            tmp_path: Path) -> AsyncIterator[tuple[GatewayProcess, str, list[int]]]:
    """A one-worker gateway whose body limit admits 200 MB; yields it, a token, and the worker PIDs."""
    token = (await create_token(env, "svc"))["token"]
    config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": streaming_upstream.url}],
                          extra="[gateway.limits]\nmax_body_bytes = 536870912\n")
    async with running_gateway(env, config, tmp_path) as gw:
        workers = children_of(gw.process.pid)
        assert len(workers) == 1, workers
        async with aiohttp.ClientSession() as session, session.get(
                gw.url + "/download?bytes=1048576", headers=bearer(token)) as warm:
            assert warm.status == 200  # the credential is verified and cached before measuring
            await warm.read()
        yield gw, token, workers


async def upload_body(total: int) -> AsyncIterator[bytes]:
    for chunk in chunks(total):
        yield chunk


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_200mb_upload_streams_through(streaming_gateway: tuple[GatewayProcess, str, list[int]],
                                            framing: str) -> None:
    gw, token, workers = streaming_gateway
    headers = bearer(token)
    if framing == "content-length":
        headers["Content-Length"] = str(STREAM_BYTES)
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=25)
    with RssWatch(workers) as rss:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                gw.url + "/upload", data=upload_body(STREAM_BYTES), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            result: dict[str, Any] = await resp.json()
    elapsed = time.monotonic() - started
    assert result["bytes"] == STREAM_BYTES
    assert result["digest"] == expected_digest(STREAM_BYTES)
    assert result["user"] == "svc"
    assert (result["chunked"] == "chunked") == (framing == "chunked")
    assert rss.growth_kib() < MAX_RSS_GROWTH_KIB, f"worker RSS grew {rss.growth_kib()} KiB"
    print(f"\n200 MB upload ({framing}): {elapsed:.1f}s, worker RSS +{rss.growth_kib() / 1024:.1f} MiB")


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_200mb_download_streams_through(streaming_gateway: tuple[GatewayProcess, str, list[int]],
                                              framing: str) -> None:
    gw, token, workers = streaming_gateway
    digest = hashlib.blake2b()
    received = 0
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=25)
    with RssWatch(workers) as rss:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
                f"{gw.url}/download?bytes={STREAM_BYTES}&framing={framing}", headers=bearer(token)) as resp:
            assert resp.status == 200
            assert resp.headers["X-User"] == "svc"
            if framing == "content-length":
                assert resp.headers["Content-Length"] == str(STREAM_BYTES)
            else:
                assert resp.headers["Transfer-Encoding"] == "chunked"
            async for data in resp.content.iter_any():
                digest.update(data)
                received += len(data)
    elapsed = time.monotonic() - started
    assert received == STREAM_BYTES
    assert digest.hexdigest() == expected_digest(STREAM_BYTES)
    assert rss.growth_kib() < MAX_RSS_GROWTH_KIB, f"worker RSS grew {rss.growth_kib()} KiB"
    print(f"\n200 MB download ({framing}): {elapsed:.1f}s, worker RSS +{rss.growth_kib() / 1024:.1f} MiB")


# --- limits ---------------------------------------------------------------------------------------------------

LIMITS = "[gateway.limits]\nmax_header_bytes = 4096\nmax_headers = 20\nmax_body_bytes = 1048576\n"
HEAD_TOO_LARGE = "request_header_fields_too_large"
BODY_TOO_LARGE = "content_too_large"


def error_of(reply: RawResponse) -> str:
    """The `error` of a gateway JSON error body (which has exactly `error` and `error_description`)."""
    assert reply.header("Content-Type") == "application/json", reply.headers
    body = reply.json()
    assert set(body) == {"error", "error_description"} and isinstance(body["error_description"], str), body
    return str(body["error"])


@pytest.fixture
async def echo_upstream() -> AsyncIterator[Upstream]:
    up = await start_upstream()
    try:
        yield up
    finally:
        await up.runner.cleanup()


def request_head(path: str, token: str, extra: list[tuple[str, str]]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gateway", f"Authorization: Bearer {token}"]
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_header_and_body_limits(env: dict[str, str], tmp_path: Path, echo_upstream: Upstream) -> None:
    token = (await create_token(env, "svc"))["token"]
    async with scripted_upstream(None) as tripwire:
        config = write_config(tmp_path / "gw.toml", [{"prefix": "/", "upstream": echo_upstream.url},
                                                     {"prefix": "/trip", "upstream": tripwire.url}], extra=LIMITS)
        async with running_gateway(env, config, tmp_path) as gw:
            # within the limits: 17 extra headers (20 in all), a body of exactly the limit
            allowed = [(f"X-H{i}", "v" * 100) for i in range(17)] + [("Content-Length", str(MIB))]
            reply = await raw_exchange(gw.port, request_head("/ok", token, allowed) + b"x" * MIB)
            assert reply.status == 200, reply.body
            assert reply.json()["body_bytes"] == MIB

            refused: dict[str, tuple[list[tuple[str, str]], int, str]] = {
                "one huge header": ([("X-Big", "a" * 5000), ("Content-Length", "0")], 431, HEAD_TOO_LARGE),
                "too many headers": ([(f"X-H{i}", "v") for i in range(25)], 431, HEAD_TOO_LARGE),
                "head bytes in sum": ([(f"X-H{i}", "v" * 400) for i in range(15)], 431, HEAD_TOO_LARGE),
                "declared body too large": ([("Content-Length", str(MIB + 1))], 413, BODY_TOO_LARGE),
                "too large, expecting 100-continue": (
                    [("Content-Length", str(4 * MIB)), ("Expect", "100-continue")], 413, BODY_TOO_LARGE),
            }
            for case, (headers, status, body) in refused.items():
                reply = await raw_exchange(gw.port, request_head("/trip/x", token, headers))
                assert (reply.status, error_of(reply)) == (status, body), case
                assert reply.closed, case
            assert tripwire.connections == 0  # nothing of any refused request reached the upstream

            # A chunked body is streamed as it arrives; the limit cuts it off with 413.
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            try:
                writer.write(request_head("/trip/x", token, [("Transfer-Encoding", "chunked")]))
                piece = b"y" * 65536
                for _ in range(MIB // len(piece) + 1):
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                reply = await read_response(reader)
            finally:
                writer.close()
                await writer.wait_closed()
            assert (reply.status, error_of(reply)) == (413, BODY_TOO_LARGE)
            assert reply.closed
            assert len(tripwire.received) <= MIB + 4096  # the upstream got at most the allowed part
