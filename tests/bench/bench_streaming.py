"""Streaming: RSS of the gateway worker while a large body goes through it, up (POST to a sink upstream) and
down (GET of a large file from the upstream nginx), sampled every 10 ms from /proc/<pid>/status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tests.bench import bench_procs
from tests.bench.bench_servers import Gateway, log

CHUNK = 256 * 1024
SAMPLE_SECONDS = 0.01


async def _sampled(pid: int, work: Callable[[], Awaitable[int]]) -> dict[str, Any]:
    """Run work() while sampling pid's RSS; returns baseline, peak, growth (KiB), bytes moved and MB/s."""
    baseline = bench_procs.rss_kib(pid)
    peak = baseline
    done = asyncio.Event()

    async def sampler() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, bench_procs.rss_kib(pid))
            await asyncio.sleep(SAMPLE_SECONDS)

    task = asyncio.create_task(sampler())
    began = time.perf_counter()
    try:
        moved = await work()
    finally:
        done.set()
        await task
    seconds = time.perf_counter() - began
    after = bench_procs.rss_kib(pid)
    return {"baseline_kib": baseline, "peak_kib": peak, "growth_kib": peak - baseline, "after_kib": after,
            "bytes": moved, "seconds": seconds, "mb_per_s": moved / 1e6 / seconds if seconds else 0.0}


async def _upload(port: int, token: str, size: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /sink HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n"
                     "Connection: close\r\n\r\n".encode())
        chunk = bytes(CHUNK)
        sent = 0
        while sent < size:
            piece = chunk[: min(CHUNK, size - sent)]
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
        response = await asyncio.wait_for(reader.read(), 120)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or int(body or b"0") != size:
        raise RuntimeError(f"upload through the gateway failed: {head[:200]!r} body {body[:100]!r}")
    return sent


class _Counter(asyncio.BufferedProtocol):
    """Reads a response into one reused buffer and only counts it: the client must not be the bottleneck
    (a StreamReader loop tops out around 150 MB/s here, below what the gateway streams)."""

    def __init__(self) -> None:
        self.buffer = bytearray(CHUNK)
        self.head = b""
        self.in_body = False
        self.body = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.in_body:
            self.body += nbytes
            return
        self.head += bytes(self.buffer[:nbytes])
        head, found, rest = self.head.partition(b"\r\n\r\n")
        if found:
            self.head, self.in_body = head, True
            self.body += len(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _download(port: int, token: str, size: int) -> int:
    loop = asyncio.get_running_loop()
    transport, counter = await loop.create_connection(_Counter, "127.0.0.1", port)
    try:
        transport.write(f"GET /stream/big HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
                        "Connection: close\r\n\r\n".encode())
        await asyncio.wait_for(counter.done, 120)
    finally:
        transport.close()
    if not counter.head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"download through the gateway failed: {counter.head[:200]!r}")
    if counter.body != size:
        raise RuntimeError(f"download through the gateway: {counter.body} bytes of {size}")
    return counter.body


def run(gw: Gateway, token: str, megabytes: int, cores: set[int]) -> dict[str, Any]:
    pid = gw.workers[0]
    size = megabytes * 1024 * 1024
    bench_procs.pin([pid], cores)

    async def both() -> dict[str, Any]:
        up = await _sampled(pid, lambda: _upload(gw.port, token, size))
        down = await _sampled(pid, lambda: _download(gw.port, token, size))
        return {"upload": up, "download": down}

    result = asyncio.run(both())
    for direction, r in result.items():
        log(f"streaming {direction}: {r['bytes'] / 1e6:.0f} MB at {r['mb_per_s']:.0f} MB/s, worker RSS "
            f"{r['baseline_kib'] / 1024:.1f} -> peak {r['peak_kib'] / 1024:.1f} MiB (+{r['growth_kib'] / 1024:.1f})")
    return result


def section(result: dict[str, Any], megabytes: int) -> list[str]:
    lines = [
        f"One {megabytes} MB body through a 1-worker gateway (bearer route), worker RSS sampled every "
        f"{SAMPLE_SECONDS * 1000:g} ms. Up: POST with Content-Length to a sink upstream that only counts bytes. "
        "Down: GET of a file served by the upstream nginx.",
        "",
        "| direction | MB/s | worker RSS before MiB | peak MiB | growth MiB | after MiB |",
        "|---|---|---|---|---|---|",
    ]
    for direction, r in result.items():
        lines.append(f"| {direction} | {r['mb_per_s']:.0f} | {r['baseline_kib'] / 1024:.1f} | "
                     f"{r['peak_kib'] / 1024:.1f} | {r['growth_kib'] / 1024:.1f} | {r['after_kib'] / 1024:.1f} |")
    return lines
