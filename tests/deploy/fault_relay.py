"""A fault-injecting TCP relay (the kernel here has no netem): pass, delay, stall or reset, switched at run time."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Mode(enum.Enum):
    PASS = "pass"
    DELAY = "delay"  # every chunk towards the server waits `delay` seconds: each round trip takes that much longer
    STALL = "stall"  # connections are accepted and held, nothing is forwarded either way (a partition)
    RESET = "reset"  # every connection, open or new, is answered with a TCP RST


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: SO_LINGER with a zero timeout makes close() abort the connection."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                reset(writer)
        for task in self.tasks:
            task.cancel()


class FaultRelay:
    """Accepts on `listener` and relays each connection to `target` over a socket from `new_socket` (so that
    both ends may live in network namespaces). Mode changes apply at once to open connections too."""

    def __init__(self, listener: socket.socket, target: tuple[str, int], new_socket: Callable[[], socket.socket]):
        self.listener = listener
        self.target = target
        self.new_socket = new_socket
        self.mode = Mode.PASS
        self.delay = 0.0
        self.accepted = 0
        self.chunks_to_server = 0  # with DELAY, each one that is a request is a round trip paid
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> FaultRelay:
        self._server = await asyncio.start_server(self._serve, sock=self.listener)
        return self

    def set_mode(self, mode: Mode, delay_ms: float = 0) -> None:
        self.mode = mode
        self.delay = delay_ms / 1000 if mode is Mode.DELAY else 0.0
        if mode is Mode.STALL:
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode is Mode.RESET:
            for link in list(self._links):
                link.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode is Mode.RESET:
            reset(writer)
            return
        link = _Link(writer)
        task = asyncio.current_task()
        assert task is not None
        link.tasks.add(task)
        self._links.add(link)
        try:
            await self._flowing.wait()  # a stalled relay accepts and then never connects onwards
            sock = self.new_socket()
            try:
                await asyncio.get_running_loop().sock_connect(sock, self.target)
            except BaseException:
                sock.close()
                raise
            server_reader, server_writer = await asyncio.open_connection(sock=sock)
            link.server = server_writer
            await asyncio.gather(self._pipe(link, reader, server_writer, towards_server=True),
                                 self._pipe(link, server_reader, writer, towards_server=False))
        except (OSError, asyncio.CancelledError):
            pass  # a reset of ours, or a peer gone: the link just ends
        finally:
            self._links.discard(link)
            for end in (link.client, link.server):
                if end is not None:
                    end.close()

    async def _pipe(self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *,
                    towards_server: bool) -> None:
        """Forward chunks in order, each not before its due time (read time + delay), and only while flowing;
        an end that breaks takes the whole link down (both ends reset, both directions stopped)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await source.read(65536):
                    self.chunks_to_server += towards_server
                    queue.put_nowait((time.monotonic() + (self.delay if towards_server else 0.0), data))
            finally:
                queue.put_nowait((0.0, b""))

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await queue.get()
                await self._flowing.wait()
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    await reading  # re-raises what ended the reader, if it was an error
                    sink.write_eof()
                    return
                sink.write(data)
                await sink.drain()
        except OSError:
            link.abort()
        finally:
            reading.cancel()
