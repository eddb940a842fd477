"""`credgate admin`: serves the admin API and its Prometheus metrics until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time

import asyncpg
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from admin.app import SchemaMissing, create_app
from admin.auth import IDENTITY, REQUEST_ID
from gateway.core.logs import configure_logging
from gateway.core.settings import Settings, parse_listen

logger = logging.getLogger("credgate.admin")

READY_TEXT = "credgate admin listening on"


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON line per request: never a query string, header, cookie or body (they may hold secrets)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        identity = request.get(IDENTITY)
        self.logger.info(json.dumps({
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "request_id": request.get(REQUEST_ID, ""),
            "remote": request.remote or "", "method": request.method, "path": request.path,
            "status": response.status, "ms": round(duration * 1000, 1),
            "principal": identity.name if identity is not None else None,
            "auth": identity.method if identity is not None else None,
        }, separators=(",", ":")))


def access_logger(target: str) -> logging.Logger | None:
    """admin.access_log: "stdout", "off" or a file path."""
    if target == "off":
        return None
    access = logging.getLogger("credgate.admin.access")
    access.propagate = False
    access.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stdout) if target == "stdout" else logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.handlers[:] = [handler]
    return access


def run_admin(settings: Settings, listen: str | None) -> int:
    configure_logging()
    listen = listen or settings.admin.listen
    try:
        host, port = parse_listen(listen)
    except ValueError:
        print(f"credgate: --listen {listen!r} is not HOST:PORT", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(settings, host, port))
    except KeyboardInterrupt:
        return 0


async def _serve(settings: Settings, host: str, port: int) -> int:
    registry = CollectorRegistry()
    access = access_logger(settings.admin.access_log)
    runner = web.AppRunner(create_app(settings, registry), handle_signals=False, access_log=access,
                           access_log_class=JsonAccessLogger)
    metrics_runner: web.AppRunner | None = None
    try:
        try:
            await runner.setup()
        except SchemaMissing as exc:
            print(f"credgate admin: {exc}", file=sys.stderr)
            return 1
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            print(f"credgate admin: cannot reach the database at {settings.database_url}: "
                  f"{exc.__class__.__name__}: {exc}", file=sys.stderr)
            return 1
        try:
            await web.TCPSite(runner, host, port).start()
            if settings.admin.metrics_listen:
                metrics_runner = await _start_metrics(settings.admin.metrics_listen, registry)
        except OSError as exc:
            print(f"credgate admin: cannot listen: {exc.strerror}", file=sys.stderr)
            return 1
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        logger.info("admin API on http://%s:%d/api/v1 (metrics on %s)", shown, bound_port,
                    settings.admin.metrics_listen or "off")
        print(f"{READY_TEXT} http://{shown}:{bound_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()


async def _start_metrics(listen: str, registry: CollectorRegistry) -> web.AppRunner:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    host, port = parse_listen(listen)
    await web.TCPSite(runner, host, port).start()
    return runner
