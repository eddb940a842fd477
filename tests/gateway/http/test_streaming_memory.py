"""Streaming memory bound: the data plane in a subprocess on uvloop relays 200 MB each way to and from a slow peer,
and its peak RSS grows by less than 50 MiB (flow control pauses the fast side)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import pytest
import uvloop

from tests.gateway.http.support_raw import OK_REPLY

# The repository root: the subprocess imports the product (gateway) from there.
ROOT = str(Path(__file__).resolve().parents[3])


PROXY_PROCESS = """
import asyncio, signal, sys
import uvloop
from gateway.core.settings import Limits
from gateway.http.exchange import Forward, Respond
from gateway.http.server import start_server

class Handler:
    def handle(self, ex):
        head = b"%s %s HTTP/1.1\\r\\nHost: up\\r\\n" % (ex.method, ex.target)
        return Forward("127.0.0.1", int(sys.argv[1]), head)
    def done(self, ex, outcome):
        print("done", outcome.status, outcome.bytes_sent, outcome.error, flush=True)
    def rejected(self, client_ip, status, error):
        pass
    def error_response(self, status, error, description):
        return Respond(status, [], error.encode())

async def main():
    server = await start_server(Handler(), "127.0.0.1", 0, limits=Limits(max_body_bytes=0))
    print(server.port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.shutdown(1.0)

uvloop.run(main())
"""
TRANSFER = 200 * 1024 * 1024
CHUNK = 256 * 1024


def _memory_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise AssertionError(field_name)


class ProxyProcess:
    def __init__(self, upstream_port: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", PROXY_PROCESS, str(upstream_port)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
            text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def done_lines(self) -> list[str]:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=10)
        return [line for line in out.splitlines() if line.startswith("done")]

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.mark.slow
def test_200mb_download_streams_in_bounded_memory() -> None:
    async def scenario() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await _small_request(reader, writer):
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TRANSFER)
            block = b"d" * CHUNK
            for _ in range(TRANSFER // CHUNK):
                writer.write(block)
                await writer.drain()
            writer.close()

        upstream = await asyncio.start_server(serve, "127.0.0.1", 0)
        try:
            with ProxyProcess(upstream.sockets[0].getsockname()[1]) as proxy:
                await _warm_up(proxy.port)
                before = _memory_kib(proxy.process.pid, "VmRSS")
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=CHUNK)
                writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert b"Content-Length: %d" % TRANSFER in head
                await _read_slowly(reader)  # a slow reader first: the proxy must pause the upstream
                writer.close()
                await writer.wait_closed()
                growth_mib = (_memory_kib(proxy.process.pid, "VmHWM") - before) / 1024
                assert growth_mib < 50, growth_mib
                assert proxy.done_lines()[-1] == f"done 200 {TRANSFER} None"
        finally:
            upstream.close()
            await upstream.wait_closed()

    uvloop.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.slow
def test_200mb_upload_streams_in_bounded_memory() -> None:
    async def scenario() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await _small_request(reader, writer):
                return
            received = await _read_slowly(reader)  # a slow upstream first: the proxy must pause the client
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(received)), received))
            await writer.drain()
            writer.close()

        upstream = await asyncio.start_server(serve, "127.0.0.1", 0, limit=CHUNK)
        try:
            with ProxyProcess(upstream.sockets[0].getsockname()[1]) as proxy:
                await _warm_up(proxy.port)
                before = _memory_kib(proxy.process.pid, "VmRSS")
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(b"PUT /big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % TRANSFER)
                block = b"u" * CHUNK
                for _ in range(TRANSFER // CHUNK):
                    writer.write(block)
                    await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                assert await reader.readexactly(len(str(TRANSFER))) == str(TRANSFER).encode()
                writer.close()
                await writer.wait_closed()
                growth_mib = (_memory_kib(proxy.process.pid, "VmHWM") - before) / 1024
                assert growth_mib < 50, growth_mib
        finally:
            upstream.close()
            await upstream.wait_closed()

    uvloop.run(asyncio.wait_for(scenario(), 60))


async def _read_slowly(reader: asyncio.StreamReader) -> int:
    """Read TRANSFER bytes, pausing after each read for the first quarter: the other side must wait for us."""
    received = 0
    while received < TRANSFER:
        chunk = await reader.read(CHUNK)
        assert chunk
        received += len(chunk)
        if received < TRANSFER // 4:
            await asyncio.sleep(0.001)
    return received


async def _small_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Reads a request head; answers and closes if it is the warm-up request (True)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"GET /warm"):
        return False
    writer.write(OK_REPLY)
    await writer.drain()
    writer.close()
    return True


async def _warm_up(port: int) -> None:
    """One tiny exchange so imports and first-use allocations are in the baseline."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /warm HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    await reader.read()
    writer.close()
    await writer.wait_closed()
