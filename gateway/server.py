"""`credgate gateway`: a supervisor that runs N worker processes sharing the port (SO_REUSEPORT) and serves
their combined metrics; each worker runs the data plane on uvloop with its own caches and connections."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from gateway.core.logs import configure_logging
from gateway.core.settings import Settings, parse_listen

logger = logging.getLogger("credgate.gateway")

READY_LINE = "credgate-worker-ready"



# --- supervisor -------------------------------------------------------------------------------------------


@dataclass
class Child:
    index: int
    process: subprocess.Popen[bytes]
    started: float
    ready_fd: int


def _reserve_port(host: str, port: int) -> tuple[int, socket.socket | None]:
    """A concrete port for every worker; port 0 picks one. Also fails fast, clearly, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"credgate: cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock.getsockname()[1], sock


def run_gateway(
    settings: Settings, listen: str | None = None, workers: int | None = None, config_path: str | None = None
) -> int:
    configure_logging()
    listen = listen or settings.gateway.listen
    try:
        host, port = parse_listen(listen)
    except ValueError:
        print(f"credgate: --listen {listen!r} is not HOST:PORT", file=sys.stderr)
        return 2
    count = workers or settings.gateway.workers
    if count < 1:
        print("credgate: --workers must be at least 1", file=sys.stderr)
        return 2
    port, placeholder = _reserve_port(host, port)
    metrics_dir = tempfile.mkdtemp(prefix="credgate-metrics-")
    env = dict(os.environ)
    env.update({"PROMETHEUS_MULTIPROC_DIR": metrics_dir, "CREDGATE_GATEWAY_LISTEN": f"{host}:{port}"})
    if config_path:
        env["CREDGATE_CONFIG"] = config_path
    metrics_server = _start_metrics(settings.gateway.metrics_listen, metrics_dir)
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children = [_spawn(i, env) for i in range(count)]
    shown = f"[{host}]" if ":" in host else host
    try:
        if not _wait_ready(children, lambda: stopping):
            return 1
        if placeholder is not None:
            placeholder.close()
        logger.info(
            "credgate gateway listening on http://%s:%d (%d worker%s)", shown, port, count, "s" if count > 1 else ""
        )
        print(f"credgate gateway listening on http://{shown}:{port}", flush=True)
        if settings.forward_auth.listen:
            logger.info("credgate forward-auth listening on http://%s (trusted: %s)", settings.forward_auth.listen,
                        ", ".join(settings.forward_auth.trusted_proxies))
        restarts: list[float] = []
        while not stopping:
            time.sleep(0.2)
            for i, child in enumerate(children):
                if child.process.poll() is not None and not stopping:
                    restarts = [t for t in restarts if time.monotonic() - t < 60] + [time.monotonic()]
                    if len(restarts) > 10:
                        logger.error("workers keep dying; giving up")
                        return 1
                    logger.error("worker %d exited with %s; restarting", i, child.process.returncode)
                    _mark_dead(child.process.pid, metrics_dir)
                    children[i] = _spawn(i, env)
                    _wait_ready([children[i]], lambda: stopping)
        return 0
    finally:
        if placeholder is not None:
            placeholder.close()
        _stop_children(children, settings.gateway.shutdown_timeout + 5)
        if metrics_server is not None:
            metrics_server.shutdown()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _spawn(index: int, env: dict[str, str]) -> Child:
    """Start one worker; it inherits stdout (its access log) and reports readiness on a private pipe."""
    read_fd, write_fd = os.pipe()
    child_env = dict(env, CREDGATE_READY_FD=str(write_fd))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.server", "--worker", str(index)],
            env=child_env,
            stdin=subprocess.DEVNULL,
            pass_fds=(write_fd,),
        )
    finally:
        os.close(write_fd)
    return Child(index, process, time.monotonic(), read_fd)


def _wait_ready(children: list[Child], stopping: Any) -> bool:
    ok = True
    for child in children:
        with os.fdopen(child.ready_fd, "rb") as ready:
            line = ready.readline()
        if not line.startswith(READY_LINE.encode()):
            logger.error("worker %d failed to start (exit %s)", child.index, child.process.wait())
            ok = False
    return ok and not stopping()


def _stop_children(children: list[Child], timeout: float) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("worker %d did not stop in time; killing it", child.index)
            child.process.kill()
            child.process.wait()


def _mark_dead(pid: int, metrics_dir: str) -> None:
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, metrics_dir)


def _start_metrics(listen: str, metrics_dir: str) -> Any:
    if not listen:
        return None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)
    host, port = parse_listen(listen)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise SystemExit(f"credgate: cannot serve metrics on {listen}: {exc.strerror}") from None
    return server


# --- worker -----------------------------------------------------------------------------------------------


def worker_main() -> int:
    configure_logging()
    from gateway.core.settings import SettingsError, exit_on_error, load_settings

    try:
        settings = load_settings(None)
    except SettingsError as exc:
        exit_on_error(exc)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))


async def serve(settings: Settings) -> int:
    from gateway.runtime import running_worker

    async with running_worker(settings):
        # Everything allocated so far lives as long as the worker: keep it out of the collector's sight, and
        # collect young objects less often (a request allocates a few dozen short-lived objects).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready_fd = os.environ.pop("CREDGATE_READY_FD", None)
        if ready_fd is not None:
            with os.fdopen(int(ready_fd), "wb") as ready:
                ready.write(READY_LINE.encode() + b"\n")
        await stop.wait()
    return 0

if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        raise SystemExit(worker_main())
    raise SystemExit("usage: credgate gateway")
