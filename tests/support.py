"""Test helpers: real upstream servers and real gateway processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web


@contextlib.contextmanager
def server_dir(prefix: str) -> Iterator[Path]:
    """A private directory for an embedded server's data, outside pytest's basetemp.

    The embedded Postgres runs as an unprivileged user that must traverse the path to its data; pytest
    resets /tmp/pytest-of-<user> to 0700 whenever another pytest session starts, which would pull the
    data directory away from under a running server.
    """
    path = Path(tempfile.mkdtemp(prefix=f"credgate-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Upstream:
    """A real aiohttp upstream that echoes what it received and records every request."""

    port: int
    runner: web.AppRunner
    seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_upstream() -> Upstream:
    seen: list[dict[str, Any]] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        if request.path == "/ws" and request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_json({"headers": dict(request.headers)})
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
            return ws
        body = await request.read()
        record = {
            "method": request.method,
            "path": request.raw_path,
            "headers": list(request.raw_headers),
            "body_bytes": len(body),
        }
        seen.append(record)
        headers = {k: v for k, v in request.headers.items()}
        return web.json_response(
            {"method": request.method, "path": request.raw_path, "headers": headers, "body_bytes": len(body)}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Upstream(port, runner, seen)


@dataclass
class GatewayProcess:
    """A `credgate gateway` supervisor with its workers, started as a real subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return int(self.process.returncode)


def write_config(path: Path, routes: Sequence[Mapping[str, Any]], extra: str = "") -> Path:
    lines = [extra]
    for route in routes:
        lines.append("[[routes]]")
        for key, value in route.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, list):
                lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
            else:
                lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def start_gateway(
    env: Mapping[str, str],
    config: Path,
    tmp: Path,
    *,
    workers: int = 1,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> GatewayProcess:
    """`credgate gateway` on free ports; started again on other ports when one was taken meanwhile (free_port
    can only find a port that is free now: an outgoing connection may take it before the gateway binds)."""
    for attempt in range(3):
        try:
            return _start_gateway(env, config, tmp, workers, extra_env, timeout)
        except _PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class _PortTaken(RuntimeError):
    pass


def _start_gateway(
    env: Mapping[str, str],
    config: Path,
    tmp: Path,
    workers: int,
    extra_env: Mapping[str, str] | None,
    timeout: float,
) -> GatewayProcess:
    port, metrics_port = free_port(), free_port()
    log_path = tmp / f"gateway-{port}.log"
    run_env = dict(env)
    run_env.update({"CREDGATE_GATEWAY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}", "PYTHONUNBUFFERED": "1"})
    run_env.update(extra_env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "admin",
                "gateway",
                "--config",
                str(config),
                "--listen",
                f"127.0.0.1:{port}",
                "--workers",
                str(workers),
            ],
            env=run_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    gw = GatewayProcess(process, port, metrics_port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if "address already in use" in gw.log().lower():
                raise _PortTaken(gw.log())
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gw.log()}")
        if "listening on" in gw.log():
            return gw
        time.sleep(0.05)
    gw.stop()
    raise RuntimeError(f"gateway did not start in {timeout}s:\n{gw.log()}")


@contextlib.asynccontextmanager
async def running_gateway(
    env: Mapping[str, str], config: Path, tmp: Path, **kwargs: Any
) -> AsyncIterator[GatewayProcess]:
    gw = await asyncio.to_thread(start_gateway, env, config, tmp, **kwargs)
    try:
        yield gw
    finally:
        await asyncio.to_thread(gw.stop)


async def cli(env: Mapping[str, str], *args: str) -> str:
    """Run the credgate CLI (with --json) and return its stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "admin",
        *args,
        "--json",
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"credgate {' '.join(args)} failed: {err.decode()}")
    return out.decode()


async def scrape(metrics_port: int) -> str:
    """One Prometheus text page from a metrics listener on 127.0.0.1."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def metric(text: str, name: str) -> float | None:
    """Sum of every sample of `name` in a Prometheus text page; None when there is none."""
    total: float | None = None
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+|NaN)$", line)
        if match:
            total = (total or 0.0) + float(match.group(2))
    return total
